"""The model card's metric tables and its model-index entries, from a run's test_results.json and trainer_state.json
(`esmloc.run_files.RunRecord`): which metrics, in which order, under which names."""

from huggingface_hub import EvalResult

from esmloc import task
from esmloc.run_files import RunRecord, fmt, is_number


# The metric module's keys for the location multi-label reports feature in full (accuracy_Mitochondrion, ...).
FEATURED_SUFFIX = f"_{task.metric_key(task.POSITIVE_LABEL)}"
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
TUNED_THRESHOLD_CONFIG = "tuned threshold"


def metric_parts(run: RunRecord) -> tuple[list[str], list[tuple[str, str]]]:
    """(summary metrics, per-location (metric, location) pairs) present in test_results.json, in display order.

    A metric is a result key without its `test_` prefix and `_tuned` suffix: `mcc`, `macro_mcc`, `f1_Mitochondrion`,
    and, for multi-label runs, the per-location `mcc_<Location>` and `threshold_<Location>`."""
    bases = []
    for key in run.test:
        if key.startswith("test_"):
            base = key[len("test_"):].removesuffix("_tuned")
            if base not in bases:
                bases.append(base)
    locations = [task.metric_key(label) for label in run.labels] if run.multi_label else []
    per_location = [(metric, location) for location in locations for metric in ("mcc", "threshold")
                    if f"{metric}_{location}" in bases]
    located = {f"{metric}_{location}" for metric, location in per_location}
    order = list(METRIC_NAMES)

    def rank(base):  # METRIC_NAMES order, the featured location's variants of a multi-label run after the others
        metric = base.removesuffix(FEATURED_SUFFIX) if base not in METRIC_NAMES else base
        return (metric != base, order.index(metric) if metric in order else len(order), base)

    return sorted((base for base in bases if base not in located), key=rank), per_location


def metric_display(base: str) -> str:
    if base not in METRIC_NAMES and base.endswith(FEATURED_SUFFIX):
        metric = base.removesuffix(FEATURED_SUFFIX)
        return f"{METRIC_NAMES.get(metric, metric)} ({task.POSITIVE_LABEL})"
    return METRIC_NAMES.get(base, base)


def cell(run: RunRecord, key: str, base: str) -> str:
    if key not in run.test:
        return "–"
    return fmt(run.test[key], THRESHOLD_SPEC if base == "threshold" else ".3f")


Rows = list[tuple[str, list[str]]]


def evaluation_table(run: RunRecord) -> tuple[list[str], Rows, list[str], Rows]:
    summary, per_location = metric_parts(run)
    default = run.test.get("test_threshold")
    default_text = f"threshold {fmt(default, 'g')}" if is_number(default) else "threshold 0.5"
    header = [f"Test, {default_text}", "Test, tuned threshold", "Validation, tuned threshold"]
    rows = [
        (metric_display(base), [cell(run, f"test_{base}", base), cell(run, f"test_{base}_tuned", base),
                                 cell(run, f"validation_{base}_tuned", base)])
        for base in summary
    ]
    location_header, location_rows = [], []
    if per_location:
        location_header = ["MCC, threshold 0.5", "MCC, tuned threshold", "Tuned threshold", "Validation MCC, tuned"]
        for label in run.labels:
            name = task.metric_key(label)
            location_rows.append((label, [
                cell(run, f"test_mcc_{name}", "mcc"),
                cell(run, f"test_mcc_{name}_tuned", "mcc"),
                cell(run, f"test_threshold_{name}_tuned", "threshold"),
                cell(run, f"validation_mcc_{name}_tuned", "mcc"),
            ]))
    return header, rows, location_header, location_rows


def eval_results(run: RunRecord, task_name: str, dataset_name: str, dataset_type: str) -> list[EvalResult]:
    """model-index entries: every threshold-dependent metric at 0.5 and tuned, threshold-free ones once."""
    summary, per_location = metric_parts(run)
    bases = [base for base in summary if base in MODEL_INDEX_TYPES
             or (base.endswith(FEATURED_SUFFIX) and base.removesuffix(FEATURED_SUFFIX) in MODEL_INDEX_TYPES)]
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
        elif base.endswith(FEATURED_SUFFIX):
            metric, suffix = base.removesuffix(FEATURED_SUFFIX), f" ({task.POSITIVE_LABEL})"
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


def epoch_log(run: RunRecord) -> tuple[list[str], list[list[str]]]:
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
        rows.append([("–" if value is None else fmt(value, "g" if column == 0 else ".3f"))
                     for column, value in enumerate(values)])
    return header, rows
