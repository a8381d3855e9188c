"""esmloc-predict: a saved esmloc model + a FASTA or CSV file of proteins -> a CSV of predictions.

    esmloc-predict MODEL_DIR proteins.fasta -o predictions.csv
    python -m esmloc.commands.predict MODEL_DIR proteins.csv -o predictions.csv --max_tokens_per_batch 8192

MODEL_DIR is a directory saved by train.py (or any directory with an esmloc config, weights and tokenizer). The input
is FASTA (.fasta .fa .faa .fas .fsa, optionally .gz; the ACC is the UniProt accession of a `>sp|P12345|...` header,
else the header's first word) or CSV/TSV with the columns ACC and Sequence (other columns are ignored).

Output, one row per input record, in input order:
- single-label models: ACC, probability_<label> for every label, predicted_label. For a binary model the positive
  label (label 1, e.g. Mitochondrion) is predicted when its probability >= the decision threshold; with more
  classes the most probable label is predicted;
- multi-label models: ACC, probability_<label> for every label, predicted_labels (the labels at or above their
  thresholds, joined with ";"; empty for none).
The decision threshold is, in this order: --threshold; the model's own, tuned for MCC on the validation split of the
training run and stored in its config.json (`decision_thresholds`, what the pipeline applies too); for models saved
before the config held it, the tuned keys of MODEL_DIR/test_results.json (`test_threshold_tuned`, per label
`test_threshold_<label>_tuned`); 0.5 (`esmloc.task.decision_thresholds`). The log (stderr) says which one was used.

Long proteins (longer than the model's window, `max_residues`) are cropped or embedded whole in overlapping windows,
as the model's config says (`long_proteins`, saved with the model); `--long_proteins` / `--window_overlap` choose
otherwise, with a warning (the model was trained and evaluated with its own rule). The log says how many there are.

Streaming: records are read and predicted in chunks of --chunk_size (batched within a chunk by the engine)
and written as they come, so memory does not grow with the input; the progress bar moves with every batch.

Malformed records: the whole input is checked before any prediction (a fast pass that reads every record). A bad
record (a character outside the ESM-2 alphabet, an empty sequence or ACC, a missing column, ...) stops the run with
exit status 2 and a message naming the file, line and ACC; nothing is written. Record IDs (ACCs) that occur more than
once are counted in that pass and reported (a warning); every record still gets its own row. Predictions are written
to a temporary file next to the output and renamed into place only when every record has been predicted, so the
output path never holds a partial file; an output path that is the input file (or the model's) is refused before
anything is read.

Large jobs: under `torchrun` / `accelerate launch` (several processes, GPUs or machines), or with `--resumable`, the
input is split between the processes by tokens and predicted in resumable parts beside the output, which are
merged in input order at the end (`esmloc.jobs`): the output is the same as one process's. Repeated IDs are then
reported at the end.
"""

import argparse
import csv
import logging
import sys
import time
from array import array
from collections import Counter
from itertools import islice
from pathlib import Path

from tqdm.auto import tqdm

from esmloc import cli, jobs, loading, task
from esmloc.task import decision_thresholds
from esmloc.errors import InputError
from esmloc.sequences import crop_note, read_sequences
from esmloc.engine import Engine
from esmloc.digests import tensors_digest
from esmloc.files import atomic_file
from esmloc.jobs import id_digest, repeated_digests
from esmloc.predictions import PredictionsWriter, columns


logger = logging.getLogger("esmloc.predict")


def parse_arguments(argv=None) -> argparse.Namespace:
    parser = cli.file_job_parser(
        "esmloc-predict",
        "Predict subcellular localisation for every protein of a FASTA or CSV file with a saved esmloc model; writes "
        "a CSV (ACC, probability per label, predicted label).",
        "model_dir", "a model directory saved by train.py", "CSV")
    parser.add_argument("--threshold", type=cli.probability, default=None,
                        help="decision threshold for the positive label (every label for multi-label models), in "
                             "[0, 1]; default: the model's own (decision_thresholds in config.json), else 0.5")
    parser.add_argument("--resumable", action="store_true",
                        help="with one process too: write resumable parts beside the output, as several processes "
                             "do (see Large jobs)")
    parser.add_argument("--explain", metavar="DIR", default=None,
                        help="also write per-residue explanations into DIR: explanations.csv (occlusion scores, and "
                             "attention-pooling weights, for every residue) and a PNG per protein for the first "
                             "--explain_plots (esmloc.explain; a second pass: occlusion windows centred on every "
                             "residue of proteins up to ~220 residues, every few residues beyond, at most ~48 "
                             "forward passes of a 1,022-residue protein each; the CSV says each protein's window and "
                             "stride)")
    parser.add_argument("--explain_plots", type=int, default=10, help="proteins drawn by --explain (default 10)")
    cli.add_engine_options(parser, "predicted and written")
    args = parser.parse_args(argv)
    if args.explain_plots < 0:
        parser.error(f"argument --explain_plots: must not be negative, got {args.explain_plots}")
    return args


def check_paths(args) -> list[Path]:
    """The checks every process makes alike before any work: the input exists and is a file, the model directory is
    a complete esmloc model, and no output replaces an input or a model file or lands where it cannot be written."""
    input_path = Path(args.input)
    if not input_path.is_file():
        raise InputError(f"{input_path}: {'is a directory, not a file' if input_path.is_dir() else 'no such file'}")
    loading.check_model_dir(args.model_dir)
    inputs = [input_path, *Path(args.model_dir).glob("*")]
    cli.check_output_file(args.output, inputs)
    if args.explain:
        cli.check_output_dir(args.explain, "--explain")
    return inputs


def batched(iterable, size: int):
    """Tuples of `size` items (the last one shorter): itertools.batched from Python 3.12 on."""
    iterator = iter(iterable)
    while chunk := tuple(islice(iterator, size)):
        yield chunk


def survey(path, max_residues: int) -> tuple[int, int, int, set[int]]:
    """Reads every record once (raising DataValidationError at the first bad one): the number of records, of
    residues and of records longer than `max_residues` (cropped), and the digests of the record IDs that occur more
    than once. IDs are kept as 8-byte digests, not strings, so that memory stays small on proteome-sized files (two
    IDs share a digest with odds of about 1 in 10^9 among a million IDs: at worst a repeated ID is reported that is
    not)."""
    digests, residues, cropped = array("Q"), 0, 0
    for record in read_sequences(path):
        digests.append(id_digest(record.acc))
        residues += len(record.sequence)
        cropped += len(record.sequence) > max_residues
    return len(digests), residues, cropped, repeated_digests(digests)


def predict_file(model, tokenizer, input_path, output_path, thresholds, chunk_size: int = 4096,
                 max_tokens_per_batch: int | None = None, device=None, precision: str = "auto",
                 progress: bool = True, total: int | None = None, repeated_ids: set[int] = frozenset()
                 ) -> tuple[int, Counter]:
    """Writes the predictions of every record of `input_path` to `output_path` (atomically); returns the number
    written and how often each ID among `repeated_ids` (digests, see `survey`) occurred."""
    config = model.config
    engine = Engine(model, tokenizer, max_tokens_per_batch=max_tokens_per_batch, device=device,
                    precision=precision, progress=False)
    output_path = Path(output_path)
    output_path.parent.mkdir(parents=True, exist_ok=True)
    written, repeated = 0, Counter()
    with atomic_file(output_path, "w", newline="") as handle, tqdm(total=total, unit="protein", desc="Predicting",
                                                                  disable=not progress) as bar:
        writer = PredictionsWriter(handle, task.label_names(config), task.is_multi_label(config), thresholds)
        for chunk in batched(read_sequences(input_path), chunk_size):
            accs = [record.acc for record in chunk]
            writer.write(accs, engine.predict_probabilities([record.sequence for record in chunk], bar=bar))
            written += len(chunk)
            repeated.update(acc for acc in accs if repeated_ids and id_digest(acc) in repeated_ids)
    return written, repeated


def predict(argv=None) -> int:
    args = parse_arguments(argv)
    state = jobs.distributed_state()
    if state.num_processes > 1 or args.resumable:
        return predict_in_parts(args, state)
    input_path = Path(args.input)
    check_paths(args)
    device = cli.choose_device(args.device)
    started = time.perf_counter()
    config = loading.read_config(args.model_dir)
    total, residues, cropped, repeated_ids = survey(input_path, config["max_residues"])
    if repeated_ids:
        logger.warning("%s: %d record ID(s) occur more than once; each record gets its own row, in input order "
                       "(listed at the end)", input_path, len(repeated_ids))
    model, tokenizer = load(args, device)
    note_cropped(cropped, total, model.config)
    thresholds, source = decision_thresholds(args.model_dir, model.config, args.threshold)
    logger.info("%s: %d proteins (%d residues); model %s (%s pooling); decision threshold: %s", input_path, total,
                residues, args.model_dir, model.config.pooling, source)
    written, repeated = predict_file(model, tokenizer, input_path, args.output, thresholds, chunk_size=args.chunk_size,
                                     max_tokens_per_batch=args.max_tokens_per_batch, device=device,
                                     precision=args.precision, progress=cli.show_progress(args), total=total,
                                     repeated_ids=repeated_ids)
    if repeated:
        shown = ", ".join(f"{acc} (x{count})" for acc, count in repeated.most_common(10))
        logger.warning("Repeated record IDs: %s%s", shown, " ..." if len(repeated) > 10 else "")
    logger.info("Wrote %d predictions to %s in %.1f s", written, args.output, time.perf_counter() - started)
    if args.explain:
        from esmloc.explain import explain_records

        path = explain_records(model, tokenizer, read_sequences(input_path), args.explain, plots=args.explain_plots,
                               progress=cli.show_progress(args), total=total, device=device,
                               precision=args.precision, max_tokens_per_batch=args.max_tokens_per_batch)
        logger.info("Wrote per-residue explanations to %s", path)
    return 0


def load(args, device):
    """The model and tokenizer of MODEL_DIR, with the long-protein rule of --long_proteins / --window_overlap when
    given (a warning when it is not the one the model was trained and evaluated with)."""
    model, tokenizer = loading.load_model_dir(args.model_dir, device)
    saved = (model.config.long_proteins, model.config.window_overlap)
    tokenizer = loading.with_long_proteins(model, args.long_proteins, args.window_overlap) or tokenizer
    if (model.config.long_proteins, model.config.window_overlap) != saved:
        logger.warning("%s was trained and evaluated with long_proteins=%s (window_overlap %s); predicting with %s "
                       "(window_overlap %s), as asked", args.model_dir, *saved, model.config.long_proteins,
                       model.config.window_overlap)
    return model, tokenizer


def note_cropped(cropped: int, total: int, config) -> None:
    """Says once per run how many proteins are longer than the model's window, and so cropped (or windowed)."""
    message = crop_note(cropped, total, config.max_residues, config.crop, config.long_proteins,
                        config.window_overlap)
    if message:
        logger.warning("%s", message)


def predict_in_parts(args, state) -> int:
    """The large-job path (`esmloc.jobs`): this process's share of the input, resumable parts, one merged output."""
    started = time.perf_counter()
    input_path = Path(args.input)
    with jobs.same_everywhere(state):
        check_paths(args)
        config = loading.read_config(args.model_dir)
        device = cli.choose_device(args.device, state)
    job = jobs.PartsJob("esmloc-predict", input_path, args.output, (".csv",), max_residues=config["max_residues"],
                        part_size=args.part_size, chunk_size=args.chunk_size, state=state)
    plan = job.plan()
    job.validate()
    model, tokenizer = load(args, device)
    config = model.config
    note_cropped(plan.cropped, plan.records, config)
    thresholds, source = decision_thresholds(args.model_dir, config, args.threshold)
    engine = Engine(model, tokenizer, max_tokens_per_batch=args.max_tokens_per_batch, device=device,
                    precision=args.precision, progress=False)
    logger.info("%s: %d proteins in %d parts of %d, %d process(es); model %s (%s pooling); decision threshold: %s",
                input_path, plan.records, plan.parts, plan.part_size, job.processes, args.model_dir, config.pooling,
                source)
    job.prepare(lambda: {"model_weights": tensors_digest(model), "model_config": jobs.model_config(config),
                         "thresholds": None if thresholds is None else [float(t) for t in thresholds],
                         "precision": engine.precision_name})
    names, multi_label = task.label_names(config), task.is_multi_label(config)
    pending = job.pending_parts()
    progress = cli.show_progress(args)
    with tqdm(total=sum(job.part_records(part) for part in pending), unit="protein", disable=not progress,
              desc=f"Predicting ({job.rank + 1}/{job.processes})", position=job.rank) as bar:
        for window in job.windows():
            accs = [record.acc for record in window.records]
            probabilities = engine.predict_probabilities([record.sequence for record in window.records], bar=bar)
            for part, start, end in window.spans:
                with atomic_file(job.part_path(part, ".csv"), "w", newline="") as handle:
                    PredictionsWriter(handle, names, multi_label, thresholds).write(accs[start:end],
                                                                                    probabilities[start:end])

    def merge(parts):
        header = columns(names, multi_label)
        repeated = jobs.RepeatedIds()
        with atomic_file(Path(args.output), "w", newline="") as handle:
            writer = csv.writer(handle, lineterminator="\n")
            writer.writerow(header)
            for accs, rows in part_rows(job, parts):
                writer.writerows(rows)
                repeated.add(accs)
        repeated.report(input_path, lambda: (accs for accs, _ in part_rows(job, parts)))

    if job.finish(merge):
        logger.info("Wrote %d predictions to %s in %.1f s (%d process(es))", plan.records, args.output,
                    time.perf_counter() - started, job.processes)
    return 0


def part_rows(job, parts):
    """(ACCs, rows) of each predictions part, in order (the rows as csv.reader reads them, without the header)."""
    for part in parts:
        with open(job.part_path(part, ".csv"), newline="") as handle:
            rows = list(csv.reader(handle))[1:]
        yield [row[0] for row in rows], rows


def main(argv=None) -> int:
    return cli.run("esmloc-predict", predict, argv)


if __name__ == "__main__":
    sys.exit(main())
