"""The predictions CSV: one layout, one writer, for `esmloc-predict` and for train.py's `test_predictions.csv`.

Columns, one row per protein in input order:

    ACC, [true_label], probability_<label> for every label (model order), predicted_label
    ACC, [true_labels], probability_<label> for every label,               predicted_labels   (multi-label models)

`true_label(s)` is there when the truth is known (a test split). Binary models predict label 1 when its probability
is >= the decision threshold, multi-label models every label at or above its threshold (joined with ";", empty for
none), multi-class models their most probable label (`esmloc.task.predicted`). Probabilities are written with 6
significant digits.
"""

import csv
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from esmloc import task
from esmloc.files import atomic_file


def columns(names: Sequence[str], multi_label: bool, with_truth: bool = False) -> list[str]:
    label = "labels" if multi_label else "label"
    return (["ACC"] + ([f"true_{label}"] if with_truth else []) + [f"probability_{name}" for name in names]
            + [f"predicted_{label}"])


def truth_cell(truth, names: Sequence[str], multi_label: bool) -> str:
    """A class index (single-label) or a multi-hot row (multi-label) as the label name(s)."""
    if multi_label:
        return task.LABEL_SEPARATOR.join(name for name, on in zip(names, np.asarray(truth)) if on)
    return names[int(truth)]


def rows(accs: Sequence[str], probabilities, names: Sequence[str], multi_label: bool, thresholds=None,
         truths=None) -> list[list[str]]:
    """The CSV cells of each protein, as `columns` names them (`truths` given: with the true label(s)).
    `probabilities`: (n, num_labels), every label's."""
    probabilities = np.asarray(probabilities)
    labels = task.predicted(probabilities, names, multi_label, thresholds)
    truth = ([[truth_cell(value, names, multi_label)] for value in truths] if truths is not None
             else [[]] * len(labels))
    return [[acc, *cells, *(f"{value:.6g}" for value in row), label]
            for acc, cells, row, label in zip(accs, truth, probabilities, labels, strict=True)]


class PredictionsWriter:
    """Writes the header, then rows batch by batch, to an open text handle (see the module docstring)."""

    def __init__(self, handle, names: Sequence[str], multi_label: bool, thresholds=None, with_truth: bool = False):
        self.writer = csv.writer(handle, lineterminator="\n")
        self.names, self.multi_label, self.thresholds, self.with_truth = list(names), multi_label, thresholds, with_truth
        self.writer.writerow(columns(self.names, multi_label, with_truth))

    def write(self, accs: Sequence[str], probabilities, truths=None) -> None:
        """`probabilities`: (n, num_labels), every label's; `truths`: n true labels when with_truth."""
        self.writer.writerows(rows(accs, probabilities, self.names, self.multi_label, self.thresholds,
                                   truths if self.with_truth else None))


def write_predictions_csv(path, accs, probabilities, names: Sequence[str], multi_label: bool, thresholds=None,
                          truths=None) -> Path:
    """The whole file at once (atomically), with `true_label(s)` when `truths` is given; returns the path."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with atomic_file(path, "w", newline="") as handle:
        PredictionsWriter(handle, names, multi_label, thresholds, with_truth=truths is not None).write(
            accs, probabilities, truths)
    return path
