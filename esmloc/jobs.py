"""Large jobs: one file of proteins split between processes (CPU cores, GPUs, machines), resumable, merged in order.

`esmloc-predict` (with several processes, or `--resumable`) and `esmloc-embed` run through here, under
`torchrun` or `accelerate launch` (`torch.distributed`, set up by `accelerate.PartialState`: gloo between CPU
processes, nccl between GPUs):

1. Plan (the main process): one raw pass over the input (no validation) counts the tokens of every group of
   `part_size` consecutive records (a *part*; the last one shorter) and digests the file. Parts are dealt out to
   the processes in contiguous runs of about equal token counts (not record counts: a process given the long
   proteins would otherwise finish last). The plan is broadcast.
2. Validation: every process checks the records of its own parts only, so no record is checked twice; the
   processes then agree through a gathered flag. A bad record anywhere stops every process before anything is
   written, with exit status 2 and one message (from the process that found it, the earliest in the file when
   there are several) naming the file, line and ACC.
3. Parts: each process computes its parts, several at a time (up to `chunk_size` records: the engine sorts them
   by length together), and writes each part's files atomically into `<OUT>.parts/` beside the output. That
   directory holds `fingerprint.json`: the tool, esmloc's version, the input's size and sha256, the chunking and
   every setting the results depend on (the model's weights digest, thresholds, precision, crop, pooling). A
   rerun with the same fingerprint skips the parts already there; a rerun with another one discards them (and
   says so) rather than mixing results of two models or inputs. A part is used only when all of its files exist.
4. Merge: once every process has finished, the main process writes the parts in input order into the output
   (atomically) and removes the parts directory. The output is the same whatever the number of processes.

Memory stays flat: a process holds at most `chunk_size` records and their results; the plan holds one number per
part (and, for tools that skip repeated sequences, the records that repeat one: `find_repeats`); the merge holds one
part at a time (and an 8-byte digest per record ID, to report repeated IDs).

About 450 lines for one job, the large-job machinery both tools share: planning, validation, parts, fingerprint and
merge are the steps of one protocol between processes; split, each step would need the others' state.
"""

import hashlib
import json
import logging
import os
import shutil
import time
from array import array
from collections import Counter
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from datetime import timedelta
from pathlib import Path

import numpy as np
import torch
from accelerate.utils import broadcast_object_list, gather_object

import esmloc
from esmloc import cli
from esmloc.files import TEMPORARY_PREFIX, atomic_file
from esmloc.digests import file_digest
from esmloc.errors import DataValidationError, InputError
from esmloc.sequences import ProteinRecord, checked_record, raw_records


logger = logging.getLogger(__name__)

FINGERPRINT_FILE = "fingerprint.json"
PART_TARGET_COUNT = 1024  # the default part size aims at about this many parts: fine balancing, few files
PART_SIZE_STEP = 16
MAX_DEFAULT_PART_SIZE = 4096
# Collectives wait this long for the slowest process (torch's default, 30 min, is shorter than a proteome's share).
COLLECTIVE_TIMEOUT = timedelta(hours=48)


def distributed_state():
    """`accelerate.PartialState` for this process: one process without a launcher; under `torchrun` /
    `accelerate launch` the process group (gloo between CPU processes, nccl between GPUs) with a long timeout."""
    from accelerate import PartialState

    backend = cli.cpu_ddp_backend()  # set explicitly: accelerate would pick MPI where it is installed
    return PartialState(cpu=not torch.cuda.is_available(), timeout=COLLECTIVE_TIMEOUT,
                        **({"backend": backend} if backend else {}))


def _broadcast(value):
    return broadcast_object_list([value])[0]


def _gather(value) -> list:
    """`value` of every process, in rank order (one process: `[value]`)."""
    return gather_object([value])


@contextmanager
def same_everywhere(state):
    """For checks every process makes alike (paths, the model directory): when they fail, the main process reports
    the error and the others leave quietly with the same status."""
    try:
        yield
    except InputError as error:
        if state.is_main_process:
            raise
        raise SystemExit(error.exit_code) from error


def id_digest(acc: str) -> int:
    """An 8-byte digest of a record ID: repeated IDs are counted on digests, not strings, to keep memory small."""
    return int.from_bytes(hashlib.blake2b(acc.encode(), digest_size=8).digest(), "little")


def repeated_digests(digests: array) -> set[int]:
    """The digests (`id_digest`) that occur more than once in `digests` (an array("Q"), sorted in place): a sort and
    a comparison of neighbours, about one byte per record beyond the array (np.unique with counts needs four
    times the array, which showed in the peak memory of proteome-sized runs)."""
    values = np.frombuffer(digests, dtype=np.uint64)
    if len(values) < 2:
        return set()
    values.sort()
    return {int(value) for value in values[1:][values[1:] == values[:-1]]}


def default_part_size(records: int) -> int:
    """About `PART_TARGET_COUNT` parts, in steps of `PART_SIZE_STEP` records, at most `MAX_DEFAULT_PART_SIZE`."""
    wanted = -(-records // PART_TARGET_COUNT)
    return min(MAX_DEFAULT_PART_SIZE, max(PART_SIZE_STEP, -(-wanted // PART_SIZE_STEP) * PART_SIZE_STEP))


def assign_parts(tokens: Sequence[int], processes: int) -> list[int]:
    """The process of each part: contiguous runs of parts, cut where the cumulative token count crosses each
    process's equal share (a part goes where its middle falls)."""
    tokens = np.asarray(tokens, dtype=np.float64)
    if not len(tokens):
        return []
    middles = np.cumsum(tokens) - tokens / 2
    total = max(float(tokens.sum()), 1.0)
    return np.minimum((middles * processes / total).astype(int), processes - 1).tolist()


@dataclass
class Plan:
    """What every process agrees on before any work: parts (record counts and tokens) and who computes which."""

    records: int
    part_size: int
    part_tokens: list[int]
    owners: list[int]
    input_size: int
    input_sha256: str
    cropped: int = 0  # records longer than max_residues
    # Planned `with_repeats`: the records whose sequence repeats an earlier record's (sorted), and the first record
    # with that sequence for each (`find_repeats`); int64 arrays, as long as the input has repeats.
    repeats: np.ndarray = field(default_factory=lambda: np.zeros(0, dtype=np.int64))
    repeat_of: np.ndarray = field(default_factory=lambda: np.zeros(0, dtype=np.int64))

    @property
    def parts(self) -> int:
        return len(self.part_tokens)


def tokens_seen(residues: int, max_residues: int) -> int:
    """Tokens the backbone sees for a protein of `residues` residues: cropped to `max_residues`, plus <cls>/<eos>
    (an estimate from the raw length, for balancing and reporting only)."""
    return min(residues, max_residues) + 2


def sequence_digest(raw: str) -> tuple[int, int]:
    """A 16-byte digest of a raw sequence, as two integers: repeats are found on digests, not strings, to keep memory
    small (two different sequences among a billion share one with odds of about 1 in 10^20; the merge checks the
    sequence key of every repeat against its original's all the same)."""
    digest = hashlib.blake2b(raw.encode(), digest_size=16).digest()
    return int.from_bytes(digest[:8], "little"), int.from_bytes(digest[8:], "little")


def find_repeats(high: array, low: array) -> tuple[np.ndarray, np.ndarray]:
    """(repeats, repeat_of): the records whose digest (`sequence_digest`: `high`, `low` per record) equals an earlier
    record's, in record order, and for each the first record with that digest."""
    high, low = np.frombuffer(high, dtype=np.uint64), np.frombuffer(low, dtype=np.uint64)
    if len(high) < 2:
        return np.zeros(0, dtype=np.int64), np.zeros(0, dtype=np.int64)
    order = np.lexsort((low, high))  # by digest; equal digests stay in record order (lexsort is stable)
    sorted_high, sorted_low = high[order], low[order]
    same = (sorted_high[1:] == sorted_high[:-1]) & (sorted_low[1:] == sorted_low[:-1])  # i+1 repeats i
    del sorted_high, sorted_low
    group_start = np.maximum.accumulate(np.where(np.concatenate([[True], ~same]), np.arange(len(order)), 0))
    repeats, repeat_of = order[1:][same], order[group_start[1:][same]]
    by_record = np.argsort(repeats, kind="stable")
    return repeats[by_record].astype(np.int64), repeat_of[by_record].astype(np.int64)


def make_plan(input_path, processes: int, max_residues: int, part_size: int | None = None,
              with_repeats: bool = False) -> Plan:
    """One raw pass over the input: tokens per part (a record counts min(its length, max_residues) + 2, what the
    backbone sees), the file's digest, and the owner of each part; with `with_repeats`, the records that repeat an
    earlier record's sequence exactly (`find_repeats`; 16 bytes per record while planning)."""
    step_tokens = array("q")  # tokens per PART_SIZE_STEP records, before the part size is known
    high, low = array("Q"), array("Q")
    records = cropped = 0
    for _, _, raw in raw_records(input_path):
        cropped += len(raw) > max_residues
        if records % PART_SIZE_STEP == 0:
            step_tokens.append(0)
        step_tokens[-1] += tokens_seen(len(raw), max_residues)
        if with_repeats:
            digest = sequence_digest(raw)
            high.append(digest[0])
            low.append(digest[1])
        records += 1
    part_size = part_size or default_part_size(records)
    if part_size % PART_SIZE_STEP:  # an explicit --part_size: count again at its own step
        part_tokens = [0] * -(-records // part_size)
        for index, (_, _, raw) in enumerate(raw_records(input_path)):
            part_tokens[index // part_size] += tokens_seen(len(raw), max_residues)
    else:
        steps = np.frombuffer(step_tokens, dtype=np.int64) if records else np.zeros(0, dtype=np.int64)
        per_part = part_size // PART_SIZE_STEP
        part_tokens = np.add.reduceat(steps, np.arange(0, len(steps), per_part)).tolist() if len(steps) else []
    plan = Plan(records, part_size, part_tokens, assign_parts(part_tokens, processes),
                os.path.getsize(input_path), file_digest(input_path), cropped)
    if with_repeats:
        plan.repeats, plan.repeat_of = find_repeats(high, low)
    return plan


@dataclass
class Window:
    """Records a process computes at once: whole parts, `spans[i] = (part, start, end)` into `records`."""

    records: list[ProteinRecord] = field(default_factory=list)
    spans: list[tuple[int, int, int]] = field(default_factory=list)


class PartsJob:
    """One large job (see the module docstring). The tool drives it:

        job = PartsJob(prog, input_path, output, suffixes=(".csv",), max_residues=..., part_size=..., chunk_size=...)
        job.plan(); job.validate()                  # collectives: every process calls them
        job.prepare(settings)                       # settings(): a JSON-able dict the results depend on
        for window in job.windows(): ...            # compute; write each part's files to job.part_path(part, suffix)
        job.finish(merge)                           # merge(parts_in_order) runs on the main process
    """

    def __init__(self, prog: str, input_path, output, suffixes: Sequence[str], max_residues: int,
                 part_size: int | None = None, chunk_size: int = 4096, state=None, with_repeats: bool = False):
        self.prog, self.input_path, self.output = prog, Path(input_path), Path(output)
        self.with_repeats = with_repeats
        self.suffixes, self.max_residues = tuple(suffixes), max_residues
        self.requested_part_size, self.chunk_size = part_size, chunk_size
        self.state = state if state is not None else distributed_state()
        self.rank, self.processes = self.state.process_index, self.state.num_processes
        self.is_main = self.state.is_main_process
        self.parts_dir = self.output.with_name(self.output.name + ".parts")
        self.plan_: Plan | None = None

    # Collectives --------------------------------------------------------------------------------------------------

    def plan(self) -> Plan:
        """The main process plans (a malformed file structure stops every process with one message)."""
        result = None
        if self.is_main:
            try:
                result = make_plan(self.input_path, self.processes, self.max_residues, self.requested_part_size,
                                   self.with_repeats)
            except DataValidationError as error:
                result = error
        result = _broadcast(result)
        if isinstance(result, DataValidationError):
            self._stop(result, reporter=0)
        self.plan_ = result
        return result

    def my_parts(self) -> list[int]:
        return [part for part, owner in enumerate(self.plan_.owners) if owner == self.rank]

    def validate(self) -> None:
        """Checks the records of this process's parts; every process stops (status 2) when any record is bad."""
        mine = set(self.my_parts())
        error = None
        try:
            for index, (line, acc, raw) in enumerate(raw_records(self.input_path)):
                if index // self.plan_.part_size in mine:
                    checked_record(self.input_path, line, acc, raw)
        except DataValidationError as found:
            error = found
        errors = _gather(None if error is None else str(error))
        reporter = next((rank for rank, message in enumerate(errors) if message is not None), None)
        if reporter is not None:
            self._stop(error if reporter == self.rank else None, reporter)

    def part_records(self, part: int) -> int:
        return min(self.plan_.part_size, self.plan_.records - part * self.plan_.part_size)

    def _stop(self, error, reporter: int):
        """Every process leaves with status 2; only `reporter` says why (esmloc.cli prints the error once)."""
        self.close()
        if self.rank == reporter and error is not None:
            raise error
        raise SystemExit(InputError.exit_code)

    def prepare(self, settings: Callable[[], dict]) -> None:
        """The main process opens the parts directory: resumes when its fingerprint matches, discards it otherwise.
        `settings()` (called on the main process only: a weights digest takes a while) returns what the results
        depend on besides the input, as a JSON-able dict."""
        if self.is_main:
            self._open_parts_dir(self.fingerprint(settings()))
        self.barrier()
        self.computed = Counter(started=time.perf_counter())

    def fingerprint(self, settings: dict) -> dict:
        plan = self.plan_
        return json.loads(json.dumps({"tool": self.prog, "esmloc_version": esmloc.__version__,
                "input_size": plan.input_size, "input_sha256": plan.input_sha256, "records": plan.records,
                "part_size": plan.part_size, "parts": plan.parts, "part_files": list(self.suffixes),
                "settings": settings}, default=str))

    def _open_parts_dir(self, fingerprint: dict) -> None:
        directory, fingerprint_path = self.parts_dir, self.parts_dir / FINGERPRINT_FILE
        if directory.exists():
            if not fingerprint_path.is_file():
                if any(directory.iterdir()):
                    raise InputError(f"{directory} exists and is not an esmloc parts directory (no "
                                     f"{FINGERPRINT_FILE}); move it away or choose another output")
            else:
                previous = json.loads(fingerprint_path.read_text())
                if previous == fingerprint:
                    done = sum(self.part_done(part) for part in range(self.plan_.parts))
                    logger.info("Resuming from %s: %d of %d parts already done", directory, done, self.plan_.parts)
                    self._remove_temporaries()
                    return
                changed = sorted(key for key in set(previous) | set(fingerprint) if previous.get(key) !=
                                 fingerprint.get(key))
                if "settings" in changed:
                    old, new = previous.get("settings") or {}, fingerprint["settings"]
                    changed.remove("settings")
                    changed += sorted(key for key in set(old) | set(new) if old.get(key) != new.get(key))
                logger.warning("%s holds parts of an earlier run with a different %s: discarding them (results of "
                               "two runs are never mixed)", directory, ", ".join(changed))
                shutil.rmtree(directory)
        directory.mkdir(parents=True, exist_ok=True)
        with atomic_file(fingerprint_path, "w") as handle:
            handle.write(json.dumps(fingerprint, indent=2, sort_keys=True))

    def _remove_temporaries(self) -> None:
        for path in self.parts_dir.glob(f"{TEMPORARY_PREFIX}*"):
            path.unlink(missing_ok=True)

    def barrier(self) -> None:
        if self.processes > 1:
            self.state.wait_for_everyone()

    def close(self) -> None:
        cli.end_processes()

    # Parts --------------------------------------------------------------------------------------------------------

    def part_path(self, part: int, suffix: str) -> Path:
        return self.parts_dir / f"part-{part:06d}{suffix}"

    def part_done(self, part: int) -> bool:
        return all(self.part_path(part, suffix).is_file() for suffix in self.suffixes)

    def pending_parts(self) -> list[int]:
        return [part for part in self.my_parts() if not self.part_done(part)]

    def windows(self) -> Iterator[Window]:
        """This process's unfinished parts, read (and checked) in input order, grouped into windows of whole parts
        of up to `chunk_size` records (at least one part)."""
        pending = set(self.pending_parts())
        if not pending:
            return
        last = max(pending)
        window, current, start = Window(), None, 0
        for index, (line, acc, raw) in enumerate(raw_records(self.input_path)):
            part = index // self.plan_.part_size
            if part > last:
                break
            if part not in pending:
                continue
            if part != current:
                if current is not None:
                    window.spans.append((current, start, len(window.records)))
                    if len(window.records) + self.plan_.part_size > self.chunk_size:
                        self._count(window)
                        yield window
                        window = Window()
                current, start = part, len(window.records)
            window.records.append(checked_record(self.input_path, line, acc, raw))
        window.spans.append((current, start, len(window.records)))
        self._count(window)
        yield window

    def _count(self, window: Window) -> None:
        self.computed.update(parts=len(window.spans), records=len(window.records),
                             tokens=sum(tokens_seen(len(record.sequence), self.max_residues)
                                        for record in window.records))

    def finish(self, merge: Callable[[list[int]], None]) -> bool:
        """Waits for every process; the main process checks that every part exists, calls `merge(parts)` (which
        writes the output) and removes the parts directory. Returns whether this process merged."""
        seconds = time.perf_counter() - self.computed["started"]
        shares = _gather((self.computed["parts"], self.computed["records"], self.computed["tokens"],
                                      seconds))
        logger.info("Computed: %s", "; ".join(
            f"process {rank + 1}: {parts} parts, {records} proteins, {tokens} tokens in {seconds:.1f} s"
            for rank, (parts, records, tokens, seconds) in enumerate(shares)))
        merged = False
        if self.is_main:
            missing = [part for part in range(self.plan_.parts) if not self.part_done(part)]
            if missing:
                raise RuntimeError(f"{len(missing)} part(s) missing after every process finished (first: "
                                   f"{self.part_path(missing[0], self.suffixes[0])}); run the command again")
            merge(list(range(self.plan_.parts)))
            shutil.rmtree(self.parts_dir)
            merged = True
        self.barrier()
        self.close()
        return merged


class RepeatedIds:
    """Collects the digests of every record ID during a merge; `report` warns about the repeated ones, by name."""

    def __init__(self):
        self.digests = array("Q")

    def add(self, accs: Sequence[str]) -> None:
        self.digests.extend(id_digest(acc) for acc in accs)

    def report(self, where, accs_by_part: Callable[[], Iterator[Sequence[str]]]) -> None:
        repeated = repeated_digests(self.digests)
        if not repeated:
            return
        named = Counter(acc for accs in accs_by_part() for acc in accs if id_digest(acc) in repeated)
        shown = ", ".join(f"{acc} (x{count})" for acc, count in named.most_common(10))
        logger.warning("%s: %d record ID(s) occur more than once; each record got its own row, in input order: %s%s",
                       where, len(repeated), shown, " ..." if len(named) > 10 else "")


def model_config(config) -> dict:
    """A model config as the fingerprint keeps it: without where it was loaded from or which transformers saved it."""
    values = config.to_dict()
    for key in ("_name_or_path", "transformers_version", "esm_name_or_path"):
        values.pop(key, None)
    return values
