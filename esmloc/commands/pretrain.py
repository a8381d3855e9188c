"""Masked-language-model (pre)training of ESM-2 on your own proteins: from scratch or continued from a checkpoint.

    esmloc-pretrain --from_scratch esm2_t6_8M --train_files proteome.fasta more.csv --output_dir esm_mine/
    esmloc-pretrain --model_name_or_path facebook/esm2_t6_8M_UR50D --train_files family.fasta --output_dir adapted/
    torchrun --nproc_per_node N -m esmloc.commands.pretrain ...   # or accelerate launch -m ...: same arguments
    esmloc-pretrain args.json                            # or args.yaml

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

The recipe (proteins, masking, metrics, curve and card) is esmloc.mlm's; this module holds the arguments and the run.
"""

import json
import logging
import sys
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path

import torch
from transformers import AutoConfig, DataCollatorForTokenClassification, EsmForMaskedLM, TrainingArguments, set_seed

from configuration_esmloc import ARCHITECTURES, backbone_config, backbone_family
from esmloc import cli, loading, mlm, progress, runs
from esmloc.errors import InputError
from tokenization_esmloc import EsmLocTokenizer


try:  # ESM C: transformers >= 5.25 (configuration_esmloc.backbone_config refuses an ESM C architecture without it)
    from transformers import EsmcForMaskedLM
except ImportError:
    EsmcForMaskedLM = None


logger = logging.getLogger("esmloc.pretrain")

DATA_SUMMARY_FILE = "pretrain_data.json"
# The masked-language model of each backbone family (configuration_esmloc.backbone_family).
MLM_CLASSES = {"esm2": EsmForMaskedLM, "esmc": EsmcForMaskedLM}


@dataclass
class PretrainModelArguments:
    model_name_or_path: str | None = field(
        default=None,
        metadata={"help": "Continue pretraining this ESM-2 or ESM C checkpoint: a hub id (honours HF_ENDPOINT) or a local "
                  "directory (a clone, or an earlier esmloc-pretrain output)."},
    )
    from_scratch: str | None = field(
        default=None,
        metadata={"help": "Start from random weights of a named ESM-2 or ESM C architecture.",
                  "choices": list(ARCHITECTURES)},
    )
    config_overrides: str | None = field(
        default=None,
        metadata={"help": "With --from_scratch: EsmConfig attributes to change, as in transformers' run_mlm.py "
                  "(`PreTrainedConfig.update_from_string`), e.g. "
                  "'num_hidden_layers=4,hidden_size=160,num_attention_heads=8,intermediate_size=640'."},
    )
    attn_implementation: str = field(default="sdpa", metadata={"help": "sdpa (fast) or eager."})

    def __post_init__(self):
        cli.require((self.model_name_or_path is None) != (self.from_scratch is None),
                    "give exactly one of --model_name_or_path (an ESM-2 checkpoint) or --from_scratch")
        cli.require(not self.config_overrides or bool(self.from_scratch), "--config_overrides needs --from_scratch")


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
        cli.require(bool(self.train_files), "--train_files: give at least one FASTA or CSV file of proteins")
        cli.require(0 < self.mlm_probability < 1, f"--mlm_probability must lie between 0 and 1, got {self.mlm_probability}")
        for name in ("mask_replace_prob", "random_replace_prob"):
            cli.require(0 <= getattr(self, name) <= 1, f"--{name} must lie in [0, 1], got {getattr(self, name)}")
        cli.require(self.mask_replace_prob + self.random_replace_prob <= 1,
                    "--mask_replace_prob + --random_replace_prob must not exceed 1")
        cli.require(0 <= self.validation_fraction < 1,
                    f"--validation_fraction must lie in [0, 1), got {self.validation_fraction}")
        cli.require(self.max_residues >= 1, f"--max_residues must be at least 1, got {self.max_residues}")
        for name in ("max_eval_proteins", "max_train_minutes"):
            value = getattr(self, name)
            cli.require(value is None or value > 0, f"--{name} must be positive, got {value}")


@dataclass
class PretrainingArguments(runs.RunArguments, TrainingArguments):
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
        cli.require(self.learning_rate > 0, f"--learning_rate must be positive, got {self.learning_rate}")
        self.ddp_backend = self.ddp_backend or cli.cpu_ddp_backend()
        super().__post_init__()


def parse_arguments(argv=None) -> tuple[PretrainModelArguments, PretrainDataArguments, PretrainingArguments]:
    parser = cli.DataclassParser((PretrainModelArguments, PretrainDataArguments, PretrainingArguments),
                                 prog="esmloc-pretrain")
    return parser.parse(argv)


def build_model(model_args: PretrainModelArguments) -> EsmForMaskedLM | EsmcForMaskedLM:
    """The masked-language model of the backbone's family (`MLM_CLASSES`): random weights of a named architecture,
    or a checkpoint (its config's model_type decides the family; any other model type is an InputError)."""
    if model_args.from_scratch:
        config = backbone_config(model_args.from_scratch)
        if model_args.config_overrides:
            try:
                config.update_from_string(model_args.config_overrides)
            except ValueError as error:
                raise InputError(f"--config_overrides {model_args.config_overrides!r}: {error}") from None
        config._attn_implementation = model_args.attn_implementation
        return MLM_CLASSES[backbone_family(config)](config)
    source = loading.local_or_hub(model_args.model_name_or_path, "--model_name_or_path")
    read_config = AutoConfig.from_pretrained
    try:
        family = backbone_family(read_config(source) if isinstance(source, Path) else loading.from_hub(read_config, source))
    except ValueError as error:
        raise InputError(f"--model_name_or_path {source}: {error}") from None
    load = partial(MLM_CLASSES[family].from_pretrained, attn_implementation=model_args.attn_implementation)
    return load(source) if isinstance(source, Path) else loading.from_hub(load, source)


def run_identity(model_args, data_args, training_args, data_summary: dict) -> dict:
    """What defines a pretraining run (`esmloc.runs.identity`): a rerun into the same --output_dir resumes only when
    all of it is equal. Unlike train.py's, the length is part of it: the learning-rate schedule follows it."""
    return runs.identity({
        "model": model_args.from_scratch or model_args.model_name_or_path,
        "config_overrides": model_args.config_overrides,
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


def pretrain(argv=None) -> int:
    model_args, data_args, training_args = parse_arguments(argv)
    set_seed(training_args.seed)
    output_dir = Path(training_args.output_dir)

    # Data
    cli.check_output_dir(training_args.output_dir, "--output_dir")
    train_sequences, held_out, data_summary = mlm.prepare_sequences(data_args, training_args.seed)
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
    tokenizer = EsmLocTokenizer(max_residues=data_args.max_residues, backbone_family=backbone_family(model.config))
    masking = mlm.ResidueMasking(tokenizer, mlm_probability=data_args.mlm_probability,
                             mask_replace_prob=data_args.mask_replace_prob,
                             random_replace_prob=data_args.random_replace_prob)
    train_dataset = mlm.MaskedProteinDataset(train_sequences, tokenizer, masking, data_args.max_residues,
                                         training_args.seed)
    # Its own seed stream (an epoch number training never reaches), cropped and masked once: every evaluation scores the same positions.
    eval_dataset = None
    if held_out:
        eval_dataset = mlm.MaskedProteinDataset(held_out, tokenizer, masking, data_args.max_residues, training_args.seed)
        eval_dataset.set_epoch(2**32 - 1)
        eval_dataset = eval_dataset.fixed()
    if eval_dataset is None:
        training_args.eval_strategy = "no"
    parameters = sum(p.numel() for p in model.parameters())
    logger.info("%s: %d layers, hidden size %d, %s parameters", type(model).__name__, model.config.num_hidden_layers,
                model.config.hidden_size, f"{parameters:,}")

    callbacks = [mlm.EpochCallback(train_dataset), runs.RunRecordCallback(identity)]
    if data_args.max_train_minutes:
        callbacks.append(mlm.TimeLimitCallback(data_args.max_train_minutes))
    trainer = mlm.ResumingTrainer(
        model=model,
        args=training_args,
        train_dataset=train_dataset,
        eval_dataset=eval_dataset,
        processing_class=tokenizer,
        data_collator=DataCollatorForTokenClassification(tokenizer),
        compute_metrics=mlm.compute_metrics,
        preprocess_logits_for_metrics=mlm.token_scores,
        callbacks=callbacks,
    )

    progress.quiet_console(trainer, output_dir / progress.LOG_FILE, watched="perplexity")
    initial_path = output_dir / f"{mlm.INITIAL_EVAL}_results.json"
    if eval_dataset is not None and not last_checkpoint:
        # Without touching the random state the training order is drawn from (a data loader draws a seed from it), so
        # that a run resumed from a checkpoint (which skips this) replays the uninterrupted run exactly.
        with torch.random.fork_rng():
            initial = trainer.evaluate(metric_key_prefix=mlm.INITIAL_EVAL)
        trainer.log_metrics(mlm.INITIAL_EVAL, initial)
        trainer.save_metrics(mlm.INITIAL_EVAL, initial, combined=False)
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
        mlm.plot_perplexity(trainer.state.log_history, initial, output_dir / mlm.CURVE_FILE)
        mlm.write_model_card(output_dir, model_args, data_args, training_args, model.config, data_summary, initial, final,
                         train_metrics)
        runs.write_record(output_dir, identity, finished=True, training_length=length)
        logger.info("Masked language model, metrics, perplexity curve and model card saved in %s", output_dir)
    trainer.accelerator.wait_for_everyone()
    cli.end_processes(trainer)
    return 0


def main(argv=None) -> int:
    return cli.run("esmloc-pretrain", pretrain, argv)


if __name__ == "__main__":
    sys.exit(main())
