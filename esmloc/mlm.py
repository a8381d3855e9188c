"""Masked-language-model (pre)training, ESM-2's recipe: the proteins, the masking, the trainer and the outputs of
an esmloc-pretrain run (the command itself: esmloc.commands.pretrain).

- Proteins: the distinct sequences of the input files (`prepare_sequences`), a held-out set chosen by a seeded hash.
- Masking (`ResidueMasking`, `MaskedProteinDataset`): 15% of residues selected; of those 80% `<mask>`, 10% a random
  standard amino acid, 10% unchanged; a random window of at most `max_residues` per protein and epoch, all drawn
  from generators seeded per (seed, epoch, protein), so a resumed run replays the uninterrupted one.
- Metrics (`token_scores`, `compute_metrics`): held-out perplexity and masked-token accuracy.
- Outputs: the perplexity curve (`plot_perplexity`) and the model card (`write_model_card`, rendered from the
  template `pretrain_card.md` with huggingface_hub's `ModelCard.from_template`).
"""

import hashlib
import logging
import math
import time
from dataclasses import dataclass
from importlib import resources
from pathlib import Path

import numpy as np
import torch
from transformers import Trainer, TrainerCallback

from configuration_esmloc import backbone_family
from esmloc.errors import InputError
from esmloc.sequences import read_sequences


logger = logging.getLogger("esmloc.mlm")

# Random replacements draw from these: a protein never holds <cls>, <pad>, <mask>, gaps or X/B/U/Z/O at random.
STANDARD_AMINO_ACIDS = "ACDEFGHIKLMNPQRSTVWY"
CURVE_FILE = "perplexity_curve.png"
CARD_FILE = "README.md"
CARD_TEMPLATE = "pretrain_card.md"
INITIAL_EVAL = "initial_eval"  # save_metrics split name of the evaluation before training


# --- proteins -----------------------------------------------------------------------------------------------------


def read_unique_sequences(paths) -> tuple[list[str], dict]:
    """The distinct sequences of all `paths` (FASTA or CSV, validated by `esmloc.sequences.read_sequences`), in the order
    first seen, and per file how many records were read and how many were new."""
    seen, sequences, files = set(), [], []
    for path in paths:
        if not Path(path).is_file():
            raise InputError(f"{path}: no such file")
        records = new = 0
        for record in read_sequences(path):  # a bad record raises DataValidationError: file, line, ACC
            records += 1
            if record.sequence not in seen:
                seen.add(record.sequence)
                sequences.append(record.sequence)
                new += 1
        files.append({"file": Path(path).name, "records": records, "new_sequences": new})
    return sequences, {"files": files}


def _hash_rank(seed: int, sequence: str) -> str:
    return hashlib.sha256(f"{seed}:{sequence}".encode()).hexdigest()


def hold_out(sequences: list[str], fraction: float, limit: int | None, seed: int) -> tuple[list[str], list[str]]:
    """(training, held-out): the held-out proteins are those first in a seeded hash order, so that the choice depends
    only on the sequences and the seed, not on file order."""
    count = round(fraction * len(sequences))
    if fraction > 0 and len(sequences) > 1:
        count = max(count, 1)
    if limit is not None:
        count = min(count, limit)
    held = set(sorted(sequences, key=lambda s: _hash_rank(seed, s))[:count])
    return [s for s in sequences if s not in held], [s for s in sequences if s in held]


def prepare_sequences(data_args, seed: int) -> tuple[list[str], list[str], dict]:
    """(training proteins, held-out proteins, a summary of both for the record)."""
    train, summary = read_unique_sequences(data_args.train_files)
    if data_args.validation_files:
        held_out, validation_summary = read_unique_sequences(data_args.validation_files)
        if data_args.max_eval_proteins is not None:
            held_out = held_out[:data_args.max_eval_proteins]
        held = set(held_out)
        excluded = sum(sequence in held for sequence in train)
        train = [sequence for sequence in train if sequence not in held]
        summary.update(validation_files=validation_summary["files"], excluded_from_training_as_held_out=excluded)
    else:
        train, held_out = hold_out(train, data_args.validation_fraction, data_args.max_eval_proteins, seed)
    if not train:
        raise InputError("no training proteins left (all of them are held out)")
    for name, sequences in (("train", train), ("held_out", held_out)):
        lengths = np.array([len(s) for s in sequences]) if sequences else np.zeros(1, dtype=int)
        summary[name] = {
            "proteins": len(sequences),
            "residues": int(lengths.sum()),
            "median_length": float(np.median(lengths)),
            "cropped": int((lengths > data_args.max_residues).sum()),
            "sha256": hashlib.sha256("\n".join(sequences).encode()).hexdigest(),
        }
    return train, held_out, summary


# --- masking -----------------------------------------------------------------------------------------------------


def crop_window(sequence: str, max_residues: int, rng: np.random.Generator) -> str:
    """A window of at most `max_residues` residues at a random position (uniform over all start positions)."""
    if len(sequence) <= max_residues:
        return sequence
    start = int(rng.integers(len(sequence) - max_residues + 1))
    return sequence[start:start + max_residues]


@dataclass
class ResidueMasking:
    """ESM-2's masking of one tokenised protein: `mlm_probability` of its non-special tokens are selected; each
    selected one becomes `<mask>` (`mask_replace_prob`), one of the 20 standard amino acids (`random_replace_prob`)
    or stays as it is (the rest). Labels hold the original token where selected, -100 elsewhere.

    Why not transformers' `DataCollatorForLanguageModeling` (same parameters): it draws its random replacements
    from the whole vocabulary (`torch.randint(len(tokenizer))`), so a tenth of ESM-2's "random residues" would be
    `<cls>`, `<pad>`, `<eos>`, `<unk>`, `<mask>`, `<null_1>`, gaps or X/B/U/Z/O; and it masks with the global random
    state at collation time, which `Trainer` restores only after collating the first batch of a resumed epoch, so a
    resumed run would not mask as the uninterrupted one. Here the masks come from the generator each protein is
    given (see `MaskedProteinDataset`), and padding is added afterwards by `DataCollatorForTokenClassification`.
    """

    tokenizer: object
    mlm_probability: float = 0.15
    mask_replace_prob: float = 0.8
    random_replace_prob: float = 0.1

    def __post_init__(self):
        self.residue_ids = np.array(self.tokenizer.convert_tokens_to_ids(list(STANDARD_AMINO_ACIDS)))
        self.special_ids = np.array(sorted(set(self.tokenizer.all_special_ids)))

    def __call__(self, input_ids, rng: np.random.Generator) -> tuple[list[int], list[int]]:
        """(masked input ids, labels) of one protein."""
        ids = np.asarray(input_ids)
        selected = (rng.random(ids.shape) < self.mlm_probability) & ~np.isin(ids, self.special_ids)
        choice = rng.random(ids.shape)
        to_mask = selected & (choice < self.mask_replace_prob)
        to_random = selected & ~to_mask & (choice < self.mask_replace_prob + self.random_replace_prob)
        masked = ids.copy()
        masked[to_mask] = self.tokenizer.mask_token_id
        masked[to_random] = self.residue_ids[rng.integers(len(self.residue_ids), size=int(to_random.sum()))]
        return masked.tolist(), np.where(selected, ids, -100).tolist()


class MaskedProteinDataset(torch.utils.data.Dataset):
    """Proteins cropped to a random window (at most `max_residues`), tokenised and masked, all drawn from a generator
    seeded with (seed, epoch, index): new windows and masks every epoch, the same ones in a resumed run, whatever
    the order proteins are drawn in and whatever else uses the global random state. `EpochCallback` tells it the
    epoch; `fixed()` gives the held-out set, cropped and masked once."""

    def __init__(self, sequences: list[str], tokenizer, masking: ResidueMasking, max_residues: int, seed: int):
        self.sequences, self.tokenizer, self.masking = sequences, tokenizer, masking
        self.max_residues, self.seed, self.epoch = max_residues, seed, 0

    def set_epoch(self, epoch: int):
        self.epoch = epoch

    def __len__(self):
        return len(self.sequences)

    def __getitem__(self, index):
        rng = np.random.default_rng([self.seed, self.epoch, index])
        input_ids = self.tokenizer(crop_window(self.sequences[index], self.max_residues, rng))["input_ids"]
        masked, labels = self.masking(input_ids, rng)
        return {"input_ids": masked, "labels": labels}

    def fixed(self) -> list[dict]:
        return [self[index] for index in range(len(self))]


class EpochCallback(TrainerCallback):
    """Sets the training dataset's epoch at the start of every epoch (also the one a resumed run starts in)."""

    def __init__(self, dataset: MaskedProteinDataset):
        self.dataset = dataset

    def on_epoch_begin(self, args, state, control, **kwargs):
        self.dataset.set_epoch(math.floor(state.epoch + 1e-9))


class TimeLimitCallback(TrainerCallback):
    """Stops training (with a checkpoint) once `minutes` of training have passed."""

    def __init__(self, minutes: float):
        self.seconds, self.started = minutes * 60, None

    def on_train_begin(self, args, state, control, **kwargs):
        self.started = time.monotonic()

    def on_step_end(self, args, state, control, **kwargs):
        if time.monotonic() - self.started >= self.seconds:
            logger.info("--max_train_minutes reached at step %d: stopping", state.global_step)
            control.should_training_stop = control.should_save = True


class ResumingTrainer(Trainer):
    """`Trainer` whose resume loads the checkpoint's weights the way `from_pretrained` does.

    transformers 5.24 saves modules named `LayerNorm` (ESM's, BERT's) under the legacy names `LayerNorm.gamma` /
    `LayerNorm.beta`, which only `from_pretrained` renames back; `Trainer._load_from_checkpoint` loads the file with
    `load_state_dict(strict=False)`, misses them (a warning at most) and a resumed run silently continues with the
    LayerNorm weights of the freshly built model.
    """

    def _load_from_checkpoint(self, resume_from_checkpoint, model=None):
        target = self.accelerator.unwrap_model(model if model is not None else self.model)
        saved = type(target).from_pretrained(resume_from_checkpoint,
                                             attn_implementation=target.config._attn_implementation)
        target.load_state_dict(saved.state_dict())


# --- metrics and outputs -----------------------------------------------------------------------------------------


def token_scores(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Per token: (negative log-likelihood of the label, 1.0 if the top prediction is the label); used as
    `preprocess_logits_for_metrics`, so that evaluation keeps two numbers per token instead of the vocabulary's
    logits. Unlabelled tokens get 0 and are ignored by `compute_metrics`."""
    nll = torch.nn.functional.cross_entropy(logits.transpose(1, 2).float(), labels, ignore_index=-100,
                                            reduction="none")
    return torch.stack([nll, (logits.argmax(-1) == labels).float()], dim=-1)


def compute_metrics(evaluation) -> dict:
    """Held-out perplexity (exp of the mean cross-entropy over all masked tokens, not a mean of batch means) and
    masked-token accuracy."""
    scores, labels = evaluation.predictions, evaluation.label_ids
    scored = labels != -100
    nll, correct = scores[..., 0][scored], scores[..., 1][scored]
    mean_nll = float(np.mean(nll, dtype=np.float64))
    return {"perplexity": math.exp(mean_nll), "masked_accuracy": float(np.mean(correct)), "cross_entropy": mean_nll,
            "masked_tokens": int(scored.sum())}


def plot_perplexity(log_history: list[dict], initial: dict | None, path: Path) -> Path:
    """Held-out perplexity per evaluation (and exp of the logged training loss) against the training step."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    evaluations = [(0, initial["initial_eval_perplexity"])] if initial else []
    evaluations += [(e["step"], e["eval_perplexity"]) for e in log_history if "eval_perplexity" in e]
    training = [(e["step"], math.exp(min(e["loss"], 50))) for e in log_history if "loss" in e]
    figure, axis = plt.subplots(figsize=(6, 4))
    if training:
        axis.plot(*zip(*training), color="0.6", linewidth=1, label="training (exp of the logged loss)")
    if evaluations:
        axis.plot(*zip(*evaluations), marker="o", color="C0", label="held-out")
    axis.axhline(len(STANDARD_AMINO_ACIDS), color="C3", linestyle=":", linewidth=1,
                 label="uniform guess over 20 amino acids")
    axis.set_xlabel("training step")
    axis.set_ylabel("perplexity of masked residues")
    axis.set_title("Masked-language-model perplexity")
    axis.legend()
    figure.tight_layout()
    figure.savefig(path, dpi=120)
    plt.close(figure)
    return path


def write_model_card(output_dir: Path, model_args, data_args, training_args, model_config, data_summary: dict,
                     initial: dict | None, final: dict | None, train_metrics: dict) -> Path:
    """The run's model card (README.md), from the template `pretrain_card.md`: data, masking, optimisation, the
    held-out results before and after training, the curve and how to use the model."""
    from huggingface_hub import ModelCard, ModelCardData

    base = model_args.model_name_or_path
    hub_base = base if base and not Path(base).expanduser().exists() and base.count("/") == 1 else None
    card_data = ModelCardData(library_name="transformers", pipeline_tag="fill-mask", base_model=hub_base,
                              tags=["esm", backbone_family(model_config), "protein", "protein-language-model",
                                    "fill-mask", "esmloc"])

    def figure(metrics, prefix, key):
        value = (metrics or {}).get(f"{prefix}_{key}")
        return f"{value:.3f}" if isinstance(value, (int, float)) else "n/a"

    card = ModelCard.from_template(
        card_data, template_path=str(resources.files("esmloc").joinpath(CARD_TEMPLATE)),
        name=output_dir.resolve().name, config=model_config, base=base, from_scratch=model_args.from_scratch,
        config_overrides=model_args.config_overrides, files=data_summary["files"], train=data_summary["train"],
        held=data_summary["held_out"], data=data_args, training=training_args,
        schedule=getattr(training_args.lr_scheduler_type, "value", training_args.lr_scheduler_type),
        batch=train_metrics.get("total_batch_size", "n/a"), steps=train_metrics.get("global_step", "n/a"),
        minutes=f"{train_metrics.get('train_runtime', float('nan')) / 60:.1f}",
        before={key: figure(initial, INITIAL_EVAL, key) for key in ("perplexity", "masked_accuracy")},
        after={key: figure(final, "eval", key) for key in ("perplexity", "masked_accuracy")},
        curve=CURVE_FILE)
    path = output_dir / CARD_FILE
    card.save(path)
    return path
