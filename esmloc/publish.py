"""Publishing a trained model: its model card, the exact set of files a hub repository gets, and the push.

    esmloc-push OUTPUT_DIR --hub_model_id user/name [--hub_private_repo] [--hub_endpoint URL] [--push_adapter]

`write_model_card` renders the template `model_card.md` (the repository's root file; the package ships it as
`esmloc/model_card.md`) into the output directory's `README.md` from the run's own files, so every number in a card
is a number the run wrote. `files_to_push` is an explicit allow-list: a repository gets a complete, self-contained
model (config with a local `auto_map`, the three remote-code files, weights, tokenizer, card, metrics, plots) and
never a checkpoint folder or a pickle. `push_output_dir` makes one commit of exactly those files to the endpoint given
(`--hub_endpoint`, else `HF_ENDPOINT`, else the Hub); the token comes from the usual login or `HF_TOKEN` and is never
printed, logged or written.
"""

import json
import logging
import math
import os
import re
import sys
from dataclasses import dataclass, field
from importlib import import_module, resources
from pathlib import Path

from huggingface_hub import CommitOperationAdd, EvalResult, HfApi, ModelCard, ModelCardData
from huggingface_hub import constants as hub_constants
from huggingface_hub.errors import HfHubHTTPError
from transformers import HfArgumentParser


logger = logging.getLogger("esmloc.publish")

TEMPLATE_NAME = "model_card.md"
CARD_FILE = "README.md"
# In every card the template renders (an HTML comment, invisible on the Hub): how a push recognises an esmloc card.
CARD_MARKER = "rendered by esmloc.publish.render_model_card"
ADAPTER_DIR = "adapter"
PUSH_TARGETS = ("merged", "adapter")
DEFAULT_LICENSE = "apache-2.0"
TAGS = ["protein", "esm", "esm2", "biology", "subcellular-localization", "mitochondrion"]

# What a saved esmloc model is made of (esmloc.export.save_model); all of it is required for a push.
REMOTE_CODE_FILES = ("configuration_esmloc.py", "modeling_esmloc.py", "tokenization_esmloc.py")
MODEL_FILES = ("config.json", "model.safetensors")
TOKENIZER_FILES = ("tokenizer_config.json", "vocab.txt")
OPTIONAL_TOKENIZER_FILES = ("special_tokens_map.json",)
ADAPTER_FILES = ("adapter_config.json", "adapter_model.safetensors")
# The run's record: pushed when present. trainer_state.json holds the per-epoch validation log the card shows.
RECORD_FILES = ("run_info.json", "trainer_state.json", "test_predictions.csv")
RESULTS_SUFFIX = "_results.json"
PLOT_TITLES = {
    "roc_curve.png": "ROC curve (test)",
    "pr_curve.png": "Precision-recall curve (test)",
    "confusion_matrix.png": "Confusion matrices (test)",
    "mcc_per_location.png": "MCC per location (test)",
}
# Never pushed, whatever the allow-list says: pickles (arbitrary code on load) and optimizer/trainer state.
NEVER_PUSHED_SUFFIXES = (".bin", ".pt", ".pth", ".pkl", ".pickle", ".ckpt", ".joblib", ".npy", ".npz")

# Result keys, in the order the card shows them, with their display names. Multi-label keys are handled too:
# `<metric>_<Location>` (per-location table) and `<metric>_Mitochondrion` (summary table).
METRIC_NAMES = {
    "accuracy": "Accuracy",
    "precision": "Precision",
    "recall": "Recall",
    "f1": "F1",
    "mcc": "MCC",
    "roc_auc": "ROC-AUC",
    "pr_auc": "PR-AUC (average precision)",
    "macro_mcc": "Macro MCC (mean over locations)",
    "micro_f1": "Micro F1",
    "macro_f1": "Macro F1",
    "subset_accuracy": "Subset accuracy (all locations right)",
    "jaccard": "Jaccard (samples)",
    "micro_roc_auc": "Micro ROC-AUC",
    "macro_roc_auc": "Macro ROC-AUC",
    "tp": "True positives",
    "fp": "False positives",
    "tn": "True negatives",
    "fn": "False negatives",
    "threshold": "Threshold",
}
THRESHOLD_FREE = ("roc_auc", "pr_auc", "micro_roc_auc", "macro_roc_auc")
# model-index metric types (the `evaluate` metric ids) and arguments, for the metrics that go there.
MODEL_INDEX_TYPES = {
    "accuracy": ("accuracy", None),
    "precision": ("precision", None),
    "recall": ("recall", None),
    "f1": ("f1", None),
    "mcc": ("matthews_correlation", None),
    "roc_auc": ("roc_auc", None),
    "pr_auc": ("average_precision", None),
    "macro_mcc": ("matthews_correlation", {"average": "macro"}),
    "micro_f1": ("f1", {"average": "micro"}),
    "macro_f1": ("f1", {"average": "macro"}),
    "subset_accuracy": ("accuracy", {"subset": True}),
    "jaccard": ("jaccard", {"average": "samples"}),
    "micro_roc_auc": ("roc_auc", {"average": "micro"}),
    "macro_roc_auc": ("roc_auc", {"average": "macro"}),
}
DEFAULT_THRESHOLD_CONFIG = "threshold 0.5"
THRESHOLD_SPEC = ".3f"
HUB_URL = "https://huggingface.co"
TUNED_THRESHOLD_CONFIG = "tuned threshold"
_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")


class PublishError(RuntimeError):
    """A push (or the preparation of one) failed; the message says why and what to check. Never holds a token."""


# --- reading a run -------------------------------------------------------------------------------------------------


def _read_json(path: Path) -> dict:
    if not path.is_file():
        return {}
    with path.open(encoding="utf-8") as handle:
        return json.load(handle)


def _number(value) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def _fmt(value, spec: str = ".3f") -> str:
    """A number as the card shows it: integers with thousands separators, floats per `spec`."""
    if isinstance(value, bool) or not _number(value):
        return str(value)
    if isinstance(value, int):
        return f"{value:,}"
    return format(value, spec)


def as_hub_model_id(name) -> str | None:
    """`name` if it reads as a hub model id (`org/name`), else None (a local path, `random:...`, nothing)."""
    if not isinstance(name, str) or name.startswith((".", "/", "~", "random:")) or "\\" in name:
        return None
    return name if _HUB_ID.match(name) and ".." not in name else None


def _display_path(path) -> str | None:
    """A data file as the card names it: its file name only (absolute paths would leak a user's directories)."""
    return None if not path else Path(str(path)).name


def template_path() -> Path:
    """The model card template shipped with the package (`esmloc/model_card.md`, the root `model_card.md`)."""
    return Path(str(resources.files("esmloc").joinpath(TEMPLATE_NAME)))


class _Run:
    """The files of one output directory that a card is made from."""

    def __init__(self, output_dir: Path):
        self.dir = output_dir
        self.config = _read_json(output_dir / "config.json")
        self.info = _read_json(output_dir / "run_info.json")
        self.test = {k: v for k, v in _read_json(output_dir / "test_results.json").items() if _number(v)}
        all_results = _read_json(output_dir / "all_results.json")
        self.train = _read_json(output_dir / "train_results.json") or {
            key: value for key, value in all_results.items() if not key.startswith(("test_", "validation_"))
        }
        self.state = _read_json(output_dir / "trainer_state.json")
        self.adapter_config = _read_json(output_dir / ADAPTER_DIR / "adapter_config.json")
        self.model = self.info.get("model", {})
        self.data = self.info.get("data", {})
        self.training = self.info.get("training", {})

    @property
    def labels(self) -> list[str]:
        id2label = self.config.get("id2label") or {"0": "Other", "1": "Mitochondrion"}
        return [id2label[key] for key in sorted(id2label, key=int)]

    @property
    def multi_label(self) -> bool:
        return self.config.get("problem_type") == "multi_label_classification"

    @property
    def base_model(self) -> str | None:
        return self.model.get("base_model") or self.config.get("esm_name_or_path")

    @property
    def finetune(self) -> str | None:
        if self.model.get("finetune"):
            return self.model["finetune"]
        return "lora" if self.adapter_config else None

    @property
    def split_method(self) -> str | None:
        if not self.data:
            return None
        # train.py's rule when --split_method is not given.
        given = self.data.get("validation_file") and self.data.get("test_file")
        return self.data.get("split_method") or ("given" if given else "stratified")


# --- the card ------------------------------------------------------------------------------------------------------


def _metric_parts(run: _Run) -> tuple[list[str], list[tuple[str, str]]]:
    """(summary metrics, per-location (metric, location) pairs) present in test_results.json, in display order.

    A metric is a result key without its `test_` prefix and `_tuned` suffix: `mcc`, `macro_mcc`, `f1_Mitochondrion`,
    and, for multi-label runs, the per-location `mcc_<Location>` and `threshold_<Location>`."""
    bases = []
    for key in run.test:
        if key.startswith("test_"):
            base = key[len("test_"):].removesuffix("_tuned")
            if base not in bases:
                bases.append(base)
    locations = [_key_name(label) for label in run.labels] if run.multi_label else []
    per_location = [(metric, location) for location in locations for metric in ("mcc", "threshold")
                    if f"{metric}_{location}" in bases]
    located = {f"{metric}_{location}" for metric, location in per_location}
    order = list(METRIC_NAMES)

    def rank(base):  # METRIC_NAMES order, the _Mitochondrion variants of a multi-label run after the others
        metric = base.removesuffix("_Mitochondrion") if base not in METRIC_NAMES else base
        return (metric != base, order.index(metric) if metric in order else len(order), base)

    return sorted((base for base in bases if base not in located), key=rank), per_location


def _key_name(label: str) -> str:
    # The form a label takes inside result keys (esmloc.metrics.esmloc_metrics.key_name).
    return re.sub(r"\W+", "_", str(label)).strip("_")


def _metric_display(base: str) -> str:
    if base not in METRIC_NAMES and base.endswith("_Mitochondrion"):
        metric = base.removesuffix("_Mitochondrion")
        return f"{METRIC_NAMES.get(metric, metric)} (Mitochondrion)"
    return METRIC_NAMES.get(base, base)


def _cell(run: _Run, key: str, base: str) -> str:
    if key not in run.test:
        return "–"
    return _fmt(run.test[key], THRESHOLD_SPEC if base == "threshold" else ".3f")


Rows = list[tuple[str, list[str]]]


def _evaluation_table(run: _Run) -> tuple[list[str], Rows, list[str], Rows]:
    summary, per_location = _metric_parts(run)
    default = run.test.get("test_threshold")
    default_text = f"threshold {_fmt(default, 'g')}" if _number(default) else "threshold 0.5"
    header = [f"Test, {default_text}", "Test, tuned threshold", "Validation, tuned threshold"]
    rows = [
        (_metric_display(base), [_cell(run, f"test_{base}", base), _cell(run, f"test_{base}_tuned", base),
                                 _cell(run, f"validation_{base}_tuned", base)])
        for base in summary
    ]
    location_header, location_rows = [], []
    if per_location:
        location_header = ["MCC, threshold 0.5", "MCC, tuned threshold", "Tuned threshold", "Validation MCC, tuned"]
        for label in run.labels:
            name = _key_name(label)
            location_rows.append((label, [
                _cell(run, f"test_mcc_{name}", "mcc"),
                _cell(run, f"test_mcc_{name}_tuned", "mcc"),
                _cell(run, f"test_threshold_{name}_tuned", "threshold"),
                _cell(run, f"validation_mcc_{name}_tuned", "mcc"),
            ]))
    return header, rows, location_header, location_rows


def _eval_results(run: _Run, task_name: str, dataset_name: str, dataset_type: str) -> list[EvalResult]:
    """model-index entries: every threshold-dependent metric at 0.5 and tuned, threshold-free ones once."""
    summary, per_location = _metric_parts(run)
    bases = [base for base in summary if base in MODEL_INDEX_TYPES
             or (base.endswith("_Mitochondrion") and base[: -len("_Mitochondrion")] in MODEL_INDEX_TYPES)]
    bases += [f"mcc_{location}" for metric, location in per_location if metric == "mcc"]
    results = []
    common = {"task_type": "text-classification", "task_name": task_name, "dataset_type": dataset_type,
              "dataset_name": dataset_name, "dataset_config": run.data.get("dataset_config"), "dataset_split": "test"}
    for base in bases:
        metric = base
        args = None
        suffix = ""
        if base.startswith("mcc_") and base not in MODEL_INDEX_TYPES:
            metric, suffix = "mcc", f" ({base[len('mcc_'):]})"
        elif base.endswith("_Mitochondrion"):
            metric, suffix = base[: -len("_Mitochondrion")], " (Mitochondrion)"
        metric_type, args = MODEL_INDEX_TYPES[metric]
        variants = [("", DEFAULT_THRESHOLD_CONFIG)]
        if metric not in THRESHOLD_FREE:
            variants.append(("_tuned", TUNED_THRESHOLD_CONFIG))
        for key_suffix, config in variants:
            key = f"test_{base}{key_suffix}"
            if key not in run.test:
                continue
            threshold_free = metric in THRESHOLD_FREE
            name = f"Test {METRIC_NAMES[metric]}{suffix}" + ("" if threshold_free else f", {config}")
            results.append(EvalResult(**common, metric_type=metric_type, metric_value=run.test[key], metric_name=name,
                                      metric_config=None if threshold_free else config, metric_args=args))
    return results


def _epoch_log(run: _Run) -> tuple[list[str], list[list[str]]]:
    history = run.state.get("log_history") or []
    evaluations = [entry for entry in history if "eval_loss" in entry]
    if not evaluations:
        return [], []
    mcc = "eval_macro_mcc" if run.multi_label else "eval_mcc"
    train_loss = {entry.get("epoch"): entry["loss"] for entry in history if "loss" in entry}
    header = ["Epoch", "Step", "Training loss", "Validation loss", "Validation MCC, 0.5", "Validation MCC, tuned"]
    rows = []
    for entry in evaluations:
        values = [entry.get("epoch"), entry.get("step"), train_loss.get(entry.get("epoch")), entry.get("eval_loss"),
                  entry.get(mcc), entry.get(f"{mcc}_tuned")]
        rows.append([("–" if value is None else _fmt(value, "g" if column == 0 else ".3f"))
                     for column, value in enumerate(values)])
    return header, rows


def _plots(run: _Run) -> list[tuple[str, str]]:
    present = sorted(path.name for path in run.dir.glob("*.png") if path.is_file())
    known = [name for name in PLOT_TITLES if name in present]
    return [(PLOT_TITLES.get(name, Path(name).stem.replace("_", " ")), name)
            for name in known + [name for name in present if name not in known]]


def _base_model_text(run: _Run, base_id: str | None) -> tuple[str, bool]:
    """(how the card names the base model, whether its weights can be loaded by that name)."""
    base = run.base_model
    if base_id:
        return f"[`{base_id}`]({HUB_URL}/{base_id})", True
    if base and base.startswith("random:"):
        return f"none: an ESM-2 `{base[len('random:'):]}` architecture with random initial weights", False
    if base:  # a local folder: only its name (a path would show the publisher's directories)
        return (f"`{Path(base).name}`, a local ESM-2 checkpoint (esmloc-push --base_model names its hub id)",
                Path(base).expanduser().is_dir())
    return "not recorded", False


def _head_text(run: _Run) -> str:
    parts = [f"{run.config.get('pooling', 'mean')} pooling"]
    esm = run.config.get("esm_config") or {}
    if esm.get("num_hidden_layers") and esm.get("hidden_size"):
        parts.append(f"over the {esm['num_hidden_layers']}-layer, {esm['hidden_size']}-dimensional ESM-2 encoder")
    if _number(run.config.get("classifier_dropout")):
        parts.append(f"dropout {_fmt(run.config['classifier_dropout'], 'g')}")
    return ", ".join(parts)


def _crop_text(crop: str | None) -> str:
    return {"middle": "middle cropping: the N- and C-terminal halves are kept, as in DeepLoc 2.0",
            "n_terminal": "the N-terminal residues are kept, where mitochondrial targeting peptides sit"}.get(
        crop, f"crop strategy {crop!r}")


def _training_rows(run: _Run) -> list[tuple[str, str]]:
    rows = []
    finetune = run.finetune
    descriptions = {"frozen": "frozen backbone, only the head trained", "lora": "LoRA adapters + head",
                    "full": "full fine-tuning (backbone and head)"}
    if finetune:
        rows.append(("Fine-tuning mode", f"`{finetune}` ({descriptions.get(finetune, finetune)})"))
    if _number(run.model.get("trainable_parameters")) and _number(run.model.get("total_parameters")):
        counts = f"{_fmt(run.model['trainable_parameters'])} of {_fmt(run.model['total_parameters'])}"
        rows.append(("Trainable parameters", counts))
    if _number(run.training.get("num_train_epochs")):
        trained = run.train.get("epoch")
        text = _fmt(run.training["num_train_epochs"], "g")
        if _number(trained) and trained != run.training["num_train_epochs"]:
            text += f" requested, {_fmt(trained, '.3g')} trained"
        rows.append(("Epochs", text))
    elif _number(run.train.get("epoch")):
        rows.append(("Epochs", _fmt(run.train["epoch"], "g")))
    for key, name, spec in (("learning_rate", "Learning rate", "g"), ("per_device_train_batch_size",
                            "Batch size per device", "g"), ("world_size", "Processes", "g"), ("seed", "Seed", "g")):
        if _number(run.training.get(key)):
            rows.append((name, _fmt(run.training[key], spec)))
    if isinstance(run.model.get("class_weights"), bool) or run.config.get("class_weights") is not None:
        weights = run.config.get("class_weights")
        name = "Loss weights (BCE pos_weight per location)" if run.multi_label else "Class-weighted loss"
        rows.append((name, "yes: " + ", ".join(
            f"{label} {_fmt(weight)}" for label, weight in zip(run.labels, weights)) if weights else "no"))
    if _number(run.train.get("train_loss")):
        rows.append(("Final training loss", _fmt(run.train["train_loss"])))
    if _number(run.train.get("train_runtime")):
        rows.append(("Training loop runtime (train_runtime)", f"{_fmt(run.train['train_runtime'], '.1f')} s"))
    best = run.training.get("metric_for_best_model")
    if best and _number(run.state.get("best_metric")):
        step = run.state.get("best_global_step")
        rows.append(("Model kept", f"the checkpoint with the best validation `{best}`: {_fmt(run.state['best_metric'])}"
                                   + (f" (step {_fmt(step, 'g')})" if _number(step) else "")))
    return rows


def _lora_rows(run: _Run) -> list[tuple[str, str]]:
    if run.finetune != "lora":
        return []
    source = run.adapter_config or {}
    rows = []
    for key, adapter_key, name in (("lora_r", "r", "Rank r"), ("lora_alpha", "lora_alpha", "Alpha"),
                                   ("lora_dropout", "lora_dropout", "Dropout")):
        value = run.model.get(key, source.get(adapter_key))
        if _number(value):
            rows.append((name, _fmt(value, "g")))
    targets = run.model.get("lora_target_modules") or source.get("target_modules")
    if targets:
        rows.append(("Target modules", ", ".join(f"`{t}`" for t in targets)))
    saved = source.get("modules_to_save")
    if saved:
        rows.append(("Trained in full and saved with the adapter", ", ".join(f"`{m}`" for m in saved)))
    return rows


def _split_text(run: _Run) -> str | None:
    method = run.split_method
    if method == "stratified":
        return "stratified random split of one file (seeded; identical sequences kept in one split)"
    if method == "partition":
        parts = []
        for key, name in (("validation_partitions", "validation"), ("test_partitions", "test")):
            if run.data.get(key) is not None:
                parts.append(f"{name} partitions {', '.join(str(p) for p in run.data[key])}")
        detail = f" ({'; '.join(parts)})" if parts else ""
        return f"by the homology partitions of the data's `Partition` column{detail}"
    if method == "given":
        return "three given files (train, validation, test)"
    return method


def _data_rows(run: _Run) -> list[tuple[str, str]]:
    if not run.data:
        return []
    rows = []
    files = [(name, _display_path(run.data.get(key))) for key, name in (("train_file", "train"),
             ("validation_file", "validation"), ("test_file", "test"))]
    files = [(name, file) for name, file in files if file]
    if files:
        rows.append(("Data files", ", ".join(f"`{file}` ({name})" for name, file in files)))
    elif run.data.get("dataset_config") == "deeploc":
        rows.append(("Data", "the DeepLoc 2.0 SwissProt training set (public download)"))
    if run.data.get("dataset_config"):
        rows.append(("Task (dataset config)", f"`{run.data['dataset_config']}`"))
    if run.split_method:
        rows.append(("Split", _split_text(run)))
    sizes = run.data.get("split_sizes") or {}
    if sizes:
        rows.append(("Proteins per split", ", ".join(f"{name} {_fmt(size, 'g')}" for name, size in sizes.items())))
    for key, name in (("max_train_samples", "train"), ("max_eval_samples", "validation"),
                      ("max_test_samples", "test")):
        if _number(run.data.get(key)):
            rows.append((f"Truncated {name} split", f"to at most {_fmt(run.data[key], 'g')} proteins"))
    return rows


def _class_weights_text(run: _Run) -> str | None:
    weights = run.config.get("class_weights")
    return ", ".join(f"{label} {_fmt(w)}" for label, w in zip(run.labels, weights)) if weights else None


def render_model_card(
    output_dir,
    *,
    what: str = "merged",
    repo_id: str | None = None,
    endpoint: str | None = None,
    license: str = DEFAULT_LICENSE,
    base_model: str | None = None,
    datasets: list[str] | None = None,
    space_id: str | None = None,
) -> ModelCard:
    """The model card of a run's output directory, rendered from the template `model_card.md`.

    Every number comes from the run's files (test_results.json, run_info.json, train_results.json or
    all_results.json, trainer_state.json, config.json); what they lack is left out, never made up. Plots are
    referenced only when their PNG exists. `what="adapter"` renders the card of the LoRA adapter (library `peft`,
    loading code that names the base model). `repo_id` (and `endpoint`, for the clone URL) make the loading code use
    the repository; without them it uses the folder's name. `base_model` and `datasets` set the metadata the run
    cannot know (hub ids); by default `base_model` is the run's ESM-2 checkpoint when that is a hub id. `space_id`: a
    demo Space of the model (esmloc.space) that the card links to.
    """
    if what not in PUSH_TARGETS:
        raise ValueError(f"what must be one of {PUSH_TARGETS}, got {what!r}")
    output_dir = Path(output_dir)
    run = _Run(output_dir)
    if not run.config:
        raise PublishError(f"{output_dir} holds no config.json: not a saved esmloc model")
    if base_model is not None and as_hub_model_id(base_model) is None:
        raise ValueError(f"base_model must be a hub model id such as facebook/esm2_t6_8M_UR50D, got {base_model!r}")
    base_id = base_model or as_hub_model_id(run.base_model)
    base_text, base_loadable = _base_model_text(run, base_id)
    is_adapter = what == "adapter"
    multi_label = run.multi_label
    labels = run.labels
    name = repo_id.split("/")[-1] if repo_id else output_dir.resolve().name

    if multi_label:
        task_name = "Protein subcellular localisation (multi-label)"
        title = f"{name}: protein subcellular localisation with ESM-2"
        summary = (f"Predicts where in the cell a protein lives from its amino-acid sequence alone: one independent "
                   f"probability for each location ({', '.join(labels)}). An ESM-2 protein "
                   "language model encodes the sequence; a pooling layer and a classifier turn it into the scores.")
        output_description = "one sigmoid probability per location: " + ", ".join(f"`{label}`" for label in labels)
    else:
        positive = labels[-1]
        task_name = f"Protein subcellular localisation ({positive} vs {', '.join(labels[:-1])})"
        title = f"{name}: is this protein in the {positive.lower()}?"
        summary = (f"Predicts from its amino-acid sequence alone whether a protein is located in the "
                   f"**{positive.lower()}** (`{positive}`) or not (`{labels[0]}`). An ESM-2 protein language model "
                   "encodes the sequence; a pooling layer and a classifier turn it into the probability.")
        output_description = f"probabilities of {' and '.join(f'`{label}`' for label in labels)} (softmax)"

    finetune = run.finetune
    targets = run.model.get("lora_target_modules") or run.adapter_config.get("target_modules") or []
    finetune_text = {"frozen": "frozen ESM-2 backbone, trained head",
                     "lora": "LoRA adapters" + (f" on {', '.join(f'`{t}`' for t in targets)}" if targets else "")
                             + ", trained head",
                     "full": "the whole model (backbone and head)"}.get(finetune, "not recorded")
    train_file = _display_path(run.data.get("train_file"))
    source = train_file or ("DeepLoc 2.0" if run.data.get("dataset_config") == "deeploc" else "esmloc data")
    dataset_name = f"{source} (test split" + (f", {run.split_method} split)" if run.split_method else ")")
    eval_results = _eval_results(run, task_name, dataset_name, (datasets or ["esmloc"])[0]) if run.test else None

    card_data = ModelCardData(
        library_name="peft" if is_adapter else "transformers",
        pipeline_tag="text-classification",
        tags=TAGS + (["lora", "peft"] if finetune == "lora" else []) + (["multi-label"] if multi_label else []),
        base_model=base_id,
        datasets=list(datasets) if datasets else None,
        license=license,
        model_name=name if eval_results else None,
        eval_results=eval_results or None,
    )
    evaluation_header, evaluation_rows, location_header, location_rows = _evaluation_table(run)
    epoch_header, epoch_rows = _epoch_log(run)
    load_ref = repo_id or name
    hub_url = (endpoint or hub_constants.ENDPOINT).rstrip("/")
    return ModelCard.from_template(
        card_data,
        template_path=str(template_path()),
        title=title,
        summary=summary,
        is_adapter=is_adapter,
        multi_label=multi_label,
        output_description=output_description,
        base_model=base_id or (Path(run.base_model).name if run.base_model else None),
        base_model_id=base_id,
        base_model_text=base_text,
        base_loadable=base_loadable,
        base_random=bool(run.base_model and run.base_model.startswith("random:")),
        adapter_saves=", ".join(f"`{m}`" for m in run.adapter_config.get("modules_to_save") or []),
        finetune_text=finetune_text,
        head_text=_head_text(run),
        max_residues=run.config.get("max_residues", "(not recorded)"),
        crop_text=_crop_text(run.config.get("crop")),
        load_ref=load_ref,
        clone_url=f"{hub_url}/{repo_id}" if repo_id else f"{hub_url}/<user>/{name}",
        clone_dir=name,
        space_url=f"{hub_url}/spaces/{space_id}" if space_id else None,
        positive_label=labels[-1],
        negative_label=labels[0],
        tuned_threshold=(_fmt(run.test["test_threshold_tuned"], THRESHOLD_SPEC) if "test_threshold_tuned" in run.test
                         else None),
        training_rows=_training_rows(run),
        lora_rows=_lora_rows(run),
        data_rows=_data_rows(run),
        epoch_header=epoch_header,
        epoch_rows=epoch_rows,
        evaluation_header=evaluation_header,
        evaluation_rows=evaluation_rows if run.test else [],
        location_header=location_header,
        location_rows=location_rows,
        plots=_plots(run),
        split_method=run.split_method,
        class_weights=_class_weights_text(run),
    )


def write_model_card(output_dir, **card_options) -> Path:
    """Writes the card into `output_dir/README.md` (and `adapter/README.md` for a LoRA run, replacing PEFT's blank
    template); returns the README path. Called by train.py at the end of every run, before any push."""
    output_dir = Path(output_dir)
    path = output_dir / CARD_FILE
    render_model_card(output_dir, **card_options).save(path)
    if (output_dir / ADAPTER_DIR / ADAPTER_FILES[0]).is_file():
        render_model_card(output_dir, what="adapter", **card_options).save(output_dir / ADAPTER_DIR / CARD_FILE)
    return path


# --- what a repository gets ----------------------------------------------------------------------------------------


def files_to_push(output_dir, what: str = "merged") -> dict[str, Path]:
    """The files a hub repository gets from `output_dir`, as {path in the repository: local path}, sorted.

    An explicit allow-list: `config.json`, `model.safetensors` (merged) or `adapter_config.json` +
    `adapter_model.safetensors` from `adapter/` (adapter), the three remote-code files, the tokenizer files, the card
    `README.md`, `*_results.json`, `run_info.json`, `trainer_state.json`, `test_predictions.csv` and the plots
    (`*.png`). Checkpoint folders, pickles (`*.bin`, `*.pt`, `*.pth`, `*.pkl`, ...) and anything else stay local.
    Raises `PublishError` when a file a loadable model needs is missing. The card itself may be missing (the push
    renders it).
    """
    if what not in PUSH_TARGETS:
        raise ValueError(f"what must be one of {PUSH_TARGETS}, got {what!r}")
    output_dir = Path(output_dir)
    if not output_dir.is_dir():
        raise PublishError(f"{output_dir} is not a directory")
    files = {}
    required = (*MODEL_FILES[:1], *REMOTE_CODE_FILES, *TOKENIZER_FILES)
    if what == "merged":
        required = (*required, MODEL_FILES[1])
    else:
        adapter_dir = output_dir / ADAPTER_DIR
        missing = [name for name in ADAPTER_FILES if not (adapter_dir / name).is_file()]
        if missing:
            raise PublishError(f"{adapter_dir} lacks {', '.join(missing)}: only --finetune lora runs have an adapter")
        files.update({name: adapter_dir / name for name in ADAPTER_FILES})
    missing = [name for name in required if not (output_dir / name).is_file()]
    if missing:
        raise PublishError(f"{output_dir} is not a complete saved esmloc model: missing {', '.join(missing)}")
    optional = [*OPTIONAL_TOKENIZER_FILES, *RECORD_FILES]
    optional += sorted(path.name for path in output_dir.glob(f"*{RESULTS_SUFFIX}"))
    optional += sorted(path.name for path in output_dir.glob("*.png"))
    for name in (*required, *optional):
        if (output_dir / name).is_file():
            files[name] = output_dir / name
    card = (output_dir / ADAPTER_DIR / CARD_FILE) if what == "adapter" else (output_dir / CARD_FILE)
    if card.is_file():
        files[CARD_FILE] = card
    for name in files:
        if name.endswith(NEVER_PUSHED_SUFFIXES) or "/" in name:
            raise PublishError(f"refusing to push {name}")  # a guard against future edits of the allow-list
    return dict(sorted(files.items()))


def card_for_push(output_dir, repo_id: str, what: str = "merged", endpoint: str | None = None,
                  **card_options) -> bytes:
    """The README.md a push sends.

    The card rendered for `repo_id` (its loading code names the repository) when the output directory's card is the
    one `write_model_card` wrote, unedited, or is missing (or, for the adapter, is PEFT's blank template); a card
    edited or written by hand is sent as it is. The local file is never changed."""
    output_dir = Path(output_dir)
    local = (output_dir / ADAPTER_DIR / CARD_FILE) if what == "adapter" else (output_dir / CARD_FILE)
    if local.is_file():
        text = local.read_text(encoding="utf-8")
        generated = CARD_MARKER in text and text.strip() == str(render_model_card(output_dir, what=what)).strip()
        peft_template = what == "adapter" and CARD_MARKER not in text
        if not (generated or peft_template):
            logger.info("%s was edited or written by hand: pushing it as it is", local)
            return local.read_bytes()
    card = render_model_card(output_dir, what=what, repo_id=repo_id, endpoint=endpoint, **card_options)
    return (str(card).rstrip("\n") + "\n").encode("utf-8")


# --- the push ------------------------------------------------------------------------------------------------------


def resolve_endpoint(endpoint: str | None = None) -> str:
    """The endpoint a push goes to: `endpoint`, else `HF_ENDPOINT` (read now, not at import), else the Hub."""
    return (endpoint or os.environ.get("HF_ENDPOINT") or hub_constants.ENDPOINT).rstrip("/")


def _secrets(token: str | None) -> list[str]:
    candidates = [token, os.environ.get("HF_TOKEN"), os.environ.get("HUGGING_FACE_HUB_TOKEN")]
    try:
        from huggingface_hub import get_token

        candidates.append(get_token())
    except Exception as error:  # noqa: BLE001 - a broken token store must not hide the push error
        logger.debug("could not read the stored token (%s)", type(error).__name__)
    return sorted({secret for secret in candidates if secret and len(secret) >= 4}, key=len, reverse=True)


def _scrub(text: str, secrets: list[str]) -> str:
    for secret in secrets:
        text = text.replace(secret, "***")
    return re.sub(r"(?i)(bearer\s+|authorization:\s*)\S+", r"\1***", text)


def _transport_errors() -> tuple[type[BaseException], ...]:
    """The HTTP client errors huggingface_hub may raise: httpx2 (huggingface_hub 2.x), httpx (1.x), requests."""
    errors = []
    for module, name in (("httpx2", "HTTPError"), ("httpx", "HTTPError"), ("requests", "RequestException")):
        try:
            errors.append(getattr(import_module(module), name))
        except (ImportError, AttributeError):
            pass
    return tuple(errors)


def _failure_message(error: Exception, endpoint: str, repo_id: str, secrets: list[str]) -> str:
    where = f"pushing to {endpoint}/{repo_id} failed"
    status = getattr(getattr(error, "response", None), "status_code", None)
    if isinstance(status, int):
        server = getattr(error, "server_message", None) or ""
        detail = f"HTTP {status}" + (f": {server.strip()}" if server.strip() else "")
        hints = {
            401: "the endpoint did not accept the credentials: log in with `hf auth login` or set HF_TOKEN to a token "
                 "with write access",
            403: f"the token may be read-only, or may not allow writing to the namespace {repo_id.split('/')[0]!r}",
            404: "the endpoint has no such repository or no upload API (mirrors such as hf-mirror.com are read-only: "
                 "push to https://huggingface.co, i.e. unset HF_ENDPOINT or pass --hub_endpoint)",
            405: "the endpoint does not accept uploads (a read-only mirror?): push to https://huggingface.co",
            429: "the endpoint is rate limiting: wait and push again",
        }
        hint = hints.get(status, "check the endpoint, the repository id and the token's write access")
    elif isinstance(error, (*_transport_errors(), OSError)):
        detail = f"{type(error).__name__}: {error}"
        hint = "the endpoint could not be reached: check the network, a proxy, and HF_ENDPOINT / --hub_endpoint"
    elif isinstance(error, ValueError):
        detail = f"{type(error).__name__}: {error}"
        hint = "check the repository id (user/name or org/name)"
    else:
        detail = type(error).__name__
        hint = "check the endpoint, the repository id and the token's write access"
    message = (f"{where} ({detail}); {hint}. The token is never shown. The local output directory is unchanged: "
               "push it again with esmloc-push.")
    return _scrub(message, secrets)


def push_output_dir(
    output_dir,
    repo_id: str,
    private: bool | None = False,
    endpoint: str | None = None,
    token: str | None = None,
    what: str = "merged",
    api: HfApi | None = None,
    commit_message: str | None = None,
    card_options: dict | None = None,
) -> str:
    """Pushes a run's output directory to the hub repository `repo_id` in ONE commit; returns the repository URL.

    `what="merged"` pushes the model (`files_to_push(output_dir, "merged")`), `what="adapter"` the LoRA adapter
    with its own card naming the base model. The endpoint is `endpoint`, else `HF_ENDPOINT`, else the Hub; the token
    is `token`, else the standard login / `HF_TOKEN`. The repository is created if needed (`private` applies to a new
    repository; a request for a private push into an existing public one is refused). Any failure raises
    `PublishError` with a message naming the endpoint, the repository and what to check, never the token; the output
    directory is never modified.
    """
    output_dir = Path(output_dir)
    endpoint = resolve_endpoint(endpoint)
    card_options = card_options or {}
    if as_hub_model_id(repo_id) != repo_id:
        raise PublishError(f"--hub_model_id must be a full repository id, user/name or org/name, got {repo_id!r}")
    files = files_to_push(output_dir, what)
    if what == "adapter":
        base = _Run(output_dir).base_model or ""
        if not (card_options.get("base_model") or as_hub_model_id(base) or Path(base).expanduser().is_dir()):
            raise PublishError(
                f"the adapter of {output_dir} cannot be used without its base model, and the run started from "
                f"{base or 'an unrecorded base'!s}, which cannot be loaded by name: push the merged model instead")
    readme = card_for_push(output_dir, repo_id, what, endpoint, **card_options)
    operations = [
        CommitOperationAdd(path_in_repo=name, path_or_fileobj=readme if name == CARD_FILE else str(path))
        for name, path in files.items()
    ]
    if CARD_FILE not in files:
        operations.append(CommitOperationAdd(path_in_repo=CARD_FILE, path_or_fileobj=readme))
    operations.sort(key=lambda operation: operation.path_in_repo)
    logger.info("Pushing %d files of %s (%s) to %s/%s", len(operations), output_dir, what, endpoint, repo_id)

    secrets = _secrets(token)
    try:
        api = api if api is not None else HfApi(endpoint=endpoint, token=token or None)
        api.create_repo(repo_id, repo_type="model", private=private, exist_ok=True)
        if private:
            visibility = api.repo_info(repo_id, repo_type="model")
            if getattr(visibility, "private", None) is False:
                raise PublishError(
                    f"{endpoint}/{repo_id} already exists and is public, but a private push was asked for: make it "
                    "private first (or choose another --hub_model_id). Nothing was pushed; the local output "
                    "directory is unchanged.")
        api.create_commit(
            repo_id,
            operations=operations,
            commit_message=commit_message or f"Upload esmloc {'LoRA adapter' if what == 'adapter' else 'model'}",
            repo_type="model",
        )
    except PublishError:
        raise
    except (HfHubHTTPError, *_transport_errors(), OSError, ValueError) as error:
        raise PublishError(_failure_message(error, endpoint, repo_id, secrets)) from None
    url = f"{endpoint}/{repo_id}"
    logger.info("Pushed to %s", url)
    return url


# --- the command ---------------------------------------------------------------------------------------------------


@dataclass
class PushArguments:
    hub_model_id: str = field(metadata={"help": "The repository to push to: user/name or org/name."})
    hub_private_repo: bool = field(default=False, metadata={"help": "Create the repository private."})
    hub_endpoint: str | None = field(
        default=None,
        metadata={"help": "The hub to push to (default: HF_ENDPOINT, else https://huggingface.co). The token is "
                  "the one of `hf auth login` or HF_TOKEN; it is never printed."},
    )
    push_adapter: bool = field(
        default=False,
        metadata={"help": "Push the LoRA adapter (OUTPUT_DIR/adapter) with its own card instead of the merged model."},
    )
    license: str = field(default=DEFAULT_LICENSE, metadata={"help": "The card's license (a hub license id)."})
    base_model: str | None = field(
        default=None,
        metadata={"help": "The card's base_model hub id, when the run's ESM-2 checkpoint was a local folder."},
    )
    datasets: list[str] | None = field(default=None, metadata={"help": "Hub dataset ids for the card's metadata."})
    commit_message: str | None = field(default=None)
    space: str | None = field(
        default=None,
        metadata={"help": "Also create or update this Gradio Space (user/name) serving the pushed model "
                  "(esmloc.space); the model card links to it."},
    )


def parse_arguments(argv=None) -> tuple[Path, PushArguments]:
    parser = HfArgumentParser(PushArguments, prog="esmloc-push",
                              description="Push a train.py output directory to a Hugging Face hub repository.")
    parser.add_argument("output_dir", metavar="OUTPUT_DIR", help="A train.py --output_dir.")
    arguments, rest = parser.parse_args_into_dataclasses(args=sys.argv[1:] if argv is None else argv)
    return Path(rest.output_dir), arguments


def main(argv=None) -> str:
    output_dir, args = parse_arguments(argv)
    logging.basicConfig(format="%(asctime)s %(levelname)s %(name)s: %(message)s", level=logging.INFO,
                        handlers=[logging.StreamHandler(sys.stdout)])
    for name in ("httpx", "httpx2", "httpcore", "httpcore2", "urllib3"):  # request lines add nothing to our messages
        logging.getLogger(name).setLevel(logging.WARNING)
    what = "adapter" if args.push_adapter else "merged"
    card_options = {"license": args.license, "base_model": args.base_model, "datasets": args.datasets,
                    "space_id": args.space}
    if args.space is not None and as_hub_model_id(args.space) != args.space:
        raise SystemExit(f"esmloc-push: --space must be a full Space id, user/name or org/name, got {args.space!r}")
    try:
        url = push_output_dir(output_dir, args.hub_model_id, private=args.hub_private_repo,
                              endpoint=args.hub_endpoint, what=what, commit_message=args.commit_message,
                              card_options={k: v for k, v in card_options.items() if v is not None})
    except (PublishError, ValueError) as error:
        raise SystemExit(f"esmloc-push: {error}") from None
    print(url)
    if args.space:
        from esmloc.space import push_space

        endpoint = resolve_endpoint(args.hub_endpoint)
        try:
            print(push_space(args.space, args.hub_model_id, HfApi(endpoint=endpoint), endpoint,
                             private=args.hub_private_repo))
        except (HfHubHTTPError, *_transport_errors(), OSError, ValueError) as error:
            raise SystemExit(f"esmloc-push: the model is at {url}, but the Space failed: "
                             + _failure_message(error, endpoint, args.space, _secrets(None))) from None
    return url


if __name__ == "__main__":
    main()
