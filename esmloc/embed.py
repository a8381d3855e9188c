"""esmloc-embed: protein embeddings of a FASTA or CSV file, from an esmloc model or a stock ESM-2 checkpoint.

    esmloc-embed MODEL_OR_ESM_CHECKPOINT proteins.fasta -o embeddings.parquet
    esmloc-embed facebook/esm2_t33_650M_UR50D proteins.fasta -o embeddings.parquet --per_residue residues/
    torchrun --nproc_per_node 4 -m esmloc.embed MODEL proteins.fasta -o embeddings.parquet     (see Large jobs)

MODEL_OR_ESM_CHECKPOINT is an esmloc model directory (saved by train.py) or a stock ESM-2 checkpoint: a local
directory or a hub id (`EsmModel` or `EsmForMaskedLM` layout). Sequences are normalised and cropped as the model
says (a stock checkpoint: 1022 residues, middle crop, the esmloc default), exactly as for prediction.

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
import os
import shutil
import sys
import time
import uuid
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import torch
from safetensors import safe_open
from safetensors.numpy import save as safetensors_bytes
from tqdm.auto import tqdm

from esmloc import cli, jobs, loading
from esmloc.cache import backbone_fingerprint, sequence_key
from esmloc.cli import InputError
from esmloc.engine import Engine
from esmloc.files import TEMPORARY_PREFIX, atomic_file
from esmloc.predict import check_output_path, file_job_parser, parse_run_arguments
from esmloc.saving import tokenizer_for
from modeling_esmloc import EsmForLocalization


logger = logging.getLogger("esmloc.embed")

POOLINGS = ("mean", "cls", "attention")
RESIDUE_DTYPES = {"float16": np.float16, "float32": np.float32}
INDEX_FILE = "index.json"
SCHEMA_FIELDS = [("ACC", pa.string()), ("sequence_sha256", pa.string()), ("embedding", pa.list_(pa.float32()))]


def parse_arguments(argv=None) -> argparse.Namespace:
    parser = file_job_parser(
        "esmloc-embed",
        "Pooled (and optionally per-residue) ESM-2 embeddings of every protein of a FASTA or CSV file, from an esmloc "
        "model or a stock ESM-2 checkpoint; writes Parquet.",
        "model", "an esmloc model directory, or a stock ESM-2 checkpoint (directory or hub id)", "Parquet file")
    parser.add_argument("--pooling", choices=POOLINGS, default=None,
                        help="default: the model's own pooling (mean for a stock ESM-2 checkpoint)")
    parser.add_argument("--per_residue", default=None, metavar="DIR",
                        help="also write per-residue embeddings, as safetensors shards with an index.json, to DIR")
    parser.add_argument("--per_residue_dtype", choices=tuple(RESIDUE_DTYPES), default="float16")
    return parse_run_arguments(parser, argv, "embedded and written")


def load_model(name_or_path, device="cpu"):
    """(model, tokenizer, kind): an esmloc model directory as saved, or a stock ESM-2 checkpoint wrapped by
    `EsmForLocalization.from_esm` (its head unused) with the tokenizer that crops as its config says."""
    if Path(name_or_path).is_dir() and loading.model_kind(name_or_path) == "esmloc":
        model, tokenizer = loading.load_model_dir(name_or_path, device)
        return model, tokenizer, "esmloc"
    if str(name_or_path).startswith(("/", "./", "../", "~")) and not Path(name_or_path).expanduser().exists():
        raise InputError(f"{name_or_path}: no such model directory")
    try:
        model = EsmForLocalization.from_esm(name_or_path)
    except (OSError, ValueError) as error:
        raise InputError(f"{name_or_path}: cannot load an ESM-2 checkpoint from it ({error})") from None
    return model.to(device).eval(), tokenizer_for(model.config), "esm"


def choose_pooling(requested, model, kind: str) -> str:
    own = model.config.pooling if kind == "esmloc" else "mean"
    pooling = requested or own
    if pooling == "attention" and own != "attention":
        raise InputError(f"--pooling attention needs an esmloc model trained with attention pooling; this model "
                         f"pools by {own}")
    return pooling


def pooled_features(model, pooling: str):
    """`function(lengths, hidden)` for `Engine.map_batches`: the pooled float32 vectors of a batch."""
    def pool(lengths, hidden):
        if pooling == "attention":
            return model.pooler(*Engine.padded(hidden, lengths))[0].float()
        return Engine.pool(hidden, lengths, pooling).float()
    return pool


def embedding_table(accs, keys, vectors: np.ndarray, missing=None) -> pa.Table:
    """The output's rows: one vector per record (`vectors`, records x hidden); records flagged in `missing` (a part
    file's repeats of earlier sequences, filled in by the merge) get a null embedding and no row of `vectors`."""
    vectors = np.ascontiguousarray(vectors, dtype=np.float32)
    present = np.ones(len(accs), dtype=bool) if missing is None else ~np.asarray(missing, dtype=bool)
    offsets = np.concatenate([[0], np.cumsum(present * vectors.shape[1])]).astype(np.int32)
    embedding = pa.ListArray.from_arrays(pa.array(offsets), pa.array(vectors.reshape(-1)),
                                         mask=None if present.all() else pa.array(~present))
    return pa.Table.from_arrays([pa.array(accs, pa.string()), pa.array(keys, pa.string()), embedding],
                                schema=pa.schema(SCHEMA_FIELDS))


class RepeatedSequences:
    """During the merge: the vectors of the records whose sequence repeats later in the input (`plan.repeat_of`), kept
    on disk in fixed-size slots of a scratch file (memory stays flat however many repeats there are), and filled
    into the rows of the repeats (which the processes did not embed again)."""

    def __init__(self, plan, path: Path, hidden_size: int):
        self.plan, self.path, self.hidden_size = plan, path, hidden_size
        self.originals = np.unique(plan.repeat_of)  # sorted record indices
        self.slot_bytes = 64 + 4 * hidden_size  # the sequence key (hex) and the vector
        self.handle = open(path, "w+b") if len(self.originals) else None

    def fill(self, table: pa.Table, first_record: int) -> pa.Table:
        """`table` (one part, starting at record `first_record`) with its repeats filled in; the vectors of its
        originals are kept for later parts. A repeat whose sequence key differs from its original's (two sequences
        with one 16-byte digest) stops the merge: no wrong vector is ever written."""
        records = np.arange(first_record, first_record + table.num_rows)
        originals = np.isin(records, self.originals, assume_unique=True)
        repeats = np.isin(records, self.plan.repeats, assume_unique=True)
        if not (originals.any() or repeats.any()):
            return table
        keys = table.column("sequence_sha256").to_pylist()
        vectors = table.column("embedding").to_pylist()
        for row in np.flatnonzero(originals):
            slot = int(np.searchsorted(self.originals, records[row]))
            data = keys[row].encode() + np.asarray(vectors[row], dtype=np.float32).tobytes()
            os.pwrite(self.handle.fileno(), data, slot * self.slot_bytes)
        for row in np.flatnonzero(repeats):
            original = int(self.plan.repeat_of[np.searchsorted(self.plan.repeats, records[row])])
            data = os.pread(self.handle.fileno(), self.slot_bytes,
                            int(np.searchsorted(self.originals, original)) * self.slot_bytes)
            if data[:64].decode() != keys[row]:
                raise RuntimeError(f"record {records[row] + 1} was taken for a repeat of record {original + 1}, but "
                                   "their sequences differ; nothing was written. Please report this.")
            vectors[row] = np.frombuffer(data[64:], dtype=np.float32)
        return embedding_table(table.column("ACC").to_pylist(), keys, np.asarray(vectors, dtype=np.float32))

    def close(self):
        if self.handle is not None:
            self.handle.close()
            self.path.unlink(missing_ok=True)


def embed(argv=None) -> int:
    args = parse_arguments(argv)
    state = jobs.distributed_state()
    cli.setup_logging(logging.INFO if state.is_main_process else logging.WARNING)
    started = time.perf_counter()
    input_path, output = Path(args.input), Path(args.output)
    suffixes = (".parquet",) + ((".safetensors",) if args.per_residue else ())
    job = jobs.PartsJob("esmloc-embed", input_path, output, suffixes, max_residues=0, part_size=args.part_size,
                        chunk_size=args.chunk_size, state=state, with_repeats=True)
    device = torch.device(args.device) if args.device else state.device
    with job.same_everywhere():
        if not input_path.is_file():
            raise InputError(f"{input_path}: no such file")
        model_files = list(Path(args.model).glob("*")) if Path(args.model).is_dir() else []
        check_output_path(output, [input_path, *model_files])
        if args.per_residue:
            check_output_path(args.per_residue, [input_path, output, *model_files])
            residues_dir = Path(args.per_residue)
            if residues_dir.exists() and not (residues_dir / INDEX_FILE).is_file() and any(residues_dir.iterdir()):
                raise InputError(f"--per_residue {residues_dir} exists and holds no {INDEX_FILE} of an earlier "
                                 "esmloc-embed run: refusing to replace it; choose another directory")
        model, tokenizer, kind = load_model(args.model, device)
        pooling = choose_pooling(args.pooling, model, kind)
    job.max_residues = tokenizer.max_residues
    plan = job.plan()
    job.validate()
    engine = Engine(model, tokenizer, max_tokens_per_batch=args.max_tokens_per_batch, device=device,
                    precision=args.precision, progress=False)
    residue_dtype = RESIDUE_DTYPES[args.per_residue_dtype]
    logger.info("%s: %d proteins in %d parts of %d, %d process(es); %s %s, %s pooling, %s, cropped to %d residues "
                "(%s)", input_path, plan.records, plan.parts, plan.part_size, job.processes, kind, args.model,
                pooling, engine.precision_name, tokenizer.max_residues, tokenizer.crop)
    if len(plan.repeats):
        logger.info("%d record(s) repeat the sequence of an earlier record: embedded once, written for each",
                    len(plan.repeats))
    settings = {"backbone": None, "pooling": pooling, "precision": engine.precision_name,
                "max_residues": tokenizer.max_residues, "crop": tokenizer.crop,
                "per_residue_dtype": args.per_residue_dtype if args.per_residue else None}

    def fingerprint():
        settings["backbone"] = backbone_fingerprint(model.esm)
        if pooling == "attention":
            settings["pooler"] = jobs.tensors_digest(model.pooler)
        return settings

    job.prepare(fingerprint)
    pool = pooled_features(model, pooling)

    def features(lengths, hidden):
        residues = [x.float().cpu().numpy() for x in Engine.residues(hidden, lengths)] if args.per_residue else None
        return pool(lengths, hidden).cpu().numpy(), residues

    progress = not args.no_progress and cli.progress_bars_wanted()
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


def merge_residues(job, parts, directory: Path, metadata: dict) -> None:
    """Copies each part's safetensors shard into a new directory with an index (sequence key -> the first shard
    holding it), which then replaces `directory` (the parts stay until the whole merge is done)."""
    building = directory.with_name(f"{TEMPORARY_PREFIX}{uuid.uuid4().hex}-{directory.name}")
    building.mkdir(parents=True)
    weight_map = {}
    try:
        for part in parts:
            name = f"residues-{part:06d}.safetensors"
            with safe_open(job.part_path(part, ".safetensors"), "np") as handle:
                for key in handle.keys():
                    weight_map.setdefault(key, name)
            shutil.copyfile(job.part_path(part, ".safetensors"), building / name)
        (building / INDEX_FILE).write_text(json.dumps({"metadata": metadata, "weight_map": weight_map}, indent=1))
        if directory.exists():
            shutil.rmtree(directory)  # an earlier esmloc-embed output (checked before the run)
        building.rename(directory)
    finally:
        if building.exists():
            shutil.rmtree(building)


def read_residues(directory, key: str) -> np.ndarray:
    """One sequence's per-residue states (residues, hidden) from a `--per_residue` directory, by sequence_sha256."""
    directory = Path(directory)
    shard = json.loads((directory / INDEX_FILE).read_text())["weight_map"][key]
    with safe_open(directory / shard, "np") as handle:
        return handle.get_tensor(key)


def main(argv=None) -> int:
    return cli.run("esmloc-embed", embed, argv)


if __name__ == "__main__":
    sys.exit(main())
