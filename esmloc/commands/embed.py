"""esmloc-embed: protein embeddings of a FASTA or CSV file, from an esmloc model or a stock ESM-2 checkpoint.

    esmloc-embed MODEL_OR_ESM_CHECKPOINT proteins.fasta -o embeddings.parquet
    esmloc-embed facebook/esm2_t33_650M_UR50D proteins.fasta -o embeddings.parquet --per_residue residues/
    torchrun --nproc_per_node 4 -m esmloc.commands.embed MODEL proteins.fasta -o embeddings.parquet     (see Large jobs)

MODEL_OR_ESM_CHECKPOINT is an esmloc model directory (saved by train.py) or a stock ESM-2 checkpoint: a local
directory or a hub id (`EsmModel` or `EsmForMaskedLM` layout). Sequences are normalised and cropped as the model
says (a stock checkpoint: 1022 residues, middle crop, the esmloc default), exactly as for prediction; with
`--long_proteins windows` (or a model saved with that rule) a longer protein is embedded whole, in overlapping windows
(`--window_overlap`), and its per-residue states cover every residue.

Output: a Parquet file (pyarrow, written in row groups as the parts are merged), one row per input record, in input
order, duplicates included:

- `ACC` (string), `sequence_sha256` (string: the sha256 of the sequence the backbone saw, i.e. normalised and
  cropped: the key of the per-residue file), `embedding` (list<float32>: the pooled vector).

`--pooling`: `mean` over the residues (without `<cls>`/`<eos>`), `cls` (the `<cls>` state) or `attention` (the
model's trained attention pooler: esmloc models with attention pooling only); default: the model's own pooling,
`mean` for a stock checkpoint. It loads with `pandas.read_parquet(path)` and
`datasets.load_dataset("parquet", data_files=path)`.

`--per_residue DIR`: every distinct sequence's last hidden states (residues x hidden, without `<cls>`/`<eos>`) in
safetensors shards, one tensor per sequence named by its `sequence_sha256`, and `DIR/index.json` with the shard of
every sequence (`weight_map`, the layout of a sharded Hugging Face checkpoint). Safetensors because the arrays are
ragged (one length per protein) and a reader needs only a few of them: `safe_open(shard).get_tensor(key)`
memory-maps one protein without reading the rest, from numpy, torch or any safetensors binding; a Parquet list
column would have to be decoded row group by row group. float16 by default (`--per_residue_dtype`): half the disk
of float32, and its rounding error (~1e-3 relative) is below the bf16/fp16 inference differences users already
meet; float32 keeps every bit.

Identical sequences are embedded once: a record whose sequence repeats an earlier record's anywhere in the input
(found while planning, by 16-byte digests) is not embedded again, by any process; the merge writes its original's
vector into its row (and the per-residue index points its key at the original's shard). Within a window of
`--chunk_size` records, sequences that become identical by normalisation and cropping are also embedded once. The
job runs in resumable parts under `<OUT>.parts/` (a rerun of the same command continues; see esmloc.jobs), also with
one process.
"""

import argparse
import json
import logging
import sys
import time
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
from safetensors.numpy import save as safetensors_bytes
from tqdm.auto import tqdm

from esmloc import cli, jobs, loading
from esmloc.cache import backbone_fingerprint, long_protein_rule, sequence_key
from esmloc.digests import tensors_digest
from esmloc.embeddings import (
    INDEX_FILE, POOLINGS, RESIDUE_DTYPES, SCHEMA_FIELDS, RepeatedSequences, choose_pooling, embedding_table,
    merge_residues, pooled_features,
)
from esmloc.engine import Engine
from esmloc.errors import InputError
from esmloc.files import atomic_file
from esmloc.sequences import crop_note


logger = logging.getLogger("esmloc.embed")


def parse_arguments(argv=None) -> argparse.Namespace:
    parser = cli.file_job_parser(
        "esmloc-embed",
        "Pooled (and optionally per-residue) ESM-2 embeddings of every protein of a FASTA or CSV file, from an esmloc "
        "model or a stock ESM-2 checkpoint; writes Parquet.",
        "model", "an esmloc model directory, or a stock ESM-2 checkpoint (directory or hub id)", "Parquet file")
    parser.add_argument("--pooling", choices=POOLINGS, default=None,
                        help="default: the model's own pooling (mean for a stock ESM-2 checkpoint)")
    parser.add_argument("--per_residue", default=None, metavar="DIR",
                        help="also write per-residue embeddings, as safetensors shards with an index.json, to DIR")
    parser.add_argument("--per_residue_dtype", choices=tuple(RESIDUE_DTYPES), default="float16")
    cli.add_engine_options(parser, "embedded and written")
    return parser.parse_args(argv)


def embed(argv=None) -> int:
    args = parse_arguments(argv)
    state = jobs.distributed_state()
    started = time.perf_counter()
    input_path, output = Path(args.input), Path(args.output)
    with jobs.same_everywhere(state):
        if not input_path.is_file():
            raise InputError(f"{input_path}: {'is a directory, not a file' if input_path.is_dir() else 'no such file'}")
        model_files = list(Path(args.model).glob("*")) if Path(args.model).is_dir() else []
        cli.check_output_file(output, [input_path, *model_files])
        if args.per_residue:
            residues_dir = cli.check_output_dir(args.per_residue, "--per_residue")
            if any(cli.same_file(residues_dir, path) for path in (input_path, output, *model_files)):
                raise InputError(f"--per_residue {residues_dir} is an input or the output: choose another directory")
            if residues_dir.exists() and not (residues_dir / INDEX_FILE).is_file() and any(residues_dir.iterdir()):
                raise InputError(f"--per_residue {residues_dir} exists and holds no {INDEX_FILE} of an earlier "
                                 "esmloc-embed run: refusing to replace it; choose another directory")
        device = cli.choose_device(args.device, state)
        model, tokenizer, kind = loading.load_model_or_backbone(args.model, device)
        tokenizer = loading.with_long_proteins(model, args.long_proteins, args.window_overlap) or tokenizer
        pooling = choose_pooling(args.pooling, model, kind)
    suffixes = (".parquet",) + ((".safetensors",) if args.per_residue else ())
    job = jobs.PartsJob("esmloc-embed", input_path, output, suffixes, max_residues=tokenizer.max_residues,
                        part_size=args.part_size, chunk_size=args.chunk_size, state=state, with_repeats=True)
    plan = job.plan()
    job.validate()
    note = crop_note(plan.cropped, plan.records, tokenizer.max_residues, tokenizer.crop, tokenizer.long_proteins,
                     tokenizer.window_overlap)
    if note:
        logger.warning("%s", note)
    engine = Engine(model, tokenizer, max_tokens_per_batch=args.max_tokens_per_batch, device=device,
                    precision=args.precision, progress=False)
    residue_dtype = RESIDUE_DTYPES[args.per_residue_dtype]
    logger.info("%s: %d proteins in %d parts of %d, %d process(es); %s %s, %s pooling, %s, long proteins: %s",
                input_path, plan.records, plan.parts, plan.part_size, job.processes, kind, args.model, pooling,
                engine.precision_name, long_protein_rule(tokenizer))
    if len(plan.repeats):
        logger.info("%d record(s) repeat the sequence of an earlier record: embedded once, written for each",
                    len(plan.repeats))
    settings = {"backbone": None, "pooling": pooling, "precision": engine.precision_name,
                **long_protein_rule(tokenizer), "per_residue_dtype": args.per_residue_dtype if args.per_residue else None}

    def fingerprint():
        settings["backbone"] = backbone_fingerprint(model.esm)
        if pooling == "attention":
            settings["pooler"] = tensors_digest(model.pooler)
        return settings

    job.prepare(fingerprint)
    pool = pooled_features(model, pooling)

    def features(lengths, hidden):
        residues = [x.float().cpu().numpy() for x in Engine.residues(hidden, lengths)] if args.per_residue else None
        return pool(lengths, hidden).cpu().numpy(), residues

    progress = cli.show_progress(args)
    with tqdm(total=sum(job.part_records(part) for part in job.pending_parts()), unit="protein",
              disable=not progress, desc=f"Embedding ({job.rank + 1}/{job.processes})", position=job.rank) as bar:
        for window in job.windows():
            keys = [sequence_key(record.sequence, tokenizer) for record in window.records]
            # Records repeating an earlier record's sequence anywhere in the input are not embedded again (the merge
            # fills them in); the others are embedded once per distinct sequence the backbone sees.
            records = np.concatenate([np.arange(part * plan.part_size, part * plan.part_size + end - start)
                                      for part, start, end in window.spans])
            repeats = np.isin(records, plan.repeats, assume_unique=True)
            first = {}
            for index, key in enumerate(keys):
                if not repeats[index]:
                    first.setdefault(key, index)
            unique = list(first)  # each distinct sequence once
            encoded = engine.encode([window.records[first[key]].sequence for key in unique])
            vectors = np.zeros((len(unique), model.esm.config.hidden_size), dtype=np.float32)
            residues = [None] * len(unique)
            for indices, (rows, states) in engine.map_batches(encoded, features, bar=bar):
                vectors[indices] = rows
                for index, state_rows in zip(indices, states or [], strict=False):
                    residues[index] = state_rows
            bar.update(len(keys) - len(unique))
            slot = {key: position for position, key in enumerate(unique)}
            for part, start, end in window.spans:
                part_keys, part_repeats = keys[start:end], repeats[start:end]
                computed = [key for key, repeat in zip(part_keys, part_repeats) if not repeat]
                if args.per_residue:  # a repeat's states are those of its original, in an earlier part
                    tensors = {key: residues[slot[key]].astype(residue_dtype) for key in dict.fromkeys(computed)}
                    with atomic_file(job.part_path(part, ".safetensors")) as handle:
                        handle.write(safetensors_bytes(tensors))
                table = embedding_table([record.acc for record in window.records[start:end]], part_keys,
                                        vectors[[slot[key] for key in computed]], missing=part_repeats)
                with atomic_file(job.part_path(part, ".parquet")) as handle:
                    pq.write_table(table, handle)

    def merge(parts):
        repeated = jobs.RepeatedIds()
        metadata = {"esmloc": json.dumps({"model": str(args.model), "kind": kind, **settings})}
        sequences = RepeatedSequences(plan, job.parts_dir / "repeated-sequences.bin", model.esm.config.hidden_size)
        try:
            with atomic_file(output) as handle:
                with pq.ParquetWriter(handle, pa.schema(SCHEMA_FIELDS, metadata=metadata)) as writer:
                    for part in parts:
                        table = sequences.fill(pq.read_table(job.part_path(part, ".parquet")),
                                               part * plan.part_size)
                        writer.write_table(table.replace_schema_metadata(metadata))
                        repeated.add(table.column("ACC").to_pylist())
        finally:
            sequences.close()
        repeated.report(input_path, lambda: (pq.read_table(job.part_path(part, ".parquet"), columns=["ACC"])
                                             .column("ACC").to_pylist() for part in parts))
        if args.per_residue:
            merge_residues(job, parts, Path(args.per_residue), {"esmloc": json.dumps(
                {"model": str(args.model), "kind": kind, **settings})})

    if job.finish(merge):
        logger.info("Wrote %d embeddings (%s pooling) to %s%s in %.1f s (%d process(es))", plan.records, pooling,
                    output, f" and per-residue states to {args.per_residue}" if args.per_residue else "",
                    time.perf_counter() - started, job.processes)
    return 0


def main(argv=None) -> int:
    return cli.run("esmloc-embed", embed, argv)


if __name__ == "__main__":
    sys.exit(main())
