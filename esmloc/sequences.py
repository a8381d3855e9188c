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

import codecs
import contextlib
import csv
import gzip
import io
import re
import zlib
from collections.abc import Iterator
from pathlib import Path
from typing import NamedTuple

from configuration_esmloc import window_overlap_for
from esmloc.errors import DataValidationError
from tokenization_esmloc import RESIDUES, STOP_CODON, InvalidSequenceError, normalize_sequence


# The residue letters of the ESM-2 vocabulary. `.` and `-` are alignment gaps, not residues.
ALPHABET = RESIDUES
FASTA_SUFFIXES = (".fasta", ".fa", ".faa", ".fas", ".fsa")

_WHITESPACE = re.compile(r"\s+")
_UNIPROT_HEADER = re.compile(r"(?:sp|tr)\|([^|\s]+)\|")


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


def crop_note(cropped: int, total: int, max_residues: int, crop: str, long_proteins: str = "crop",
              window_overlap: int | None = None) -> str | None:
    """What a run says once about the proteins longer than the model's window (None when there are none): cropped,
    or with `long_proteins="windows"` embedded whole in overlapping windows."""
    if not cropped:
        return None
    if long_proteins == "windows":
        overlap = window_overlap_for(max_residues, window_overlap)
        return (f"{cropped} of {total} proteins are longer than the model's window of {max_residues} residues: each is "
                f"embedded whole, in windows of {max_residues} residues overlapping by at least {overlap} (a stride of "
                f"at most {max_residues - overlap}), each residue's state from the window it is most central in")
    kept = "the N-terminal residues" if crop == "n_terminal" else "the N- and C-terminal halves"
    return (f"{cropped} of {total} proteins are longer than the model's window of {max_residues} residues: each is "
            f"cropped to {max_residues} residues ({crop} crop: {kept} are kept, the rest is not seen)")


class ProteinRecord(NamedTuple):
    """One protein read from a file: accession, normalised sequence and the file line where the record starts."""

    acc: str
    sequence: str
    line: int


def _open_text(path, expected: str):
    """`path` opened as text (UTF-8, a byte-order mark dropped; gunzipped for `.gz`) after `check_text_file`; text
    already in memory (an `io.StringIO`: the demo's pasted text, named by its str()) as it is."""
    if isinstance(path, io.TextIOBase):
        return contextlib.nullcontext(path)
    check_text_file(path, expected)
    # utf-8-sig: spreadsheet programs start CSV exports with a byte-order mark, which must not end up in "ACC".
    if str(path).endswith(".gz"):
        return gzip.open(path, "rt", encoding="utf-8-sig", newline="")
    return open(path, encoding="utf-8-sig", newline="")


_SNIFF_BYTES = 1 << 16
_PASS = {"FASTA": f"a FASTA file ({', '.join(FASTA_SUFFIXES)}, optionally .gz)",
         "CSV": "a CSV or TSV file (.csv, .tsv) with a header row"}


def check_text_file(path, expected: str) -> None:
    """Refuses, with one line naming the file, what no reader can use: a missing file, a directory, binary or
    non-UTF-8 data, and a FASTA file where a CSV/TSV is expected or the reverse (`expected`: "FASTA" or "CSV"),
    saying which it looks like and what to pass. Looks at the first 64 KiB; a bad byte later is reported by the
    reader with its line (`_lines`)."""
    file = Path(path)
    if not file.exists():
        raise DataValidationError([f"{path}: no such file"])
    if file.is_dir():
        raise DataValidationError([f"{path}: is a directory; pass {_PASS[expected]}"])
    try:
        if str(path).endswith(".gz"):
            with gzip.open(path, "rb") as handle:
                head = handle.read(_SNIFF_BYTES)
        else:
            with open(path, "rb") as handle:
                head = handle.read(_SNIFF_BYTES)
    except (gzip.BadGzipFile, EOFError, zlib.error) as error:
        raise DataValidationError([f"{path}: named .gz but not gzip data ({error})"]) from None
    if b"\0" in head:
        offset = head.index(b"\0")
        raise DataValidationError([f"{path}: binary data (a NUL byte at offset {offset}), not text; pass "
                                   f"{_PASS[expected]}"])
    bom = len(codecs.BOM_UTF8) if head.startswith(codecs.BOM_UTF8) else 0
    try:
        text = codecs.getincrementaldecoder("utf-8")().decode(head[bom:], final=len(head) < _SNIFF_BYTES)
    except UnicodeDecodeError as error:
        offset = bom + error.start
        raise DataValidationError([f"{path}: not UTF-8 text (byte 0x{head[offset]:02x} at offset {offset}); save it "
                                   f"as UTF-8 and pass {_PASS[expected]}"]) from None
    first = next((line.strip() for line in text.splitlines() if line.strip()), "")
    looks = "FASTA" if first.startswith(">") else "CSV" if first and (
        "," in first or "\t" in first) and "Sequence" in first else None
    if looks is not None and looks != expected:
        raise DataValidationError([f"{path}: looks like {looks} (it starts with {first[:40]!r}), but is read as "
                                   f"{expected} by its name; pass {_PASS[expected]}, or name the file after its "
                                   f"content ({_PASS[looks]})"])


def _lines(handle, path):
    """The lines of an open text file; a byte that is not UTF-8 stops with the line it is on."""
    line_number = 0
    try:
        for line_number, line in enumerate(handle, start=1):
            yield line_number, line
    except UnicodeDecodeError as error:
        raise DataValidationError([f"{path}, line {line_number + 1}: not UTF-8 text ({error.reason}); save the file "
                                   "as UTF-8"]) from None


def is_fasta(path) -> bool:
    """Whether `path` is read as FASTA: by its name (`FASTA_SUFFIXES`, optionally `.gz`)."""
    return str(path).removesuffix(".gz").lower().endswith(FASTA_SUFFIXES)


def describe_row(path, line, acc) -> str:
    """Where a problem is, as every message names it: file, line and (when known) accession."""
    return f"{path}, line {line}, ACC {acc!r}" if acc else f"{path}, line {line}"


def fasta_entries(path) -> Iterator[tuple[int, str, str]]:
    """Yields (header line, ACC, raw sequence) per FASTA record, holding one record in memory at a time."""
    line_number, acc, header_line, chunks = 0, None, 0, []
    with _open_text(path, "FASTA") as handle:
        for line_number, line in _lines(handle, path):
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
    with _open_text(path, "CSV") as handle:
        delimiter = "\t" if str(path).removesuffix(".gz").endswith(".tsv") else ","
        reader = csv.reader((line for _, line in _lines(handle, path)), delimiter=delimiter)
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
