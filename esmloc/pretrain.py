"""Masked-language-model (pre)training of ESM-2 on your own proteins: from scratch or continued from a checkpoint.

    esmloc-pretrain --from_scratch esm2_t6_8M --train_files proteome.fasta more.csv --output_dir esm_mine/
    esmloc-pretrain --model_name_or_path facebook/esm2_t6_8M_UR50D --train_files family.fasta --output_dir adapted/
    torchrun --nproc_per_node N -m esmloc.pretrain ...   # or accelerate launch -m esmloc.pretrain ...: same arguments
    python -m esmloc.pretrain args.json                  # or args.yaml

ESM-2's recipe: 15% of the residues of every protein are selected; of those 80% become `<mask>`, 10% a random
standard amino acid, 10% stay as they are; the loss is the cross-entropy on the selected residues. Proteins longer
than `--max_residues` are cropped to a window at a random position, a different one each epoch (seeded, so a resumed
run sees the same windows). Identical sequences are used once, however many files or records hold them.

A held-out set (`--validation_files`, or a `--validation_fraction` of the proteins chosen by a seeded hash of each
sequence) is cropped and masked once, so that every evaluation scores the same positions; its perplexity and
masked-token accuracy are reported before training and at every evaluation.

The output directory is a standard `EsmForMaskedLM` checkpoint (config.json, model.safetensors) with the esmloc
tokenizer, a model card (README.md) and the perplexity curve (perplexity_curve.png). It loads offline with
`transformers.EsmForMaskedLM.from_pretrained(DIR)`, `EsmForLocalization.from_esm(DIR)` and
`train.py --model_name_or_path DIR`.

A rerun into the same `--output_dir` resumes from its last checkpoint, or leaves a finished run alone, as train.py
does and through the same code (`esmloc.runs`), but only the same run: `esmloc_run.json` records what defines it
(data content, model, masking, optimisation, length) and a rerun with anything different, or an explicit
`--resume_from_checkpoint` of another run, is refused with what differs (exit status 2); `--overwrite_output_dir`
starts afresh.

Longer than most modules (about 640 lines) for one job, a pretraining run: its arguments, the masking recipe and its
dataset (which the standard collator cannot give: see ResidueMasking), the run check, and the outputs of the run
(curve and card) belong to this command only.
"""

import hashlib
import json
import logging
import math
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from transformers import (
    DataCollatorForTokenClassification,
    EsmConfig,
    EsmForMaskedLM,
    Trainer,
    TrainerCallback,
    TrainingArguments,
    set_seed,
)
from configuration_esmloc import ESM2_ARCHITECTURES
from esmloc import cli, runs, train
from esmloc.cli import EnvironmentProblem, InputError
from esmloc.sequences import read_sequences
from tokenization_esmloc import EsmLocTokenizer


logger = logging.getLogger("esmloc.pretrain")

# Random replacements draw from these: a protein never holds <cls>, <pad>, <mask>, gaps or X/B/U/Z/O at random.
STANDARD_AMINO_ACIDS = "ACDEFGHIKLMNPQRSTVWY"
DATA_SUMMARY_FILE = "pretrain_data.json"
CURVE_FILE = "perplexity_curve.png"
CARD_FILE = "README.md"
INITIAL_EVAL = "initial_eval"  # save_metrics split name of the evaluation before training


@dataclass
class PretrainModelArguments:
    model_name_or_path: str | None = field(
        default=None,
        metadata={"help": "Continue pretraining this ESM-2 checkpoint: a hub id (honours HF_ENDPOINT) or a local "
                  "directory (a clone, or an earlier esmloc-pretrain output)."},
    )
    from_scratch: str | None = field(
        default=None,
        metadata={"help": "Start from random weights of a named ESM-2 architecture.",
                  "choices": list(ESM2_ARCHITECTURES)},
    )
    config_overrides: str | None = field(
        default=None,
        metadata={"help": "With --from_scratch: EsmConfig attributes to change, as in transformers' run_mlm.py, e.g. "
                  "'num_hidden_layers=4,hidden_size=160,num_attention_heads=8,intermediate_size=640'."},
    )
    attn_implementation: str = field(default="sdpa", metadata={"help": "sdpa (fast) or eager."})

    def __post_init__(self):
        if (self.model_name_or_path is None) == (self.from_scratch is None):
            raise ValueError("give exactly one of --model_name_or_path (an ESM-2 checkpoint) or --from_scratch")
        if self.config_overrides and not self.from_scratch:
            raise ValueError("--config_overrides needs --from_scratch")


@dataclass
class PretrainDataArguments:
    train_files: list[str] = field(
        default_factory=list,
        metadata={"help": "FASTA (.fasta/.fa/.faa/.fas/.fsa, optionally .gz) or CSV/TSV files with ACC and Sequence "
                  "columns; any number. Identical sequences are used once."},
    )
    validation_files: list[str] | None = field(
        default=None,
        metadata={"help": "Held-out proteins for perplexity; they are removed from the training proteins. Default: "
                  "--validation_fraction of the training proteins."},
    )
    validation_fraction: float = field(
        default=0.05, metadata={"help": "Without --validation_files: this share of the proteins is held out."}
    )
    max_eval_proteins: int | None = field(
        default=1000, metadata={"help": "At most this many held-out proteins (evaluation time); the rest train."}
    )
    max_residues: int = field(
        default=1022, metadata={"help": "Longer proteins are cropped to a window at a random position."}
    )
    mlm_probability: float = field(default=0.15, metadata={"help": "Share of residues selected for the loss."})
    mask_replace_prob: float = field(default=0.8, metadata={"help": "Share of the selected ones set to <mask>."})
    random_replace_prob: float = field(
        default=0.1, metadata={"help": "Share of the selected ones set to a random standard amino acid; the rest "
                               "stay unchanged."}
    )
    max_train_minutes: float | None = field(
        default=None,
        metadata={"help": "Stop training (saving a checkpoint, then evaluating and saving the model as usual) once "
                  "this many minutes of training have passed: a time budget. The learning-rate schedule still "
                  "follows --max_steps / --num_train_epochs."},
    )

    def __post_init__(self):
        if not self.train_files:
            raise ValueError("--train_files: give at least one FASTA or CSV file of proteins")
        if not 0 < self.mlm_probability < 1:
            raise ValueError("--mlm_probability must lie between 0 and 1")
        if self.mask_replace_prob + self.random_replace_prob > 1:
            raise ValueError("--mask_replace_prob + --random_replace_prob must not exceed 1")
        if not 0 <= self.validation_fraction < 1:
            raise ValueError("--validation_fraction must lie in [0, 1)")


@dataclass
class PretrainingArguments(runs.OverwriteArguments, TrainingArguments):
    """`TrainingArguments` with ESM-2's optimiser settings (Adam beta2 0.98, weight decay 0.01, learning rate 4e-4
    with warm-up and linear decay) and defaults for this job: evaluate, save and log by steps, group batches by
    length, report to nobody."""

    learning_rate: float = field(default=4e-4)
    weight_decay: float = field(default=0.01)
    adam_beta2: float = field(default=0.98)
    warmup_steps: float = field(default=0.05)
    num_train_epochs: float = field(default=10.0)
    per_device_train_batch_size: int = field(default=16)
    per_device_eval_batch_size: int = field(default=32)
    eval_strategy: str = field(default="steps")
    eval_steps: float | None = field(default=500)
    save_strategy: str = field(default="steps")
    save_steps: float = field(default=500)
    logging_strategy: str = field(default="steps")
    logging_steps: float = field(default=50)
    save_total_limit: int | None = field(default=2)
    train_sampling_strategy: str = field(default="group_by_length")
    report_to: None | str | list[str] = field(default="none")
    dataloader_pin_memory: bool = field(default=torch.cuda.is_available())

    def __post_init__(self):
        self.ddp_backend = self.ddp_backend or cli.cpu_ddp_backend()
        super().__post_init__()


def parse_arguments(argv=None) -> tuple[PretrainModelArguments, PretrainDataArguments, PretrainingArguments]:
    return train.parse_arguments(argv, (PretrainModelArguments, PretrainDataArguments, PretrainingArguments))


# ----------------------------------------------------------------------------------------------------------------
# Proteins
# ----------------------------------------------------------------------------------------------------------------


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


def prepare_sequences(data_args: PretrainDataArguments, seed: int) -> tuple[list[str], list[str], dict]:
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


# ----------------------------------------------------------------------------------------------------------------
# Metrics
# ----------------------------------------------------------------------------------------------------------------


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


# ----------------------------------------------------------------------------------------------------------------
# Model, run identity
# ----------------------------------------------------------------------------------------------------------------


def parse_config_overrides(text: str | None) -> dict:
    """'a=1,b=0.5,c=gelu' -> {"a": 1, "b": 0.5, "c": "gelu"}."""
    overrides = {}
    for item in filter(None, (text or "").split(",")):
        key, separator, value = item.partition("=")
        if not separator:
            raise InputError(f"--config_overrides: {item!r} is not key=value")
        try:
            overrides[key.strip()] = json.loads(value)
        except json.JSONDecodeError:
            overrides[key.strip()] = value.strip()
    return overrides


def build_model(model_args: PretrainModelArguments) -> EsmForMaskedLM:
    if model_args.from_scratch:
        config = EsmConfig(**{**ESM2_ARCHITECTURES[model_args.from_scratch],
                              **parse_config_overrides(model_args.config_overrides)})
        config._attn_implementation = model_args.attn_implementation
        return EsmForMaskedLM(config)
    name = model_args.model_name_or_path
    local = Path(name).expanduser()
    if not local.is_dir() and (name.startswith((".", "/", "~")) or name.count("/") > 1):
        raise InputError(f"--model_name_or_path {name}: no such directory")
    try:
        return EsmForMaskedLM.from_pretrained(name, attn_implementation=model_args.attn_implementation)
    except OSError as error:
        raise EnvironmentProblem(train.hub_unreachable_message(name, error)) from error


def run_identity(model_args, data_args, training_args, data_summary: dict) -> dict:
    """What defines a pretraining run (`esmloc.runs.identity`): a rerun into the same --output_dir resumes only when
    all of it is equal. Unlike train.py's, the length is part of it: the learning-rate schedule follows it."""
    return runs.identity({
        "model": model_args.from_scratch or model_args.model_name_or_path,
        "config_overrides": parse_config_overrides(model_args.config_overrides),
        "train_sequences": {key: data_summary["train"][key] for key in ("proteins", "sha256")},
        "held_out_sequences": {key: data_summary["held_out"][key] for key in ("proteins", "sha256")},
        "max_residues": data_args.max_residues,
        "masking": [data_args.mlm_probability, data_args.mask_replace_prob, data_args.random_replace_prob],
        "seed": training_args.seed,
        "optimiser": {name: getattr(training_args, name) for name in (
            "learning_rate", "weight_decay", "adam_beta1", "adam_beta2", "warmup_steps", "lr_scheduler_type",
            "num_train_epochs", "max_steps", "gradient_accumulation_steps")},
        "total_batch_size": training_args.per_device_train_batch_size * training_args.gradient_accumulation_steps
        * training_args.world_size,
    })


# ----------------------------------------------------------------------------------------------------------------
# Outputs: curve and card
# ----------------------------------------------------------------------------------------------------------------


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
    from huggingface_hub import ModelCard, ModelCardData

    base = model_args.model_name_or_path
    hub_base = base if base and not Path(base).expanduser().exists() and base.count("/") == 1 else None
    origin = (f"continued from `{base}`" if base else
              f"trained from scratch (random initial weights, ESM-2 `{model_args.from_scratch}` architecture"
              + (f" with {model_args.config_overrides}" if model_args.config_overrides else "") + ")")
    card_data = ModelCardData(library_name="transformers", pipeline_tag="fill-mask", base_model=hub_base,
                              tags=["esm", "esm2", "protein", "protein-language-model", "fill-mask", "esmloc"])
    files = "\n".join(f"| {f['file']} | {f['records']} | {f['new_sequences']} |" for f in data_summary["files"])
    train, held = data_summary["train"], data_summary["held_out"]

    def figure(metrics, prefix, key, spec=".3f"):
        value = (metrics or {}).get(f"{prefix}_{key}")
        return format(value, spec) if isinstance(value, (int, float)) else "n/a"

    body = f"""
# {output_dir.resolve().name}: an ESM-2 masked language model

An `EsmForMaskedLM` ({model_config.num_hidden_layers} layers, hidden size {model_config.hidden_size},
{model_config.num_attention_heads} heads) {origin}, pretrained with `esmloc-pretrain` on the proteins below.

## Data

| file | records | distinct new sequences |
| --- | --- | --- |
{files}

Training: {train['proteins']} distinct proteins, {train['residues']:,} residues (median length
{train['median_length']:g}; {train['cropped']} longer than {data_args.max_residues} residues, cropped to a random
window each epoch). Held out for perplexity: {held['proteins']} proteins, cropped and masked once.

## Training

ESM-2's masking: {data_args.mlm_probability:.0%} of residues selected; of those {data_args.mask_replace_prob:.0%}
`<mask>`, {data_args.random_replace_prob:.0%} a random standard amino acid, the rest unchanged. Learning rate
{training_args.learning_rate:g} (warm-up {training_args.warmup_steps:g}, {getattr(training_args.lr_scheduler_type, 'value', training_args.lr_scheduler_type)} schedule),
Adam betas ({training_args.adam_beta1:g}, {training_args.adam_beta2:g}), weight decay {training_args.weight_decay:g},
{train_metrics.get('total_batch_size', 'n/a')} proteins per step, {train_metrics.get('global_step', 'n/a')} steps,
{train_metrics.get('train_runtime', float('nan')) / 60:.1f} min of training, seed {training_args.seed}.

## Held-out results

| | perplexity | masked-token accuracy |
| --- | --- | --- |
| before training | {figure(initial, INITIAL_EVAL, 'perplexity')} | {figure(initial, INITIAL_EVAL, 'masked_accuracy')} |
| after training | {figure(final, 'eval', 'perplexity')} | {figure(final, 'eval', 'masked_accuracy')} |

For scale: a uniform guess over the 20 amino acids scores 20, a guess by amino-acid frequency about 18; the
published ESM-2 models score roughly 10 (8M parameters) down to about 6 (billions) on UniRef50 (Lin et al. 2023).

![perplexity curve]({CURVE_FILE})

## Use

```python
from transformers import AutoTokenizer, EsmForMaskedLM
model = EsmForMaskedLM.from_pretrained("{output_dir.resolve().name}")
tokenizer = AutoTokenizer.from_pretrained("{output_dir.resolve().name}", trust_remote_code=True)
```

Fine-tune it for localisation: `python train.py --model_name_or_path {output_dir.resolve().name} --train_file
proteins.csv --output_dir out/`, or `EsmForLocalization.from_esm("{output_dir.resolve().name}")`.
"""
    card = ModelCard(f"---\n{card_data.to_yaml()}\n---\n{body}")
    path = output_dir / CARD_FILE
    card.save(path)
    return path


# ----------------------------------------------------------------------------------------------------------------
# Main
# ----------------------------------------------------------------------------------------------------------------


def pretrain(argv=None) -> int:
    model_args, data_args, training_args = parse_arguments(argv)
    cli.setup_logging(logging.INFO if training_args.should_log else logging.WARNING)
    set_seed(training_args.seed)
    output_dir = Path(training_args.output_dir)

    # Data
    train_sequences, held_out, data_summary = prepare_sequences(data_args, training_args.seed)
    logger.info("Proteins: %d for training, %d held out (%s)", len(train_sequences), len(held_out),
                ", ".join(f"{f['file']}: {f['records']} records, {f['new_sequences']} new" for f in data_summary["files"]))
    identity = run_identity(model_args, data_args, training_args, data_summary)
    length = runs.training_length(training_args)
    with training_args.main_process_first(desc="checking --output_dir"):
        last_checkpoint = runs.plan_resume(output_dir, identity, length, training_args.resume_from_checkpoint,
                                           overwrite=training_args.overwrite_output_dir)
    if last_checkpoint == runs.FINISHED:
        logger.info("This pretraining run has already finished in %s (same data, settings and length): its model "
                    "is there, unchanged. Nothing to do; --overwrite_output_dir trains it again.", output_dir)
        return 0
    if last_checkpoint:
        logger.info("Resuming from %s (the same run: data, settings and seed match)", last_checkpoint)

    # Model, tokenizer, data pipeline
    model = build_model(model_args)
    tokenizer = EsmLocTokenizer(max_residues=data_args.max_residues)
    masking = ResidueMasking(tokenizer, mlm_probability=data_args.mlm_probability,
                             mask_replace_prob=data_args.mask_replace_prob,
                             random_replace_prob=data_args.random_replace_prob)
    train_dataset = MaskedProteinDataset(train_sequences, tokenizer, masking, data_args.max_residues,
                                         training_args.seed)
    # Its own seed stream (an epoch number training never reaches), cropped and masked once: every evaluation scores the same positions.
    eval_dataset = None
    if held_out:
        eval_dataset = MaskedProteinDataset(held_out, tokenizer, masking, data_args.max_residues, training_args.seed)
        eval_dataset.set_epoch(2**32 - 1)
        eval_dataset = eval_dataset.fixed()
    if eval_dataset is None:
        training_args.eval_strategy = "no"
    parameters = sum(p.numel() for p in model.parameters())
    logger.info("EsmForMaskedLM: %d layers, hidden size %d, %s parameters", model.config.num_hidden_layers,
                model.config.hidden_size, f"{parameters:,}")

    callbacks = [EpochCallback(train_dataset), runs.RunRecordCallback(identity)]
    if data_args.max_train_minutes:
        callbacks.append(TimeLimitCallback(data_args.max_train_minutes))
    trainer = ResumingTrainer(
        model=model,
        args=training_args,
        train_dataset=train_dataset,
        eval_dataset=eval_dataset,
        processing_class=tokenizer,
        data_collator=DataCollatorForTokenClassification(tokenizer),
        compute_metrics=compute_metrics,
        preprocess_logits_for_metrics=token_scores,
        callbacks=callbacks,
    )

    initial_path = output_dir / f"{INITIAL_EVAL}_results.json"
    if eval_dataset is not None and not last_checkpoint:
        # Without touching the random state the training order is drawn from (a data loader draws a seed from it), so
        # that a run resumed from a checkpoint (which skips this) replays the uninterrupted run exactly.
        with torch.random.fork_rng():
            initial = trainer.evaluate(metric_key_prefix=INITIAL_EVAL)
        trainer.log_metrics(INITIAL_EVAL, initial)
        trainer.save_metrics(INITIAL_EVAL, initial, combined=False)
    else:
        # A resumed run reports the figures its first start measured (written by that start, complete).
        initial = json.loads(initial_path.read_text()) if initial_path.is_file() else None

    if training_args.should_save:
        runs.write_record(output_dir, identity, finished=False)
    train_result = trainer.train(resume_from_checkpoint=last_checkpoint)
    train_metrics = {**train_result.metrics, "global_step": trainer.state.global_step,
                     "total_batch_size": training_args.per_device_train_batch_size
                     * training_args.gradient_accumulation_steps * training_args.world_size}
    trainer.log_metrics("train", train_metrics)
    trainer.save_metrics("train", train_metrics)
    final = None
    if eval_dataset is not None:
        final = trainer.evaluate()
        trainer.log_metrics("eval", final)
        trainer.save_metrics("eval", final)
    trainer.save_state()

    if trainer.is_world_process_zero():
        trainer.save_model(str(output_dir))  # EsmForMaskedLM (safetensors, config) and the esmloc tokenizer
        (output_dir / DATA_SUMMARY_FILE).write_text(json.dumps(data_summary, indent=2))
        plot_perplexity(trainer.state.log_history, initial, output_dir / CURVE_FILE)
        write_model_card(output_dir, model_args, data_args, training_args, model.config, data_summary, initial, final,
                         train_metrics)
        runs.write_record(output_dir, identity, finished=True, training_length=length)
        print(f"Masked language model, metrics, perplexity curve and model card saved in {output_dir}")
    trainer.accelerator.wait_for_everyone()
    cli.end_processes(trainer)
    return 0


def main(argv=None) -> int:
    return cli.run("esmloc-pretrain", pretrain, argv)


if __name__ == "__main__":
    sys.exit(main())
