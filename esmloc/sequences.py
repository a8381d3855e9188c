"""Reading and validating protein sequences: FASTA and CSV/TSV readers and the one sequence check.

Needs no `datasets`: `esmloc-predict` streams its input through `read_sequences`, and the `datasets` builder in
`esmloc.data` validates whole training files with the same `validate_sequence` and row readers.

- `validate_sequence`: the one sequence check (upper case, whitespace removed, a trailing `*` stop codon stripped,
  residues limited to the ESM-2 alphabet): the rule of the model's own tokenizer (`tokenization_esmloc.
  normalize_sequence`, which ships with every saved model), with the changes it made named.
- `read_sequences` / `read_fasta`: streaming readers for prediction input (FASTA or CSV), one record at a time.
- `fasta_entries` / `csv_rows`: the raw records of a file, with the line each starts on, for readers that check
  more than the sequence (the builder's labels).
- `DataValidationError`: bad input, naming the file, line and accession of each problem.
"""

import csv
import gzip
import re
from collections.abc import Iterator
from typing import NamedTuple

from tokenization_esmloc import RESIDUES, STOP_CODON, InvalidSequenceError, normalize_sequence


# The residue letters of the ESM-2 vocabulary. `.` and `-` are alignment gaps, not residues.
ALPHABET = RESIDUES
FASTA_SUFFIXES = (".fasta", ".fa", ".faa", ".fas", ".fsa")

_WHITESPACE = re.compile(r"\s+")
_UNIPROT_HEADER = re.compile(r"(?:sp|tr)\|([^|\s]+)\|")


class DataValidationError(ValueError):
    """Bad input data. `problems` lists the first few problems found (file, line, ACC, what), `count` all of them."""

    def __init__(self, problems: list[str], count: int | None = None):
        self.problems = problems
        self.count = len(problems) if count is None else count
        shown = f" (the first {len(problems)} below)" if self.count > len(problems) else ""
        super().__init__(f"{self.count} problem(s) in the data{shown}:\n  " + "\n  ".join(problems))


class BadValue(ValueError):
    """One bad cell of one row; collected with the file, line and ACC into a DataValidationError."""


class SequenceError(BadValue):
    """A protein sequence that cannot be used; `position` is the 1-based residue of the first bad character."""

    def __init__(self, message: str, position: int | None = None):
        super().__init__(message)
        self.position = position


def validate_sequence(raw: str) -> tuple[str, tuple[str, ...]]:
    """Normalises and checks one protein sequence.

    Removes whitespace, upper-cases, strips one trailing `*` (a stop codon) and checks that every residue is in
    `ALPHABET`. Returns the sequence and the names of the normalisations applied (empty for a clean sequence).
    Raises `SequenceError` for an empty sequence or a character outside the alphabet, with its 1-based position
    counted in the sequence without whitespace.
    """
    try:
        sequence = normalize_sequence(raw)
    except InvalidSequenceError as error:
        raise SequenceError(str(error), position=error.position) from None
    if sequence == raw:  # the common case: nothing changed
        return sequence, ()
    compact = _WHITESPACE.sub("", raw)
    changes = [change for change, applied in (("whitespace removed", compact != raw),
                                              ("lower case upper-cased", compact != compact.upper()),
                                              ("stop codon '*' stripped", compact.endswith(STOP_CODON))) if applied]
    return sequence, tuple(changes)


class ProteinRecord(NamedTuple):
    """One protein read from a file: accession, normalised sequence and the file line where the record starts."""

    acc: str
    sequence: str
    line: int


def _open_text(path):
    # utf-8-sig: spreadsheet programs start CSV exports with a byte-order mark, which must not end up in "ACC".
    if str(path).endswith(".gz"):
        return gzip.open(path, "rt", encoding="utf-8-sig", newline="")
    return open(path, encoding="utf-8-sig", newline="")


def is_fasta(path) -> bool:
    """Whether `path` is read as FASTA: by its name (`FASTA_SUFFIXES`, optionally `.gz`)."""
    return str(path).removesuffix(".gz").lower().endswith(FASTA_SUFFIXES)


def describe_row(path, line, acc) -> str:
    """Where a problem is, as every message names it: file, line and (when known) accession."""
    return f"{path}, line {line}, ACC {acc!r}" if acc else f"{path}, line {line}"


def fasta_entries(path) -> Iterator[tuple[int, str, str]]:
    """Yields (header line, ACC, raw sequence) per FASTA record, holding one record in memory at a time."""
    line_number, acc, header_line, chunks = 0, None, 0, []
    with _open_text(path) as handle:
        for line_number, line in enumerate(handle, start=1):
            if line.startswith(">"):
                if acc is not None:
                    yield header_line, acc, "".join(chunks)
                header = line[1:].strip()
                uniprot = _UNIPROT_HEADER.match(header)
                acc = uniprot.group(1) if uniprot else (header.split() or [""])[0]
                if not acc:
                    raise DataValidationError([f"{describe_row(path, line_number, None)}: empty FASTA header"])
                header_line, chunks = line_number, []
            elif line.strip():
                if acc is None:
                    where = describe_row(path, line_number, None)
                    raise DataValidationError([f"{where}: sequence before the first '>' header; is this FASTA?"])
                chunks.append(line.strip())
    if acc is not None:
        yield header_line, acc, "".join(chunks)


def csv_rows(path, required: tuple[str, ...]) -> Iterator[tuple[int, dict[str, str]]]:
    """Yields (file line, {column: cell}) for the `required` columns; the header is line 1."""
    with _open_text(path) as handle:
        reader = csv.reader(handle, delimiter="\t" if str(path).removesuffix(".gz").endswith(".tsv") else ",")
        header = [name.strip() for name in next(reader, [])]
        missing = [name for name in required if name not in header]
        if missing:
            raise DataValidationError(
                [f"{describe_row(path, 1, None)}: missing column(s) {missing}; found {header}, need {list(required)}"]
            )
        index = {name: header.index(name) for name in required}
        line = reader.line_num
        for row in reader:
            start, line = line + 1, reader.line_num  # a quoted cell may span lines: report where the row starts
            if not any(cell.strip() for cell in row):
                continue
            yield start, {name: (row[i] if i < len(row) else "") for name, i in index.items()}


def read_fasta(path) -> Iterator[ProteinRecord]:
    """Streams the proteins of a FASTA file (optionally .gz).

    The ACC is the accession of a UniProt header (`>sp|P12345|NAME_HUMAN ...` gives `P12345`), else the first word
    of the header. Raises `DataValidationError` naming the file, line and ACC at the first bad record.
    """
    for line, acc, raw in fasta_entries(path):
        try:
            sequence, _ = validate_sequence(raw)
        except SequenceError as error:
            raise DataValidationError([f"{describe_row(path, line, acc)}: {error}"]) from None
        yield ProteinRecord(acc, sequence, line)


def raw_records(path) -> Iterator[tuple[int, str, str]]:
    """Yields (line, ACC, raw sequence) per record of a FASTA or CSV/TSV file, without checking the sequence (the
    file's structure is checked: FASTA headers, CSV columns). `checked_record` turns one into a `ProteinRecord`;
    large jobs (`esmloc.jobs`) read every record raw and check only their own share."""
    if is_fasta(path):
        yield from fasta_entries(path)
        return
    for line, row in csv_rows(path, ("ACC", "Sequence")):
        yield line, row["ACC"].strip(), row["Sequence"]


def checked_record(path, line: int, acc: str, raw: str) -> ProteinRecord:
    """A raw record (`raw_records`) checked and normalised; DataValidationError naming the file, line and ACC."""
    try:
        if not acc:
            raise BadValue("empty ACC")
        sequence, _ = validate_sequence(raw)
    except BadValue as error:
        raise DataValidationError([f"{describe_row(path, line, acc)}: {error}"]) from None
    return ProteinRecord(acc, sequence, line)


def read_sequences(path) -> Iterator[ProteinRecord]:
    """Streams the proteins of a FASTA file or of a CSV/TSV file with at least the columns ACC and Sequence.

    The format follows the file name: `.fasta`, `.fa`, `.faa`, `.fas`, `.fsa` (optionally `.gz`) are FASTA,
    anything else is CSV (TSV for `.tsv`). One record is held in memory at a time. Raises `DataValidationError`
    naming the file, line and ACC at the first bad record.
    """
    for line, acc, raw in raw_records(path):
        yield checked_record(path, line, acc, raw)


__all__ = [
    "ALPHABET",
    "FASTA_SUFFIXES",
    "BadValue",
    "DataValidationError",
    "ProteinRecord",
    "checked_record",
    "SequenceError",
    "csv_rows",
    "describe_row",
    "fasta_entries",
    "is_fasta",
    "read_fasta",
    "raw_records",
    "read_sequences",
    "validate_sequence",
]
