"""Embeddings as esmloc-embed writes them: pooled vectors in Parquet, per-residue states in safetensors shards.

The layout (`esmloc.commands.embed` writes it, `read_residues` reads it):

- the Parquet file: one row per input record, in input order: `ACC` (string), `sequence_sha256` (string: the sha256
  of the sequence the backbone saw, normalised and cropped: the key of the per-residue file), `embedding`
  (list<float32>: the pooled vector);
- `--per_residue DIR`: every distinct sequence's last hidden states (residues x hidden, without `<cls>`/`<eos>`) in
  safetensors shards, one tensor per sequence named by its `sequence_sha256`, and `DIR/index.json` with the shard of
  every sequence (`weight_map`, the layout of a sharded Hugging Face checkpoint).
"""

import json
import os
import shutil
import uuid
from pathlib import Path

import numpy as np
import pyarrow as pa
from safetensors import safe_open

from configuration_esmloc import POOLING_MODES
from esmloc.engine import Engine
from esmloc.errors import InputError
from esmloc.files import TEMPORARY_PREFIX


RESIDUE_DTYPES = {"float16": np.float16, "float32": np.float32}
INDEX_FILE = "index.json"
SCHEMA_FIELDS = [("ACC", pa.string()), ("sequence_sha256", pa.string()), ("embedding", pa.list_(pa.float32()))]
POOLINGS = POOLING_MODES


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
