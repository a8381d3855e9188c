"""The esmloc dataset: protein localisation data validated and split for training, as a `datasets` builder.

One job, one module: the loading script imports this builder whole, so the builder, its config and the
loader around it stay together; the sequence rules and the split rules already live in `esmloc.sequences` and
`esmloc.splits`.

Everything that turns a user's file into training data lives here, so that `train.py` and the loading script
`dataset_script/esmloc.py` share one implementation; reading and validating sequences is `esmloc.sequences` (which
needs no `datasets`; its public names are importable from here too, as they were before it existed):

- `EsmLocDataset`: the `datasets` builder (configs `mitochondrion` and `deeploc`) that validates a whole file,
  merges exact duplicates and splits it so that identical sequences never straddle two splits.
- `load_dataset`: that builder instantiated directly, which works on datasets 3.x and on datasets >= 4 (which no
  longer runs loading scripts), from a pip install as well as from a checkout.
- `format_summary` / `dataset_summary`: split sizes, positives per split and what was normalised or merged.

The split rules themselves are esmloc.splits's.
"""

import dataclasses
import functools
import hashlib
import json
import os
from collections import Counter
from collections.abc import Iterator
from glob import glob
from pathlib import Path

import datasets
from datasets.data_files import DataFilesDict

import tokenization_esmloc

from esmloc import sequences, task
from esmloc.sequences import (
    ALPHABET,
    FASTA_SUFFIXES,
    BadValue,
    DataValidationError,
    ProteinRecord,
    SequenceError,
    check_text_file,
    csv_rows,
    describe_row,
    fasta_entries,
    is_fasta,
    read_fasta,
    read_sequences,
    validate_sequence,
)
from esmloc.splits import (
    MAX_REPORTED_PROBLEMS, check_no_shared_sequences, partition_split, sequence_groups, stratified_split,
)


logger = datasets.logging.get_logger(__name__)

# The 10 DeepLoc 2.0 locations, in the column order of its CSV files.
LOCATIONS = (
    "Cytoplasm",
    "Nucleus",
    "Extracellular",
    "Cell membrane",
    "Mitochondrion",
    "Plastid",
    "Endoplasmic reticulum",
    "Lysosome/Vacuole",
    "Golgi apparatus",
    "Peroxisome",
)
LABEL_NAMES = task.BINARY_LABELS
SPLIT_METHODS = ("stratified", "partition", "given")

_DEEPLOC_URL = "https://services.healthtech.dtu.dk/services/DeepLoc-2.0/data/Swissprot_Train_Validation_dataset.csv"
_CITATION = """\
@article{thumuluri2022deeploc,
  title={DeepLoc 2.0: multi-label subcellular localization prediction using protein language models},
  author={Thumuluri, Vineet and Almagro Armenteros, Jos{\\'e} Juan and Johansen, Alexander Rosenberg and
          Nielsen, Henrik and Winther, Ole},
  journal={Nucleic Acids Research},
  volume={50},
  number={W1},
  pages={W228--W234},
  year={2022},
  doi={10.1093/nar/gkac278}
}
"""
_DESCRIPTION = """\
Protein subcellular localisation from sequence. Config `mitochondrion`: is the protein in the mitochondrion
(binary, from CSV files with the columns ACC, Mitochondrion, Sequence). Config `deeploc`: the 10 DeepLoc 2.0
locations as a multi-label target, with Kingdom, Partition and Membrane. Without data files the source is the
DeepLoc 2.0 SwissProt set (28,303 eukaryotic proteins, 5 homology partitions).
"""
_HOMEPAGE = "https://services.healthtech.dtu.dk/services/DeepLoc-2.0/"
_LICENSE = (
    "DeepLoc 2.0 data: derived from UniProtKB/Swiss-Prot (CC BY 4.0), distributed by DTU Health Tech under their "
    "own terms (see the DeepLoc 2.0 site). Synthetic demo data and code: Apache-2.0 (esmloc)."
)
# The build report rides in DatasetInfo.description, the one free-text field datasets stores with the cache.
_REPORT_MARKER = "esmloc build report: "
# Folded into the cache key: a new version of this module or of the sequence check (sequences.py and the rule it
# applies, tokenization_esmloc.normalize_sequence) must never be served a split made by an old one.
_CODE_FINGERPRINT = hashlib.sha256(
    Path(__file__).read_bytes() + Path(sequences.__file__).read_bytes()
    + Path(tokenization_esmloc.__file__).read_bytes() + ALPHABET.encode()
).hexdigest()[:16]
_LABEL_SPELLINGS = {"0": 0, "1": 1, "0.0": 0, "1.0": 1, "false": 0, "true": 1}


@dataclasses.dataclass
class EsmLocDatasetConfig(datasets.BuilderConfig):
    """BuilderConfig for the esmloc dataset.

    Args:
        split_method: `"stratified"` (seeded train/validation/test split stratified on the Mitochondrion label),
            `"partition"` (by the DeepLoc `Partition` column: `validation_partitions` and `test_partitions` are held
            out, the rest is train) or `"given"` (each `data_files` split is kept as it is). `None` picks `"given"`
            when `data_files` names several splits or holds only FASTA, else `"stratified"`.
        seed: seed of the stratified split.
        validation_size: fraction of the proteins in the validation split (stratified).
        test_size: fraction of the proteins in the test split (stratified).
        validation_partitions: partitions that form the validation split (partition).
        test_partitions: partitions that form the test split (partition).
    """

    split_method: str | None = None
    seed: int = 42
    validation_size: float = 0.1
    test_size: float = 0.2
    validation_partitions: list[int] = dataclasses.field(default_factory=lambda: [3])
    test_partitions: list[int] = dataclasses.field(default_factory=lambda: [4])

    def create_config_id(self, config_kwargs: dict, custom_features=None) -> str:
        # datasets keys its cache on the config kwargs and on each data file's path and mtime. Add the files'
        # content (an edit within the mtime resolution, or a copy with an old mtime, must not reuse a stale split)
        # and this module's code (a fixed splitter must not be served the old split).
        fingerprint = hashlib.blake2b(_CODE_FINGERPRINT.encode(), digest_size=16)
        for split, files in sorted((self.data_files or {}).items()):
            for path in files:
                fingerprint.update(f"{split}:{path}".encode())
                if os.path.isfile(path):
                    with open(path, "rb") as handle:
                        for block in iter(lambda: handle.read(1 << 20), b""):
                            fingerprint.update(block)
        config_kwargs = {**config_kwargs, "fingerprint": fingerprint.hexdigest()}
        return super().create_config_id(config_kwargs, custom_features=custom_features)


def _labelled_columns(config_name: str, need_partition: bool) -> tuple[str, ...]:
    if config_name == "deeploc":
        return ("ACC", "Kingdom", "Partition", "Membrane", *LOCATIONS, "Sequence")
    return ("ACC", "Mitochondrion", "Sequence", *(["Partition"] if need_partition else []))


def _parse_label(value: str, normalised: Counter) -> int:
    label = _LABEL_SPELLINGS.get(value.strip().lower())
    if label is None:
        raise BadValue(f"label {value!r} is not one of 0, 1, 0.0, 1.0, True, False")
    if value not in ("0", "1"):
        normalised["label spelled 0.0/1.0/True/False"] += 1
    return label


def _parse_unlabelled(row: dict[str, str], normalised: Counter) -> dict:
    """A FASTA record: no label (-1, as datasets does for unlabelled test sets)."""
    sequence, changes = validate_sequence(row["Sequence"])
    normalised.update(changes)
    return {"Sequence": sequence, "label": -1}


def _parse_row(config_name: str, row: dict[str, str], normalised: Counter) -> dict:
    """Turns one CSV row into an example (plus `Partition` when present); raises BadValue on bad values."""
    sequence, changes = validate_sequence(row["Sequence"])
    normalised.update(changes)
    example = {"Sequence": sequence}
    if "Partition" in row:
        try:
            example["Partition"] = int(row["Partition"])
        except ValueError:
            raise BadValue(f"Partition {row['Partition']!r} is not an integer") from None
    if config_name == "deeploc":
        if not row["Kingdom"].strip():
            raise BadValue("empty Kingdom")
        example["Kingdom"] = row["Kingdom"].strip()
        example["Membrane"] = _parse_label(row["Membrane"], normalised)
        flags = [_parse_label(row[location], normalised) for location in LOCATIONS]
        example["label"] = [index for index, flag in enumerate(flags) if flag]
    else:
        example["label"] = _parse_label(row["Mitochondrion"], normalised)
    return example


def _is_positive(example: dict) -> bool:
    label = example["label"]
    return LOCATIONS.index("Mitochondrion") in label if isinstance(label, list) else label == 1


class EsmLocDataset(datasets.GeneratorBasedBuilder):
    """Protein localisation data (ACC, Sequence, label), validated and split without sequence leaks."""

    VERSION = datasets.Version("1.0.0")
    BUILDER_CONFIG_CLASS = EsmLocDatasetConfig
    BUILDER_CONFIGS = [
        EsmLocDatasetConfig(
            name="mitochondrion",
            version=VERSION,
            description="Binary: is the protein in the mitochondrion? CSV columns ACC, Mitochondrion, Sequence.",
        ),
        EsmLocDatasetConfig(
            name="deeploc",
            version=VERSION,
            description="Multi-label: the 10 DeepLoc 2.0 locations, with Kingdom, Partition and Membrane.",
        ),
    ]
    DEFAULT_CONFIG_NAME = "mitochondrion"

    def __init__(self, *args, data_files=None, **kwargs):
        # datasets 3.x resolves relative data_files against the loading script's folder; users mean their working
        # directory, as with load_dataset("csv", data_files=...). Paths that exist from there are made absolute.
        # The cache folder is named after the dataset, not after this module.
        kwargs["dataset_name"] = kwargs.get("dataset_name") or "esmloc"
        super().__init__(*args, data_files=_from_working_dir(data_files), **kwargs)
        self._check_config()

    def _check_config(self):
        config = self.config
        if config.split_method not in (None, *SPLIT_METHODS):
            raise ValueError(f"split_method must be one of {SPLIT_METHODS} or None, got {config.split_method!r}")
        if not (0 < config.validation_size < 1 and 0 < config.test_size < 1 - config.validation_size):
            raise ValueError(
                "validation_size and test_size must be > 0 with a sum < 1, got "
                f"{config.validation_size} and {config.test_size}"
            )
        for field in ("validation_partitions", "test_partitions"):  # a single partition may be given as an int
            if isinstance(getattr(config, field), int):
                setattr(config, field, [getattr(config, field)])
        held_out = set(config.validation_partitions) & set(config.test_partitions)
        if not config.validation_partitions or not config.test_partitions or held_out:
            raise ValueError(
                "validation_partitions and test_partitions must be non-empty and disjoint, got "
                f"{config.validation_partitions} and {config.test_partitions}"
            )
        if config.split_method in ("stratified", "partition") and config.data_files and len(config.data_files) > 1:
            raise ValueError(
                f"split_method={config.split_method!r} splits one pool of proteins, but data_files names the splits "
                f"{list(config.data_files)}: pass a file or a list of files, or use split_method='given'"
            )

    def _info(self):
        if self.config.name == "deeploc":
            features = datasets.Features(
                {
                    "ACC": datasets.Value("string"),
                    "Kingdom": datasets.Value("string"),
                    "Partition": datasets.Value("int32"),
                    "Membrane": datasets.Value("int32"),
                    "Sequence": datasets.Value("string"),
                    "label": datasets.Sequence(datasets.ClassLabel(names=list(LOCATIONS))),
                }
            )
        else:
            features = datasets.Features(
                {
                    "ACC": datasets.Value("string"),
                    "Sequence": datasets.Value("string"),
                    "label": datasets.ClassLabel(names=list(LABEL_NAMES)),
                }
            )
        return datasets.DatasetInfo(
            description=_DESCRIPTION,
            features=features,
            homepage=_HOMEPAGE,
            license=_LICENSE,
            citation=_CITATION,
        )

    def _split_generators(self, dl_manager):
        config = self.config
        if config.data_files:
            sources = {split: list(files) for split, files in config.data_files.items()}
        else:
            sources = {"train": [_DEEPLOC_URL]}
        try:
            local = dl_manager.download(sources)
        except OSError as error:  # FileNotFoundError / ConnectionError: offline, or the server moved the file
            if config.data_files:
                raise
            raise ConnectionError(
                f"could not download DeepLoc 2.0 from {_DEEPLOC_URL} ({error!r}); download it from {_HOMEPAGE} and "
                "pass it as data_files"
            ) from error
        files = {split: list(zip(sources[split], local[split], strict=True)) for split in sources}
        fasta = [is_fasta(name) for pairs in files.values() for name, _ in pairs]
        method = config.split_method or ("given" if len(files) > 1 or all(fasta) else "stratified")
        if method != "given" and any(fasta):
            raise ValueError(f"split_method={method!r} needs labels: FASTA files have none; use split_method='given'")

        normalised, problems = Counter(), []
        pools, merged = {}, 0
        seen = {}  # ACC -> (split, where, example): duplicates are merged or reported across all files
        for split, pairs in files.items():
            pools[split] = []
            for name, path in pairs:
                for line, acc, parsed in self._read_file(name, path, method, normalised, problems):
                    where = describe_row(name, line, acc)
                    if acc in seen:
                        first_split, first_where, first = seen[acc]
                        if first != parsed:
                            fields = sorted(key for key in parsed if parsed[key] != first.get(key))
                            problems.append(f"{where}: same ACC as {first_where} with different {', '.join(fields)}")
                        elif first_split != split:
                            problems.append(f"{where}: the same protein is also in {first_split!r} ({first_where})")
                        else:
                            merged += 1
                        continue
                    seen[acc] = (split, where, parsed)
                    pools[split].append({"ACC": acc, **parsed})
        if problems:
            raise DataValidationError(problems[:MAX_REPORTED_PROBLEMS], count=len(problems))

        if method == "given":
            splits = pools
            check_no_shared_sequences(splits)
        else:
            (pool,) = pools.values()
            if method == "partition":
                splits = partition_split(pool, config.validation_partitions, config.test_partitions)
                check_no_shared_sequences(splits)
            else:
                splits = stratified_split(pool, config.seed, config.validation_size, config.test_size, _is_positive)

        report = _build_report(config, method, [name for pairs in files.values() for name, _ in pairs], splits)
        report.update(exact_duplicates_merged=merged, normalised=dict(sorted(normalised.items())))
        self.info.description = f"{_DESCRIPTION}\n{_REPORT_MARKER}{json.dumps(report)}\n"
        logger.debug(_format_report(report))  # callers print format_summary(dataset), cached loads included
        return [
            # A tuple, not a list: datasets would treat a list in gen_kwargs as one shard per element.
            datasets.SplitGenerator(name=split, gen_kwargs={"examples": tuple(examples)})
            for split, examples in splits.items()
        ]

    def _read_file(self, name, path, method, normalised, problems) -> Iterator[tuple[int, str, dict]]:
        """Yields (line, ACC, example) for the valid rows of one file and appends a message per bad row."""
        if is_fasta(name):
            if self.config.name == "deeploc":
                raise ValueError(f"{name}: the deeploc config needs CSV input with its columns; FASTA has none")
            rows = ((line, acc, {"Sequence": raw}) for line, acc, raw in fasta_entries(path))
            parse = _parse_unlabelled
        else:
            columns = _labelled_columns(self.config.name, need_partition=method == "partition")
            rows = ((line, row["ACC"], row) for line, row in csv_rows(path, columns))
            parse = functools.partial(_parse_row, self.config.name)
        for line, acc, row in rows:
            try:
                if acc != acc.strip():
                    normalised["ACC whitespace stripped"] += 1
                    acc = acc.strip()
                if not acc:
                    raise BadValue("empty ACC")
                yield line, acc, parse(row, normalised)
            except BadValue as error:
                problems.append(f"{describe_row(name, line, acc)}: {error}")

    def _generate_examples(self, examples):
        columns = self.info.features.keys()
        for example in examples:
            yield example["ACC"], {column: example[column] for column in columns}


CONFIG_NAMES = tuple(config.name for config in EsmLocDataset.BUILDER_CONFIGS)


def _from_working_dir(data_files):
    if isinstance(data_files, os.PathLike):
        data_files = os.fspath(data_files)
    if isinstance(data_files, str):
        relative = "://" not in data_files and not os.path.isabs(data_files)
        found = relative and (os.path.exists(data_files) or glob(data_files))
        return os.path.abspath(data_files) if found else data_files
    if isinstance(data_files, list | tuple):
        return [_from_working_dir(pattern) for pattern in data_files]
    if isinstance(data_files, dict) and not isinstance(data_files, DataFilesDict):
        return {split: _from_working_dir(patterns) for split, patterns in data_files.items()}
    return data_files


def _build_report(config, method, files, splits) -> dict:
    pool = [example for examples in splits.values() for example in examples]
    groups = [group for group in sequence_groups(pool).values() if len(group) > 1]
    mixed = sum(len({json.dumps(example["label"]) for example in group}) > 1 for group in groups)
    report = {"config": config.name, "split_method": method, "files": files}
    if method == "stratified":
        report.update(seed=config.seed, validation_size=config.validation_size, test_size=config.test_size)
    elif method == "partition":
        report.update(validation_partitions=config.validation_partitions, test_partitions=config.test_partitions)
    report["identical_sequences"] = {
        "groups": len(groups),
        "proteins": sum(len(group) for group in groups),
        "groups_with_different_labels": mixed,
    }
    report["splits"] = {
        split: {"proteins": len(examples), "Mitochondrion": sum(_is_positive(example) for example in examples)}
        for split, examples in splits.items()
    }
    return report


def load_dataset(
    data_files=None, config_name: str = "mitochondrion", *, cache_dir=None, download_mode=None, **config_kwargs
) -> datasets.DatasetDict:
    """Loads, validates and splits the esmloc dataset; the same result on datasets 3.x and >= 4.

    Equivalent to `datasets.load_dataset("dataset_script/esmloc.py", config_name, data_files=..., **config_kwargs,
    trust_remote_code=True)` on datasets 3.x, without the loading script (datasets >= 4 runs none).

    Args:
        data_files: a CSV/TSV/FASTA path, a list of them (one pool, split by `split_method`) or a dict
            `{"train": ..., "validation": ..., "test": ...}` (kept as given). `None` downloads DeepLoc 2.0.
        config_name: `"mitochondrion"` (binary label) or `"deeploc"` (10 locations, multi-label).
        cache_dir, download_mode: as in `datasets.load_dataset`.
        config_kwargs: `EsmLocDatasetConfig` fields: `split_method`, `seed`, `validation_size`, `test_size`,
            `validation_partitions`, `test_partitions`.

    Every data file is checked first (`esmloc.sequences.check_text_file`: present, a file, UTF-8 text, and FASTA or
    CSV as its name says), so that a bad file is one message naming it, before datasets resolves any path.
    """
    for path in _file_list(data_files):
        if not any(character in str(path) for character in "*?["):  # a glob pattern: datasets resolves it
            check_text_file(path, "FASTA" if is_fasta(path) else "CSV")
    builder = EsmLocDataset(
        config_name=config_name, data_files=data_files, cache_dir=cache_dir, **config_kwargs
    )
    builder.download_and_prepare(download_mode=download_mode)
    return builder.as_dataset()


def _file_list(data_files) -> list:
    """The paths of `data_files` (a path, a list of paths, or a dict of either per split)."""
    if data_files is None:
        return []
    if isinstance(data_files, dict):
        return [path for value in data_files.values() for path in _file_list(value)]
    if isinstance(data_files, (list, tuple)):
        return list(data_files)
    return [data_files]


def dataset_summary(dataset: datasets.DatasetDict) -> dict:
    """The build report of an esmloc DatasetDict, with split sizes and Mitochondrion positives counted as it is now.

    Keys: `config`, `split_method`, `files`, the split parameters, `identical_sequences`, `exact_duplicates_merged`,
    `normalised` (count per normalisation) and `splits` (`{split: {"proteins": n, "Mitochondrion": positives}}`).
    """
    first = next(iter(dataset.values()))
    report = {}
    for line in (first.info.description or "").splitlines():
        if line.startswith(_REPORT_MARKER):
            report = json.loads(line[len(_REPORT_MARKER) :])
    mitochondrion = LOCATIONS.index("Mitochondrion")
    report["splits"] = {}
    for split, data in dataset.items():
        labels = list(data["label"])
        if isinstance(data.features["label"], datasets.ClassLabel):
            positives = sum(label == 1 for label in labels)
        else:
            positives = sum(mitochondrion in label for label in labels)
        report["splits"][split] = {"proteins": len(labels), "Mitochondrion": positives}
    return report


def _format_report(report: dict) -> str:
    lines = [f"esmloc dataset ({report.get('config')}, split_method={report.get('split_method')})"]
    for split, counts in report["splits"].items():
        share = f" ({counts['Mitochondrion'] / counts['proteins']:.1%})" if counts["proteins"] else ""
        proteins, positives = counts["proteins"], counts["Mitochondrion"]
        lines.append(f"  {split:<10} {proteins:>7} proteins, {positives:>6} Mitochondrion{share}")
    if "exact_duplicates_merged" in report:
        lines.append(f"  exact duplicate rows merged: {report['exact_duplicates_merged']}")
    if "normalised" in report:
        for name, count in report["normalised"].items():
            lines.append(f"  normalised, {name}: {count}")
        if not report["normalised"]:
            lines.append("  normalised: nothing")
    if "identical_sequences" in report:
        same = report["identical_sequences"]
        lines.append(
            f"  identical sequences: {same['groups']} groups of {same['proteins']} proteins "
            f"({same['groups_with_different_labels']} with different labels), each group in one split"
        )
    return "\n".join(lines)


def format_summary(dataset: datasets.DatasetDict) -> str:
    """`dataset_summary` as printable text: one line per split, then what was merged and normalised."""
    return _format_report(dataset_summary(dataset))


__all__ = [
    "ALPHABET",
    "FASTA_SUFFIXES",
    "LABEL_NAMES",
    "LOCATIONS",
    "DataValidationError",
    "EsmLocDataset",
    "EsmLocDatasetConfig",
    "ProteinRecord",
    "SequenceError",
    "dataset_summary",
    "format_summary",
    "load_dataset",
    "read_fasta",
    "read_sequences",
    "validate_sequence",
]
