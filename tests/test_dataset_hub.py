"""Sharing the dataset: `esmloc-dataset export` (Parquet + dataset card) loading with plain `datasets.load_dataset` in
a Python where esmloc cannot be imported, on the datasets major this run uses (CI reruns this file on datasets 5, and
once more with ESMLOC_DATASETS_OVERLAY naming a datasets 5 install that the fresh processes load with), the push
against a stand-in for HfApi, a round trip through a real mirror server (olah) ending in `train.py --dataset_name`,
and the loading script's plainly stated requirements."""

import csv
import inspect
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import datasets
import pytest

from esmloc import data, dataset_hub
from esmloc.commands import dataset as dataset_command
from esmloc.demo import write_demo_csv

from conftest import (
    OTHER_DATASETS_MAJOR, REPO, GitWorkTreeHub, assert_no_token, calls_named, clean_env, directory_digest, front_matter,
    run_main, write_deeploc_layout_csv,
)


DATASETS_MAJOR = int(datasets.__version__.split(".")[0])
REPO_ID = "alice/esmloc-demo"
# A Python where esmloc is not installed: every import of esmloc or of its three top-level modules fails, as it does
# for someone who never installed the package.
NO_ESMLOC = """\
import sys

BLOCKED = {"esmloc", "configuration_esmloc", "modeling_esmloc", "tokenization_esmloc"}


class NoEsmloc:
    def find_spec(self, name, path=None, target=None):
        if name.partition(".")[0] in BLOCKED:
            raise ModuleNotFoundError(f"No module named {name!r} (esmloc is not installed here)", name=name)
        return None


sys.meta_path.insert(0, NoEsmloc())
"""
# Run in a fresh process: load every config of the folder or repository with plain datasets, describe it as JSON.
LOAD_EVERYWHERE = """
import json, sys
try:
    import esmloc
    sys.exit("esmloc is importable: the test would prove nothing")
except ImportError:
    pass
import datasets

{describe}
source, configs = {source}, {configs!r}
result = {{"version": datasets.__version__, "configs": {{}}}}
for config in configs:
    dataset = datasets.load_dataset(source, config)
    result["configs"][str(config)] = {{
        split: {{"rows": rows.to_list(), "features": {{name: describe(f) for name, f in rows.features.items()}},
                "features_dict": rows.features.to_dict()}}
        for split, rows in dataset.items()
    }}
print(json.dumps(result))
"""


def describe(feature):
    """Version-independent form of a feature (datasets 3 says Sequence, 4+ List), as LOAD_EVERYWHERE writes it."""
    if isinstance(feature, datasets.ClassLabel):
        return ["ClassLabel", feature.names]
    if hasattr(feature, "feature"):
        return ["list", describe(feature.feature)]
    return ["Value", feature.dtype]


def expected_splits(dataset: datasets.DatasetDict) -> dict:
    return {split: {"rows": rows.to_list(), "features": {name: describe(f) for name, f in rows.features.items()},
                    "features_dict": rows.features.to_dict()}
            for split, rows in dataset.items()}


def python_without_esmloc(tmp_path: Path, overlay: str | None = None, **extra) -> dict:
    """The environment of a fresh process that cannot import esmloc (and, with `overlay`, uses the datasets there)."""
    blocker = tmp_path / "no_esmloc"
    blocker.mkdir(exist_ok=True)
    (blocker / "sitecustomize.py").write_text(NO_ESMLOC)
    paths = [str(blocker), overlay if overlay is not None else os.environ.get("PYTHONPATH", "")]
    return {**clean_env(tmp_path, **extra), "PYTHONPATH": os.pathsep.join(path for path in paths if path)}


def load_elsewhere(source: str, configs: list, tmp_path: Path, env: dict, mirror=None) -> dict:
    """LOAD_EVERYWHERE in a fresh process, in a working directory outside the repository."""
    cwd = tmp_path / "elsewhere"
    cwd.mkdir(exist_ok=True)
    code = LOAD_EVERYWHERE.format(source=source, configs=configs, describe=inspect.getsource(describe))
    result = subprocess.run([sys.executable, "-c", code], check=False, cwd=cwd, env=env, capture_output=True,
                            text=True, timeout=600)
    if result.returncode != 0:
        server = f"\n--- olah log ---\n{mirror.log_tail()}" if mirror else ""
        raise AssertionError(f"load_dataset({source}) failed ({result.returncode}):\n{result.stderr[-4000:]}{server}")
    return json.loads(result.stdout.strip().splitlines()[-1])


def assert_same_dataset(loaded: dict, expected: dict, same_major: bool):
    assert list(loaded) == list(expected)  # the same splits, in the same order
    for split, want in expected.items():
        assert loaded[split]["rows"] == want["rows"], split  # the same rows, in the same order
        assert loaded[split]["features"] == want["features"], split  # ClassLabel names, list of ClassLabel
        if same_major:
            assert loaded[split]["features_dict"] == want["features_dict"], split


def card_yaml(folder: Path) -> dict:
    return front_matter((folder / "README.md").read_text())[0]


# --- fixtures: the demo set and a DeepLoc-layout file, each built by the builder and exported --------------------


@pytest.fixture(scope="module")
def workdir(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("dataset_hub")


@pytest.fixture(scope="module")
def demo_csv(workdir) -> Path:
    return write_demo_csv(workdir / "demo_mitochondrion.csv")


@pytest.fixture(scope="module")
def demo_export(workdir, demo_csv) -> Path:
    """The demo set through the installed command, the way the README shows it."""
    output = workdir / "demo_dataset"
    command = [str(Path(sys.executable).with_name("esmloc-dataset")), "export", str(demo_csv), "--output_dir",
               str(output), "--license", "apache-2.0", "--source", "synthetic proteins made by python -m esmloc.demo",
               "--cache_dir", str(workdir / "cache")]
    result = subprocess.run(command, check=False, cwd=workdir, env=clean_env(workdir), capture_output=True,
                            text=True, timeout=600)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    assert result.stdout.strip().splitlines()[-1] == str(output)
    return output


@pytest.fixture(scope="module")
def deeploc_csv(workdir) -> Path:
    return write_deeploc_layout_csv(workdir / "deeploc_layout.csv", n_rows=120, seed=5)


@pytest.fixture(scope="module")
def deeploc_export(workdir, deeploc_csv) -> Path:
    """Both configs of a DeepLoc-layout file, split by its homology partitions."""
    return dataset_hub.export_dataset(
        deeploc_csv, workdir / "deeploc_dataset", ["mitochondrion", "deeploc"], split_method="partition",
        validation_partitions=[3], test_partitions=[4], cache_dir=workdir / "cache")


def built(source, config, workdir, **options) -> datasets.DatasetDict:
    """What the builder gives for the same files and options (the reference every export is compared with)."""
    return data.load_dataset(source, config, cache_dir=workdir / "cache", **options)


# --- export --------------------------------------------------------------------------------------------------------


def test_export_writes_one_parquet_file_per_config_and_split_and_a_card(demo_export, deeploc_export):
    files = lambda folder: sorted(p.relative_to(folder).as_posix() for p in folder.rglob("*") if p.is_file())  # noqa
    assert files(demo_export) == ["README.md"] + [dataset_hub.parquet_path("mitochondrion", split)
                                                  for split in ("test", "train", "validation")]
    assert files(deeploc_export) == ["README.md"] + sorted(
        dataset_hub.parquet_path(config, split) for config in ("deeploc", "mitochondrion")
        for split in ("train", "validation", "test"))
    assert not list(demo_export.parent.glob(".*partial*"))  # the staging folder was renamed, not left behind


def test_card_metadata_declares_configs_features_and_split_sizes(deeploc_export, deeploc_csv, workdir):
    metadata = card_yaml(deeploc_export)
    configs = {config["config_name"]: config for config in metadata["configs"]}
    assert configs["mitochondrion"].get("default") is True and not configs["deeploc"].get("default")
    infos = {info["config_name"]: info for info in metadata["dataset_info"]}
    for config in ("mitochondrion", "deeploc"):
        reference = built(deeploc_csv, config, workdir, split_method="partition")
        assert configs[config]["data_files"] == [{"split": split, "path": f"data/{config}/{split}-*"}
                                                 for split in ("train", "validation", "test")]
        assert {split["name"]: split["num_examples"] for split in infos[config]["splits"]} == {
            split: len(rows) for split, rows in reference.items()}
        label = next(feature for feature in infos[config]["features"] if feature["name"] == "label")
        # The datasets 3.x spelling of a list feature (`sequence:`), which every datasets major reads.
        class_label = label["dtype"]["class_label"] if config == "mitochondrion" else label["sequence"]["class_label"]
        names = data.LABEL_NAMES if config == "mitochondrion" else data.LOCATIONS
        assert class_label["names"] == {str(index): name for index, name in enumerate(names)}
    assert metadata["task_categories"] == ["text-classification"] and "biology" in metadata["tags"]
    card = (deeploc_export / "README.md").read_text()
    assert card.count("by the homology partitions of the `Partition` column: validation 3, test 4, train all") == 2
    assert "| Peroxisome |" in card and "`label` lists every location the protein is in" in card


def test_card_shows_counts_per_class_and_split_validation_and_the_source(demo_export, demo_csv, workdir):
    card = (demo_export / "README.md").read_text()
    reference = built(demo_csv, "mitochondrion", workdir)
    for name, index in (("Other", 0), ("Mitochondrion", 1)):
        counts = [sum(label == index for label in reference[split]["label"]) for split in reference]
        assert f"| {name} | {' | '.join(f'{count:,}' for count in counts)} |" in card
    assert f"| Proteins | {' | '.join(f'{len(rows):,}' for rows in reference.values())} |" in card
    assert "stratified on the Mitochondrion label, 70% / 10% / 20%" in card and "seed 42" in card
    assert "Made from `demo_mitochondrion.csv`" in card and str(demo_csv.parent) not in card  # names, not paths
    assert "| exact duplicate rows merged | 0 |" in card
    assert "Source: synthetic proteins made by python -m esmloc.demo." in card
    assert card_yaml(demo_export)["license"] == "apache-2.0" and "@article{thumuluri2022deeploc" in card
    assert f'load_dataset("{demo_export.name}")' in card and dataset_hub.CARD_MARKER in card


def test_card_reports_what_validation_normalised_and_merged(workdir):
    rows = [("A1", 1, "mlrtsslftrrvqpslfsrn"), ("A1", 1, "mlrtsslftrrvqpslfsrn"), (" A2", 0, "MKTAYIAK QRQISF*")]
    rows += [(f"B{i}", i % 2, "MSEQ" + "ACDEFGHIKLMNPQRSTVWY"[i % 20] * (i + 3)) for i in range(27)]
    path = workdir / "normalised.csv"
    with path.open("w", newline="") as handle:
        csv.writer(handle).writerows([("ACC", "Mitochondrion", "Sequence"), *rows])
    folder = dataset_hub.export_dataset(path, workdir / "normalised_dataset", cache_dir=workdir / "cache")
    card = (folder / "README.md").read_text()
    assert "| exact duplicate rows merged | 1 |" in card
    assert "| normalised: lower case upper-cased | 2 |" in card  # both rows of A1 were read (then merged)
    assert "| normalised: stop codon '*' stripped | 1 |" in card
    assert "| normalised: ACC whitespace stripped | 1 |" in card


def test_given_splits_are_exported_as_given_through_the_command_line(workdir, demo_csv):
    rows = list(csv.DictReader(demo_csv.open()))
    files = {}
    for split, part in (("train", rows[:200]), ("validation", rows[200:260]), ("test", rows[260:])):
        files[split] = workdir / f"given_{split}.csv"
        with files[split].open("w", newline="") as handle:
            writer = csv.DictWriter(handle, fieldnames=["ACC", "Mitochondrion", "Sequence"])
            writer.writeheader()
            writer.writerows(part)
    folder = workdir / "given_dataset"
    assert dataset_command.main(["export", *(f"{split}={path}" for split, path in files.items()), "--output_dir", str(folder),
                             "--cache_dir", str(workdir / "cache")]) == 0
    exported = datasets.load_dataset(str(folder), cache_dir=str(workdir / "cache_loaded"))
    assert {split: rows["ACC"] for split, rows in exported.items()} == {
        "train": [row["ACC"] for row in rows[:200]], "validation": [row["ACC"] for row in rows[200:260]],
        "test": [row["ACC"] for row in rows[260:]]}
    assert "the files given for each split, kept as they are" in (folder / "README.md").read_text()


def test_bad_input_stops_the_export_naming_the_row_and_writes_nothing(workdir, demo_csv, capsys):
    bad = workdir / "bad.csv"
    lines = demo_csv.read_text().splitlines(keepends=True)
    assert lines[7].startswith("SYN00007,")
    lines[7] = lines[7].replace(",M", ",M-", 1)  # a gap in the sequence of the protein on line 8
    bad.write_text("".join(lines))
    output = workdir / "never_written"
    status, _, err = run_main(dataset_command.main, ["export", bad, "--output_dir", output, "--cache_dir",
                                                     workdir / "cache"], capsys)
    assert status == 2 and f"{bad}, line 8, ACC 'SYN00007'" in err and "'-'" in err
    assert not output.exists() and not list(workdir.glob(".never_written*"))


def test_export_never_overwrites_a_folder(workdir, demo_csv, capsys):
    output = workdir / "occupied"
    output.mkdir()
    (output / "notes.txt").write_text("mine")
    status, _, err = run_main(dataset_command.main, ["export", demo_csv, "--output_dir", output], capsys)
    assert status == 2 and "exists and is not an empty directory" in err
    assert [p.name for p in output.iterdir()] == ["notes.txt"] and (output / "notes.txt").read_text() == "mine"


# --- loads anywhere: plain datasets, no esmloc, outside the repository --------------------------------------------


OVERLAY = os.environ.get("ESMLOC_DATASETS_OVERLAY")
LOADERS = [pytest.param(None, id=f"datasets{DATASETS_MAJOR}")] + (
    [pytest.param(OVERLAY, id="datasets-overlay")] if OVERLAY else [])


@pytest.mark.parametrize("overlay", LOADERS)
def test_demo_export_loads_in_a_python_without_esmloc_as_the_builder_splits(demo_export, demo_csv, workdir,
                                                                           tmp_path, overlay):
    loaded = load_elsewhere(repr(str(demo_export)), [None], tmp_path, python_without_esmloc(tmp_path, overlay))
    same_major = int(loaded["version"].split(".")[0]) == DATASETS_MAJOR
    assert same_major == (overlay is None)
    assert_same_dataset(loaded["configs"]["None"], expected_splits(built(demo_csv, "mitochondrion", workdir)),
                        same_major)


@pytest.mark.parametrize("overlay", LOADERS)
def test_deeploc_export_loads_both_configs_without_esmloc(deeploc_export, deeploc_csv, workdir, tmp_path, overlay):
    loaded = load_elsewhere(repr(str(deeploc_export)), ["mitochondrion", "deeploc", None], tmp_path,
                            python_without_esmloc(tmp_path, overlay))
    same_major = overlay is None
    for config in ("mitochondrion", "deeploc"):
        expected = expected_splits(built(deeploc_csv, config, workdir, split_method="partition"))
        assert_same_dataset(loaded["configs"][config], expected, same_major)
    assert loaded["configs"]["None"] == loaded["configs"]["mitochondrion"]  # the default config
    assert loaded["configs"]["deeploc"]["train"]["features"]["label"] == ["list", ["ClassLabel", list(data.LOCATIONS)]]


def test_the_loading_script_states_its_requirements_and_points_to_parquet(workdir, demo_csv, tmp_path):
    """The script is not self-contained, and says so: in its docstring, in its card, in the README; and without
    esmloc, datasets 3.x stops with an error naming esmloc (datasets >= 4 refuses every script: test_dataset.py)."""
    script = REPO / "dataset_script" / "esmloc.py"
    for text in (script.read_text(), (REPO / "dataset_script" / "README.md").read_text(),
                 (REPO / "README.md").read_text()):
        assert "needs esmloc installed and datasets 3.x" in " ".join(text.split())
        assert "esmloc-dataset export" in text
    if DATASETS_MAJOR >= 4:
        pytest.skip(f"{OTHER_DATASETS_MAJOR}: datasets {datasets.__version__} runs no loading scripts at all")
    code = (f"import datasets\ndatasets.load_dataset({str(script)!r}, data_files={str(demo_csv)!r}, "
            "trust_remote_code=True)\n")
    result = subprocess.run([sys.executable, "-c", code], check=False, cwd=tmp_path, capture_output=True, text=True,
                            env=python_without_esmloc(tmp_path), timeout=300)
    assert result.returncode != 0
    assert "you need to install the following dependency: esmloc" in result.stderr
    assert "pip install esmloc'" in result.stderr


# --- the push, against a stand-in for HfApi ------------------------------------------------------------------------


def test_push_sends_one_commit_of_the_card_and_the_parquet_files(demo_export, hub, monkeypatch, capsys, caplog,
                                                                 tmp_path):
    folder = tmp_path / "demo_dataset"
    shutil.copytree(demo_export, folder)
    (folder / "notes.txt").write_text("stays local")
    (folder / ".cache").mkdir()
    (folder / ".cache" / "x.parquet").write_text("stays local")
    monkeypatch.setenv("HF_ENDPOINT", "https://hub.example.test")
    before = directory_digest(folder)
    assert dataset_command.main(["push", str(folder), "--hub_dataset_id", REPO_ID]) == 0

    captured = capsys.readouterr()
    assert captured.out.strip().splitlines()[-1] == f"https://hub.example.test/datasets/{REPO_ID}"
    assert calls_named(hub, "init") == [{"endpoint": "https://hub.example.test", "token": None}]
    assert calls_named(hub, "create_repo") == [{"repo_id": REPO_ID, "repo_type": "dataset", "private": False,
                                                "exist_ok": True}]
    (commit,) = calls_named(hub, "create_commit")
    assert commit["repo_id"] == REPO_ID and commit["repo_type"] == "dataset"
    assert sorted(commit["files"]) == ["README.md"] + [dataset_hub.parquet_path("mitochondrion", split)
                                                       for split in ("test", "train", "validation")]
    for name, content in commit["files"].items():
        assert content == (folder / name).read_bytes(), name
    assert directory_digest(folder) == before
    assert_no_token(captured.out, captured.err, caplog.text, directories=[folder])


def test_push_private_with_an_explicit_endpoint(demo_export, hub, monkeypatch, capsys):
    monkeypatch.setenv("HF_ENDPOINT", "https://from-env.example.test")
    hub.existing_private = True
    assert dataset_command.main(["push", str(demo_export), "--hub_dataset_id", REPO_ID, "--private", "--hub_endpoint",
                             "https://explicit.example.test"]) == 0
    assert capsys.readouterr().out.strip().splitlines()[-1] == f"https://explicit.example.test/datasets/{REPO_ID}"
    assert calls_named(hub, "init")[0]["endpoint"] == "https://explicit.example.test"
    assert calls_named(hub, "create_repo")[0]["private"] is True
    assert calls_named(hub, "create_repo")[0]["repo_type"] == "dataset"
    hub.existing_private = False  # an existing public repository is never filled by a private push
    status, _, err = run_main(dataset_command.main, ["push", demo_export, "--hub_dataset_id", REPO_ID, "--private"],
                              capsys)
    assert status == 1 and "already exists and is public" in err
    assert len(calls_named(hub, "create_commit")) == 1


def test_failed_push_says_why_and_changes_nothing(demo_export, hub, capsys, caplog):
    hub.fail_on, hub.error = "create_commit", ConnectionError("connection refused")  # real errors carry no token
    before = directory_digest(demo_export)
    status, out, message = run_main(dataset_command.main, ["push", demo_export, "--hub_dataset_id", REPO_ID], capsys)
    (error,) = [line for line in message.splitlines() if line.startswith("esmloc-dataset: error:")]
    assert status == 1 and "Traceback" not in message
    assert error.startswith("esmloc-dataset: error: pushing to https://huggingface.co/alice/esmloc-demo failed")
    assert "could not be reached" in message and "push it again with esmloc-dataset push" in message
    assert directory_digest(demo_export) == before
    assert_no_token(message, out, caplog.text)


@pytest.mark.parametrize("folder, repo_id, expected", [
    ("demo", "esmloc-demo", "full repository id"),
    ("empty", REPO_ID, "not an exported dataset"),
    ("missing", REPO_ID, "is not a directory"),
])
def test_push_refuses_what_is_not_an_exported_dataset(demo_export, hub, tmp_path, folder, repo_id, expected, capsys):
    paths = {"demo": demo_export, "empty": tmp_path, "missing": tmp_path / "missing"}
    status, _, err = run_main(dataset_command.main, ["push", paths[folder], "--hub_dataset_id", repo_id], capsys)
    assert status == 2 and expected in err
    assert not calls_named(hub, "create_commit")


# --- train.py --dataset_name -----------------------------------------------------------------------------------------


def test_dataset_name_is_checked_for_splits_features_and_conflicting_arguments(demo_export, deeploc_export, tmp_path,
                                                                              monkeypatch):
    from esmloc.commands.train import DataArguments, load_splits
    from esmloc.errors import InputError

    monkeypatch.setattr(datasets.config, "HF_DATASETS_CACHE", tmp_path / "cache")
    loaded = load_splits(DataArguments(dataset_name=str(deeploc_export), dataset_config="deeploc"), seed=0)
    assert list(loaded) == ["train", "validation", "test"]
    with pytest.raises(ValueError, match="brings its own splits: drop --train_file, --split_method"):
        DataArguments(dataset_name=str(demo_export), train_file="x.csv", split_method="stratified")
    with pytest.raises(InputError, match="config 'deeploc': ValueError: BuilderConfig 'deeploc' not found"):
        load_splits(DataArguments(dataset_name=str(demo_export), dataset_config="deeploc"), seed=0)
    misnamed = tmp_path / "misnamed"  # binary labels under the name of the multi-label config
    shutil.copytree(demo_export, misnamed)
    (misnamed / "README.md").write_text((misnamed / "README.md").read_text().replace("mitochondrion", "deeploc"))
    (misnamed / "data" / "mitochondrion").rename(misnamed / "data" / "deeploc")
    with pytest.raises(InputError, match="does not have the features of the esmloc 'deeploc' config: found {'label'"):
        load_splits(DataArguments(dataset_name=str(misnamed), dataset_config="deeploc"), seed=0)
    only_train = tmp_path / "only_train"
    shutil.copytree(demo_export / "data" / "mitochondrion", only_train / "data")
    (only_train / "data" / "validation-00000-of-00001.parquet").unlink()
    (only_train / "data" / "test-00000-of-00001.parquet").unlink()
    with pytest.raises(InputError, match="needs non-empty train, validation, test: missing or empty validation, test"):
        load_splits(DataArguments(dataset_name=str(only_train), dataset_config="default"), seed=0)
    with pytest.raises(InputError, match="could not load the dataset"):
        load_splits(DataArguments(dataset_name=str(tmp_path / "absent")), seed=0)


# --- a real mirror server ------------------------------------------------------------------------------------------


def train_on(dataset_name: str, output_dir: Path, cwd: Path, env: dict) -> Path:
    command = [sys.executable, str(REPO / "train.py"), "--dataset_name", dataset_name, "--from_scratch", "tiny",
               "--num_train_epochs", "1", "--max_residues", "64", "--num_examples_to_show", "0",
               "--output_dir", str(output_dir)]
    result = subprocess.run(command, check=False, cwd=cwd, env={**env, "PYTHONPATH": ""}, capture_output=True,
                            text=True, timeout=900)
    if result.returncode != 0:
        pytest.fail(f"train.py failed ({result.returncode}):\n{result.stdout[-3000:]}\n{result.stderr[-3000:]}")
    return output_dir


@pytest.fixture(scope="module")
def pushed(demo_export, mirror) -> set[str]:
    """The demo export pushed into the git work tree olah serves under datasets/; the files pushed."""
    hub = GitWorkTreeHub(mirror.mirrors)
    url = dataset_hub.push_dataset_dir(demo_export, REPO_ID, endpoint=mirror.url, api=hub)
    assert url == f"{mirror.url}/datasets/{REPO_ID}"
    assert hub.pushed[REPO_ID] == set(dataset_hub.files_to_push(demo_export))
    return hub.pushed[REPO_ID]


def download_through(mirror, tmp_path: Path, env: dict) -> Path:
    download = tmp_path / "download"
    code = ("from huggingface_hub import snapshot_download\n"
            f"print(snapshot_download({REPO_ID!r}, repo_type='dataset', local_dir={str(download)!r}))\n")
    result = subprocess.run([sys.executable, "-c", code], check=False, cwd=tmp_path, env=env, capture_output=True,
                            text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:] + mirror.log_tail()
    return download


@pytest.mark.slow
def test_round_trip_through_a_mirror_server_without_esmloc(pushed, demo_csv, mirror, workdir, tmp_path):
    """A fresh process without esmloc, HF_ENDPOINT at the mirror: snapshot_download, then load_dataset on the
    downloaded folder and on the repository id."""
    env = python_without_esmloc(tmp_path, HF_ENDPOINT=mirror.url)
    download = download_through(mirror, tmp_path, env)
    assert {p.relative_to(download).as_posix() for p in download.rglob("*")
            if p.is_file() and ".cache" not in p.parts} == pushed
    expected = expected_splits(built(demo_csv, "mitochondrion", workdir))
    from_folder = load_elsewhere(repr(str(download)), [None], tmp_path, env, mirror)
    assert_same_dataset(from_folder["configs"]["None"], expected, same_major=True)
    from_repo = load_elsewhere(repr(REPO_ID), ["mitochondrion"], tmp_path, env, mirror)
    assert_same_dataset(from_repo["configs"]["mitochondrion"], expected, same_major=True)


@pytest.mark.slow
@pytest.mark.skipif(DATASETS_MAJOR >= 4, reason=f"{OTHER_DATASETS_MAJOR}: train.py runs on the datasets esmloc "
                    "installs (3.x); this rerun only checks the loading")
def test_train_from_the_downloaded_folder_and_from_the_mirror(pushed, demo_csv, mirror, workdir, tmp_path):
    train_env = clean_env(tmp_path, HF_ENDPOINT=mirror.url)
    download = download_through(mirror, tmp_path, train_env)
    expected = built(demo_csv, "mitochondrion", workdir)
    for name, output in ((str(download), tmp_path / "from_folder"), (REPO_ID, tmp_path / "from_mirror")):
        train_on(name, output, tmp_path, train_env)
        run_info = json.loads((output / "run_info.json").read_text())
        assert run_info["data"]["split_sizes"] == {split: len(rows) for split, rows in expected.items()}
        test_accs = [row["ACC"] for row in csv.DictReader((output / "test_predictions.csv").open())]
        assert test_accs == expected["test"]["ACC"]  # its own test split, as it is
    # The model card names the dataset repository (a local folder has no hub id to name).
    metadata, body = front_matter((tmp_path / "from_mirror" / "README.md").read_text())
    assert metadata["datasets"] == [REPO_ID]
    assert f"| Dataset | `{REPO_ID}` |" in body and "the dataset's own train, validation and test splits" in body
    assert "datasets" not in front_matter((tmp_path / "from_folder" / "README.md").read_text())[0]
