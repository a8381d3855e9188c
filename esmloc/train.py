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
"""

import json
import logging
import os
import sys
from dataclasses import asdict, dataclass, field
from functools import partial
from pathlib import Path

import numpy as np
import torch
import transformers
from huggingface_hub import constants as hub_constants
from transformers import (
    DataCollatorWithPadding,
    EarlyStoppingCallback,
    HfArgumentParser,
    Trainer,
    TrainingArguments,
    set_seed,
)
from transformers.trainer_utils import get_last_checkpoint

from configuration_esmloc import CROP_STRATEGIES, ESM2_ARCHITECTURES, POOLING_MODES, EsmLocConfig
from esmloc import cache, data, engine, evaluation, publish
from esmloc.export import save_model, tokenizer_for
from modeling_esmloc import EsmForLocalization


logger = logging.getLogger("esmloc.train")

FINETUNE_MODES = ("frozen", "lora", "full")
# Learning rates that work for each mode when --learning_rate is not given: a head alone tolerates a large
# step, LoRA adapters a medium one, the whole backbone only a small one.
DEFAULT_LEARNING_RATES = {"frozen": 1e-3, "lora": 5e-4, "full": 5e-5}
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
    max_residues: int = field(default=1022, metadata={"help": "Proteins longer than this are cropped."})
    crop: str = field(default="middle", metadata={"choices": list(CROP_STRATEGIES)})
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
        if (self.model_name_or_path is None) == (self.from_scratch is None):
            raise ValueError("give exactly one of --model_name_or_path (an ESM-2 checkpoint) or --from_scratch")


@dataclass
class DataArguments:
    dataset_config: str = field(
        default="mitochondrion",
        metadata={"help": "mitochondrion: binary ACC/Mitochondrion/Sequence CSVs; deeploc: DeepLoc 2.0's 10 "
                  "locations, multi-label.", "choices": ["mitochondrion", "deeploc"]},
    )
    train_file: str | None = field(
        default=None,
        metadata={"help": "CSV with ACC, Mitochondrion (0/1) and Sequence columns. Split into train/validation/test "
                  "unless --validation_file and --test_file are given. Without any file the DeepLoc 2.0 public "
                  "download is used."},
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
class EsmLocTrainingArguments(TrainingArguments):
    """`TrainingArguments` with defaults for this task: evaluate and save every epoch, keep the model with the
    best validation MCC, group batches by length, report to nobody."""

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

    def __post_init__(self):
        # Two or more CPU processes (torchrun / accelerate launch on a machine without GPUs) need gloo.
        if self.ddp_backend is None and int(os.environ.get("WORLD_SIZE", "1")) > 1 and not torch.cuda.is_available():
            self.ddp_backend = "gloo"
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
    if model_args.from_scratch:
        esm_config = dict(ESM2_ARCHITECTURES[model_args.from_scratch])
        config = EsmLocConfig(esm_config=esm_config, esm_name_or_path=f"random:{model_args.from_scratch}",
                              attn_implementation=model_args.attn_implementation, **head_config)
        return EsmForLocalization(config)
    name = model_args.model_name_or_path
    local = Path(name).expanduser()
    if local.is_dir() and json.loads((local / "config.json").read_text()).get("model_type") == "esmloc":
        return EsmForLocalization.from_pretrained(local, attn_implementation=model_args.attn_implementation,
                                                  **head_config)
    if not local.is_dir() and (name.startswith((".", "/", "~")) or name.count("/") > 1):
        raise SystemExit(f"--model_name_or_path {name}: no such directory")
    try:
        return EsmForLocalization.from_esm(name, attn_implementation=model_args.attn_implementation, **head_config)
    except OSError as error:
        raise SystemExit(hub_unreachable_message(name, error)) from error


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
    return get_peft_model(model, lora_config)


def count_parameters(model) -> tuple[int, int]:
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    return trainable, sum(p.numel() for p in model.parameters())


def load_splits(data_args: DataArguments, seed: int):
    """Train/validation/test through the esmloc dataset builder (validated, split, identical sequences kept
    together)."""
    files = {split: path for split, path in (("train", data_args.train_file), ("validation", data_args.validation_file),
                                             ("test", data_args.test_file)) if path}
    if files and "train" not in files:
        raise SystemExit("--validation_file/--test_file need a --train_file")
    if len(files) == 2:
        raise SystemExit("give --train_file alone (it is split) or all of --train_file, --validation_file, --test_file")
    split_kwargs = {key: value for key, value in (("split_method", data_args.split_method),
                                                  ("validation_partitions", data_args.validation_partitions),
                                                  ("test_partitions", data_args.test_partitions)) if value is not None}
    data_files = files if len(files) == 3 else files.get("train")
    return data.load_dataset(data_files, data_args.dataset_config, seed=seed, **split_kwargs)


def label_setup(dataset, dataset_config: str) -> tuple[dict, list[str]]:
    """Config kwargs describing the labels, and the label names."""
    label_feature = dataset["train"].features["label"]
    if dataset_config == "deeploc":
        names = list(label_feature.feature.names)
        return {"id2label": dict(enumerate(names)), "problem_type": "multi_label_classification"}, names
    names = list(label_feature.names)
    return {"id2label": dict(enumerate(names)), "problem_type": "single_label_classification"}, names


def targets(split, num_labels: int, multi_label: bool) -> np.ndarray:
    """Integer class ids (single-label) or a multi-hot matrix (multi-label) for a split."""
    if not multi_label:
        return np.asarray(split["label"], dtype=np.int64)
    multi_hot = np.zeros((len(split), num_labels), dtype=np.float32)
    for row, present in enumerate(split["label"]):
        multi_hot[row, present] = 1.0
    return multi_hot


def balanced_class_weights(train_targets: np.ndarray, num_labels: int, multi_label: bool) -> list[float]:
    """Balanced cross-entropy weights n / (k * n_c), or BCE pos_weight negatives / positives per label."""
    if multi_label:
        positives = train_targets.sum(axis=0)
        return [float((len(train_targets) - p) / p) if p else 1.0 for p in positives]
    counts = np.bincount(train_targets, minlength=num_labels)
    return [float(len(train_targets) / (num_labels * c)) if c else 1.0 for c in counts]


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
                              device=training_args.device, progress=training_args.should_log)
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


def positive_probabilities(probabilities: np.ndarray, multi_label: bool) -> np.ndarray:
    """The evaluation layer's convention: P(positive) as a vector for binary tasks, one column per label
    otherwise."""
    return probabilities[:, 1] if not multi_label and probabilities.shape[1] == 2 else probabilities


def without_local_paths(arguments: dict) -> dict:
    """Arguments for the record (run_info.json travels with a pushed model): local files by name only."""
    return {key: Path(value).name if isinstance(value, str) and Path(value).expanduser().exists() else value
            for key, value in arguments.items()}


def main(argv=None):
    model_args, data_args, training_args = parse_arguments(argv)
    # Trainer's own hub logic would create the repo at init and upload checkpoints (pickles); publish pushes the
    # finished output directory at the end instead.
    push_to_hub, training_args.push_to_hub = training_args.push_to_hub, False
    if push_to_hub and publish.as_hub_model_id(training_args.hub_model_id or "") != training_args.hub_model_id:
        raise SystemExit("--push_to_hub needs --hub_model_id user/name")
    if model_args.push_adapter and model_args.finetune != "lora":
        raise SystemExit("--push_adapter needs --finetune lora")
    logging.basicConfig(format="%(asctime)s %(levelname)s %(name)s: %(message)s", level=logging.INFO,
                        handlers=[logging.StreamHandler(sys.stdout)])
    if not training_args.should_log:
        logger.setLevel(logging.WARNING)
    transformers.utils.logging.set_verbosity_warning()
    if training_args.learning_rate is None:
        training_args.learning_rate = DEFAULT_LEARNING_RATES[model_args.finetune]
    set_seed(training_args.seed)

    output_dir = Path(training_args.output_dir)
    last_checkpoint = training_args.resume_from_checkpoint
    if last_checkpoint is None and output_dir.is_dir():
        last_checkpoint = get_last_checkpoint(str(output_dir))
        if last_checkpoint:
            logger.info("Resuming from %s (found in --output_dir)", last_checkpoint)

    # Data
    with training_args.main_process_first(desc="loading the dataset"):
        dataset = load_splits(data_args, seed=training_args.seed)
    label_config, label_names = label_setup(dataset, data_args.dataset_config)
    multi_label = label_config["problem_type"] == "multi_label_classification"
    if training_args.metric_for_best_model is None:
        training_args.metric_for_best_model = "macro_mcc_tuned" if multi_label else "mcc_tuned"
        training_args.greater_is_better = True
    for name, limit in (("train", data_args.max_train_samples), ("validation", data_args.max_eval_samples),
                        ("test", data_args.max_test_samples)):
        if limit is not None:
            dataset[name] = dataset[name].select(range(min(limit, len(dataset[name]))))
    if training_args.should_log:
        print(data.format_summary(dataset))
    num_labels = len(label_names)
    if model_args.class_weights:
        train_targets = targets(dataset["train"], num_labels, multi_label)
        label_config["class_weights"] = balanced_class_weights(train_targets, num_labels, multi_label)
        logger.info("Class weights from the training split: %s", label_config["class_weights"])

    # Model
    model = build_model(model_args, label_config)
    tokenizer = tokenizer_for(model.config)
    trainable_model = prepare_finetuning(model, model_args)
    trainable, total = count_parameters(trainable_model)
    if training_args.should_log:
        print(f"finetune={model_args.finetune}: {trainable:,} trainable parameters of {total:,} "
              f"({100 * trainable / total:.2f}%)")

    callbacks = []
    if training_args.early_stopping_patience:
        callbacks.append(EarlyStoppingCallback(early_stopping_patience=training_args.early_stopping_patience))
    compute_metrics = evaluation.compute_metrics(multi_label, label_names, tune_threshold=True)
    use_feature_cache = model_args.finetune == "frozen" and model_args.feature_cache
    if use_feature_cache:
        trainer = cached_feature_trainer(model, tokenizer, dataset, model_args, training_args, num_labels,
                                         multi_label, compute_metrics=compute_metrics, callbacks=callbacks)
    else:
        tokenized = tokenize_splits(dataset, tokenizer, num_labels, multi_label, training_args)
        trainer = Trainer(
            model=trainable_model,
            args=training_args,
            train_dataset=tokenized["train"],
            eval_dataset=tokenized["validation"],
            processing_class=tokenizer,
            data_collator=DataCollatorWithPadding(tokenizer),
            compute_metrics=compute_metrics,
            callbacks=callbacks,
        )

    train_result = trainer.train(resume_from_checkpoint=last_checkpoint)
    trainer.save_metrics("train", train_result.metrics)
    trainer.save_state()

    # The final model: what the best checkpoint holds, merged with its adapters for LoRA. Only the main process
    # saves and evaluates it; its predictions come from exactly the weights that were saved.
    final_model = trainer.model
    if use_feature_cache:
        # The Trainer trained (and, with load_best_model_at_end, restored) the head modules the model shares.
        final_model = model.to(training_args.device)
    if model_args.finetune == "lora":
        if trainer.is_world_process_zero():
            final_model.save_pretrained(output_dir / "adapter")
        final_model = final_model.merge_and_unload()
    if trainer.is_world_process_zero():
        save_model(final_model, output_dir, tokenizer)
        # With the feature cache, pooled features of the (unchanged) backbone come from the cache: the same numbers.
        predict = partial(engine.predict_probabilities, final_model, tokenizer, device=training_args.device,
                          max_tokens_per_batch=model_args.max_tokens_per_batch,
                          feature_cache=feature_cache_dir(model_args) if use_feature_cache else None)
        validation_targets = targets(dataset["validation"], num_labels, multi_label)
        test_targets = targets(dataset["test"], num_labels, multi_label)
        validation_probabilities = positive_probabilities(
            predict(dataset["validation"]["Sequence"], desc="Predicting validation"), multi_label)
        test_probabilities = positive_probabilities(predict(dataset["test"]["Sequence"], desc="Predicting test"),
                                                    multi_label)
        report = evaluation.evaluation_report(validation_probabilities, validation_targets, test_probabilities,
                                              test_targets, label_names=label_names)
        # Undefined metrics (e.g. ROC-AUC of a location without positives in the split) are saved as null.
        trainer.log_metrics("test", {key: value for key, value in report.items() if value is not None})
        trainer.save_metrics("test", report)
        threshold = evaluation.tuned_threshold(validation_probabilities, validation_targets)
        test_accs = dataset["test"]["ACC"]
        evaluation.write_predictions_csv(output_dir / "test_predictions.csv", test_accs, test_targets,
                                         test_probabilities, threshold, label_names)
        evaluation.plot_curves(output_dir, test_targets, test_probabilities, threshold, label_names)
        print(evaluation.format_examples_table(test_accs, test_targets, test_probabilities, threshold=threshold,
                                               label_names=label_names, n=data_args.num_examples_to_show,
                                               seed=training_args.seed))
        run_info = {
            "model": {**without_local_paths(asdict(model_args)), "base_model": model.config.esm_name_or_path,
                      "trainable_parameters": trainable, "total_parameters": total},
            "data": {**without_local_paths(asdict(data_args)),
                     "split_sizes": {name: len(split) for name, split in dataset.items()}},
            "training": {"num_train_epochs": training_args.num_train_epochs, "seed": training_args.seed,
                         "learning_rate": training_args.learning_rate,
                         "per_device_train_batch_size": training_args.per_device_train_batch_size,
                         "world_size": training_args.world_size,
                         "metric_for_best_model": training_args.metric_for_best_model},
        }
        (output_dir / RUN_INFO_FILE).write_text(json.dumps(run_info, indent=2))
        publish.write_model_card(output_dir)
        print(f"Model, metrics, predictions, plots and model card saved in {output_dir}")
    # Push only once every process is done, so that a failed push cannot leave other processes waiting.
    trainer.accelerator.wait_for_everyone()
    if push_to_hub and trainer.is_world_process_zero():
        try:
            url = publish.push_output_dir(output_dir, training_args.hub_model_id,
                                          private=bool(training_args.hub_private_repo),
                                          endpoint=model_args.hub_endpoint, token=training_args.hub_token,
                                          what="adapter" if model_args.push_adapter else "merged")
        except publish.PublishError as error:
            raise SystemExit(f"The model is saved in {output_dir}, but the push failed: {error}") from None
        print(f"Pushed to {url}")


if __name__ == "__main__":
    main()
