"""What a training run leaves behind once trained: the saved model, evaluated with exactly the saved weights.

`evaluate_and_save` saves the model, predicts validation and test, tunes the decision threshold(s) on validation,
and writes the report (`test_results.json`), the predictions (`test_predictions.csv`), the plots, the run record
(`run_info.json`) and the model card. `run_summary` is what the console shows at the end: one screen with the data,
the model, the test metrics, the decision rule with a few test proteins, and where the files are.
"""

import json
import logging
from functools import partial
from pathlib import Path

import numpy as np

from esmloc import data, engine, evaluation, task
from esmloc.card import write_model_card
from esmloc.run_files import PREDICTIONS_FILE, RUN_INFO_FILE
from esmloc.files import atomic_file
from esmloc.predictions import write_predictions_csv
from esmloc.progress import LOG_FILE
from esmloc.saving import MODEL_FILES, save_model


logger = logging.getLogger("esmloc.report")


def evaluate_and_save(trainer, final_model, tokenizer, dataset, model_args, data_args, training_args, run_record: dict,
                      output_dir: Path, feature_cache_dir=None) -> tuple[dict, str]:
    """Saves the model, then predicts validation and test with exactly the saved weights: the report (threshold
    tuned on validation, also stored in the saved config as `decision_thresholds`), the predictions CSV, the plots,
    the run record and the model card. With
    `feature_cache_dir` (a frozen backbone), pooled features come from the cache: the same numbers. Returns the
    report and the table of a few test proteins under the decision rule (empty without --num_examples_to_show)."""
    save_model(final_model, output_dir, tokenizer)
    config = final_model.config
    names, multi_label = task.label_names(config), task.is_multi_label(config)
    predict = partial(engine.predict_probabilities, final_model, tokenizer, device=training_args.device,
                      max_tokens_per_batch=model_args.max_tokens_per_batch, progress=not training_args.disable_tqdm,
                      precision=model_args.precision, feature_cache=feature_cache_dir)
    probabilities, truth, scores = {}, {}, {}
    for split in ("validation", "test"):
        probabilities[split] = predict(dataset[split]["Sequence"], desc=f"Predicting {split}")
        truth[split] = task.targets(dataset[split]["label"], len(names), multi_label)
        scores[split] = task.scores(probabilities[split], multi_label)
    report = evaluation.evaluation_report(scores["validation"], truth["validation"], scores["test"], truth["test"],
                                          label_names=names)
    trainer.save_metrics("test", report)
    threshold = evaluation.tuned_threshold(scores["validation"], truth["validation"])
    # The tuned thresholds go into the saved config, where every path reads them (pipeline, predict_labels,
    # esmloc-predict, the demo, the card): the weights saved above are unchanged.
    config.decision_thresholds = np.asarray(threshold, dtype=float).tolist()
    config.save_pretrained(output_dir)
    accs = dataset["test"]["ACC"]
    write_predictions_csv(output_dir / PREDICTIONS_FILE, accs, probabilities["test"], names, multi_label, threshold,
                          truths=truth["test"])
    evaluation.plot_curves(output_dir, truth["test"], scores["test"], threshold, names)
    examples = evaluation.format_examples_table(
        accs, truth["test"], probabilities["test"], names=names, multi_label=multi_label, thresholds=threshold,
        n=data_args.num_examples_to_show, seed=training_args.seed) if data_args.num_examples_to_show else ""
    # How the splits were made, in the builder's own words (the card reads it; "dataset": a shared dataset's own).
    split_method = "dataset" if data_args.dataset_name else data.dataset_summary(dataset).get("split_method")
    split_sizes = {name: len(split) for name, split in dataset.items()}
    with atomic_file(output_dir / RUN_INFO_FILE, "w") as handle:
        handle.write(json.dumps({**run_record, "data": {**run_record["data"], "split_method": split_method,
                                                        "split_sizes": split_sizes}}, indent=2))
    write_model_card(output_dir)
    return report, examples


# Test metrics in the summary, at the threshold(s) tuned on validation: (label, report key without "test_").
SUMMARY_METRICS = {
    "binary": [("MCC", "mcc_tuned"), ("F1", "f1_tuned"), ("ROC-AUC", "roc_auc_tuned"), ("PR-AUC", "pr_auc_tuned"),
               ("accuracy", "accuracy_tuned")],
    "multi_label": [("macro MCC", "macro_mcc_tuned"), ("macro F1", "macro_f1_tuned"), ("micro F1", "micro_f1_tuned"),
                    ("macro ROC-AUC", "macro_roc_auc_tuned"), ("subset accuracy", "subset_accuracy_tuned")],
}


def run_summary(output_dir: Path, dataset, config, finetune: str, parameters: tuple[int, int], report: dict,
                examples: str, seconds: float) -> str:
    """The one screen train.py prints at the end (the dicts and details are in the log and the files)."""
    names, multi_label = task.label_names(config), task.is_multi_label(config)
    sizes = " / ".join(f"{len(dataset[split]):,}" for split in ("train", "validation", "test"))
    trainable, total = parameters
    metrics = SUMMARY_METRICS["multi_label" if multi_label else "binary"]
    cells = [(label, report.get(f"test_{key}")) for label, key in metrics]
    table = "  ".join(f"{label} {value:.3f}" if isinstance(value, (int, float)) else f"{label} n/a"
                      for label, value in cells)
    lines = [
        f"Trained in {seconds / 60:.1f} min.",
        f"Data:    {sizes} proteins (train / validation / test), labels {', '.join(names)}",
        f"Model:   {config.esm_name_or_path}, {config.pooling} pooling, --finetune {finetune}: {trainable:,} of "
        f"{total:,} parameters trained",
        f"Test:    {table}   (at the threshold{'s' if multi_label else ''} tuned on validation)",
    ]
    if examples:
        lines += ["", examples]
    plots = ", ".join(sorted(path.name for path in Path(output_dir).glob("*.png")))
    lines += ["", f"Saved in {output_dir}/:",
              f"  the model    {', '.join(MODEL_FILES)}, the esmloc code and tokenizer: "
              f"AutoModel.from_pretrained({str(output_dir)!r}, trust_remote_code=True)",
              f"  the results  {task.RESULTS_FILE}, {PREDICTIONS_FILE}, {plots}",
              f"  the record   README.md (the model card), {RUN_INFO_FILE}, {LOG_FILE} (every evaluation)"]
    return "\n".join(lines)


def without_local_paths(arguments: dict) -> dict:
    """Arguments for the record (run_info.json travels with a pushed model): local files by name only."""
    return {key: Path(value).name if isinstance(value, str) and Path(value).expanduser().exists() else value
            for key, value in arguments.items()}
