"""The task rules, decided once: what kind of problem a model solves, what its labels are called, how its logits
become probabilities and how probabilities become predicted labels.

Every esmloc tool imports these (training, evaluation, the engine, esmloc-predict, the model card). The rule itself,
probabilities and predicted labels, is the remote code's (`modeling_esmloc.label_probabilities` and
`predicted_labels`, which ship inside every saved model, so that the pipeline and a user's own code decide as esmloc
does); this module applies it to numpy arrays and CSV cells. The metric module (an `evaluate` module, loaded from its
file) keeps its own `key_name`, which the tests check against `metric_key`.

Three kinds of problem, told apart by the config (`problem_type`, `num_labels`):
- binary (the default, Other / Mitochondrion): softmax over two classes; label 1 is predicted when its
  probability is >= the decision threshold (the one tuned for MCC on validation, stored in the saved config as
  `decision_thresholds`; 0.5 without one);
- multi-label (`problem_type="multi_label_classification"`, e.g. DeepLoc's 10 locations): a sigmoid per label;
  every label at or above its own threshold is predicted (possibly none);
- multi-class (single-label, more than two classes): softmax; the most probable label is predicted.
"""

import json
import re
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch

from esmloc.errors import InputError
from modeling_esmloc import label_probabilities, predicted_labels


BINARY_LABELS = ("Other", "Mitochondrion")
# The label esmloc is about: label 1 of a binary model, the location multi-label reports feature in full.
POSITIVE_LABEL = BINARY_LABELS[1]
MULTI_LABEL = "multi_label_classification"
SINGLE_LABEL = "single_label_classification"
# How several predicted labels of one protein are written in one CSV cell.
LABEL_SEPARATOR = ";"
# Where train.py writes the test report, which holds the tuned thresholds of models saved before config.json did.
RESULTS_FILE = "test_results.json"


def is_multi_label(config) -> bool:
    """Whether the model of `config` (a PreTrainedConfig or its dict) predicts independent labels (sigmoid)."""
    problem_type = config.get("problem_type") if isinstance(config, dict) else config.problem_type
    return problem_type == MULTI_LABEL


def label_names(config) -> list[str]:
    """The label names in output order (a PreTrainedConfig or its dict, whose JSON keys are strings)."""
    id2label = config.get("id2label") if isinstance(config, dict) else config.id2label
    return [id2label[key] for key in sorted(id2label, key=int)]


def is_binary(config) -> bool:
    return not is_multi_label(config) and len(label_names(config)) == 2


def probabilities(logits, multi_label: bool):
    """Logits (n, num_labels) -> probabilities (n, num_labels): a sigmoid per label for multi-label models, a
    softmax otherwise (`modeling_esmloc.label_probabilities`). Takes and returns a torch tensor (float32) or a numpy
    array (float64)."""
    if isinstance(logits, torch.Tensor):
        return label_probabilities(logits.float(), multi_label)
    return label_probabilities(torch.as_tensor(np.asarray(logits, dtype=np.float64)), multi_label).numpy()


def scores(probabilities_matrix, multi_label: bool) -> np.ndarray:
    """What the metrics and thresholds work on: for a binary problem the probability of label 1 (n,), otherwise
    the full (n, num_labels) matrix."""
    probabilities_matrix = np.asarray(probabilities_matrix)
    if not multi_label and probabilities_matrix.shape[1] == 2:
        return probabilities_matrix[:, 1]
    return probabilities_matrix


def predicted(probabilities_matrix, names: Sequence[str], multi_label: bool, thresholds=None) -> list[str]:
    """The predicted label(s) of each protein, from its (num_labels,) probabilities, as CSV cells
    (`modeling_esmloc.predicted_labels`, the rule of every path).

    Binary: `names[1]` when its probability >= `thresholds` (one number, default 0.5), else `names[0]`.
    Multi-label: the labels at or above their thresholds (one per label, or one for all; default 0.5), joined
    with `LABEL_SEPARATOR`, "" for none. Multi-class: the most probable label (`thresholds` must be None)."""
    labels = predicted_labels(np.asarray(probabilities_matrix, dtype=np.float64), names, multi_label, thresholds)
    return [LABEL_SEPARATOR.join(label) for label in labels] if multi_label else labels


def saved_with_thresholds(saved_config: dict) -> bool:
    """Whether a saved config.json (as a dict) decides the thresholds: esmloc writes `decision_thresholds` into every
    config it saves (null: 0.5), so a config without the key was saved before, and its tuned thresholds are only in
    test_results.json."""
    return "decision_thresholds" in saved_config


def decision_thresholds(model_dir, config, override: float | None = None) -> tuple[np.ndarray | None, str]:
    """The thresholds a saved model's labels are decided by, per label (one for a binary model; None for a
    multi-class model, which predicts the most probable label), and where they came from: `override` (esmloc-predict's
    --threshold), else the `decision_thresholds` of MODEL_DIR/config.json (what the pipeline and `predict_labels`
    apply; null: 0.5); for a model saved before config.json held them, the tuned keys of MODEL_DIR/test_results.json,
    else 0.5."""
    names, multi_label = label_names(config), is_multi_label(config)
    if not multi_label and len(names) != 2:
        return None, "none (multi-class: the most probable label)"
    count = len(names) if multi_label else 1

    def shown(values) -> str:
        return ", ".join(f"{name}={value:.4g}" for name, value in zip(names if multi_label else names[1:], values))

    if override is not None:
        return np.full(count, override), f"{override} (--threshold)"
    saved = json.loads((Path(model_dir) / "config.json").read_text())
    if saved_with_thresholds(saved):
        if saved["decision_thresholds"] is None:
            return np.full(count, 0.5), "0.5 (decision_thresholds of the model's config.json is null)"
        values = np.atleast_1d(np.asarray(saved["decision_thresholds"], dtype=np.float64))
        return values, f"{shown(values)} (decision_thresholds of the model's config.json)"
    results_path = Path(model_dir) / RESULTS_FILE
    results = json.loads(results_path.read_text()) if results_path.is_file() else {}
    keys = tuned_threshold_keys(names, multi_label)
    if all(isinstance(results.get(key), (int, float)) for key in keys):
        values = np.asarray([float(results[key]) for key in keys])
        return values, (f"{shown(values)} (tuned on validation, {', '.join(keys[:2])}{' ...' if len(keys) > 2 else ''} from "
                        f"{results_path}: a model saved before config.json held its thresholds)")
    return np.full(count, 0.5), f"0.5 (default: no decision_thresholds in config.json, no tuned one in {results_path})"


def metric_key(label: str) -> str:
    """The form a label name takes inside result keys (`mcc_Cell_membrane`); the metric module's `key_name`."""
    return re.sub(r"\W+", "_", str(label)).strip("_")


def tuned_threshold_keys(names: Sequence[str], multi_label: bool, prefix: str = "test") -> list[str]:
    """The keys of `<prefix>_results.json` that hold the decision thresholds tuned on validation: one for a binary
    model (`test_threshold_tuned`), one per label for a multi-label model (`test_threshold_<label>_tuned`)."""
    if multi_label:
        return [f"{prefix}_threshold_{metric_key(name)}_tuned" for name in names]
    return [f"{prefix}_threshold_tuned"]


def threshold_rule(names: Sequence[str], multi_label: bool, thresholds=None) -> str:
    """The decision rule in words, for tables and logs (e.g. "Mitochondrion if its probability >= 0.858")."""
    if not multi_label and len(names) != 2:
        return "the most probable label"
    values = np.atleast_1d(np.asarray(0.5 if thresholds is None else thresholds, dtype=np.float64))
    if not multi_label:
        return f"{names[1]} if its probability >= {values[0]:.3f}, else {names[0]}"
    if values.size == 1 or np.all(values == values[0]):
        return f"every label whose probability >= {values[0]:.3f}"
    return "every label whose probability >= its threshold (" + ", ".join(
        f"{name} {value:.3f}" for name, value in zip(names, values)) + ")"


# --- the labels of a training run ------------------------------------------------------------------------------------


def label_config(label_feature) -> dict:
    """The config kwargs (id2label, problem_type) of a dataset's `label` feature: a ClassLabel is single-label, a
    sequence of ClassLabels (DeepLoc's locations) multi-label."""
    names = getattr(label_feature, "names", None)
    if names is not None:
        return {"id2label": dict(enumerate(names)), "problem_type": SINGLE_LABEL}
    inner = getattr(label_feature, "feature", None)  # datasets' Sequence / List of a ClassLabel
    return {"id2label": dict(enumerate(inner.names)), "problem_type": MULTI_LABEL}


def targets(labels, num_labels: int, multi_label: bool) -> np.ndarray:
    """A split's `label` column as training targets: integer class ids (single-label) or a multi-hot float matrix
    (multi-label; each row lists the label ids present)."""
    if not multi_label:
        return np.asarray(labels, dtype=np.int64)
    multi_hot = np.zeros((len(labels), num_labels), dtype=np.float32)
    for row, present in enumerate(labels):
        multi_hot[row, present] = 1.0
    return multi_hot


def balanced_class_weights(train_targets: np.ndarray, num_labels: int, multi_label: bool) -> list[float]:
    """Balanced cross-entropy weights n / (k * n_c) (scikit-learn's "balanced"), or BCE pos_weight
    negatives / positives per label."""
    if multi_label:
        positives = train_targets.sum(axis=0)
        return [float((len(train_targets) - p) / p) for p in positives]
    from sklearn.utils.class_weight import compute_class_weight

    weights = compute_class_weight("balanced", classes=np.arange(num_labels), y=train_targets)
    return [float(weight) for weight in weights]


def check_learnable(split_targets: dict[str, np.ndarray], names: Sequence[str], multi_label: bool, source: str) -> None:
    """Refuses splits no sound model can come from: every label needs positives in training (a label never seen
    positive is learned as "never"), and in validation, where its decision threshold is tuned. `split_targets`:
    `targets` of the "train" and "validation" splits."""
    for split, purpose in (("train", "to learn it from"), ("validation", "to tune its decision threshold on")):
        labels = split_targets[split]
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
