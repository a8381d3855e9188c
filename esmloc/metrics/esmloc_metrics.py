"""esmloc_metrics: the one place where esmloc's classification metrics are computed.

A local `evaluate` module (it loads offline: `evaluate.load("path/to/esmloc_metrics.py", config_name=...)`).
All arithmetic is delegated to scikit-learn; this module only picks the metrics, applies the decision threshold
and turns undefined values into `None` instead of raising.
"""

import re

import datasets
import evaluate
import numpy as np
from sklearn.metrics import accuracy_score
from sklearn.metrics import average_precision_score
from sklearn.metrics import confusion_matrix
from sklearn.metrics import f1_score
from sklearn.metrics import jaccard_score
from sklearn.metrics import matthews_corrcoef
from sklearn.metrics import precision_score
from sklearn.metrics import recall_score
from sklearn.metrics import roc_auc_score


_DESCRIPTION = """
Classification metrics for protein subcellular localisation, following DeepLoc's reporting (MCC as the main
metric, per-location MCC for multi-label problems). Three configurations:

- `binary` (the default): one protein, one probability of the positive class (e.g. "in the mitochondrion").
  Reports accuracy, precision, recall, F1, MCC, ROC-AUC, PR-AUC (average precision), the threshold used and the
  confusion counts tp, fp, tn, fn.
- `multilabel`: one probability per location (sigmoid outputs), multi-hot references. Reports per-location MCC,
  micro/macro F1, the mean per-location MCC, subset accuracy, samples-averaged Jaccard, micro/macro ROC-AUC,
  and the full binary set for a location named "Mitochondrion" if present.
- `multiclass`: one probability per class (softmax outputs), exactly one true class per protein. Reports
  accuracy, macro F1 and the multi-class MCC (Gorodkin's R_K); the predicted class is the argmax.

A protein is predicted positive for a label when its probability is >= the threshold. Undefined values (ROC-AUC
or PR-AUC when the references hold a single class) are `None`, never an exception. MCC and F1 follow
scikit-learn's conventions for degenerate cases: constant predictions give MCC 0, an empty denominator gives 0.
"""

_KWARGS_DESCRIPTION = """
Args:
    predictions: `binary`: the predicted probability of the positive class, one float in [0, 1] per protein.
        `multilabel` / `multiclass`: a list of per-label probabilities per protein.
    references: `binary`: 0/1 labels. `multilabel`: multi-hot lists of 0/1. `multiclass`: class indices.
    threshold: decision threshold, default 0.5. `multilabel` accepts one float for all labels or a list with one
        threshold per label. Ignored by `multiclass`.
    label_names (`multilabel` only): names of the labels, in column order; they appear in the result keys with
        every run of characters other than letters, digits and "_" replaced by "_" (e.g. "Cell membrane" gives
        `mcc_Cell_membrane`). Defaults to the column indices.

Returns:
    `binary`: accuracy, precision, recall, f1, mcc, roc_auc, pr_auc, threshold, tp, fp, tn, fn.
    `multilabel`: mcc_<label> and threshold_<label> per label, macro_mcc, micro_f1, macro_f1, subset_accuracy,
        jaccard, micro_roc_auc, macro_roc_auc (None unless every label has both classes), and, when a label is
        named "Mitochondrion": accuracy_, precision_, recall_, f1_, roc_auc_, pr_auc_Mitochondrion.
    `multiclass`: accuracy, macro_f1, mcc.

Examples:
    >>> metric = evaluate.load("esmloc/metrics/esmloc_metrics.py")
    >>> metric.compute(predictions=[0.9, 0.2, 0.6], references=[1, 0, 0], threshold=0.7)["mcc"]
    1.0
"""

_CITATION = """
@article{pedregosa2011scikit,
  title={Scikit-learn: Machine Learning in {P}ython},
  author={Pedregosa, F. and others},
  journal={Journal of Machine Learning Research},
  volume={12},
  pages={2825--2830},
  year={2011}
}
"""

_FEATURES = {
    # float64 so that a threshold chosen on exact probabilities classifies them identically here
    "binary": datasets.Features(
        {"predictions": datasets.Value("float64"), "references": datasets.Value("int32")}
    ),
    "multilabel": datasets.Features(
        {
            "predictions": datasets.Sequence(datasets.Value("float64")),
            "references": datasets.Sequence(datasets.Value("int32")),
        }
    ),
    "multiclass": datasets.Features(
        {"predictions": datasets.Sequence(datasets.Value("float64")), "references": datasets.Value("int32")}
    ),
}

MITOCHONDRION = "Mitochondrion"


def key_name(label: str) -> str:
    """The form a label name takes inside result keys (safe for JSON, TensorBoard and shell tools)."""
    return re.sub(r"\W+", "_", str(label)).strip("_")


def _check_probabilities(probabilities: np.ndarray) -> None:
    # Logits passed by mistake would be thresholded at 0.5 without any error: refuse them.
    if probabilities.size and (np.nanmin(probabilities) < 0 or np.nanmax(probabilities) > 1):
        raise ValueError("predictions must be probabilities in [0, 1] (apply softmax/sigmoid to logits first)")


def _check_binary(references: np.ndarray) -> None:
    if not np.isin(references, (0, 1)).all():
        raise ValueError("references must be 0/1 labels")


def _has_both_classes(references: np.ndarray) -> bool:
    """Whether ROC-AUC is defined: it needs at least one positive and one negative example."""
    return bool(references.any()) and not bool(references.all())


def binary_metrics(probabilities, references, threshold: float = 0.5) -> dict:
    """The `binary` results for one label (also used per label by `multilabel`)."""
    probabilities = np.asarray(probabilities, dtype=np.float64)
    references = np.asarray(references, dtype=np.int64)
    _check_probabilities(probabilities)
    _check_binary(references)
    predicted = (probabilities >= threshold).astype(np.int64)
    tn, fp, fn, tp = confusion_matrix(references, predicted, labels=[0, 1]).ravel()
    return {
        "accuracy": float(accuracy_score(references, predicted)),
        "precision": float(precision_score(references, predicted, zero_division=0)),
        "recall": float(recall_score(references, predicted, zero_division=0)),
        "f1": float(f1_score(references, predicted, zero_division=0)),
        "mcc": float(matthews_corrcoef(references, predicted)),
        "roc_auc": float(roc_auc_score(references, probabilities)) if _has_both_classes(references) else None,
        # average precision is undefined without a positive example (scikit-learn warns and returns 0)
        "pr_auc": float(average_precision_score(references, probabilities)) if references.any() else None,
        "threshold": float(threshold),
        "tp": int(tp),
        "fp": int(fp),
        "tn": int(tn),
        "fn": int(fn),
    }


def multilabel_metrics(probabilities, references, threshold=0.5, label_names=None) -> dict:
    """The `multilabel` results (see the module's description)."""
    probabilities = np.asarray(probabilities, dtype=np.float64)
    references = np.asarray(references, dtype=np.int64)
    if probabilities.ndim != 2 or probabilities.shape != references.shape:
        raise ValueError("multilabel predictions and references must both be (n_proteins, n_labels)")
    _check_probabilities(probabilities)
    _check_binary(references)
    n_labels = probabilities.shape[1]
    names = [key_name(name) for name in (label_names if label_names is not None else range(n_labels))]
    if len(names) != n_labels or len(set(names)) != n_labels:
        raise ValueError(f"label_names must be {n_labels} distinct names, got {label_names}")
    thresholds = np.asarray(threshold, dtype=np.float64)
    if thresholds.ndim == 0:
        thresholds = np.full(n_labels, float(thresholds))
    if thresholds.shape != (n_labels,):
        raise ValueError(f"threshold must be one float or {n_labels} floats, got {threshold}")
    predicted = (probabilities >= thresholds).astype(np.int64)

    results = {}
    for column, name in enumerate(names):
        results[f"mcc_{name}"] = float(matthews_corrcoef(references[:, column], predicted[:, column]))
    results["macro_mcc"] = float(np.mean([results[f"mcc_{name}"] for name in names]))
    results["micro_f1"] = float(f1_score(references, predicted, average="micro", zero_division=0))
    results["macro_f1"] = float(f1_score(references, predicted, average="macro", zero_division=0))
    # exact match of the whole label set
    results["subset_accuracy"] = float(accuracy_score(references, predicted))
    # a protein with no true and no predicted location agrees perfectly: count it as 1
    results["jaccard"] = float(jaccard_score(references, predicted, average="samples", zero_division=1.0))
    results["micro_roc_auc"] = (
        float(roc_auc_score(references, probabilities, average="micro")) if _has_both_classes(references) else None
    )
    every_label_defined = all(_has_both_classes(references[:, column]) for column in range(n_labels))
    results["macro_roc_auc"] = (
        float(roc_auc_score(references, probabilities, average="macro")) if every_label_defined else None
    )
    for column, name in enumerate(names):
        results[f"threshold_{name}"] = float(thresholds[column])
    if MITOCHONDRION in names:
        column = names.index(MITOCHONDRION)
        mito = binary_metrics(probabilities[:, column], references[:, column], thresholds[column])
        for metric in ("accuracy", "precision", "recall", "f1", "roc_auc", "pr_auc"):
            results[f"{metric}_{MITOCHONDRION}"] = mito[metric]
    return results


def multiclass_metrics(probabilities, references) -> dict:
    """The `multiclass` results: the predicted class is the most probable one."""
    probabilities = np.asarray(probabilities, dtype=np.float64)
    references = np.asarray(references, dtype=np.int64)
    _check_probabilities(probabilities)
    predicted = probabilities.argmax(axis=1)
    return {
        "accuracy": float(accuracy_score(references, predicted)),
        "macro_f1": float(
            f1_score(references, predicted, average="macro", labels=range(probabilities.shape[1]), zero_division=0)
        ),
        "mcc": float(matthews_corrcoef(references, predicted)),
    }


@evaluate.utils.file_utils.add_start_docstrings(_DESCRIPTION, _KWARGS_DESCRIPTION)
class EsmlocMetrics(evaluate.Metric):
    """Accuracy, precision, recall, F1, MCC, ROC-AUC and PR-AUC for (multi-label) localisation."""

    def _info(self):
        config = "binary" if self.config_name == "default" else self.config_name
        if config not in _FEATURES:
            raise ValueError(f"Unknown configuration {self.config_name!r}; choose one of {sorted(_FEATURES)}")
        return evaluate.MetricInfo(
            description=_DESCRIPTION,
            citation=_CITATION,
            inputs_description=_KWARGS_DESCRIPTION,
            features=_FEATURES[config],
            reference_urls=[
                "https://services.healthtech.dtu.dk/services/DeepLoc-2.0/",
                "https://scikit-learn.org/stable/modules/model_evaluation.html",
            ],
        )

    def _compute(self, predictions, references, threshold=0.5, label_names=None):
        if self.config_name == "multilabel":
            return multilabel_metrics(predictions, references, threshold, label_names)
        if self.config_name == "multiclass":
            return multiclass_metrics(predictions, references)
        return binary_metrics(predictions, references, threshold)
