"""esmloc-predict: a saved esmloc model + a FASTA or CSV file of proteins -> a CSV of predictions.

    esmloc-predict MODEL_DIR proteins.fasta -o predictions.csv
    python -m esmloc.predict MODEL_DIR proteins.csv -o predictions.csv --max_tokens_per_batch 8192

MODEL_DIR is a directory saved by train.py (or any directory with an esmloc config, weights and tokenizer). The input
is FASTA (.fasta .fa .faa .fas .fsa, optionally .gz; the ACC is the UniProt accession of a `>sp|P12345|...` header,
else the header's first word) or CSV/TSV with the columns ACC and Sequence (other columns are ignored).

Output, one row per input record, in input order:
- single-label models: ACC, probability_<label> for every label, predicted_label. For a binary model the positive
  label (label 1, e.g. Mitochondrion) is predicted when its probability >= the decision threshold; with more
  classes the most probable label is predicted;
- multi-label models: ACC, probability_<label> for every label, predicted_labels (the labels at or above their
  thresholds, joined with ";"; empty for none).
The decision threshold is, in this order: --threshold; the threshold tuned for MCC on the validation split of the
training run (`test_threshold_tuned`, per label `test_threshold_<label>_tuned`, from MODEL_DIR/test_results.json);
0.5. The log (stderr) says which one was used.

Streaming: records are read and predicted in chunks of --chunk_size (sorted by length within a chunk by the engine)
and written as they come, so memory does not grow with the input.

Malformed records: the whole input is checked before any prediction (a fast pass that reads every record). A bad
record (a character outside the ESM-2 alphabet, an empty sequence or ACC, a missing column, ...) stops the run with
exit status 2 and a message naming the file, line and ACC; nothing is written. Predictions are written to a
temporary file next to the output and renamed into place only when every record has been predicted, so the output
path never holds a partial file.
"""

import argparse
import csv
import json
import logging
import sys
import time
from pathlib import Path

import numpy as np
import torch
from tqdm.auto import tqdm

from esmloc import data
from esmloc.engine import PRECISIONS, Engine
from esmloc.export import crop_mismatch
from esmloc.files import atomic_file
from modeling_esmloc import EsmForLocalization
from tokenization_esmloc import EsmLocTokenizer


logger = logging.getLogger("esmloc.predict")

RESULTS_FILE = "test_results.json"


def parse_arguments(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="esmloc-predict",
        description="Predict subcellular localisation for every protein of a FASTA or CSV file with a saved esmloc "
                    "model; writes a CSV (ACC, probability per label, predicted label).",
    )
    parser.add_argument("model_dir", help="a model directory saved by train.py")
    parser.add_argument("input", help="FASTA (.fasta/.fa/.faa/.fas/.fsa[.gz]) or CSV/TSV with ACC and Sequence")
    parser.add_argument("-o", "--output", required=True, help="the CSV to write")
    parser.add_argument("--threshold", type=float, default=None,
                        help="decision threshold for the positive label (every label for multi-label models); "
                             "default: the tuned one from MODEL_DIR/test_results.json, else 0.5")
    parser.add_argument("--max_tokens_per_batch", "--batch", type=int, default=None,
                        help="token budget per batch (proteins x longest); default 2048 on CPU, 65536 on CUDA")
    parser.add_argument("--chunk_size", type=int, default=4096,
                        help="records read, predicted and written at a time (default 4096)")
    parser.add_argument("--device", default=None, help="cpu, cuda, cuda:1, ... (default: cuda if available)")
    parser.add_argument("--precision", default="auto", choices=PRECISIONS,
                        help="auto: fp32 on CPU, bf16 (or fp16) autocast on CUDA")
    parser.add_argument("--no_progress", action="store_true", help="no progress bar")
    parser.add_argument("--explain", metavar="DIR", default=None,
                        help="also write per-residue explanations into DIR: explanations.csv (occlusion scores, and "
                             "attention-pooling weights, for every residue) and a PNG per protein for the first "
                             "--explain_plots (esmloc.explain; a second pass, one forward pass per residue)")
    parser.add_argument("--explain_plots", type=int, default=10, help="proteins drawn by --explain (default 10)")
    args = parser.parse_args(argv)
    if args.chunk_size < 1:
        parser.error("--chunk_size must be positive")
    return args


def load_model(model_dir, device):
    """The model and its tokenizer from a saved directory (the installed esmloc classes; no remote code runs)."""
    model_dir = Path(model_dir)
    if not (model_dir / "config.json").is_file():
        raise SystemExit(f"{model_dir}: not a model directory (no config.json)")
    model = EsmForLocalization.from_pretrained(model_dir).to(device).eval()
    tokenizer = EsmLocTokenizer.from_pretrained(model_dir)
    mismatch = crop_mismatch(tokenizer, model.config)
    if mismatch:
        raise SystemExit(f"{model_dir}: {mismatch}")
    return model, tokenizer


def decision_thresholds(model_dir, config, override: float | None) -> tuple[np.ndarray | None, str]:
    """Per-label thresholds (None for a multi-class model, which predicts the most probable label) and where they
    came from."""
    names = [config.id2label[i] for i in range(config.num_labels)]
    multi_label = config.problem_type == "multi_label_classification"
    if not multi_label and config.num_labels != 2:
        return None, "none (multi-class: the most probable label)"
    count = config.num_labels if multi_label else 1
    if override is not None:
        return np.full(count, override), f"{override} (--threshold)"
    results_path = Path(model_dir) / RESULTS_FILE
    if results_path.is_file():
        results = json.loads(results_path.read_text())
        keys = [f"test_threshold_{name}_tuned" for name in names] if multi_label else ["test_threshold_tuned"]
        if all(isinstance(results.get(key), (int, float)) for key in keys):
            values = np.asarray([float(results[key]) for key in keys])
            shown = ", ".join(f"{name}={value:.4g}" for name, value in zip(names if multi_label else [names[1]],
                                                                            values))
            return values, f"{shown} (tuned on validation, {', '.join(keys[:2])}{' ...' if len(keys) > 2 else ''} " \
                           f"from {results_path})"
    return np.full(count, 0.5), f"0.5 (default: no tuned threshold in {results_path})"


def prediction_header(names, multi_label: bool) -> list[str]:
    return ["ACC"] + [f"probability_{name}" for name in names] + ["predicted_labels" if multi_label else "predicted_label"]


def prediction_rows(accs, probabilities: np.ndarray, thresholds, names, multi_label: bool):
    for acc, row in zip(accs, probabilities, strict=True):
        cells = [acc] + [f"{value:.6g}" for value in row]
        if multi_label:
            cells.append(";".join(name for name, value, cut in zip(names, row, thresholds) if value >= cut))
        elif thresholds is not None:
            cells.append(names[1] if row[1] >= thresholds[0] else names[0])
        else:
            cells.append(names[int(np.argmax(row))])
        yield cells


def count_records(path) -> int:
    """Reads every record once (raising DataValidationError at the first bad one) and counts them."""
    return sum(1 for _ in data.read_sequences(path))


def chunks(records, size: int):
    chunk = []
    for record in records:
        chunk.append(record)
        if len(chunk) == size:
            yield chunk
            chunk = []
    if chunk:
        yield chunk


def predict_file(model, tokenizer, input_path, output_path, thresholds, chunk_size: int = 4096,
                 max_tokens_per_batch: int | None = None, device=None, precision: str = "auto",
                 progress: bool = True, total: int | None = None) -> int:
    """Writes the predictions of every record of `input_path` to `output_path` (atomically); returns the count."""
    config = model.config
    names = [config.id2label[i] for i in range(config.num_labels)]
    multi_label = config.problem_type == "multi_label_classification"
    engine = Engine(model, tokenizer, max_tokens_per_batch=max_tokens_per_batch, device=device,
                    precision=precision, progress=False)
    output_path = Path(output_path)
    output_path.parent.mkdir(parents=True, exist_ok=True)
    written = 0
    with atomic_file(output_path, "w", newline="") as handle, tqdm(total=total, unit="protein", desc="Predicting",
                                                                  disable=not progress) as bar:
        writer = csv.writer(handle)
        writer.writerow(prediction_header(names, multi_label))
        for chunk in chunks(data.read_sequences(input_path), chunk_size):
            probabilities = engine.predict_probabilities([record.sequence for record in chunk])
            writer.writerows(prediction_rows([record.acc for record in chunk], probabilities, thresholds,
                                             names, multi_label))
            written += len(chunk)
            bar.update(len(chunk))
    return written


def main(argv=None) -> int:
    args = parse_arguments(argv)
    logging.basicConfig(format="%(asctime)s %(levelname)s %(name)s: %(message)s", level=logging.INFO,
                        stream=sys.stderr)
    input_path = Path(args.input)
    if not input_path.is_file():
        print(f"esmloc-predict: {input_path}: no such file", file=sys.stderr)
        return 2
    started = time.perf_counter()
    try:
        total = count_records(input_path)
    except data.DataValidationError as error:
        print(f"esmloc-predict: malformed input, nothing written: {error}", file=sys.stderr)
        return 2
    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    model, tokenizer = load_model(args.model_dir, device)
    thresholds, source = decision_thresholds(args.model_dir, model.config, args.threshold)
    logger.info("%s: %d proteins; model %s (%s pooling); decision threshold: %s", input_path, total, args.model_dir,
                model.config.pooling, source)
    try:
        written = predict_file(model, tokenizer, input_path, args.output, thresholds, chunk_size=args.chunk_size,
                               max_tokens_per_batch=args.max_tokens_per_batch, device=device,
                               precision=args.precision, progress=not args.no_progress, total=total)
    except data.DataValidationError as error:  # the file changed since it was checked
        print(f"esmloc-predict: malformed input, nothing written: {error}", file=sys.stderr)
        return 2
    elapsed = time.perf_counter() - started
    logger.info("Wrote %d predictions to %s in %.1f s", written, args.output, elapsed)
    if args.explain:
        from esmloc.explain import explain_records

        path = explain_records(model, tokenizer, data.read_sequences(input_path), args.explain,
                               plots=args.explain_plots, progress=not args.no_progress, total=total, device=device,
                               precision=args.precision, max_tokens_per_batch=args.max_tokens_per_batch)
        logger.info("Wrote per-residue explanations to %s", path)
    return 0


if __name__ == "__main__":
    sys.exit(main())
