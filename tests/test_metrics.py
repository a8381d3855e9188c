"""The evaluation layer: the esmloc_metrics module against hand-computed values, MCC threshold tuning, the
Trainer hook, the report, and the files written for a run (predictions CSV, examples table, plots)."""

import json
import math
import struct
import time

import numpy as np
import pandas as pd
import pytest
import torch
from sklearn.metrics import matthews_corrcoef
from transformers import EvalPrediction, Trainer, TrainingArguments
from transformers.modeling_outputs import SequenceClassifierOutput

from esmloc import evaluation
from esmloc.evaluation import (
    METRIC_PATH,
    best_threshold,
    best_thresholds,
    compute_metrics,
    evaluation_report,
    format_examples_table,
    load_metric,
    mcc_by_threshold,
    plot_curves,
)
from esmloc import task
from esmloc.metrics.esmloc_metrics import MITOCHONDRION, key_name
from esmloc.predictions import write_predictions_csv

from conftest import run_offline


# The hand-worked binary example: ten proteins sorted by predicted probability, four of them mitochondrial.
PROBABILITIES = np.array([0.95, 0.85, 0.75, 0.65, 0.55, 0.45, 0.35, 0.25, 0.15, 0.05])
LABELS = np.array([1, 1, 0, 1, 0, 1, 0, 0, 0, 0])
ACCS = [f"P{i:05d}" for i in range(10)]


def logit(p):
    return np.log(p / (1 - p))


def test_binary_metrics_match_hand_computation():
    # Threshold 0.5: the top five (0.95 .. 0.55) are predicted positive.
    #   TP = 3 (0.95, 0.85, 0.65)   FP = 2 (0.75, 0.55)   FN = 1 (0.45)   TN = 4
    #   accuracy = 7/10; precision = 3/5; recall = 3/4; F1 = 2 * 0.6 * 0.75 / 1.35 = 2/3
    #   MCC = (3*4 - 2*1) / sqrt(5 * 4 * 6 * 5) = 10 / sqrt(600)
    # ROC-AUC: pairs (positive, negative) ranked correctly, out of 4 * 6 = 24:
    #   0.95 beats 6, 0.85 beats 6, 0.65 beats 5 (not 0.75), 0.45 beats 4 (0.35 .. 0.05) -> 21/24
    # PR-AUC (average precision): precision at each positive's rank: 1/1, 2/2, 3/4, 4/6 -> mean
    results = load_metric().compute(predictions=PROBABILITIES, references=LABELS, threshold=0.5)
    assert (results["tp"], results["fp"], results["fn"], results["tn"]) == (3, 2, 1, 4)
    assert results["accuracy"] == pytest.approx(0.7)
    assert results["precision"] == pytest.approx(0.6)
    assert results["recall"] == pytest.approx(0.75)
    assert results["f1"] == pytest.approx(2 / 3)
    assert results["mcc"] == pytest.approx(10 / math.sqrt(600))
    assert results["roc_auc"] == pytest.approx(21 / 24)
    assert results["pr_auc"] == pytest.approx((1 + 1 + 3 / 4 + 4 / 6) / 4)
    assert results["threshold"] == 0.5
    assert set(results) == {"accuracy", "precision", "recall", "f1", "mcc", "roc_auc", "pr_auc", "threshold",
                            "tp", "fp", "tn", "fn"}
    json.dumps(results)  # plain Python numbers: Trainer.save_metrics writes them with json


def test_threshold_is_applied_as_probability_at_least_threshold():
    # at 0.55 the protein with probability exactly 0.55 is positive, at 0.56 it is not
    at = load_metric().compute(predictions=PROBABILITIES, references=LABELS, threshold=0.55)
    above = load_metric().compute(predictions=PROBABILITIES, references=LABELS, threshold=0.56)
    assert (at["tp"], at["fp"]) == (3, 2)
    assert (above["tp"], above["fp"]) == (3, 1)


def test_best_threshold_beats_half_on_hand_made_example():
    # Predicting the top k proteins positive (P = 4, N = 6), MCC = (TP*TN - FP*FN) / sqrt(...):
    #   k=5 (threshold 0.5): TP 3 FP 2 FN 1 TN 4 -> 10/sqrt(600) = 0.408
    #   k=2: TP 2 FP 0 FN 2 TN 6 -> 12/sqrt(384) = 0.612     k=4: TP 3 FP 1 FN 1 TN 5 -> 14/24 = 0.583
    #   k=6: TP 4 FP 2 FN 0 TN 4 -> 16/sqrt(6*4*6*4) = 16/24 = 2/3   (the best)
    #   k=7: TP 4 FP 3 FN 0 TN 3 -> 12/sqrt(504) = 0.535
    # k=6 lies between 0.45 and 0.35: the midpoint 0.40 is the tuned threshold.
    threshold = best_threshold(PROBABILITIES, LABELS)
    assert threshold == pytest.approx(0.40)
    tuned = load_metric().compute(predictions=PROBABILITIES, references=LABELS, threshold=threshold)
    assert tuned["mcc"] == pytest.approx(2 / 3)
    assert (tuned["tp"], tuned["fp"], tuned["fn"], tuned["tn"]) == (4, 2, 0, 4)


def test_candidate_thresholds_are_midpoints_including_sentinels():
    thresholds, mccs = mcc_by_threshold([0.2, 0.6, 0.6, 0.9], [0, 1, 0, 1])
    # distinct values of {0, 1} and the probabilities: 0, 0.2, 0.6, 0.9, 1 -> four midpoints
    np.testing.assert_allclose(thresholds, [0.1, 0.4, 0.75, 0.95])
    # all positive, above 0.2, above 0.6 (0.9 only), none: MCC 0, 1/sqrt(3), 1/sqrt(3), 0
    np.testing.assert_allclose(mccs, [0, 1 / math.sqrt(3), 1 / math.sqrt(3), 0], atol=1e-12)


def test_best_threshold_tie_breaking():
    # Two candidates share the best MCC 1/sqrt(3): 0.75 (only 0.9 positive) and 0.2 (all but 0.1 positive);
    # 0.75 is closer to 0.5.
    assert best_threshold([0.1, 0.3, 0.6, 0.9], [0, 1, 0, 1]) == pytest.approx(0.75)
    # A single class: every MCC is 0, so the candidate closest to 0.5 wins (midpoints 0.05, 0.15, 0.55, 0.95).
    assert best_threshold([0.1, 0.2, 0.9], [0, 0, 0]) == pytest.approx(0.55)


def test_sweep_mcc_equals_metric_module_at_every_candidate():
    rng = np.random.default_rng(0)
    labels = (rng.random(400) < 0.3).astype(int)
    # rounded to create ties, plus two adjacent floats whose midpoint rounds onto one of them
    probabilities = np.clip(np.round(rng.normal(0.3 + 0.3 * labels, 0.2), 2), 0, 1)
    probabilities[:2], labels[:2] = [0.3, np.nextafter(0.3, 1)], [0, 1]
    thresholds, mccs = mcc_by_threshold(probabilities, labels)
    module_mccs = [
        load_metric().compute(predictions=probabilities, references=labels, threshold=t)["mcc"] for t in thresholds
    ]
    np.testing.assert_allclose(mccs, module_mccs, rtol=0, atol=1e-12)
    chosen = best_threshold(probabilities, labels)
    at_chosen = load_metric().compute(predictions=probabilities, references=labels, threshold=chosen)["mcc"]
    assert at_chosen == pytest.approx(max(module_mccs), abs=1e-12)


def test_best_threshold_is_fast_on_thirty_thousand_proteins():
    rng = np.random.default_rng(1)
    labels = (rng.random(30_000) < 0.15).astype(int)
    probabilities = 1 / (1 + np.exp(-(rng.normal(size=30_000) + 2 * labels - 1.5)))
    start = time.perf_counter()
    threshold = best_threshold(probabilities, labels)
    assert time.perf_counter() - start < 1.0  # the sweep takes milliseconds; an O(n^2) one takes minutes
    # spot-check optimality against scikit-learn on a grid around the choice
    best = matthews_corrcoef(labels, probabilities >= threshold)
    for t in np.linspace(0.05, 0.95, 19):
        assert matthews_corrcoef(labels, probabilities >= t) <= best + 1e-12


def test_degenerate_cases_give_values_not_errors():
    metric = load_metric()
    only_negatives = metric.compute(predictions=[0.1, 0.7, 0.4], references=[0, 0, 0])
    assert only_negatives["roc_auc"] is None and only_negatives["pr_auc"] is None
    assert only_negatives["mcc"] == 0.0 and only_negatives["precision"] == 0.0 and only_negatives["fp"] == 1
    only_positives = metric.compute(predictions=[0.1, 0.7, 0.4], references=[1, 1, 1])
    assert only_positives["roc_auc"] is None and only_positives["pr_auc"] == pytest.approx(1.0)
    assert only_positives["mcc"] == 0.0 and only_positives["recall"] == pytest.approx(1 / 3)
    constant = metric.compute(predictions=[0.1, 0.2, 0.3, 0.4], references=[0, 1, 0, 1])  # nothing >= 0.5
    assert constant["mcc"] == 0.0 and constant["precision"] == 0.0 and constant["f1"] == 0.0
    assert constant["roc_auc"] == pytest.approx(0.75)
    with pytest.raises(ValueError, match="probabilities"):
        metric.compute(predictions=[-2.0, 3.0], references=[0, 1])  # logits, not probabilities


# Hand-made multi-label example: column 0 Nucleus, column 1 Mitochondrion; both separable, the mitochondrial
# probabilities all below 0.5.
ML_NAMES = ["Nucleus", "Mitochondrion"]
ML_PROBABILITIES = np.array([[0.9, 0.45], [0.8, 0.35], [0.3, 0.2], [0.2, 0.1]])
ML_LABELS = np.array([[1, 1], [1, 1], [0, 0], [0, 0]])


def test_multilabel_metrics_match_hand_computation():
    # Threshold 0.5: predicted sets {N}, {N}, {}, {} against true {N, M}, {N, M}, {}, {}.
    #   MCC Nucleus = 1; MCC Mitochondrion = 0 (nothing predicted); macro MCC = 0.5
    #   micro F1: TP 2, FP 0, FN 2 -> precision 1, recall 1/2 -> 2/3; macro F1 = (1 + 0) / 2
    #   subset accuracy: rows 3 and 4 exact -> 2/4
    #   Jaccard per protein: 1/2, 1/2, 1 (both empty count as agreement), 1 -> 3/4
    results = load_metric("multilabel").compute(
        predictions=ML_PROBABILITIES, references=ML_LABELS, label_names=ML_NAMES
    )
    assert results["mcc_Nucleus"] == pytest.approx(1.0)
    assert results["mcc_Mitochondrion"] == 0.0
    assert results["macro_mcc"] == pytest.approx(0.5)
    assert results["micro_f1"] == pytest.approx(2 / 3)
    assert results["macro_f1"] == pytest.approx(0.5)
    assert results["subset_accuracy"] == pytest.approx(0.5)
    assert results["jaccard"] == pytest.approx(0.75)
    assert results["macro_roc_auc"] == pytest.approx(1.0) and results["micro_roc_auc"] is not None
    assert results["threshold_Nucleus"] == results["threshold_Mitochondrion"] == 0.5
    # the Mitochondrion entries of a multi-label run compare with a binary run
    assert results["recall_Mitochondrion"] == 0.0 and results["roc_auc_Mitochondrion"] == pytest.approx(1.0)
    json.dumps(results)


def test_multilabel_per_class_thresholds():
    # Nucleus: separable between 0.3 and 0.8 -> midpoint 0.55. Mitochondrion: between 0.2 and 0.35 -> 0.275.
    thresholds = best_thresholds(ML_PROBABILITIES, ML_LABELS)
    np.testing.assert_allclose(thresholds, [0.55, 0.275])
    tuned = load_metric("multilabel").compute(
        predictions=ML_PROBABILITIES, references=ML_LABELS, threshold=list(thresholds), label_names=ML_NAMES
    )
    assert tuned["mcc_Nucleus"] == tuned["mcc_Mitochondrion"] == pytest.approx(1.0)
    assert tuned["subset_accuracy"] == tuned["jaccard"] == tuned["micro_f1"] == pytest.approx(1.0)
    assert tuned["threshold_Mitochondrion"] == pytest.approx(0.275)


def test_multilabel_keys_and_undefined_roc_auc():
    names = ["Cell membrane", "Lysosome/Vacuole"]
    results = load_metric("multilabel").compute(
        predictions=[[0.9, 0.1], [0.2, 0.6]], references=[[1, 0], [0, 0]], label_names=names
    )
    assert "mcc_Cell_membrane" in results and "threshold_Lysosome_Vacuole" in results
    assert "mcc_Mitochondrion" not in results and "accuracy_Mitochondrion" not in results
    assert results["macro_roc_auc"] is None  # Lysosome/Vacuole has no positive
    assert results["micro_roc_auc"] is not None
    with pytest.raises(ValueError, match="threshold"):
        load_metric("multilabel").compute(predictions=[[0.9, 0.1]], references=[[1, 0]], threshold=[0.5, 0.5, 0.5])


def test_metric_module_loads_offline_in_a_fresh_process(tmp_path, elsewhere):
    code = (
        "import json\n"
        "from esmloc.evaluation import load_metric, METRIC_PATH\n"
        "metric = load_metric()\n"
        "results = metric.compute(predictions=[0.9, 0.2, 0.6], references=[1, 0, 0], threshold=0.7)\n"
        "print(json.dumps({'mcc': results['mcc'], 'name': metric.name, 'path': str(METRIC_PATH),\n"
        "                  'citation': metric.citation, 'features': str(metric.features)}))\n"
    )
    result = run_offline(code, cwd=elsewhere, tmp_path=tmp_path)
    assert result["mcc"] == 1.0
    assert result["name"] == "esmloc_metrics"
    assert result["path"] == str(METRIC_PATH) and "Scikit-learn" in result["citation"]
    assert "predictions" in result["features"] and "references" in result["features"]


def test_metric_module_is_a_real_evaluate_module():
    import evaluate

    assert METRIC_PATH.is_file() and METRIC_PATH.parent.parent.name == "esmloc"
    metric = load_metric("multilabel")
    assert isinstance(metric, evaluate.Metric)
    assert "Sequence" in str(metric.features["predictions"]) and metric.inputs_description
    with pytest.raises(ValueError, match="Unknown configuration"):
        evaluate.load(str(METRIC_PATH), config_name="nonsense")


def test_compute_metrics_from_eval_prediction():
    # two-class logits [0, logit(p)] give softmax probability p for class 1
    logits = np.stack([np.zeros(10), logit(PROBABILITIES)], axis=1)
    results = compute_metrics(tune_threshold=True)(EvalPrediction(predictions=logits, label_ids=LABELS))
    assert results["mcc"] == pytest.approx(10 / math.sqrt(600))
    assert results["mcc_tuned"] == pytest.approx(2 / 3) and results["threshold_tuned"] == pytest.approx(0.40)
    assert "mcc_tuned" not in compute_metrics()(EvalPrediction(predictions=(logits,), label_ids=LABELS))

    # multi-label: sigmoid of logits, float labels as BCE receives them
    multi = compute_metrics(multi_label=True, label_names=ML_NAMES)(
        EvalPrediction(predictions=logit(ML_PROBABILITIES), label_ids=ML_LABELS.astype(np.float32))
    )
    assert multi["mcc_Nucleus"] == pytest.approx(1.0) and multi["micro_f1"] == pytest.approx(2 / 3)

    # three classes: argmax predictions [0, 1, 2, 2] against [0, 1, 2, 1]
    #   accuracy 3/4; F1 per class: 1, 2/3 (TP 1, FN 1), 2/3 (TP 1, FP 1) -> macro 7/9
    #   MCC (Gorodkin): n = 4, correct = 3, true counts (1, 2, 1), predicted counts (1, 1, 2)
    #   (3*4 - (1 + 2 + 2)) / sqrt((16 - (1 + 1 + 4)) * (16 - (1 + 4 + 1))) = 7 / 10
    three = np.log(np.array([[0.8, 0.1, 0.1], [0.1, 0.8, 0.1], [0.1, 0.1, 0.8], [0.1, 0.3, 0.6]]))
    multiclass = compute_metrics()(EvalPrediction(predictions=three, label_ids=np.array([0, 1, 2, 1])))
    assert multiclass == pytest.approx({"accuracy": 0.75, "macro_f1": 7 / 9, "mcc": 0.7})


class LogitsAsInput(torch.nn.Module):
    """A 'model' whose logits are its input, so Trainer evaluates known probabilities."""

    def __init__(self):
        super().__init__()
        self.bias = torch.nn.Parameter(torch.zeros(1))

    def forward(self, logits, labels=None):
        logits = logits + self.bias
        return SequenceClassifierOutput(loss=torch.nn.functional.cross_entropy(logits, labels), logits=logits)


def test_trainer_prefixes_the_keys(tmp_path):
    examples = [
        {"logits": torch.tensor([0.0, value], dtype=torch.float32), "labels": int(label)}
        for value, label in zip(logit(PROBABILITIES), LABELS)
    ]
    args = TrainingArguments(output_dir=str(tmp_path), per_device_eval_batch_size=4, report_to=[], use_cpu=True)
    trainer = Trainer(model=LogitsAsInput(), args=args, compute_metrics=compute_metrics(tune_threshold=True))
    metrics = trainer.evaluate(examples)
    assert metrics["eval_mcc"] == pytest.approx(10 / math.sqrt(600))
    assert metrics["eval_mcc_tuned"] == pytest.approx(2 / 3)
    assert metrics["eval_threshold_tuned"] == pytest.approx(0.40, abs=1e-6)  # float32 logits


def test_evaluation_report_tunes_on_validation_and_applies_to_test():
    # validation = the hand-worked example (tuned threshold 0.40, MCC 2/3)
    # test: at 0.5 predicted [1, 0, 0, 1] -> TP 1 FN 1 FP 1 TN 1 -> MCC 0
    #       at 0.4 predicted [1, 1, 0, 1] -> TP 2 FP 1 TN 1 FN 0 -> MCC 2/sqrt(3*2*2*1) = 1/sqrt(3)
    report = evaluation_report(PROBABILITIES, LABELS, [0.9, 0.42, 0.3, 0.6], [1, 1, 0, 0])
    assert report["test_threshold"] == 0.5 and report["test_mcc"] == 0.0
    assert report["test_threshold_tuned"] == pytest.approx(0.40)
    assert report["test_mcc_tuned"] == pytest.approx(1 / math.sqrt(3))
    assert report["validation_mcc_tuned"] == pytest.approx(2 / 3)
    assert report["validation_threshold_tuned"] == report["test_threshold_tuned"]
    assert all(key.startswith(("test_", "validation_")) for key in report)
    assert {"test_roc_auc", "test_pr_auc", "test_tp_tuned", "test_f1_tuned"} <= set(report)
    json.dumps(report)

    multi = evaluation_report(ML_PROBABILITIES, ML_LABELS, ML_PROBABILITIES, ML_LABELS, ML_NAMES)
    assert multi["test_mcc_Mitochondrion"] == 0.0 and multi["test_mcc_Mitochondrion_tuned"] == pytest.approx(1)
    assert multi["test_threshold_Mitochondrion_tuned"] == pytest.approx(0.275)
    assert multi["validation_macro_mcc_tuned"] == pytest.approx(1.0)


BINARY_MATRIX = np.stack([1 - PROBABILITIES, PROBABILITIES], axis=1)
BINARY_NAMES = list(task.BINARY_LABELS)


def test_predictions_csv(tmp_path):
    path = write_predictions_csv(tmp_path / "out" / "test_predictions.csv", ACCS, BINARY_MATRIX, BINARY_NAMES,
                                 multi_label=False, thresholds=0.4, truths=LABELS)
    frame = pd.read_csv(path)
    assert list(frame.columns) == ["ACC", "true_label", "probability_Other", "probability_Mitochondrion",
                                   "predicted_label"]
    assert list(frame["ACC"]) == ACCS
    np.testing.assert_allclose(frame["probability_Mitochondrion"], PROBABILITIES)
    assert list(frame["true_label"]) == ["Mitochondrion" if y else "Other" for y in LABELS]
    # at 0.4 the top six are predicted mitochondrial
    assert list(frame["predicted_label"]) == ["Mitochondrion"] * 6 + ["Other"] * 4

    multi = pd.read_csv(
        write_predictions_csv(tmp_path / "multi.csv", ACCS[:4], ML_PROBABILITIES, ML_NAMES, multi_label=True,
                              thresholds=[0.55, 0.4], truths=ML_LABELS),
        keep_default_na=False,
    )
    assert list(multi.columns) == [
        "ACC", "true_labels", "probability_Nucleus", "probability_Mitochondrion", "predicted_labels"
    ]
    assert list(multi["true_labels"]) == ["Nucleus;Mitochondrion"] * 2 + ["", ""]
    assert list(multi["predicted_labels"]) == ["Nucleus;Mitochondrion", "Nucleus", "", ""]


def test_examples_table_says_which_threshold_decided():
    table = format_examples_table(ACCS, LABELS, BINARY_MATRIX, names=BINARY_NAMES, multi_label=False,
                                  thresholds=0.4, n=3, seed=0)
    lines = table.splitlines()
    assert lines[0] == "Predicted: Mitochondrion if its probability >= 0.400, else Other."
    assert len(lines) == 5 and "ACC" in lines[1] and "probability_Mitochondrion" in lines[1]
    for line in lines[2:]:
        acc, true_label, probability, predicted = line.split()
        i = ACCS.index(acc)
        assert true_label == ("Mitochondrion" if LABELS[i] else "Other")
        assert probability == f"{PROBABILITIES[i]:.3f}"
        assert predicted == ("Mitochondrion" if PROBABILITIES[i] >= 0.4 else "Other")
    same = dict(names=BINARY_NAMES, multi_label=False, thresholds=0.4, n=3)
    assert table == format_examples_table(ACCS, LABELS, BINARY_MATRIX, seed=0, **same)
    assert table != format_examples_table(ACCS, LABELS, BINARY_MATRIX, seed=1, **same)

    multi = format_examples_table(ACCS[:4], ML_LABELS, ML_PROBABILITIES, names=ML_NAMES, multi_label=True,
                                  thresholds=[0.55, 0.4])
    assert "Nucleus (0.800)" in multi and "Mitochondrion (0.450)" in multi and "(none)" in multi
    assert multi.splitlines()[0].startswith("Predicted: every label whose probability >= its threshold (Nucleus 0.550")


def test_task_rules():
    logits = np.array([[2.0, -1.0], [0.0, 3.0]])
    probabilities = task.probabilities(logits, multi_label=False)
    np.testing.assert_allclose(probabilities.sum(axis=1), 1.0)
    np.testing.assert_allclose(task.scores(probabilities, multi_label=False), probabilities[:, 1])
    np.testing.assert_allclose(task.probabilities(logits, multi_label=True), 1 / (1 + np.exp(-logits)))
    assert task.predicted(probabilities, BINARY_NAMES, False, 0.5) == ["Other", "Mitochondrion"]
    three = np.array([[0.2, 0.5, 0.3]])
    assert task.predicted(three, ["a", "b", "c"], False) == ["b"]
    assert task.predicted(three, ["a", "b", "c"], True, [0.1, 0.6, 0.3]) == ["a;c"]
    # the metric module keeps its own copy of the key rule (it is loaded from its file): both agree
    for name in ("Cell membrane", "Lysosome/Vacuole", "Endoplasmic reticulum", "Mitochondrion"):
        assert task.metric_key(name) == key_name(name)
    assert MITOCHONDRION == task.POSITIVE_LABEL  # and the location it features


def assert_png(path, min_bytes=10_000):
    data = path.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n", f"{path.name} is not a PNG"
    width, height = struct.unpack(">II", data[16:24])  # the IHDR chunk
    assert width >= 500 and height >= 400 and len(data) >= min_bytes, (path.name, width, height, len(data))


def test_plots_are_written_as_png(tmp_path):
    rng = np.random.default_rng(0)
    labels = (rng.random(300) < 0.2).astype(int)
    probabilities = 1 / (1 + np.exp(-(rng.normal(size=300) + 2 * labels - 1.5)))
    paths = plot_curves(tmp_path / "binary", labels, probabilities, best_threshold(probabilities, labels))
    assert [path.name for path in paths] == ["roc_curve.png", "pr_curve.png", "confusion_matrix.png"]
    for path in paths:
        assert_png(path)

    multi_labels = (rng.random((300, 3)) < [0.1, 0.3, 0.0]).astype(int)  # the third location never occurs
    multi_probabilities = rng.random((300, 3))
    paths = plot_curves(tmp_path / "multi", multi_labels, multi_probabilities, [0.3, 0.4, 0.5], ["A", "B", "C"])
    assert [path.name for path in paths] == ["roc_curve.png", "pr_curve.png", "mcc_per_location.png"]
    for path in paths:
        assert_png(path)

    # a single class: the curves are undefined, the files still appear
    for path in plot_curves(tmp_path / "single", np.zeros(5, int), np.linspace(0.1, 0.9, 5), 0.5):
        assert_png(path, min_bytes=5_000)


def test_no_other_copy_of_the_metric_arithmetic():
    # metrics written once: evaluation.py takes every metric value from the module
    source = open(evaluation.__file__).read()
    for name in ("accuracy_score", "f1_score", "matthews_corrcoef", "roc_auc_score", "average_precision_score"):
        assert name not in source
