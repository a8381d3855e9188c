"""train.py / esmloc-train: fine-tune ESM-2 for subcellular localisation and leave a trained, evaluated, loadable model.

One job (the command: its arguments and the order of a run); the pieces it calls are modules of their own
(`esmloc.task`, `cache`, `finetuning`, `evaluation`, `report`, `card`, `runs`). Most of its length is the argument
dataclasses and their help texts.

    python train.py --model_name_or_path facebook/esm2_t6_8M_UR50D --train_file proteins.csv \
        --finetune lora --output_dir out/
    accelerate launch train.py ...          # or torchrun --nproc_per_node N train.py ...: same arguments
    python train.py args.json               # or args.yaml: the same arguments from a file

Arguments are `ModelArguments`, `DataArguments` and `EsmLocTrainingArguments` (transformers' `TrainingArguments`
with defaults suited to this task); `--help` lists them all.

With `--finetune frozen` (the default) the backbone never changes, so every split is embedded once by the inference
engine, the features are cached on disk (`--feature_cache_dir`, default $HF_HOME/esmloc/features; see
esmloc/cache.py) and the Trainer trains the head on them; `--no_feature_cache` runs the whole model in every epoch
instead. Both save the same `EsmForLocalization`.

The module reads like transformers' run_classification.py: the argument dataclasses, then the phases of a run
(arguments, data, model, training, the saved run, the push) in `train`. The model and the fine-tuning modes are
esmloc.finetuning's, the final evaluation and outputs esmloc.report's.
"""

import logging
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
from transformers import DataCollatorWithPadding, EarlyStoppingCallback, Trainer, TrainingArguments, set_seed

from configuration_esmloc import (
    CROP_STRATEGIES, DEFAULT_CROP, DEFAULT_LONG_PROTEINS, DEFAULT_MAX_RESIDUES, ARCHITECTURES, LONG_PROTEIN_RULES,
    POOLING_MODES, window_overlap_for,
)
from esmloc import cache, cli, data, dataset_hub, demo, evaluation, finetuning, progress, publish, report, runs, task
from esmloc.engine import PRECISIONS
from esmloc.errors import EnvironmentProblem, InputError
from esmloc.saving import tokenizer_for
from esmloc.sequences import crop_note


logger = logging.getLogger("esmloc.train")

# Without --model_name_or_path or --from_scratch (the demo run): a randomly initialised ESM-2 8M backbone.
DEMO_ARCHITECTURE = "esm2_t6_8M"


@dataclass
class ModelArguments:
    model_name_or_path: str | None = field(
        default=None,
        metadata={"help": "A stock ESM-2 or ESM C checkpoint: a hub id (e.g. facebook/esm2_t6_8M_UR50D; honours HF_ENDPOINT) "
                  "or a local directory (e.g. a git clone of the model repo). A directory saved by esmloc "
                  "continues training from that model."},
    )
    from_scratch: str | None = field(
        default=None,
        metadata={"help": "Build the backbone with random weights from a named ESM-2 or ESM C architecture instead "
                  "of loading one (offline work, tests, benchmarks).", "choices": list(ARCHITECTURES)},
    )
    finetune: str = field(
        default="frozen",
        metadata={"help": "frozen: train the head only; lora: PEFT LoRA adapters + head; full: everything.",
                  "choices": list(finetuning.FINETUNE_MODES)},
    )
    pooling: str = field(default="mean", metadata={"choices": list(POOLING_MODES)})
    classifier_dropout: float = field(default=0.1)
    max_residues: int = field(default=DEFAULT_MAX_RESIDUES, metadata={
        "help": "The model's window: proteins longer than this are cropped (--long_proteins crop) or embedded in "
                "windows of this many residues (--long_proteins windows)."})
    crop: str = field(default=DEFAULT_CROP, metadata={"choices": list(CROP_STRATEGIES),
                                                      "help": "How --long_proteins crop crops."})
    long_proteins: str = field(default=DEFAULT_LONG_PROTEINS, metadata={
        "choices": list(LONG_PROTEIN_RULES),
        "help": "crop: a protein longer than --max_residues is cropped (--crop); windows: it is embedded whole, in "
                "overlapping windows of --max_residues residues (each residue's state from the window it is most "
                "central in), and pooled whole. Saved with the model; every esmloc tool honours it."})
    window_overlap: int | None = field(default=None, metadata={
        "help": "With --long_proteins windows: the least overlap of neighbouring windows, in residues (default a "
                "quarter of --max_residues; the stride is at most --max_residues minus this)."})
    class_weights: bool = field(
        default=True,
        metadata={"help": "Weight the loss by class frequencies of the training split (balanced cross-entropy, "
                  "or BCE pos_weight = negatives/positives per label). --no_class_weights turns it off."},
    )
    lora_r: int = field(default=8)
    lora_alpha: int = field(default=16)
    lora_dropout: float = field(default=0.05)
    lora_target_modules: list[str] | None = field(default=None, metadata={
        "help": "The backbone's modules LoRA adapts; default per backbone family (esmloc.finetuning."
                "LORA_TARGET_MODULES): ESM-2 query key value dense, ESM C q_proj k_proj v_proj o_proj gate_proj "
                "up_proj down_proj."})
    attn_implementation: str = field(default="sdpa", metadata={"help": "sdpa (fast) or eager."})
    feature_cache: bool = field(
        default=True,
        metadata={"help": "With --finetune frozen: embed every split once with the inference engine, cache the "
                  "features on disk and train the head on them (the saved model is the same EsmForLocalization). "
                  "--no_feature_cache runs the whole model in every epoch instead (the ordinary Trainer path)."},
    )
    precision: str = field(
        default="auto",
        metadata={"choices": list(PRECISIONS),
                  "help": "What the backbone computes in for the cached features and the final evaluation "
                  "(esmloc.engine.PRECISIONS): auto (fp32 on CPU, bf16/fp16 autocast on CUDA), fp32, bf16, fp16, int8 "
                  "(CPU). Part of the feature cache's key. Training itself is not affected."},
    )
    feature_cache_dir: str | None = field(
        default=None,
        metadata={"help": "Where cached features are kept (default $HF_HOME/esmloc/features), one directory per "
                  "backbone fingerprint, pooling kind, crop setting and precision."},
    )
    hub_endpoint: str | None = field(
        default=None,
        metadata={"help": "With --push_to_hub: the hub to push to (default: HF_ENDPOINT, else https://huggingface.co)."},
    )
    push_adapter: bool = field(
        default=False,
        metadata={"help": "With --push_to_hub and --finetune lora: push the LoRA adapter (with its own card naming the "
                  "base model) instead of the merged model."},
    )
    max_tokens_per_batch: int | None = field(
        default=None,
        metadata={"help": "Token budget (proteins x longest) of the inference engine's batches, for embedding and "
                  "the final predictions; default 2048 on CPU, 65536 on CUDA."},
    )

    def __post_init__(self):
        cli.require(not (self.model_name_or_path and self.from_scratch),
                    "give one of --model_name_or_path (an ESM-2 checkpoint) or --from_scratch, not both")
        cli.require(self.max_residues >= 1, f"--max_residues must be at least 1, got {self.max_residues}")
        try:
            window_overlap_for(self.max_residues, self.window_overlap)
        except ValueError as error:  # the config's own check, in the option's name
            raise ValueError(f"--{error}") from None
        for name in ("classifier_dropout", "lora_dropout"):
            value = getattr(self, name)
            cli.require(0 <= value < 1, f"--{name} must lie in [0, 1), got {value}")
        for name in ("lora_r", "lora_alpha", "max_tokens_per_batch"):
            value = getattr(self, name)
            cli.require(value is None or value >= 1, f"--{name} must be a positive integer, got {value}")
        cli.require(not self.push_adapter or self.finetune == "lora", "--push_adapter needs --finetune lora")

@dataclass
class DataArguments:
    dataset_config: str = field(
        default="mitochondrion",
        metadata={"help": "mitochondrion: binary ACC/Mitochondrion/Sequence CSVs; deeploc: DeepLoc 2.0's 10 "
                  "locations, multi-label.", "choices": list(data.CONFIG_NAMES)},
    )
    dataset_name: str | None = field(
        default=None,
        metadata={"help": "A dataset shared with esmloc-dataset: a hub dataset id (honours HF_ENDPOINT) or its local "
                  "folder, with --dataset_config; its train/validation/test splits are used as they are."},
    )
    train_file: str | None = field(
        default=None,
        metadata={"help": "CSV with ACC, Mitochondrion (0/1) and Sequence columns. Split into train/validation/test "
                  "unless --validation_file and --test_file are given. Without any file: esmloc's synthetic demo "
                  "set (esmloc/demo.py), to see the machinery work."},
    )
    validation_file: str | None = field(default=None)
    test_file: str | None = field(default=None)
    split_method: str | None = field(
        default=None,
        metadata={"help": "stratified (70/10/20, seeded) or partition (DeepLoc's homology partitions); default: "
                  "given when all three files are passed, else stratified.",
                  "choices": list(data.SPLIT_METHODS)},
    )
    validation_partitions: list[int] | None = field(default=None)
    test_partitions: list[int] | None = field(default=None)
    max_train_samples: int | None = field(default=None, metadata={"help": "Truncate the training split (debugging)."})
    max_eval_samples: int | None = field(default=None)
    max_test_samples: int | None = field(default=None)
    num_examples_to_show: int = field(default=10, metadata={"help": "Random test proteins shown at the end."})

    def __post_init__(self):
        for name in ("max_train_samples", "max_eval_samples", "max_test_samples"):
            value = getattr(self, name)
            cli.require(value is None or value >= 1, f"--{name} must be a positive integer, got {value}")
        cli.require(self.num_examples_to_show >= 0,
                    f"--num_examples_to_show must not be negative, got {self.num_examples_to_show}")
        files = [self.train_file, self.validation_file, self.test_file]
        given = [name for name in ("train_file", "validation_file", "test_file", "split_method",
                                   "validation_partitions", "test_partitions") if getattr(self, name) is not None]
        cli.require(not (self.dataset_name and given),
                    f"--dataset_name brings its own splits: drop --{', --'.join(given)}")
        cli.require(not any(files[1:]) or all(files),
                    "give --train_file alone (it is split) or all of --train_file, --validation_file, --test_file")


@dataclass
class EsmLocTrainingArguments(runs.RunArguments, TrainingArguments):
    """`TrainingArguments` with defaults for this task: evaluate and save every epoch, keep the model with the
    best validation MCC, group batches by length, report to nobody."""

    output_dir: str | None = field(default="esmloc_output", metadata={"help": "Where the model and results go."})
    learning_rate: float | None = field(
        default=None, metadata={"help": f"Default per --finetune mode: {finetuning.DEFAULT_LEARNING_RATES}."}
    )
    num_train_epochs: float = field(default=5.0)
    eval_strategy: str = field(default="epoch")
    save_strategy: str = field(default="epoch")
    logging_strategy: str = field(default="epoch")
    save_total_limit: int | None = field(default=2)
    load_best_model_at_end: bool = field(default=True)
    metric_for_best_model: str | None = field(
        default=None,
        metadata={"help": "Default: validation MCC at its best threshold (mcc_tuned; macro_mcc_tuned for "
                  "multi-label), the threshold rule the final report applies."},
    )
    train_sampling_strategy: str = field(default="group_by_length")
    report_to: None | str | list[str] = field(default="none")
    # Pinned memory only speeds up copies to a GPU; on a CPU-only machine torch warns about it at every epoch.
    dataloader_pin_memory: bool = field(default=torch.cuda.is_available())
    label_names: list[str] | None = field(default_factory=lambda: ["labels"])
    early_stopping_patience: int | None = field(
        default=None, metadata={"help": "Stop after this many evaluations without a better validation MCC."}
    )
    disable_tqdm: bool | None = field(
        default=None, metadata={"help": "Default: progress bars only when stderr is a terminal."}
    )

    def __post_init__(self):
        cli.require(self.learning_rate is None or self.learning_rate > 0,
                    f"--learning_rate must be positive, got {self.learning_rate}")
        if self.disable_tqdm is None:
            self.disable_tqdm = not cli.progress_bars_wanted()
        self.ddp_backend = self.ddp_backend or cli.cpu_ddp_backend()
        # Both defaults depend on what is trained, known only in main(): TrainingArguments would otherwise fill in
        # metric_for_best_model="loss" (load_best_model_at_end) and insist on a float learning rate.
        choose_metric_later = self.metric_for_best_model is None
        learning_rate, self.learning_rate = self.learning_rate, self.learning_rate or 0.0
        super().__post_init__()
        self.learning_rate = learning_rate
        if choose_metric_later:
            self.metric_for_best_model = None
        cli.require(self.early_stopping_patience is None or self.early_stopping_patience >= 1,
                    f"--early_stopping_patience must be a positive integer, got {self.early_stopping_patience}")


def parse_arguments(argv=None) -> tuple:
    """The command line (or one .json/.yaml file with the same arguments) into the three dataclasses."""
    parser = cli.DataclassParser((ModelArguments, DataArguments, EsmLocTrainingArguments), prog="train.py")
    return parser.parse(argv)


# --- arguments ----------------------------------------------------------------------------------------------------


def check_arguments(model_args: ModelArguments, data_args: DataArguments, training_args) -> None:
    """Refuses what cannot work before anything is written; fills in the demo defaults (saying so) and the learning
    rate."""
    if training_args.push_to_hub and publish.as_hub_model_id(training_args.hub_model_id or "") is None:
        raise InputError("--push_to_hub needs --hub_model_id user/name")
    cli.check_output_dir(training_args.output_dir, "--output_dir")
    if model_args.finetune == "full" and model_args.max_residues > 512 and not torch.cuda.is_available():
        log_main(training_args, "--finetune full on CPU with --max_residues %d: every step runs the whole backbone "
                 "on up to %d residues; --max_residues 256 makes training many times faster (attention grows with "
                 "the square of the length).", model_args.max_residues, model_args.max_residues,
                 level=logging.WARNING)
    files = [data_args.train_file, data_args.validation_file, data_args.test_file]
    for option, path in zip(("--train_file", "--validation_file", "--test_file"), files):
        if path is not None and not Path(path).is_file():
            raise InputError(f"{option} {path}: {'is a directory' if Path(path).is_dir() else 'no such data file'}")
    has_data = any(files) or data_args.dataset_name
    has_model = model_args.model_name_or_path or model_args.from_scratch
    if has_data and not has_model:
        raise InputError("give --model_name_or_path (an ESM-2 checkpoint: a hub id such as facebook/esm2_t6_8M_UR50D "
                         "or a local directory) or --from_scratch ARCHITECTURE (random weights)")
    if not has_data:
        data_args.train_file = str(demo.demo_file())
        log_main(training_args, "No --train_file: training on esmloc's synthetic demo set (%s: %d made-up proteins, "
                 "positives with a targeting-peptide-like N-terminus). Pass --train_file proteins.csv for real data.",
                 data_args.train_file, demo.DEMO_ROWS)
    if not has_model:
        model_args.from_scratch = DEMO_ARCHITECTURE
        log_main(training_args, "No --model_name_or_path: an ESM-2 backbone with RANDOM weights (--from_scratch %s); "
                 "for useful predictions start from pretrained weights, e.g. --model_name_or_path "
                 "facebook/esm2_t6_8M_UR50D.", DEMO_ARCHITECTURE)
    if training_args.learning_rate is None:
        training_args.learning_rate = finetuning.DEFAULT_LEARNING_RATES[model_args.finetune]


def log_main(training_args, message: str, *args, level: int = logging.INFO) -> None:
    """Logs once per run, from the main process (every process of a DDP run reaches the same lines)."""
    if training_args.should_log:
        logger.log(level, message, *args)


# --- data ---------------------------------------------------------------------------------------------------------


def load_splits(data_args: DataArguments, seed: int):
    """Train/validation/test through the esmloc dataset builder (validated, split, identical sequences kept
    together), or the splits of a shared dataset (--dataset_name) as they are."""
    if data_args.dataset_name:
        try:
            return dataset_hub.load_splits(data_args.dataset_name, data_args.dataset_config)
        except dataset_hub.DatasetError as error:
            raise InputError(f"--dataset_name: {error}") from None
    files = {split: path for split, path in (("train", data_args.train_file), ("validation", data_args.validation_file),
                                             ("test", data_args.test_file)) if path}
    split_kwargs = {key: value for key, value in (("split_method", data_args.split_method),
                                                  ("validation_partitions", data_args.validation_partitions),
                                                  ("test_partitions", data_args.test_partitions)) if value is not None}
    data_files = files if len(files) == 3 else files["train"]
    try:
        return data.load_dataset(data_files, data_args.dataset_config, seed=seed, **split_kwargs)
    except InputError:
        raise
    except ValueError as error:  # split settings the data cannot satisfy (too few proteins, absent partitions)
        raise InputError(f"{', '.join(map(str, files.values()))}: {error}") from None


def load_data(data_args: DataArguments, model_args: ModelArguments, training_args):
    """The validated, split and (with --max_*_samples) truncated dataset and its label config (with the class
    weights); its summary and the proteins the window crops are logged."""
    with training_args.main_process_first(desc="loading the dataset"):
        dataset = load_splits(data_args, seed=training_args.seed)
    for name, limit in (("train", data_args.max_train_samples), ("validation", data_args.max_eval_samples),
                        ("test", data_args.max_test_samples)):
        if limit is not None:
            dataset[name] = dataset[name].select(range(min(limit, len(dataset[name]))))
    labels = task.label_config(dataset["train"].features["label"])
    names, multi_label = task.label_names(labels), task.is_multi_label(labels)
    split_targets = {name: task.targets(split["label"], len(names), multi_label) for name, split in dataset.items()}
    task.check_learnable(split_targets, names, multi_label, source=data_args.dataset_name or data_args.train_file)
    if model_args.class_weights:
        labels["class_weights"] = task.balanced_class_weights(split_targets["train"], len(names), multi_label)
    log_main(training_args, "Data:\n%s", data.format_summary(dataset))
    lengths = [len(sequence) for split in dataset.values() for sequence in split["Sequence"]]
    note = crop_note(sum(length > model_args.max_residues for length in lengths), len(lengths),
                     model_args.max_residues, model_args.crop, model_args.long_proteins, model_args.window_overlap)
    if note:
        log_main(training_args, "%s", note, level=logging.WARNING)
    return dataset, labels, split_targets


# --- training -----------------------------------------------------------------------------------------------------


def tokenize_splits(dataset, tokenizer, split_targets: dict, training_args):
    """Tokenised splits with `labels` and `length` columns, ready for the Trainer."""

    def encode(batch):
        encoded = tokenizer(batch["Sequence"])
        encoded["length"] = [len(ids) for ids in encoded["input_ids"]]
        return encoded

    tokenized = {}
    with training_args.main_process_first(desc="tokenizing"):
        for name, split in dataset.items():
            split = split.map(encode, batched=True, remove_columns=split.column_names, desc=f"Tokenizing {name}")
            tokenized[name] = split.add_column("labels", list(split_targets[name]))
    return tokenized


def feature_cache_dir(model_args: ModelArguments) -> Path:
    return Path(model_args.feature_cache_dir).expanduser() if model_args.feature_cache_dir else cache.default_cache_dir()


def make_trainer(model, trainable_model, tokenizer, dataset, split_targets, model_args, training_args,
                 identity: dict) -> Trainer:
    """The Trainer of the run: on cached features (frozen backbone) or on tokenised proteins (lora, full)."""
    config = model.config
    multi_label = task.is_multi_label(config)
    if training_args.metric_for_best_model is None:
        training_args.metric_for_best_model = "macro_mcc_tuned" if multi_label else "mcc_tuned"
        training_args.greater_is_better = True
    callbacks = [runs.RunRecordCallback(identity)]
    if training_args.early_stopping_patience:
        callbacks.append(EarlyStoppingCallback(early_stopping_patience=training_args.early_stopping_patience))
    kwargs = dict(compute_metrics=evaluation.compute_metrics(multi_label, task.label_names(config),
                                                             tune_threshold=True), callbacks=callbacks)
    if finetuning.uses_feature_cache(model_args):
        # No backbone runs while the head trains on features: nothing to checkpoint (and the head has no such method).
        for name in ("gradient_checkpointing", "activation_checkpointing"):  # the latter: transformers >= 5.2x's name
            if getattr(training_args, name, False):
                setattr(training_args, name, False)
                log_main(training_args, "--%s: nothing to checkpoint, --finetune frozen trains the head on cached "
                         "features (ignored)", name)
        return cache.feature_trainer(model, tokenizer, dataset, training_args, split_targets,
                                     cache_dir=feature_cache_dir(model_args),
                                     max_tokens_per_batch=model_args.max_tokens_per_batch,
                                     precision=model_args.precision, **kwargs)
    tokenized = tokenize_splits(dataset, tokenizer, split_targets, training_args)
    return Trainer(model=trainable_model, args=training_args, train_dataset=tokenized["train"],
                   eval_dataset=tokenized["validation"], processing_class=tokenizer,
                   data_collator=DataCollatorWithPadding(tokenizer), **kwargs)


def push(output_dir: Path, model_args, training_args, token: str | None = None) -> None:
    """Pushes the finished output directory (`--push_to_hub`) with `token` (`--hub_token`), else the login's."""
    try:
        url = publish.push_output_dir(output_dir, training_args.hub_model_id,
                                      private=bool(training_args.hub_private_repo), endpoint=model_args.hub_endpoint,
                                      token=token,
                                      what="adapter" if model_args.push_adapter else "merged")
    except publish.PublishError as error:
        raise EnvironmentProblem(f"The model is saved in {output_dir}, but the push failed: {error}") from None
    logger.info("Pushed to %s", url)


# --- the run ------------------------------------------------------------------------------------------------------


def train(argv=None) -> int:
    started = time.perf_counter()
    model_args, data_args, training_args = parse_arguments(argv)
    # Trainer's own hub logic would create the repo at init and upload checkpoints (pickles); esmloc pushes the
    # finished output directory at the end instead. The token stays out of Trainer's hands too: it pickles its
    # arguments into every checkpoint and the output directory (training_args.bin).
    push_to_hub, training_args.push_to_hub = training_args.push_to_hub, False
    hub_token, training_args.hub_token = training_args.hub_token, None
    check_arguments(model_args, data_args, training_args)
    set_seed(training_args.seed)
    output_dir = Path(training_args.output_dir)

    identity = runs.run_identity(model_args, data_args, training_args.seed)
    length = runs.training_length(training_args)
    with training_args.main_process_first(desc="checking --output_dir"):
        resume_from = runs.plan_resume(output_dir, identity, length, training_args.resume_from_checkpoint,
                                       overwrite=training_args.overwrite_output_dir)
    if resume_from == runs.FINISHED:
        log_main(training_args, "This run has already finished in %s (same data, settings and length): its model "
                 "and results are there, unchanged. Nothing to do; --overwrite_output_dir trains it again.", output_dir)
        return 0
    if resume_from:
        log_main(training_args, "Resuming from %s (the same run: data, settings and seed match)", resume_from)

    dataset, label_config, split_targets = load_data(data_args, model_args, training_args)
    model = finetuning.build_model(model_args, label_config)
    tokenizer = tokenizer_for(model.config)
    trainable_model = finetuning.prepare_finetuning(model, model_args)
    trainable, total = trainable_model.num_parameters(only_trainable=True), trainable_model.num_parameters()
    log_main(training_args, "finetune=%s: %s trainable parameters of %s (%.2f%%)", model_args.finetune,
             f"{trainable:,}", f"{total:,}", 100 * trainable / total)
    trainer = make_trainer(model, trainable_model, tokenizer, dataset, split_targets, model_args, training_args,
                           identity)
    progress.quiet_console(trainer, output_dir / progress.LOG_FILE)

    if training_args.should_save:
        runs.write_record(output_dir, identity, finished=False)
    train_result = trainer.train(resume_from_checkpoint=resume_from)
    trainer.save_metrics("train", train_result.metrics)
    trainer.save_state()
    final_model = finetuning.trained_model(trainer, model, model_args, output_dir)

    if trainer.is_world_process_zero():
        run_record = {
            "model": {**report.without_local_paths(asdict(model_args)), "base_model": model.config.esm_name_or_path,
                      "trainable_parameters": trainable, "total_parameters": total},
            "data": report.without_local_paths(asdict(data_args)),
            "training": {"num_train_epochs": training_args.num_train_epochs, "seed": training_args.seed,
                         "learning_rate": training_args.learning_rate,
                         "per_device_train_batch_size": training_args.per_device_train_batch_size,
                         "world_size": training_args.world_size,
                         "metric_for_best_model": training_args.metric_for_best_model},
            "fingerprint": identity["fingerprint"],
        }
        cache_dir = feature_cache_dir(model_args) if finetuning.uses_feature_cache(model_args) else None
        results, examples = report.evaluate_and_save(trainer, final_model, tokenizer, dataset, model_args, data_args,
                                                     training_args, run_record, output_dir, feature_cache_dir=cache_dir)
        runs.write_record(output_dir, identity, finished=True, training_length=length)
        print(report.run_summary(output_dir, dataset, final_model.config, model_args.finetune, (trainable, total),
                                 results, examples, time.perf_counter() - started))
    # Push only once every process is done, so that a failed push cannot leave other processes waiting.
    trainer.accelerator.wait_for_everyone()
    if push_to_hub and trainer.is_world_process_zero():
        push(output_dir, model_args, training_args, hub_token)
    cli.end_processes(trainer)
    return 0


def main(argv=None) -> int:
    return cli.run("train.py", train, argv)


if __name__ == "__main__":
    sys.exit(main())
