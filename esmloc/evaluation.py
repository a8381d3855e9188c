"""Evaluation for esmloc: metrics, decision thresholds, the test report, predictions CSV, tables and plots.

Every metric value comes from ONE local `evaluate` module, `esmloc/metrics/esmloc_metrics.py` (scikit-learn
underneath), loaded offline by `load_metric`. The only metric arithmetic done here is the fast threshold sweep
of `mcc_by_threshold`, which reproduces the module's MCC (the tests check it); the plots only turn the module's
confusion counts into curve coordinates.

Probabilities are the model's outputs after softmax (single-label: the probability of class 1, a 1-D array) or
sigmoid (multi-label: one column per location, a 2-D array); `logits_to_probabilities` converts logits. A protein
is predicted positive for a label when its probability is >= the threshold.

The protocol follows DeepLoc: the threshold (one per location for multi-label) is the one that maximises MCC on
the validation split; the test split is then reported at 0.5 and at that tuned threshold.
"""

import functools
from pathlib import Path
from typing import Callable, Sequence

import evaluate
import numpy as np
import pandas as pd
from matplotlib.figure import Figure
from sklearn.metrics import ConfusionMatrixDisplay, PrecisionRecallDisplay, RocCurveDisplay
from transformers import EvalPrediction

from esmloc import task


METRIC_PATH = Path(__file__).resolve().parent / "metrics" / "esmloc_metrics.py"

# MCC values closer than this are ties: floating-point noise must not decide the threshold.
_MCC_TIE_TOLERANCE = 1e-12


@functools.lru_cache(maxsize=None)
def load_metric(config_name: str = "binary") -> evaluate.EvaluationModule:
    """The esmloc metric module, loaded offline from the file shipped in the package (cached per configuration).

    `config_name` is "binary", "multilabel" or "multiclass". Predictions are kept in memory, so several
    processes (DDP) never share evaluate's cache files.
    """
    return evaluate.load(str(METRIC_PATH), config_name=config_name, keep_in_memory=True)


def classification_metrics(probabilities, labels, threshold=0.5, label_names: Sequence[str] | None = None) -> dict:
    """The metric module's results at `threshold`: binary for 1-D `probabilities`, multi-label for 2-D ones.

    Binary keys: accuracy, precision, recall, f1, mcc, roc_auc, pr_auc, threshold, tp, fp, tn, fn.
    Multi-label keys: see `esmloc_metrics` (mcc_<label>, macro_mcc, micro_f1, macro_f1, subset_accuracy, jaccard,
    micro_roc_auc, macro_roc_auc, threshold_<label>, and the binary set suffixed _Mitochondrion if present).
    """
    probabilities = np.asarray(probabilities, dtype=np.float64)
    labels = np.asarray(labels).astype(np.int64)
    if probabilities.ndim == 1:
        return load_metric("binary").compute(predictions=probabilities, references=labels, threshold=threshold)
    threshold = np.asarray(threshold, dtype=np.float64).tolist()
    label_names = None if label_names is None else list(label_names)
    return load_metric("multilabel").compute(
        predictions=probabilities, references=labels, threshold=threshold, label_names=label_names
    )


def mcc_by_threshold(probabilities, labels) -> tuple[np.ndarray, np.ndarray]:
    """MCC at every candidate threshold, in O(n log n): returns (thresholds ascending, mccs).

    Candidates: the midpoints between consecutive distinct values of {0, 1} and the probabilities. Together they
    reach every achievable split of the sorted proteins (the sentinels 0 and 1 add "all positive" and "all
    negative" unless a probability is exactly 0 or 1), and a midpoint keeps the largest margin to the validation
    proteins on either side of it.

    Confusion counts come from cumulative sums over the sorted probabilities and a binary search for each
    threshold, so they follow exactly the module's rule (positive iff probability >= threshold); MCC uses
    scikit-learn's convention (0 when a row or column of the confusion matrix is empty).
    """
    probabilities = np.asarray(probabilities, dtype=np.float64)
    labels = np.asarray(labels).astype(np.int64)
    if probabilities.ndim != 1 or probabilities.shape != labels.shape or probabilities.size == 0:
        raise ValueError("probabilities and labels must be non-empty 1-D arrays of the same length")
    order = np.argsort(probabilities, kind="stable")
    sorted_probabilities = probabilities[order]
    positives_before = np.concatenate([[0], np.cumsum(labels[order])])

    values = np.unique(np.concatenate([[0.0, 1.0], probabilities]))
    thresholds = (values[:-1] + values[1:]) / 2
    n_negative_predictions = np.searchsorted(sorted_probabilities, thresholds, side="left")
    fn = positives_before[n_negative_predictions].astype(np.float64)
    tn = n_negative_predictions - fn
    tp = labels.sum() - fn
    fp = (labels.size - labels.sum()) - tn

    denominator = np.sqrt((tp + fp) * (tp + fn) * (tn + fp) * (tn + fn))
    with np.errstate(invalid="ignore", divide="ignore"):
        mccs = np.where(denominator > 0, (tp * tn - fp * fn) / denominator, 0.0)
    return thresholds, mccs


def best_threshold(probabilities, labels) -> float:
    """The threshold that maximises MCC on these (validation) probabilities, DeepLoc's protocol.

    Candidates as in `mcc_by_threshold`. Ties (MCC within 1e-12) go to the candidate closest to the usual 0.5,
    then to the smaller one, so the choice is deterministic and moves away from 0.5 only for a better MCC.
    """
    thresholds, mccs = mcc_by_threshold(probabilities, labels)
    tied = thresholds[mccs >= mccs.max() - _MCC_TIE_TOLERANCE]
    return float(tied[np.argmin(np.abs(tied - 0.5))])  # argmin keeps the first, i.e. smaller, of equal distances


def best_thresholds(probabilities, labels) -> np.ndarray:
    """One MCC-maximising threshold per label (column) of multi-label probabilities, shape (n_labels,)."""
    probabilities = np.asarray(probabilities, dtype=np.float64)
    labels = np.asarray(labels)
    if probabilities.ndim != 2 or probabilities.shape != labels.shape:
        raise ValueError("probabilities and labels must both be (n_proteins, n_labels)")
    return np.array([best_threshold(probabilities[:, j], labels[:, j]) for j in range(probabilities.shape[1])])


def tuned_threshold(probabilities, labels):
    """`best_threshold` for 1-D probabilities, `best_thresholds` for 2-D ones."""
    if np.ndim(probabilities) == 1:
        return best_threshold(probabilities, labels)
    return best_thresholds(probabilities, labels)


def _suffixed(results: dict, suffix: str) -> dict:
    return {f"{key}{suffix}": value for key, value in results.items()}


def compute_metrics(
    multi_label: bool = False,
    label_names: Sequence[str] | None = None,
    tune_threshold: bool = False,
) -> Callable[[EvalPrediction], dict]:
    """Build the `compute_metrics` function for `transformers.Trainer`.

    It turns the logits into probabilities (`esmloc.task`) and returns the metric module's results
    at 0.5; Trainer prefixes the keys (`eval_mcc`, ...), so `metric_for_best_model="mcc"` works. Single-label
    with more than two classes gets the `multiclass` results (accuracy, macro_f1, mcc at the argmax).

    With `tune_threshold=True`, binary and multi-label results also hold every key again, suffixed `_tuned`,
    at the MCC-maximising threshold(s) of this very evaluation set (`mcc_tuned`, `threshold_tuned`, ...). That
    is optimistic as an estimate, but it is what a model is worth once its threshold is tuned on validation, so
    `metric_for_best_model="mcc_tuned"` (or "macro_mcc_tuned" for multi-label) selects models the way the final
    report evaluates them.

    `multi_label`: the model was trained with `problem_type="multi_label_classification"` (sigmoid outputs).
    `label_names`: the multi-label location names in column order (e.g. `config.id2label` values).
    """

    def trainer_compute_metrics(eval_prediction: EvalPrediction) -> dict:
        logits = eval_prediction.predictions
        if isinstance(logits, tuple):  # models returning hidden states or attentions too
            logits = logits[0]
        probabilities = task.scores(task.probabilities(logits, multi_label), multi_label)
        labels = np.asarray(eval_prediction.label_ids).astype(np.int64)  # BCE labels arrive as floats
        if not multi_label and probabilities.ndim == 2:
            return load_metric("multiclass").compute(predictions=probabilities, references=labels)
        results = classification_metrics(probabilities, labels, 0.5, label_names)
        if tune_threshold:
            threshold = tuned_threshold(probabilities, labels)
            results.update(_suffixed(classification_metrics(probabilities, labels, threshold, label_names), "_tuned"))
        return results

    return trainer_compute_metrics


def evaluation_report(
    validation_probabilities,
    validation_labels,
    test_probabilities,
    test_labels,
    label_names: Sequence[str] | None = None,
    metric_key_prefix: str = "test",
) -> dict:
    """The final report: threshold(s) tuned for MCC on validation, applied to test. Binary (1-D probabilities)
    or multi-label (2-D probabilities and multi-hot labels); multi-class single-label problems have no threshold
    to tune and are not supported here.

    Keys (binary; multi-label has the module's multi-label keys in the same three groups):
    - `{prefix}_<metric>`: test at 0.5, e.g. `test_mcc`, `test_roc_auc`, `test_threshold` (= 0.5);
    - `{prefix}_<metric>_tuned`: test at the tuned threshold, e.g. `test_mcc_tuned`, `test_threshold_tuned`
      (multi-label: `test_threshold_<label>_tuned`);
    - `validation_<metric>_tuned`: validation at the tuned threshold, the MCC the threshold was chosen for.
    The keys are final: `Trainer.save_metrics("test", report)` writes them unchanged into `test_results.json`
    (save_metrics adds no prefix). ROC-AUC and PR-AUC do not depend on the threshold and repeat unchanged.
    """
    threshold = tuned_threshold(validation_probabilities, validation_labels)
    report = classification_metrics(test_probabilities, test_labels, 0.5, label_names)
    tuned = classification_metrics(test_probabilities, test_labels, threshold, label_names)
    report.update(_suffixed(tuned, "_tuned"))
    report = {f"{metric_key_prefix}_{key}": value for key, value in report.items()}
    validation = classification_metrics(validation_probabilities, validation_labels, threshold, label_names)
    report.update({f"validation_{key}_tuned": value for key, value in validation.items()})
    return report


def _label_names(label_names: Sequence[str] | None, probabilities: np.ndarray) -> list[str]:
    """Binary: [negative, positive] names; multi-label: one name per column."""
    if label_names is not None:
        return list(label_names)
    if probabilities.ndim == 1:
        return list(task.BINARY_LABELS)
    return [str(column) for column in range(probabilities.shape[1])]


def format_examples_table(accs, labels, probabilities, *, names: Sequence[str], multi_label: bool, thresholds=None,
                          n: int = 10, seed: int = 0) -> str:
    """A printable table of `n` proteins drawn at random (reproducibly, from `seed`), in input order, headed by the
    rule that decided the predicted labels: ACC, true label, the probability of the positive label and the
    predicted label; multi-label tables list the true locations and the predicted ones with their probabilities.

    `probabilities`: (n, num_labels), every label's; `labels`: class indices or multi-hot rows;
    `thresholds`: as `esmloc.task.predicted` takes them."""
    probabilities = np.asarray(probabilities, dtype=np.float64)
    rows = np.sort(np.random.default_rng(seed).choice(len(accs), size=min(n, len(accs)), replace=False))
    predicted = task.predicted(probabilities[rows], names, multi_label, thresholds)
    truths = [task.LABEL_SEPARATOR.join(name for name, on in zip(names, labels[row]) if on) if multi_label
              else names[int(labels[row])] for row in rows]
    if multi_label:
        shown = ["; ".join(f"{name} ({probabilities[row, names.index(name)]:.3f})"
                           for name in labels_.split(task.LABEL_SEPARATOR) if name) or "(none)"
                 for row, labels_ in zip(rows, predicted)]
        frame = pd.DataFrame({"ACC": [accs[row] for row in rows], "true_labels": [t or "(none)" for t in truths],
                              "predicted_labels (probability)": shown})
    else:
        frame = pd.DataFrame({"ACC": [accs[row] for row in rows], "true_label": truths})
        for column in range(1, len(names)) if len(names) == 2 else range(len(names)):
            frame[f"probability_{names[column]}"] = probabilities[rows, column]
        frame["predicted_label"] = predicted
    rule = task.threshold_rule(names, multi_label, thresholds)
    return f"Predicted: {rule}.\n" + frame.to_string(index=False, float_format="{:.3f}".format)


def _operating_point(results: dict) -> tuple[float, float]:
    """(false positive rate, true positive rate) of the metric module's confusion counts."""
    negatives = results["fp"] + results["tn"]
    return (results["fp"] / negatives if negatives else float("nan")), results["recall"]


def _new_axes(title: str, xlabel: str, ylabel: str, width: float = 6.4):
    figure = Figure(figsize=(width, 5.6), layout="constrained")
    axes = figure.subplots()
    axes.set(title=title, xlabel=xlabel, ylabel=ylabel, xlim=(-0.01, 1.01), ylim=(-0.01, 1.01))
    axes.grid(alpha=0.3)
    return figure, axes


def _undefined(axes, message: str) -> None:
    axes.text(0.5, 0.5, message, ha="center", va="center", transform=axes.transAxes, wrap=True)


def _draw_curve(display, axes, labels, scores, **options) -> None:
    """Draws scikit-learn's curve `display` (RocCurveDisplay, PrecisionRecallDisplay) into `axes`, keeping the axes'
    own labels and shape (the display would set "False Positive Rate (Positive label: 1)" and square axes)."""
    xlabel, ylabel, aspect = axes.get_xlabel(), axes.get_ylabel(), axes.get_aspect()
    display.from_predictions(labels, scores, ax=axes, **options)
    axes.set(xlabel=xlabel, ylabel=ylabel, aspect=aspect)


def _plot_binary(output_dir: Path, labels, probabilities, threshold, names, split) -> list[Path]:
    at_half = classification_metrics(probabilities, labels, 0.5)
    at_tuned = classification_metrics(probabilities, labels, threshold)
    points = [(at_half, "s", "threshold 0.5"), (at_tuned, "o", f"tuned threshold {threshold:.3f}")]
    positive = names[1]

    figure, axes = _new_axes(f"ROC curve: {positive} ({split})", "False positive rate", "True positive rate")
    if at_half["roc_auc"] is None:
        _undefined(axes, "ROC curve undefined: the labels hold a single class")
    else:
        _draw_curve(RocCurveDisplay, axes, labels, probabilities,
                    curve_kwargs={"label": f"{positive} (AUC = {at_half['roc_auc']:.3f})"}, plot_chance_level=True,
                    chance_level_kw={"label": "chance (AUC = 0.5)", "linestyle": "--", "color": "grey"})
        for results, marker, name in points:
            axes.plot(*_operating_point(results), marker, markersize=9, label=f"{name}: MCC {results['mcc']:.3f}")
        axes.legend(loc="lower right")
    figure.savefig(output_dir / "roc_curve.png", dpi=150)

    figure, axes = _new_axes(f"Precision-recall curve: {positive} ({split})", "Recall", "Precision")
    if at_half["pr_auc"] is None:
        _undefined(axes, "Precision-recall curve undefined: no positive label")
    else:
        prevalence = float(np.mean(labels))
        _draw_curve(PrecisionRecallDisplay, axes, labels, probabilities,
                    curve_kwargs={"label": f"{positive} (AP = {at_half['pr_auc']:.3f})"}, plot_chance_level=True,
                    chance_level_kw={"label": f"chance (AP = {prevalence:.3f})", "linestyle": "--", "color": "grey"})
        for results, marker, name in points:
            label = f"{name}: F1 {results['f1']:.3f}"
            axes.plot(results["recall"], results["precision"], marker, markersize=9, label=label)
        axes.legend(loc="upper right")
    figure.savefig(output_dir / "pr_curve.png", dpi=150)

    figure = Figure(figsize=(10, 4.6), layout="constrained")
    for axes, (results, _, name) in zip(figure.subplots(1, 2), points):
        matrix = np.array([[results["tn"], results["fp"]], [results["fn"], results["tp"]]])
        display = ConfusionMatrixDisplay(matrix, display_labels=names)
        display.plot(ax=axes, cmap="Blues", colorbar=False, values_format="d")
        axes.set_title(f"{name}\nMCC {results['mcc']:.3f}, accuracy {results['accuracy']:.3f}")
    figure.suptitle(f"Confusion matrices ({split}, {len(labels)} proteins)")
    figure.savefig(output_dir / "confusion_matrix.png", dpi=150)
    return [output_dir / name for name in ("roc_curve.png", "pr_curve.png", "confusion_matrix.png")]


def _curves_per_location(axes, display, area, area_name, undefined, point, labels, probabilities, names, per_label):
    """One curve per location, in its own colour, with the `area` result (roc_auc, pr_auc) in its legend entry and
    its tuned operating point (`point` of its results at the tuned threshold) as a dot; a location whose curve is
    undefined gets a legend entry saying so."""
    for j, (name, (at_half, at_tuned)) in enumerate(zip(names, per_label)):
        colour = f"C{j % 10}"
        if at_half[area] is None:
            axes.plot([], [], color=colour, label=f"{name} ({undefined})")
            continue
        _draw_curve(display, axes, labels[:, j], probabilities[:, j],
                    curve_kwargs={"color": colour, "label": f"{name} ({area_name} = {at_half[area]:.3f})"})
        axes.plot(*point(at_tuned), "o", color=colour)


def _plot_multilabel(output_dir: Path, labels, probabilities, thresholds, names, split) -> list[Path]:
    per_label = [
        (
            classification_metrics(probabilities[:, j], labels[:, j], 0.5),
            classification_metrics(probabilities[:, j], labels[:, j], thresholds[j]),
        )
        for j in range(len(names))
    ]
    dots = "dots: tuned thresholds"
    # ten curves fill the axes: the legend goes to the right of them
    legend = dict(loc="upper left", bbox_to_anchor=(1.02, 1), fontsize="small")

    figure, axes = _new_axes(
        f"ROC curves per location ({split}; {dots})", "False positive rate", "True positive rate", width=9.6
    )
    _curves_per_location(axes, RocCurveDisplay, "roc_auc", "AUC", "undefined: one class", _operating_point, labels,
                         probabilities, names, per_label)
    axes.plot([0, 1], [0, 1], linestyle="--", color="grey")
    axes.legend(**legend)
    figure.savefig(output_dir / "roc_curve.png", dpi=150)

    figure, axes = _new_axes(
        f"Precision-recall curves per location ({split}; {dots})", "Recall", "Precision", width=9.6
    )
    _curves_per_location(axes, PrecisionRecallDisplay, "pr_auc", "AP", "undefined: no positive",
                         lambda results: (results["recall"], results["precision"]), labels, probabilities, names,
                         per_label)
    axes.legend(**legend)
    figure.savefig(output_dir / "pr_curve.png", dpi=150)

    figure = Figure(figsize=(max(6.4, 0.8 * len(names) + 2), 5.2), layout="constrained")
    axes = figure.subplots()
    positions = np.arange(len(names))
    axes.bar(positions - 0.2, [half["mcc"] for half, _ in per_label], width=0.4, label="threshold 0.5")
    axes.bar(positions + 0.2, [tuned["mcc"] for _, tuned in per_label], width=0.4, label="tuned thresholds")
    axes.set_xticks(positions, names, rotation=35, ha="right")
    axes.set(ylabel="MCC", title=f"MCC per location ({split})")
    axes.axhline(0, color="black", linewidth=0.8)
    axes.grid(axis="y", alpha=0.3)
    axes.legend()
    figure.savefig(output_dir / "mcc_per_location.png", dpi=150)
    return [output_dir / name for name in ("roc_curve.png", "pr_curve.png", "mcc_per_location.png")]


def plot_curves(
    output_dir, labels, probabilities, threshold, label_names: Sequence[str] | None = None, split: str = "test"
) -> list[Path]:
    """Write the evaluation plots into `output_dir` and return their paths.

    Binary: `roc_curve.png` and `pr_curve.png` (AUC / average precision in the legend, the operating points at
    0.5 and at the tuned `threshold` marked) and `confusion_matrix.png` (at 0.5 and at `threshold`, side by side).
    Multi-label (`threshold` one per location): `roc_curve.png` and `pr_curve.png` with one curve per location
    and its tuned operating point, and `mcc_per_location.png` (MCC at 0.5 and at the tuned thresholds).
    Undefined curves (a single class present) are stated in the figure instead of drawn.
    """
    output_dir = Path(output_dir)
    output_dir.mkdir(parents=True, exist_ok=True)
    probabilities = np.asarray(probabilities, dtype=np.float64)
    labels = np.asarray(labels).astype(np.int64)
    names = _label_names(label_names, probabilities)
    if probabilities.ndim == 1:
        return _plot_binary(output_dir, labels, probabilities, float(threshold), names, split)
    thresholds = np.broadcast_to(np.asarray(threshold, dtype=np.float64), (len(names),))
    return _plot_multilabel(output_dir, labels, probabilities, thresholds, names, split)
