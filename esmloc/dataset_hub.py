"""Sharing the dataset: validated splits as Parquet files with a dataset card, and the push of that folder to a hub.

(The command `esmloc-dataset export|push` is esmloc.commands.dataset.)

`export_dataset` validates and splits with the dataset builder (`esmloc.data.load_dataset`, the same call and split
options as train.py) and writes what the Hub expects of a dataset repository: one Parquet file per config and split
(`data/<config>/<split>-00000-of-00001.parquet`) and a `README.md` dataset card rendered from the template
`dataset_card.md`, whose YAML `configs` / `dataset_info` declare the files, the features and the split sizes. Such a
folder loads with plain `datasets.load_dataset(folder_or_repo_id, config)` on datasets 3.x to 5.x, with no loading
script and no esmloc installed. `push_dataset_dir` uploads it in one commit through `esmloc.publish.commit_to_hub`
(the model push's endpoint rule, token handling and failure messages). `load_splits` is train.py's
`--dataset_name`: such a dataset, from a hub (honouring HF_ENDPOINT) or a folder, checked against the builder's
features.
"""

import logging
import shutil
import tempfile
from collections import Counter
from importlib import resources
from pathlib import Path

import datasets
from datasets.info import DatasetInfosDict
from datasets.utils.metadata import MetadataConfigs
from huggingface_hub import CommitOperationAdd, DatasetCard, DatasetCardData

from esmloc import data, publish
from esmloc.splits import SPLITS


logger = logging.getLogger("esmloc.dataset_hub")

TEMPLATE_NAME = "dataset_card.md"
CARD_FILE = "README.md"
DATA_DIR = "data"
CONFIGS = data.CONFIG_NAMES
# In every card the template renders (an HTML comment, invisible on the Hub).
CARD_MARKER = "rendered by esmloc.dataset_hub.render_dataset_card"
DEFAULT_LICENSE = "other"
TAGS = ["biology", "protein", "protein-language-model", "subcellular-localization", "mitochondria", "esm"]
DATASET_UNCHANGED = "The local dataset folder is unchanged: push it again with esmloc-dataset push."


class DatasetError(ValueError):
    """An export, push or load of a shared dataset that cannot go ahead; the message says why and what to do."""


def template_path() -> Path:
    """The dataset card template shipped with the package (`esmloc/dataset_card.md`)."""
    return Path(str(resources.files("esmloc").joinpath(TEMPLATE_NAME)))


def parquet_path(config_name: str, split: str) -> str:
    """Where a split goes inside the dataset folder (and repository): the layout `push_to_hub` writes."""
    return f"{DATA_DIR}/{config_name}/{split}-00000-of-00001.parquet"


# --- export ----------------------------------------------------------------------------------------------------------


def _split_options(split_method=None, seed=42, validation_partitions=None, test_partitions=None) -> dict:
    """The builder's split options as train.py passes them: the ones given, and the seed."""
    options = {"split_method": split_method, "validation_partitions": validation_partitions,
               "test_partitions": test_partitions}
    return {"seed": seed, **{key: value for key, value in options.items() if value is not None}}


def export_dataset(
    data_files,
    output_dir,
    config_names=("mitochondrion",),
    *,
    split_method: str | None = None,
    seed: int = 42,
    validation_partitions: list[int] | None = None,
    test_partitions: list[int] | None = None,
    license: str = DEFAULT_LICENSE,
    source: str | None = None,
    pretty_name: str | None = None,
    hub_dataset_id: str | None = None,
    cache_dir=None,
) -> Path:
    """Validates and splits `data_files` with the esmloc builder and writes a hub-ready dataset folder.

    `data_files` and the split options are those of `esmloc.data.load_dataset` (a path, a list of paths pooled and
    split, or `{"train": ..., "validation": ..., "test": ...}`); each config in `config_names` is built and written.
    `license` (a hub licence id), `source` (where the files come from) and `pretty_name` go into the card;
    `hub_dataset_id` is the repository its loading code names (default: the folder). `output_dir` must not exist or
    be empty; it is written completely or not at all. Returns `output_dir`. Raises `data.DataValidationError` for bad
    input (file, line, ACC) and `DatasetError` for a bad output directory or option.
    """
    output_dir = Path(output_dir)
    unknown = [name for name in config_names if name not in CONFIGS]
    if unknown or not config_names or len(set(config_names)) != len(config_names):
        raise DatasetError(f"dataset configs must be distinct names from {list(CONFIGS)}, got {list(config_names)}")
    if hub_dataset_id is not None and publish.as_hub_model_id(hub_dataset_id) != hub_dataset_id:
        raise DatasetError(f"--hub_dataset_id must be a full repository id, user/name or org/name, got "
                           f"{hub_dataset_id!r}")
    if output_dir.exists() and (not output_dir.is_dir() or any(output_dir.iterdir())):
        raise DatasetError(f"{output_dir} exists and is not an empty directory: choose another --output_dir "
                           "(nothing is overwritten)")
    options = _split_options(split_method, seed, validation_partitions, test_partitions)
    built = {name: data.load_dataset(data_files, name, cache_dir=cache_dir, **options) for name in config_names}

    output_dir.parent.mkdir(parents=True, exist_ok=True)
    # Written beside the target and renamed at the end: a failure never leaves a half-written dataset folder.
    staging = Path(tempfile.mkdtemp(prefix=f".{output_dir.name}.partial-", dir=output_dir.parent))
    try:
        for name, dataset in built.items():
            for split, rows in dataset.items():
                path = staging / parquet_path(name, split)
                path.parent.mkdir(parents=True, exist_ok=True)
                rows.to_parquet(str(path))
        card = render_dataset_card(built, staging, license=license, source=source, pretty_name=pretty_name,
                                   load_ref=hub_dataset_id or output_dir.name)
        card.save(staging / CARD_FILE)
        if output_dir.exists():
            output_dir.rmdir()  # empty, checked above
        staging.rename(output_dir)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    logger.info("Exported %s (%s) to %s", ", ".join(built), ", ".join(SPLITS), output_dir)
    return output_dir


# --- the card --------------------------------------------------------------------------------------------------------


def _size_category(n: int) -> str:
    for bound, name in ((1_000, "n<1K"), (10_000, "1K<n<10K"), (100_000, "10K<n<100K"), (1_000_000, "100K<n<1M")):
        if n < bound:
            return name
    return "1M<n<10M"


def _class_label(feature) -> datasets.ClassLabel | None:
    """The ClassLabel of a `label` feature: itself (mitochondrion) or that of its list (deeploc)."""
    return feature if isinstance(feature, datasets.ClassLabel) else getattr(feature, "feature", None)


def _feature_text(feature) -> str:
    if isinstance(feature, datasets.ClassLabel):
        return "ClassLabel: " + ", ".join(f"{index} `{name}`" for index, name in enumerate(feature.names))
    inner = getattr(feature, "feature", None)
    if inner is not None:
        return f"list of {_feature_text(inner)}"
    return f"{feature.dtype}"


def _split_text(report: dict) -> str:
    method = report.get("split_method")
    if method == "stratified":
        validation, test = report["validation_size"], report["test_size"]
        return (f"stratified on the Mitochondrion label, {1 - validation - test:.0%} / {validation:.0%} / {test:.0%} "
                f"(train / validation / test), seed {report['seed']}: proteins are ranked by a seeded hash of their "
                "sequence, so the split is the same on every platform and library version")
    if method == "partition":
        return (f"by the homology partitions of the `Partition` column: validation "
                f"{', '.join(map(str, report['validation_partitions']))}, test "
                f"{', '.join(map(str, report['test_partitions']))}, train all others (DeepLoc 2.0's partitions share "
                "< 30% sequence identity)")
    return "the files given for each split, kept as they are"


def _class_counts(dataset: datasets.DatasetDict) -> tuple[list[str], list[tuple[str, list[str]]]]:
    """(split names, rows of (class name, count per split)): proteins per class, each location of a protein counted
    once for multi-label data."""
    names = _class_label(dataset["train"].features["label"]).names
    counts = {}
    for split, rows in dataset.items():
        counter = Counter()
        for label in rows["label"]:
            counter.update(label if isinstance(label, list) else [label])
        counts[split] = counter
    rows = [("Proteins", [f"{len(rows):,}" for rows in dataset.values()])]
    rows += [(name, [f"{counts[split][index]:,}" for split in dataset]) for index, name in enumerate(names)]
    return list(dataset), rows


def _config_section(name: str, dataset: datasets.DatasetDict) -> dict:
    report = data.dataset_summary(dataset)
    header, count_rows = _class_counts(dataset)
    identical = report.get("identical_sequences") or {}
    return {
        "name": name,
        "multi_label": not isinstance(dataset["train"].features["label"], datasets.ClassLabel),
        "features": [(column, _feature_text(feature)) for column, feature in dataset["train"].features.items()],
        "files": ", ".join(f"`{Path(str(file)).name}`" for file in report.get("files", [])),
        "split_text": _split_text(report),
        "count_header": header,
        "count_rows": count_rows,
        "normalised": [(what, f"{count:,}") for what, count in (report.get("normalised") or {}).items()],
        "merged": f"{report.get('exact_duplicates_merged', 0):,}",
        "identical_groups": f"{identical.get('groups', 0):,}",
        "identical_proteins": f"{identical.get('proteins', 0):,}",
        "identical_mixed": f"{identical.get('groups_with_different_labels', 0):,}",
    }


def _portable_features(value):
    """The YAML features in the spelling every datasets major reads: datasets >= 4 writes a list feature as `list:`,
    which datasets 3.x reads as a plain Python list instead of `Sequence`; `sequence:` (3.x) is read as `Sequence` by
    3.x and as `List` by 4.x and 5.x. (A `list` key only ever names that type: column names are values of `name`.)"""
    if isinstance(value, dict):
        return {("sequence" if key == "list" else key): _portable_features(item) for key, item in value.items()}
    if isinstance(value, list):
        return [_portable_features(item) for item in value]
    return value


def _default_config(built: dict) -> str:
    """The config `load_dataset(folder)` gives without a name: the builder's default when exported, else the first."""
    return data.EsmLocDataset.DEFAULT_CONFIG_NAME if data.EsmLocDataset.DEFAULT_CONFIG_NAME in built else next(
        iter(built))


def card_metadata(built: dict[str, datasets.DatasetDict], folder: Path, *, license: str = DEFAULT_LICENSE,
                  pretty_name: str | None = None) -> DatasetCardData:
    """The card's YAML: `configs` (data files per split), `dataset_info` (features, split sizes) and the Hub's
    descriptive fields. `folder` holds the Parquet files already written (their sizes go into `download_size`)."""
    default = _default_config(built)
    infos, configs = {}, {}
    for name, dataset in built.items():
        splits = datasets.SplitDict()
        for split, rows in dataset.items():
            splits.add(datasets.SplitInfo(name=split, num_bytes=rows.data.nbytes, num_examples=len(rows)))
        infos[name] = datasets.DatasetInfo(
            features=dataset["train"].features,
            config_name=name,
            splits=splits,
            download_size=sum((folder / parquet_path(name, split)).stat().st_size for split in dataset),
            dataset_size=sum(rows.data.nbytes for rows in dataset.values()),
        )
        configs[name] = {"data_files": [{"split": split, "path": f"{DATA_DIR}/{name}/{split}-*"} for split in dataset],
                         **({"default": True} if name == default else {})}
    multi_label = any(not isinstance(d["train"].features["label"], datasets.ClassLabel) for d in built.values())
    card_data = DatasetCardData(
        pretty_name=pretty_name or "esmloc protein subcellular localisation",
        license=license,
        task_categories=["text-classification"],
        task_ids=["multi-label-classification"] if multi_label else ["multi-class-classification"],
        tags=TAGS + (["deeploc", "multi-label"] if multi_label else []),
        size_categories=[_size_category(max(sum(len(rows) for rows in d.values()) for d in built.values()))],
    )
    DatasetInfosDict(infos).to_dataset_card_data(card_data)
    MetadataConfigs(configs).to_dataset_card_data(card_data)
    card_data["dataset_info"] = _portable_features(card_data["dataset_info"])
    return card_data


def render_dataset_card(built: dict[str, datasets.DatasetDict], folder: Path, *, license: str = DEFAULT_LICENSE,
                        source: str | None = None, pretty_name: str | None = None,
                        load_ref: str = "path/to/folder") -> DatasetCard:
    """The dataset card of an export, rendered from the template `dataset_card.md`: the YAML of `card_metadata`,
    how to load it, the features, how each config was split, the counts per class and split, what validation
    normalised and merged, the source, its licence and citation. Every number comes from the built splits."""
    card_data = card_metadata(built, folder, license=license, pretty_name=pretty_name)
    info = next(iter(built.values()))["train"].info
    return DatasetCard.from_template(
        card_data,
        template_path=str(template_path()),
        pretty_name=card_data.pretty_name,
        load_ref=load_ref,
        sections=[_config_section(name, dataset) for name, dataset in built.items()],
        several_configs=len(built) > 1,
        default_config=_default_config(built),
        source=source,
        license=license,
        builder_license=info.license,
        homepage=info.homepage,
        citation=info.citation.strip(),
    )


# --- push ------------------------------------------------------------------------------------------------------------


def files_to_push(dataset_dir) -> dict[str, Path]:
    """The files a dataset repository gets from `dataset_dir`, as {path in the repository: local path}, sorted: the
    card `README.md` and the Parquet files under `data/`. Anything else stays local. Raises `DatasetError` when the
    folder is not an exported dataset."""
    dataset_dir = Path(dataset_dir)
    if not dataset_dir.is_dir():
        raise DatasetError(f"{dataset_dir} is not a directory")
    parquet = sorted(path for path in (dataset_dir / DATA_DIR).rglob("*.parquet") if path.is_file())
    files = {path.relative_to(dataset_dir).as_posix(): path for path in parquet}
    if not (dataset_dir / CARD_FILE).is_file() or not files:
        raise DatasetError(f"{dataset_dir} is not an exported dataset (a {CARD_FILE} and {DATA_DIR}/*/*.parquet): "
                           "write one with esmloc-dataset export")
    files[CARD_FILE] = dataset_dir / CARD_FILE
    return dict(sorted(files.items()))


def push_dataset_dir(dataset_dir, repo_id: str, private: bool | None = False, endpoint: str | None = None,
                     token: str | None = None, api=None, commit_message: str | None = None) -> str:
    """Pushes an exported dataset folder to the dataset repository `repo_id` in ONE commit; returns its URL.

    The endpoint is `endpoint`, else `HF_ENDPOINT`, else the Hub; the token is `token`, else the standard login /
    `HF_TOKEN`, and never shown. Any failure raises `publish.PublishError` saying why; the folder is never changed.
    """
    if publish.as_hub_model_id(repo_id) != repo_id:
        raise DatasetError(f"--hub_dataset_id must be a full repository id, user/name or org/name, got {repo_id!r}")
    files = files_to_push(dataset_dir)
    operations = [CommitOperationAdd(path_in_repo=name, path_or_fileobj=str(path)) for name, path in files.items()]
    logger.info("Pushing %d files of %s to the dataset repository %s", len(operations), dataset_dir, repo_id)
    return publish.commit_to_hub(repo_id, operations, commit_message or "Upload esmloc dataset", repo_type="dataset",
                                 private=private, endpoint=endpoint, token=token, api=api,
                                 unchanged=DATASET_UNCHANGED)


# --- train.py --dataset_name -----------------------------------------------------------------------------------------


def builder_features(config_name: str) -> datasets.Features:
    """The features the esmloc builder gives a config (what train.py expects of a dataset)."""
    with tempfile.TemporaryDirectory() as scratch:
        return data.EsmLocDataset(config_name=config_name, cache_dir=scratch).info.features


def load_splits(name: str, config_name: str = "mitochondrion") -> datasets.DatasetDict:
    """A shared dataset (hub id, honouring HF_ENDPOINT, or a folder) with its splits as they are, checked to have
    non-empty train/validation/test splits and the builder's `ACC`, `Sequence` and `label` features for
    `config_name`. Raises `DatasetError` saying what is wrong."""
    try:
        dataset = datasets.load_dataset(name, config_name)
    except (OSError, ValueError) as error:  # not found, unreachable (ConnectionError), no such config
        where = "" if Path(name).expanduser().is_dir() else f" (from {publish.resolve_endpoint()})"
        raise DatasetError(f"could not load the dataset {name!r}, config {config_name!r}{where}: "
                           f"{type(error).__name__}: {error}") from error
    missing = [split for split in SPLITS if split not in dataset or len(dataset[split]) == 0]
    if missing:
        raise DatasetError(f"the dataset {name!r} ({config_name}) has splits {list(dataset)}, but train.py needs "
                           f"non-empty {', '.join(SPLITS)}: missing or empty {', '.join(missing)}")
    expected = builder_features(config_name)
    for split, rows in dataset.items():
        wrong = [column for column in ("ACC", "Sequence", "label") if rows.features.get(column) != expected[column]]
        if wrong:
            found = {column: str(rows.features.get(column)) for column in wrong}
            wanted = {column: str(expected[column]) for column in wrong}
            raise DatasetError(f"the {split} split of {name!r} ({config_name}) does not have the features of the "
                               f"esmloc {config_name!r} config: found {found}, expected {wanted} (pass the right "
                               "--dataset_config, or export the data with esmloc-dataset export)")
    return dataset
