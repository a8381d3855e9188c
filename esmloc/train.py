"""Fine-tunes an ESM-2 model for subcellular localisation and leaves a trained, evaluated, loadable model behind.

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

The module reads like transformers' run_classification.py: the argument dataclasses (a third of its length, the
documented command line), then one function per phase of a run (arguments, data, model, training, evaluation and
the saved run, the push), and `train` calling them in order.

About 660 lines for one job, a fine-tuning run as run_glue.py lays it out: its argument dataclasses, the model and
the fine-tuning mode, the Trainer, then the phases (train, evaluate, save, card, push). Data, caching, evaluation,
run records and publishing live in their own modules; what is left here is the run's order of steps.
"""

import json
import logging
import os
import sys
import warnings
from dataclasses import asdict, dataclass, field
from functools import partial
from pathlib import Path

import numpy as np
import torch
from huggingface_hub import constants as hub_constants
from sklearn.utils.class_weight import compute_class_weight
from transformers import (
    DataCollatorWithPadding,
    EarlyStoppingCallback,
    HfArgumentParser,
    Trainer,
    TrainingArguments,
    set_seed,
)

from configuration_esmloc import (
    CROP_STRATEGIES, DEFAULT_CROP, DEFAULT_MAX_RESIDUES, ESM2_ARCHITECTURES, POOLING_MODES, EsmLocConfig,
)
from esmloc import cache, cli, data, dataset_hub, demo, engine, evaluation, loading, publish, runs, task
from esmloc.cli import EnvironmentProblem, InputError
from esmloc.files import atomic_file
from esmloc.predictions import write_predictions_csv
from esmloc.saving import save_model, tokenizer_for
from modeling_esmloc import EsmForLocalization


logger = logging.getLogger("esmloc.train")

FINETUNE_MODES = ("frozen", "lora", "full")
# Learning rates that work for each mode when --learning_rate is not given: a head alone tolerates a large
# step, LoRA adapters a medium one, the whole backbone only a small one.
DEFAULT_LEARNING_RATES = {"frozen": 1e-3, "lora": 5e-4, "full": 5e-5}
# Without --model_name_or_path or --from_scratch (the demo run): a randomly initialised ESM-2 8M backbone.
DEMO_ARCHITECTURE = "esm2_t6_8M"
RUN_INFO_FILE = "run_info.json"


@dataclass
class ModelArguments:
    model_name_or_path: str | None = field(
        default=None,
        metadata={"help": "A stock ESM-2 checkpoint: a hub id (e.g. facebook/esm2_t6_8M_UR50D; honours HF_ENDPOINT) "
                  "or a local directory (e.g. a git clone of the model repo). A directory saved by esmloc "
                  "continues training from that model."},
    )
    from_scratch: str | None = field(
        default=None,
        metadata={"help": "Build the backbone with random weights from a named ESM-2 architecture instead of "
                  "loading one (offline work, tests, benchmarks).", "choices": list(ESM2_ARCHITECTURES)},
    )
    finetune: str = field(
        default="frozen",
        metadata={"help": "frozen: train the head only; lora: PEFT LoRA adapters + head; full: everything.",
                  "choices": list(FINETUNE_MODES)},
    )
    pooling: str = field(default="mean", metadata={"choices": list(POOLING_MODES)})
    classifier_dropout: float = field(default=0.1)
    max_residues: int = field(default=DEFAULT_MAX_RESIDUES, metadata={"help": "Proteins longer than this are cropped."})
    crop: str = field(default=DEFAULT_CROP, metadata={"choices": list(CROP_STRATEGIES)})
    class_weights: bool = field(
        default=True,
        metadata={"help": "Weight the loss by class frequencies of the training split (balanced cross-entropy, "
                  "or BCE pos_weight = negatives/positives per label). --no_class_weights turns it off."},
    )
    lora_r: int = field(default=8)
    lora_alpha: int = field(default=16)
    lora_dropout: float = field(default=0.05)
    lora_target_modules: list[str] = field(default_factory=lambda: ["query", "key", "value", "dense"])
    attn_implementation: str = field(default="sdpa", metadata={"help": "sdpa (fast) or eager."})
    feature_cache: bool = field(
        default=True,
        metadata={"help": "With --finetune frozen: embed every split once with the inference engine, cache the "
                  "features on disk and train the head on them (the saved model is the same EsmForLocalization). "
                  "--no_feature_cache runs the whole model in every epoch instead (the ordinary Trainer path)."},
    )
    precision: str = field(
        default="auto",
        metadata={"choices": list(engine.PRECISIONS),
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



@dataclass
class DataArguments:
    dataset_config: str = field(
        default="mitochondrion",
        metadata={"help": "mitochondrion: binary ACC/Mitochondrion/Sequence CSVs; deeploc: DeepLoc 2.0's 10 "
                  "locations, multi-label.", "choices": ["mitochondrion", "deeploc"]},
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
                  "choices": ["stratified", "partition", "given"]},
    )
    validation_partitions: list[int] | None = field(default=None)
    test_partitions: list[int] | None = field(default=None)
    max_train_samples: int | None = field(default=None, metadata={"help": "Truncate the training split (debugging)."})
    max_eval_samples: int | None = field(default=None)
    max_test_samples: int | None = field(default=None)
    num_examples_to_show: int = field(default=10, metadata={"help": "Random test proteins printed at the end."})


@dataclass
class EsmLocTrainingArguments(runs.OverwriteArguments, TrainingArguments):
    """`TrainingArguments` with defaults for this task: evaluate and save every epoch, keep the model with the
    best validation MCC, group batches by length, report to nobody."""

    output_dir: str | None = field(default="esmloc_output", metadata={"help": "Where the model and results go."})
    learning_rate: float | None = field(
        default=None, metadata={"help": f"Default per --finetune mode: {DEFAULT_LEARNING_RATES}."}
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


def parse_arguments(argv=None, dataclass_types=(ModelArguments, DataArguments, EsmLocTrainingArguments)) -> tuple:
    """The command line (or one .json/.yaml file) into `dataclass_types` (esmloc-pretrain passes its own)."""
    parser = HfArgumentParser(dataclass_types)
    argv = sys.argv[1:] if argv is None else argv
    if len(argv) == 1 and argv[0].endswith(".json"):
        return parser.parse_json_file(json_file=os.path.abspath(argv[0]))
    if len(argv) == 1 and argv[0].endswith((".yaml", ".yml")):
        return parser.parse_yaml_file(yaml_file=os.path.abspath(argv[0]))
    return parser.parse_args_into_dataclasses(args=argv)



# --- arguments ----------------------------------------------------------------------------------------------------


def check_arguments(model_args: ModelArguments, data_args: DataArguments, training_args) -> None:
    """Refuses contradictory arguments, fills in the demo defaults (saying so) and the learning rate."""
    if model_args.model_name_or_path and model_args.from_scratch:
        raise InputError("give one of --model_name_or_path (an ESM-2 checkpoint) or --from_scratch, not both")
    if training_args.push_to_hub and publish.as_hub_model_id(training_args.hub_model_id or "") is None:
        raise InputError("--push_to_hub needs --hub_model_id user/name")
    if model_args.push_adapter and model_args.finetune != "lora":
        raise InputError("--push_adapter needs --finetune lora")
    if model_args.finetune == "full" and model_args.max_residues > 512 and not torch.cuda.is_available():
        log_main(training_args, "--finetune full on CPU with --max_residues %d: every step runs the whole backbone "
                 "on up to %d residues; --max_residues 256 makes training many times faster (attention grows with "
                 "the square of the length).", model_args.max_residues, model_args.max_residues,
                 level=logging.WARNING)
    files = [data_args.train_file, data_args.validation_file, data_args.test_file]
    given = [name for name in ("train_file", "validation_file", "test_file", "split_method", "validation_partitions",
                               "test_partitions") if getattr(data_args, name) is not None]
    if data_args.dataset_name and given:
        raise InputError(f"--dataset_name brings its own splits: drop --{', --'.join(given)}")
    if any(files[1:]) and not all(files):
        raise InputError("give --train_file alone (it is split) or all of --train_file, --validation_file, --test_file")
    for path in filter(None, files):
        if not Path(path).is_file():
            raise InputError(f"{path}: no such data file")
    has_data, has_model = any(files) or data_args.dataset_name, model_args.model_name_or_path or model_args.from_scratch
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
        training_args.learning_rate = DEFAULT_LEARNING_RATES[model_args.finetune]


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
    except data.DataValidationError:
        raise
    except ValueError as error:  # split settings the data cannot satisfy (too few proteins, absent partitions)
        raise InputError(f"{', '.join(map(str, files.values()))}: {error}") from None


def label_setup(dataset, dataset_config: str) -> dict:
    """Config kwargs describing the labels: id2label and problem_type."""
    label_feature = dataset["train"].features["label"]
    if dataset_config == "deeploc":
        names = list(label_feature.feature.names)
        return {"id2label": dict(enumerate(names)), "problem_type": task.MULTI_LABEL}
    return {"id2label": dict(enumerate(label_feature.names)), "problem_type": task.SINGLE_LABEL}


def targets(split, num_labels: int, multi_label: bool) -> np.ndarray:
    """Integer class ids (single-label) or a multi-hot matrix (multi-label) for a split."""
    if not multi_label:
        return np.asarray(split["label"], dtype=np.int64)
    multi_hot = np.zeros((len(split), num_labels), dtype=np.float32)
    for row, present in enumerate(split["label"]):
        multi_hot[row, present] = 1.0
    return multi_hot


def check_learnable(dataset, names: list[str], multi_label: bool, source: str) -> None:
    """Refuses splits no sound model can come from: every label needs positives in training (a label never seen
    positive is learned as "never"), and in validation, where its decision threshold is tuned."""
    for split, purpose in (("train", "to learn it from"), ("validation", "to tune its decision threshold on")):
        labels = targets(dataset[split], len(names), multi_label)
        counts = labels.sum(axis=0) if multi_label else np.bincount(labels, minlength=len(names))
        if multi_label or split == "train":
            absent = [name for name, count in zip(names, counts) if count == 0]
        else:  # a binary validation split needs positives; every protein is a negative of the others
            absent = [names[1]] if len(names) == 2 and counts[1] == 0 else []
        if absent:
            shown = ", ".join(f"{name} {int(count)}" for name, count in zip(names, counts))
            raise InputError(
                f"{source}: the {split} split ({len(labels)} proteins; {shown}) has no protein labelled "
                f"{', '.join(absent)}: esmloc needs some {purpose}. Use more data or another split "
                "(--split_method, --max_train_samples/--max_eval_samples)."
            )


def load_data(data_args: DataArguments, training_args):
    """The validated, split and (with --max_*_samples) truncated dataset, its label setup, its summary printed."""
    with training_args.main_process_first(desc="loading the dataset"):
        dataset = load_splits(data_args, seed=training_args.seed)
    for name, limit in (("train", data_args.max_train_samples), ("validation", data_args.max_eval_samples),
                        ("test", data_args.max_test_samples)):
        if limit is not None:
            dataset[name] = dataset[name].select(range(min(limit, len(dataset[name]))))
    labels = label_setup(dataset, data_args.dataset_config)
    check_learnable(dataset, list(labels["id2label"].values()), task.is_multi_label(labels),
                    source=data_args.dataset_name or data_args.train_file)
    if training_args.should_log:
        print(data.format_summary(dataset))
    return dataset, labels


def balanced_class_weights(train_targets: np.ndarray, num_labels: int, multi_label: bool) -> list[float]:
    """Balanced cross-entropy weights n / (k * n_c) (scikit-learn's "balanced"), or BCE pos_weight
    negatives / positives per label."""
    if multi_label:
        positives = train_targets.sum(axis=0)
        return [float((len(train_targets) - p) / p) for p in positives]
    weights = compute_class_weight("balanced", classes=np.arange(num_labels), y=train_targets)
    return [float(weight) for weight in weights]


# --- model --------------------------------------------------------------------------------------------------------


def hub_unreachable_message(name: str, error: Exception) -> str:
    return (
        f"Could not load the ESM-2 model {name!r} from {hub_constants.ENDPOINT}: {error}\n\n"
        "The Hugging Face Hub could not be reached. Any of these works:\n"
        "  * use a mirror: export HF_ENDPOINT=https://hf-mirror.com (set it before starting train.py);\n"
        f"  * clone the model and pass its path: git clone {hub_constants.ENDPOINT}/{name} and then\n"
        f"    --model_name_or_path /path/to/{name.split('/')[-1]};\n"
        "  * train a randomly initialised backbone offline: --from_scratch esm2_t6_8M (no pretrained weights)."
    )


def build_model(model_args: ModelArguments, label_config: dict) -> EsmForLocalization:
    """The model to train: from a stock ESM-2 checkpoint, an esmloc model directory, or random weights."""
    head_config = dict(
        pooling=model_args.pooling,
        classifier_dropout=model_args.classifier_dropout,
        max_residues=model_args.max_residues,
        crop=model_args.crop,
        **label_config,
    )
    attention = {"attn_implementation": model_args.attn_implementation}
    if model_args.from_scratch:
        esm_config = dict(ESM2_ARCHITECTURES[model_args.from_scratch])
        return EsmForLocalization(EsmLocConfig(esm_config=esm_config, esm_name_or_path=f"random:{model_args.from_scratch}",
                                               **attention, **head_config))
    name = model_args.model_name_or_path
    local = Path(name).expanduser()
    if local.is_dir():
        if loading.model_kind(local) == "esmloc":  # an esmloc model trained before: continue from it
            return EsmForLocalization.from_pretrained(local, **attention, **head_config)
        return EsmForLocalization.from_esm(str(local), **attention, **head_config)
    if name.startswith((".", "/", "~")) or name.count("/") > 1:
        raise InputError(f"--model_name_or_path {name}: no such directory")
    try:
        return EsmForLocalization.from_esm(name, **attention, **head_config)
    except OSError as error:
        raise EnvironmentProblem(hub_unreachable_message(name, error)) from None


def prepare_finetuning(model: EsmForLocalization, model_args: ModelArguments):
    """Freezes or wraps the model per --finetune; returns the model the Trainer trains."""
    if model_args.finetune == "frozen":
        model.esm.requires_grad_(False)
        return model
    if model_args.finetune == "full":
        return model
    from peft import LoraConfig, get_peft_model

    lora_config = LoraConfig(
        r=model_args.lora_r,
        lora_alpha=model_args.lora_alpha,
        lora_dropout=model_args.lora_dropout,
        target_modules=model_args.lora_target_modules,
        # The head is trained in full and saved with the adapter.
        modules_to_save=["pooler", "classifier"],
    )
    with warnings.catch_warnings():
        # peft (0.21) reads transformers' deprecated `is_gradient_checkpointing` alias: a warning for peft, not users.
        warnings.filterwarnings("ignore", message="`is_gradient_checkpointing` is deprecated", category=FutureWarning)
        return get_peft_model(model, lora_config)


# --- training -----------------------------------------------------------------------------------------------------


def tokenize_splits(dataset, tokenizer, num_labels: int, multi_label: bool, training_args):
    """Tokenised splits with `labels` and `length` columns, ready for the Trainer."""

    def encode(batch):
        encoded = tokenizer(batch["Sequence"])
        encoded["length"] = [len(ids) for ids in encoded["input_ids"]]
        return encoded

    tokenized = {}
    with training_args.main_process_first(desc="tokenizing"):
        for name, split in dataset.items():
            columns = [c for c in split.column_names if c != "label"]
            split = split.map(encode, batched=True, remove_columns=columns, desc=f"Tokenizing {name}")
            split = split.remove_columns("label").add_column("labels", list(targets(dataset[name], num_labels,
                                                                                      multi_label)))
            tokenized[name] = split
    return tokenized


def feature_cache_dir(model_args: ModelArguments) -> Path:
    return Path(model_args.feature_cache_dir).expanduser() if model_args.feature_cache_dir else cache.default_cache_dir()


def cached_feature_trainer(model, tokenizer, dataset, model_args, training_args, num_labels: int, multi_label: bool,
                           **trainer_kwargs) -> Trainer:
    """The cached-feature path of --finetune frozen: every split is embedded once by the engine (or read from the
    feature cache), and a Trainer trains the model's head (`EsmLocHead`, sharing the model's pooler and classifier)
    on the features with the same arguments, sampler, loss and metrics as the ordinary path. The main process
    embeds first; the other processes of a distributed run then find everything in the cache."""
    model.to(training_args.device)
    inference = engine.Engine(model, tokenizer, max_tokens_per_batch=model_args.max_tokens_per_batch,
                              device=training_args.device, progress=not training_args.disable_tqdm,
                              precision=model_args.precision)
    kind = cache.feature_kind(model.config.pooling)
    fingerprint = cache.backbone_fingerprint(model.esm)
    splits = {}
    with training_args.main_process_first(desc="embedding"):
        for name in ("train", "validation"):
            sequences = dataset[name]["Sequence"]
            features = cache.cached_features(inference, sequences, kind, feature_cache_dir(model_args),
                                             desc=f"Embedding {name}", fingerprint=fingerprint)
            lengths = [len(ids) for ids in inference.encode(sequences)]
            splits[name] = cache.FeatureDataset(features, targets(dataset[name], num_labels, multi_label), lengths)
    return cache.FeatureTrainer(
        model=cache.EsmLocHead(model),
        args=training_args,
        train_dataset=splits["train"],
        eval_dataset=splits["validation"],
        data_collator=cache.collate_features,
        **trainer_kwargs,
    )


def make_trainer(model, trainable_model, tokenizer, dataset, model_args, training_args, identity: dict) -> Trainer:
    """The Trainer of the run: on cached features (frozen backbone) or on tokenised proteins (lora, full)."""
    config = model.config
    multi_label, num_labels = task.is_multi_label(config), config.num_labels
    if training_args.metric_for_best_model is None:
        training_args.metric_for_best_model = "macro_mcc_tuned" if multi_label else "mcc_tuned"
        training_args.greater_is_better = True
    callbacks = [runs.RunRecordCallback(identity)]
    if training_args.early_stopping_patience:
        callbacks.append(EarlyStoppingCallback(early_stopping_patience=training_args.early_stopping_patience))
    kwargs = dict(compute_metrics=evaluation.compute_metrics(multi_label, task.label_names(config),
                                                             tune_threshold=True), callbacks=callbacks)
    if uses_feature_cache(model_args):
        return cached_feature_trainer(model, tokenizer, dataset, model_args, training_args, num_labels, multi_label,
                                      **kwargs)
    tokenized = tokenize_splits(dataset, tokenizer, num_labels, multi_label, training_args)
    return Trainer(model=trainable_model, args=training_args, train_dataset=tokenized["train"],
                   eval_dataset=tokenized["validation"], processing_class=tokenizer,
                   data_collator=DataCollatorWithPadding(tokenizer), **kwargs)


def uses_feature_cache(model_args: ModelArguments) -> bool:
    return model_args.finetune == "frozen" and model_args.feature_cache


def trained_model(trainer, model, model_args, output_dir: Path):
    """The model to save: what the best checkpoint holds (the Trainer restored it), merged with its adapters for
    LoRA (the adapter itself is kept in output_dir/adapter)."""
    if uses_feature_cache(model_args):
        # The Trainer trained (and restored) the head modules the model shares.
        return model.to(trainer.args.device)
    final_model = trainer.model
    if model_args.finetune == "lora":
        if trainer.is_world_process_zero():
            final_model.save_pretrained(output_dir / "adapter")
        final_model = final_model.merge_and_unload()
    return final_model


# --- evaluation and the saved run -----------------------------------------------------------------------------------


def evaluate_and_save(trainer, final_model, tokenizer, dataset, model_args, data_args, training_args, run_record: dict,
                      output_dir: Path) -> None:
    """Saves the model, then predicts validation and test with exactly the saved weights: the report (threshold
    tuned on validation, also stored in the saved config as `decision_thresholds`), the predictions CSV, the plots, a
    table of a few test proteins, the run record and the model card."""
    save_model(final_model, output_dir, tokenizer)
    config = final_model.config
    names, multi_label = task.label_names(config), task.is_multi_label(config)
    # With the feature cache, pooled features of the (unchanged) backbone come from the cache: the same numbers.
    predict = partial(engine.predict_probabilities, final_model, tokenizer, device=training_args.device,
                      max_tokens_per_batch=model_args.max_tokens_per_batch, progress=not training_args.disable_tqdm,
                      precision=model_args.precision,
                      feature_cache=feature_cache_dir(model_args) if uses_feature_cache(model_args) else None)
    probabilities, truth, scores = {}, {}, {}
    for split in ("validation", "test"):
        probabilities[split] = predict(dataset[split]["Sequence"], desc=f"Predicting {split}")
        truth[split] = targets(dataset[split], len(names), multi_label)
        scores[split] = task.scores(probabilities[split], multi_label)
    report = evaluation.evaluation_report(scores["validation"], truth["validation"], scores["test"], truth["test"],
                                          label_names=names)
    # Undefined metrics (e.g. ROC-AUC of a location without positives in the split) are saved as null.
    trainer.log_metrics("test", {key: value for key, value in report.items() if value is not None})
    trainer.save_metrics("test", report)
    threshold = evaluation.tuned_threshold(scores["validation"], truth["validation"])
    # The tuned thresholds go into the saved config, where every path reads them (pipeline, predict_labels,
    # esmloc-predict, the demo, the card): the weights saved above are unchanged.
    config.decision_thresholds = np.asarray(threshold, dtype=float).tolist()
    config.save_pretrained(output_dir)
    accs = dataset["test"]["ACC"]
    write_predictions_csv(output_dir / "test_predictions.csv", accs, probabilities["test"], names, multi_label,
                          threshold, truths=truth["test"])
    evaluation.plot_curves(output_dir, truth["test"], scores["test"], threshold, names)
    if data_args.num_examples_to_show:
        print(evaluation.format_examples_table(accs, truth["test"], probabilities["test"], names=names,
                                               multi_label=multi_label, thresholds=threshold,
                                               n=data_args.num_examples_to_show, seed=training_args.seed))
    # How the splits were made, in the builder's own words (the card reads it; "dataset": a shared dataset's own).
    split_method = "dataset" if data_args.dataset_name else data.dataset_summary(dataset).get("split_method")
    split_sizes = {name: len(split) for name, split in dataset.items()}
    with atomic_file(output_dir / RUN_INFO_FILE, "w") as handle:
        handle.write(json.dumps({**run_record, "data": {**run_record["data"], "split_method": split_method,
                                                        "split_sizes": split_sizes}}, indent=2))
    publish.write_model_card(output_dir)


def without_local_paths(arguments: dict) -> dict:
    """Arguments for the record (run_info.json travels with a pushed model): local files by name only."""
    return {key: Path(value).name if isinstance(value, str) and Path(value).expanduser().exists() else value
            for key, value in arguments.items()}


def push(output_dir: Path, model_args, training_args) -> None:
    try:
        url = publish.push_output_dir(output_dir, training_args.hub_model_id,
                                      private=bool(training_args.hub_private_repo), endpoint=model_args.hub_endpoint,
                                      token=training_args.hub_token,
                                      what="adapter" if model_args.push_adapter else "merged")
    except publish.PublishError as error:
        raise EnvironmentProblem(f"The model is saved in {output_dir}, but the push failed: {error}") from None
    print(f"Pushed to {url}")


# --- the run ------------------------------------------------------------------------------------------------------


def train(argv=None) -> int:
    model_args, data_args, training_args = parse_arguments(argv)
    cli.setup_logging(logging.INFO if training_args.should_log else logging.WARNING)
    # Trainer's own hub logic would create the repo at init and upload checkpoints (pickles); esmloc pushes the
    # finished output directory at the end instead.
    push_to_hub, training_args.push_to_hub = training_args.push_to_hub, False
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

    dataset, label_config = load_data(data_args, training_args)
    multi_label = task.is_multi_label(label_config)
    if model_args.class_weights:
        train_targets = targets(dataset["train"], len(label_config["id2label"]), multi_label)
        label_config["class_weights"] = balanced_class_weights(train_targets, len(label_config["id2label"]),
                                                               multi_label)
        log_main(training_args, "Class weights from the training split: %s", label_config["class_weights"])

    model = build_model(model_args, label_config)
    tokenizer = tokenizer_for(model.config)
    trainable_model = prepare_finetuning(model, model_args)
    trainable, total = trainable_model.num_parameters(only_trainable=True), trainable_model.num_parameters()
    log_main(training_args, "finetune=%s: %s trainable parameters of %s (%.2f%%)", model_args.finetune,
             f"{trainable:,}", f"{total:,}", 100 * trainable / total)
    trainer = make_trainer(model, trainable_model, tokenizer, dataset, model_args, training_args, identity)

    if training_args.should_save:
        runs.write_record(output_dir, identity, finished=False)
    train_result = trainer.train(resume_from_checkpoint=resume_from)
    trainer.save_metrics("train", train_result.metrics)
    trainer.save_state()
    final_model = trained_model(trainer, model, model_args, output_dir)

    if trainer.is_world_process_zero():
        run_record = {
            "model": {**without_local_paths(asdict(model_args)), "base_model": model.config.esm_name_or_path,
                      "trainable_parameters": trainable, "total_parameters": total},
            "data": without_local_paths(asdict(data_args)),
            "training": {"num_train_epochs": training_args.num_train_epochs, "seed": training_args.seed,
                         "learning_rate": training_args.learning_rate,
                         "per_device_train_batch_size": training_args.per_device_train_batch_size,
                         "world_size": training_args.world_size,
                         "metric_for_best_model": training_args.metric_for_best_model},
            "fingerprint": identity["fingerprint"],
        }
        evaluate_and_save(trainer, final_model, tokenizer, dataset, model_args, data_args, training_args, run_record,
                          output_dir)
        runs.write_record(output_dir, identity, finished=True, training_length=length)
        print(f"Model, metrics, predictions, plots and model card saved in {output_dir}")
    # Push only once every process is done, so that a failed push cannot leave other processes waiting.
    trainer.accelerator.wait_for_everyone()
    if push_to_hub and trainer.is_world_process_zero():
        push(output_dir, model_args, training_args)
    trainer.accelerator.end_training()  # process group closed before exit (else gloo may abort a process at exit)
    return 0


def main(argv=None) -> int:
    return cli.run("train.py", train, argv)


if __name__ == "__main__":
    sys.exit(main())
