"""The dataset: sequence validation, readers, the builder's checks and splits, caching, both datasets majors.

CI runs this file once per supported datasets major version; set ESMLOC_DATASETS_MAJOR to the major a run is meant
to use, and `test_runs_on_the_datasets_major_ci_asked_for` fails if the environment does not match.
"""

import csv
import gzip
import hashlib
import json
import os
import random
import subprocess
import sys
import time
import tracemalloc
from pathlib import Path

import datasets
import pytest

from esmloc import data, sequences
from esmloc.data import LOCATIONS, dataset_summary, format_summary, load_dataset
from esmloc.sequences import (
    ALPHABET,
    DataValidationError,
    SequenceError,
    read_fasta,
    read_sequences,
    validate_sequence,
)
from esmloc.demo import demo_rows, main as demo_main, write_demo_csv

from conftest import DEEPLOC_CSV, OTHER_DATASETS_MAJOR, REPO


SCRIPT = REPO / "dataset_script" / "esmloc.py"
DATASETS_MAJOR = int(datasets.__version__.split(".")[0])
HEADER = ("ACC", "Mitochondrion", "Sequence")
# sha256 of the demo data's seed-42 split (split, ACC, label), the same on every datasets version and platform.
DEMO_SPLIT_DIGEST = "5684beca14cc17cc06cd8637ba1923742d07e1e3ac4c1cfbae108525580e92ef"


def write_csv(path: Path, rows, header=HEADER) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(header)
        writer.writerows(rows)
    return path


def demo_csv(path: Path, n_rows: int = 400, **kwargs) -> Path:
    rows = [(row["ACC"], row["Mitochondrion"], row["Sequence"]) for row in demo_rows(n_rows, **kwargs)]
    return write_csv(path, rows)


def load(tmp_path: Path, data_files, **kwargs) -> datasets.DatasetDict:
    return load_dataset(data_files, cache_dir=tmp_path / "cache", **kwargs)


def split_of_each(dataset: datasets.DatasetDict) -> dict[str, str]:
    return {acc: split for split, data in dataset.items() for acc in data["ACC"]}


def validation_error(tmp_path, rows, header=HEADER, **kwargs) -> DataValidationError:
    path = write_csv(tmp_path / "bad.csv", rows, header)
    with pytest.raises(DataValidationError) as caught:
        load(tmp_path, path, **kwargs)
    assert str(path) in str(caught.value)
    return caught.value


# 30 valid rows (ACC, label, sequence), every fifth one positive, all sequences different.
GOOD = [(f"G{i:03d}", int(i % 5 == 0), "MKTAYIAKQRQISF" + "ACDEFGHIKLMNPQRSTVWY"[i % 20] * (i + 1)) for i in range(30)]


# --- the datasets version this run is on ------------------------------------------------------------------------


@pytest.mark.parametrize("version", [datasets.__version__])
def test_runs_on_the_datasets_major_ci_asked_for(version):
    expected = os.environ.get("ESMLOC_DATASETS_MAJOR")
    if expected is None:
        pytest.skip(f"ESMLOC_DATASETS_MAJOR is not set; this run uses datasets {version}")
    assert version.split(".")[0] == expected


# --- one sequence ----------------------------------------------------------------------------------------------


def test_alphabet_is_the_esm2_residue_letters_without_gaps():
    assert sorted(ALPHABET) == sorted("LAGVSERTIDPKQNFYMHWCXBUZO")


def test_validate_sequence_normalises_and_says_what_it_changed():
    assert validate_sequence("MKTAYIAK") == ("MKTAYIAK", ())
    sequence, changes = validate_sequence(" mkt ay\tiak*\n")
    assert sequence == "MKTAYIAK"
    assert set(changes) == {"whitespace removed", "lower case upper-cased", "stop codon '*' stripped"}


@pytest.mark.parametrize(
    "raw, position",
    [("MKT1A", 4), ("MK-TA", 3), ("MK.TA", 3), ("MK*TA", 3), ("MK T J", 4), ("MKTA**", 5), ("MKTJ", 4)],
)
def test_validate_sequence_rejects_characters_outside_the_alphabet_with_their_position(raw, position):
    with pytest.raises(SequenceError, match=f"at position {position} ") as caught:
        validate_sequence(raw)
    assert caught.value.position == position


@pytest.mark.parametrize("raw", ["", "  \n", "*", " * "])
def test_validate_sequence_rejects_empty_sequences(raw):
    with pytest.raises(SequenceError, match="empty sequence"):
        validate_sequence(raw)


# --- streaming readers ------------------------------------------------------------------------------------------


def test_reading_sequences_needs_no_datasets(tmp_path):
    """esmloc-predict reads its input with esmloc.sequences: that must work where `datasets` cannot be imported."""
    path = tmp_path / "proteins.fasta"
    path.write_text(">sp|P12345|ABC_HUMAN\nmktayiak\n>bad\nMKJ\n")
    code = (
        "import json, sys\n"
        "sys.modules['datasets'] = None  # `import datasets` raises ImportError from here on\n"
        "from esmloc.sequences import DataValidationError, read_sequences\n"
        "records = []\n"
        "try:\n"
        f"    records.extend(read_sequences({str(path)!r}))\n"
        "except DataValidationError as error:\n"
        "    records.append(str(error))\n"
        "try:\n"
        "    import datasets\n"
        "except ImportError:\n"
        "    blocked = True\n"
        "print(json.dumps({'records': records, 'blocked': blocked, 'builder': 'esmloc.data' in sys.modules}))\n"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=tmp_path, check=True)
    output = json.loads(result.stdout.splitlines()[-1])
    assert output["blocked"] and not output["builder"]
    assert output["records"][0] == ["P12345", "MKTAYIAK", 1]
    assert "line 3, ACC 'bad'" in output["records"][1] and "'J' at position 3" in output["records"][1]


def test_reading_names_are_still_importable_from_esmloc_data():
    for name in ("ALPHABET", "DataValidationError", "ProteinRecord", "SequenceError", "read_fasta", "read_sequences",
                 "validate_sequence"):
        assert getattr(data, name) is getattr(sequences, name)


def test_read_fasta_takes_uniprot_accessions_and_first_words(tmp_path):
    path = tmp_path / "proteins.fasta"
    path.write_text(
        ">sp|P12345|ABC_HUMAN Some protein OS=Homo sapiens\nMKTAYIAK\nqrqisf*\n\n"
        ">tr|A0A0B4J2F0|A0A0B4J2F0_HUMAN Other\nMLRTSS\n"
        ">my_protein 42 residues\nM K T\n"
    )
    records = list(read_fasta(path))
    assert [(r.acc, r.sequence, r.line) for r in records] == [
        ("P12345", "MKTAYIAKQRQISF", 1),
        ("A0A0B4J2F0", "MLRTSS", 5),
        ("my_protein", "MKT", 7),
    ]


def test_read_fasta_streams_records_and_stops_at_a_bad_one_with_file_line_and_acc(tmp_path):
    path = tmp_path / "proteins.fa.gz"
    with gzip.open(path, "wt") as handle:
        handle.write(">sp|P1|A\nMKTAYIAK\n>sp|P2|B\nMKT\nAB1D\n>sp|P3|C\nMKT\n")
    records = read_sequences(path)
    assert next(records).acc == "P1"  # yielded before the bad record is read
    with pytest.raises(DataValidationError) as caught:
        next(records)
    assert f"{path}, line 3, ACC 'P2'" in str(caught.value)
    assert "'1' at position 6" in str(caught.value)


@pytest.mark.parametrize(
    "text, message",
    [
        (">sp|P1|A\n\n>sp|P2|B\nMKT\n", "line 1, ACC 'P1': empty sequence"),
        ("MKT\n>P1\nMKT\n", "line 1: sequence before"),
        (">\nMKT\n", "line 1: empty FASTA header"),
    ],
)
def test_read_fasta_rejects_malformed_files(tmp_path, text, message):
    path = tmp_path / "bad.fasta"
    path.write_text(text)
    with pytest.raises(DataValidationError, match=message):
        list(read_fasta(path))


def test_read_fasta_holds_one_record_in_memory(tmp_path):
    path = tmp_path / "many.fasta"
    rng = random.Random(0)
    with open(path, "w") as handle:
        for index in range(20_000):
            handle.write(f">sp|Q{index:05d}|X\n" + "".join(rng.choices("ACDEFGHIKLMNPQRSTVWY", k=300)) + "\n")
    tracemalloc.start()
    count = sum(1 for _ in read_fasta(path))
    peak = tracemalloc.get_traced_memory()[1]
    tracemalloc.stop()
    assert count == 20_000
    assert peak < path.stat().st_size / 20  # 6 MB of FASTA, read with well under 300 kB


def test_read_sequences_reads_csv_with_acc_and_sequence_and_names_bad_rows(tmp_path):
    path = write_csv(tmp_path / "input.csv", [("Q1", "x", "mkt*"), ("Q2", "y", "MKTZ")], ("ACC", "Notes", "Sequence"))
    assert [tuple(record) for record in read_sequences(path)] == [("Q1", "MKT", 2), ("Q2", "MKTZ", 3)]
    write_csv(path, [("Q1", "MKT"), ("Q2", "MK@T")], ("ACC", "Sequence"))
    with pytest.raises(DataValidationError, match=r"input.csv, line 3, ACC 'Q2': character '@' at position 3"):
        list(read_sequences(path))
    write_csv(path, [(" ", "MKT")], ("ACC", "Sequence"))
    with pytest.raises(DataValidationError, match=r"input.csv, line 2: empty ACC"):
        list(read_sequences(path))
    write_csv(path, [("Q1", "MKT")], ("ACC", "Seq"))
    with pytest.raises(DataValidationError, match=r"line 1: missing column\(s\) \['Sequence'\]"):
        list(read_sequences(path))


# --- the builder's validation -----------------------------------------------------------------------------------


def test_missing_columns_are_named(tmp_path):
    error = validation_error(tmp_path, [("P1", "MKT")], header=("ACC", "Sequence"))
    assert "line 1: missing column(s) ['Mitochondrion']" in str(error)


def test_extra_columns_and_any_column_order_are_accepted(tmp_path):
    rows = [(sequence, "note", label, acc) for acc, label, sequence in GOOD]
    path = write_csv(tmp_path / "extra.csv", rows, ("Sequence", "Comment", "Mitochondrion", "ACC"))
    dataset = load(tmp_path, path)
    assert sorted(split_of_each(dataset)) == sorted(acc for acc, _, _ in GOOD)
    assert list(dataset["train"].features) == ["ACC", "Sequence", "label"]


def test_labels_other_than_0_1_are_rejected_with_line_and_acc(tmp_path):
    error = validation_error(tmp_path, [*GOOD[:3], ("P1", "2", "MKT"), ("P2", "yes", "MKT"), ("P3", "", "MKT")])
    assert error.count == 3
    assert "line 5, ACC 'P1': label '2' is not one of 0, 1, 0.0, 1.0, True, False" in str(error)
    assert "line 6, ACC 'P2': label 'yes'" in str(error)
    assert "line 7, ACC 'P3': label ''" in str(error)


def test_label_spellings_are_accepted_and_counted(tmp_path):
    spellings = ["0", "1", "0.0", "1.0", "True", "False", "TRUE", "false"]
    rows = [(acc, spellings[i % 8], sequence) for i, (acc, _, sequence) in enumerate(GOOD)]
    dataset = load(tmp_path, write_csv(tmp_path / "spellings.csv", rows))
    labels = {item["ACC"]: item["label"] for data in dataset.values() for item in data}
    assert labels == {acc: int(spellings[i % 8].lower() in ("1", "1.0", "true")) for i, (acc, _, _) in enumerate(GOOD)}
    assert dataset_summary(dataset)["normalised"] == {"label spelled 0.0/1.0/True/False": 22}


def test_empty_sequences_and_bad_characters_are_rejected_with_position(tmp_path):
    error = validation_error(tmp_path, [*GOOD, ("E1", 0, ""), ("E2", 1, "MKTJAK"), ("", 0, "MKT")])
    assert "line 32, ACC 'E1': empty sequence" in str(error)
    assert "line 33, ACC 'E2': character 'J' at position 4" in str(error)
    assert "line 34: empty ACC" in str(error)


def test_normalisations_are_applied_and_counted(tmp_path):
    rows = [*GOOD, ("N1", 0, "mkt ayiak"), ("N2", 1, "MKTAYIAK*"), (" N3", 0, "MKTAYIAKQ")]
    dataset = load(tmp_path, write_csv(tmp_path / "normalise.csv", rows))
    sequences = {item["ACC"]: item["Sequence"] for data in dataset.values() for item in data}
    assert (sequences["N1"], sequences["N2"], sequences["N3"]) == ("MKTAYIAK", "MKTAYIAK", "MKTAYIAKQ")
    assert dataset_summary(dataset)["normalised"] == {
        "ACC whitespace stripped": 1,
        "lower case upper-cased": 1,
        "stop codon '*' stripped": 1,
        "whitespace removed": 1,
    }


def test_duplicate_acc_with_conflicting_label_or_sequence_is_an_error(tmp_path):
    error = validation_error(tmp_path, [*GOOD, ("G001", 1, GOOD[1][2]), ("G002", 0, "MKTAYIAK")])
    assert error.count == 2
    assert "line 32, ACC 'G001': same ACC as" in str(error) and "line 3, ACC 'G001' with different label" in str(error)
    assert "line 33, ACC 'G002': same ACC as" in str(error) and "with different Sequence" in str(error)


def test_exact_duplicates_are_merged_and_counted(tmp_path):
    rows = [*GOOD, GOOD[3], GOOD[3], (GOOD[4][0], "0.0", GOOD[4][2].lower())]
    dataset = load(tmp_path, write_csv(tmp_path / "duplicates.csv", rows))
    assert sum(data.num_rows for data in dataset.values()) == len(GOOD)
    summary = dataset_summary(dataset)
    assert summary["exact_duplicates_merged"] == 3
    assert "exact duplicate rows merged: 3" in format_summary(dataset)


def test_many_problems_are_reported_together_first_ten_and_the_total(tmp_path):
    error = validation_error(tmp_path, [(f"B{i}", 5, "MKT") for i in range(25)])
    assert error.count == 25 and len(error.problems) == 10
    assert str(error).startswith("25 problem(s) in the data (the first 10 below)")


def deeploc_rows(n_rows=200):
    rng = random.Random(1)
    rows = []
    for index, row in enumerate(demo_rows(n_rows)):
        flags = [0] * len(LOCATIONS)
        flags[LOCATIONS.index("Mitochondrion")] = row["Mitochondrion"]
        flags[rng.randrange(len(LOCATIONS))] = 1
        kingdom = rng.choice(["Metazoa", "Fungi", "Viridiplantae"])
        rows.append((row["ACC"], kingdom, index % 5, rng.randint(0, 1), *flags, row["Sequence"]))
    return rows


DEEPLOC_HEADER = ("ACC", "Kingdom", "Partition", "Membrane", *LOCATIONS, "Sequence")


def test_deeploc_config_is_multi_label_and_keeps_kingdom_and_partition(tmp_path):
    rows = deeploc_rows()
    dataset = load(tmp_path, write_csv(tmp_path / "deeploc.csv", rows, DEEPLOC_HEADER), config_name="deeploc")
    assert dataset["train"].features["label"].feature.names == list(LOCATIONS)
    example = {row[0]: row for row in rows}
    for split in dataset.values():
        for item in split:
            row = example[item["ACC"]]
            assert (item["Kingdom"], item["Partition"], item["Membrane"]) == row[1:4]
            assert item["label"] == [i for i, flag in enumerate(row[4:14]) if flag]
    summary = dataset_summary(dataset)
    assert sum(split["Mitochondrion"] for split in summary["splits"].values()) == sum(r[8] for r in rows)


def test_deeploc_config_validates_its_columns(tmp_path):
    rows = deeploc_rows(20)
    rows[3] = (*rows[3][:6], "2", *rows[3][7:])
    rows[5] = (rows[5][0], "", *rows[5][2:])
    rows[7] = (rows[7][0], "Fungi", "first", *rows[7][3:])
    error = validation_error(tmp_path, rows, DEEPLOC_HEADER, config_name="deeploc")
    assert f"line 5, ACC '{rows[3][0]}': label '2'" in str(error)
    assert f"line 7, ACC '{rows[5][0]}': empty Kingdom" in str(error)
    assert f"line 9, ACC '{rows[7][0]}': Partition 'first' is not an integer" in str(error)
    error = validation_error(tmp_path, [("P1", 1, "MKT")], config_name="deeploc")
    assert "missing column(s) ['Kingdom', 'Partition', 'Membrane', 'Cytoplasm'," in str(error)


# --- splits -----------------------------------------------------------------------------------------------------


def test_stratified_split_is_70_10_20_and_stratified_on_mitochondrion(tmp_path):
    dataset = load(tmp_path, demo_csv(tmp_path / "demo.csv", 1000))
    splits = dataset_summary(dataset)["splits"]
    assert {name: (split["proteins"], split["Mitochondrion"]) for name, split in splits.items()} == {
        "train": (700, 105),
        "validation": (100, 15),
        "test": (200, 30),
    }
    custom = load(tmp_path, tmp_path / "demo.csv", validation_size=0.25, test_size=0.15)
    assert {name: data.num_rows for name, data in custom.items()} == {"train": 600, "validation": 250, "test": 150}


def test_identical_sequences_never_straddle_splits(tmp_path):
    rows = [(row["ACC"], row["Mitochondrion"], row["Sequence"]) for row in demo_rows(300)]
    # 40 proteins get two copies under new ACCs, the second copy with the other label.
    copies = [(f"{acc}_copy1", label, seq) for acc, label, seq in rows[:40]]
    copies += [(f"{acc}_copy2", 1 - label, seq) for acc, label, seq in rows[:40]]
    dataset = load(tmp_path, write_csv(tmp_path / "copies.csv", rows + copies))
    where = split_of_each(dataset)
    for acc, _, _ in rows[:40]:
        assert where[acc] == where[f"{acc}_copy1"] == where[f"{acc}_copy2"]
    assert len({split for split in where.values()}) == 3
    assert dataset_summary(dataset)["identical_sequences"] == {
        "groups": 40,
        "proteins": 120,
        "groups_with_different_labels": 40,
    }


def test_seeded_split_is_reproducible_order_independent_and_seed_dependent(tmp_path):
    path = demo_csv(tmp_path / "demo.csv")
    first = split_of_each(load(tmp_path / "a", path))
    assert split_of_each(load(tmp_path / "b", path)) == first
    rows = list(csv.reader(open(path)))
    random.Random(3).shuffle(rows[1:])
    shuffled = write_csv(tmp_path / "shuffled.csv", rows[1:], rows[0])
    assert split_of_each(load(tmp_path / "c", shuffled)) == first
    assert split_of_each(load(tmp_path / "d", path, seed=7)) != first


def test_demo_split_is_identical_on_every_datasets_version(tmp_path):
    dataset = load(tmp_path, demo_csv(tmp_path / "demo.csv"))
    triples = sorted((split, item["ACC"], item["label"]) for split, data in dataset.items() for item in data)
    assert hashlib.sha256(repr(triples).encode()).hexdigest() == DEMO_SPLIT_DIGEST


def partition_csv(tmp_path, rows=None) -> Path:
    if rows is None:
        rows = [(row["ACC"], row["Mitochondrion"], row["Sequence"], i % 5) for i, row in enumerate(demo_rows(200))]
    return write_csv(tmp_path / "partitions.csv", rows, (*HEADER, "Partition"))


def test_partition_split_holds_out_the_configured_partitions(tmp_path):
    path = partition_csv(tmp_path)
    partition = {row[0]: int(row[3]) for row in list(csv.reader(open(path)))[1:]}
    where = split_of_each(load(tmp_path, path, split_method="partition"))
    assert {(partition[acc], split) for acc, split in where.items()} == {
        (0, "train"), (1, "train"), (2, "train"), (3, "validation"), (4, "test")
    }
    dataset = load(tmp_path, path, split_method="partition", validation_partitions=0, test_partitions=[1, 2])
    where = split_of_each(dataset)
    assert {(partition[acc], split) for acc, split in where.items()} == {
        (0, "validation"), (1, "test"), (2, "test"), (3, "train"), (4, "train")
    }


def test_partition_split_rejects_identical_sequences_in_different_splits(tmp_path):
    rows = [("P1", 0, "MKTAYIAK", 0), ("P2", 0, "MKTAYIAK", 3), ("P3", 1, "MLRTSS", 4), ("P4", 0, "MLKK", 1)]
    with pytest.raises(DataValidationError, match="ACC 'P2' in 'validation' has the same sequence as ACC 'P1' in"):
        load(tmp_path, partition_csv(tmp_path, rows), split_method="partition")


def test_partition_split_needs_the_partition_column_and_the_partitions(tmp_path):
    error = validation_error(tmp_path, GOOD, split_method="partition")
    assert "missing column(s) ['Partition']" in str(error)
    with pytest.raises(ValueError, match=r"partition\(s\) \[7\] are not in the data"):
        load(tmp_path, partition_csv(tmp_path), split_method="partition", test_partitions=[7])
    with pytest.raises(ValueError, match="non-empty and disjoint"):
        load(tmp_path, partition_csv(tmp_path), split_method="partition", validation_partitions=[4])


def test_given_splits_are_kept_and_checked_for_leaks(tmp_path):
    names = ["train", "validation", "test"]
    files = {name: write_csv(tmp_path / f"{name}.csv", GOOD[i::3]) for i, name in enumerate(names)}
    dataset = load(tmp_path, {name: str(path) for name, path in files.items()})
    assert {name: sorted(data["ACC"]) for name, data in dataset.items()} == {
        name: sorted(acc for acc, _, _ in GOOD[i::3]) for i, name in enumerate(names)
    }
    assert dataset_summary(dataset)["split_method"] == "given"
    write_csv(files["test"], [*GOOD[2::3], ("T1", 0, GOOD[0][2]), GOOD[1]])
    with pytest.raises(DataValidationError) as caught:
        load(tmp_path, {name: str(path) for name, path in files.items()})
    assert "test.csv, line 13, ACC 'G001': the same protein is also in 'validation'" in str(caught.value)
    write_csv(files["test"], [*GOOD[2::3], ("T1", 0, GOOD[0][2])])
    with pytest.raises(DataValidationError, match="ACC 'T1' in 'test' has the same sequence as ACC 'G000' in 'train'"):
        load(tmp_path, {name: str(path) for name, path in files.items()})
    with pytest.raises(ValueError, match="splits one pool of proteins"):
        load(tmp_path, {name: str(path) for name, path in files.items()}, split_method="stratified")


def test_too_few_proteins_for_a_split_is_an_error(tmp_path):
    with pytest.raises(ValueError, match="too few"):
        load(tmp_path, write_csv(tmp_path / "tiny.csv", GOOD[:3]))


def test_fasta_input_gives_unlabelled_examples_for_prediction(tmp_path):
    path = tmp_path / "predict.fasta"
    path.write_text(">sp|P12345|ABC_HUMAN\nMKTAYIAK\n>sp|P67890|DEF_HUMAN\nmlrtss*\n")
    dataset = load(tmp_path, {"test": str(path)})
    assert list(dataset) == ["test"]
    assert dataset["test"].to_dict() == {
        "ACC": ["P12345", "P67890"],
        "Sequence": ["MKTAYIAK", "MLRTSS"],
        "label": [-1, -1],
    }
    with pytest.raises(ValueError, match="FASTA files have none"):
        load(tmp_path, str(path), split_method="stratified")


def test_without_data_files_the_source_is_the_deeploc_download(tmp_path, monkeypatch):
    # Offline mode, so that the test never downloads: the error shows where the builder went.
    monkeypatch.setattr(datasets.config, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(datasets.config, "HF_DATASETS_OFFLINE", True)
    with pytest.raises(ConnectionError, match="DeepLoc-2.0/data/Swissprot_Train_Validation_dataset.csv"):
        load(tmp_path, None)


# --- caching ----------------------------------------------------------------------------------------------------


def test_the_cache_never_serves_a_stale_split(tmp_path):
    path = demo_csv(tmp_path / "data.csv", 100)
    before = split_of_each(load(tmp_path, path))
    mtime = path.stat().st_mtime_ns
    demo_csv(path, 120, seed=1)  # new content under the same name and the same mtime
    os.utime(path, ns=(mtime, mtime))
    assert len(split_of_each(load(tmp_path, path))) == 120
    demo_csv(path, 100)
    os.utime(path, ns=(mtime, mtime))
    assert split_of_each(load(tmp_path, path)) == before
    assert split_of_each(load(tmp_path, path, seed=1)) != before
    partitions = partition_csv(tmp_path)
    default = load(tmp_path, partitions, split_method="partition")
    swapped = load(tmp_path, partitions, split_method="partition", test_partitions=[0])
    assert set(default["test"]["ACC"]) != set(swapped["test"]["ACC"])


# --- entry points: the loading script (datasets 3) and the library loader (every version) ------------------------


@pytest.mark.skipif(DATASETS_MAJOR >= 4,
                    reason=f"{OTHER_DATASETS_MAJOR}: datasets {datasets.__version__} runs no loading scripts")
def test_loading_script_gives_the_library_loaders_dataset(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    demo_csv(tmp_path / "data" / "demo.csv")
    kwargs = {"data_files": "data/demo.csv", "cache_dir": str(tmp_path / "cache"), "seed": 5}
    scripted = datasets.load_dataset(str(SCRIPT), trust_remote_code=True, **kwargs)
    direct = load_dataset(**kwargs)
    assert scripted["train"].features == direct["train"].features
    assert {split: data.to_dict() for split, data in scripted.items()} == {
        split: data.to_dict() for split, data in direct.items()
    }
    assert dataset_summary(scripted) == dataset_summary(direct)


@pytest.mark.skipif(DATASETS_MAJOR < 4,
                    reason=f"{OTHER_DATASETS_MAJOR}: datasets {datasets.__version__} still runs loading scripts")
def test_datasets_4_plus_refuses_the_script_so_the_library_loader_is_the_way(tmp_path):
    with pytest.raises(RuntimeError, match="scripts are no longer supported"):
        datasets.load_dataset(str(SCRIPT), data_files=str(demo_csv(tmp_path / "demo.csv")))


@pytest.mark.skipif(not DEEPLOC_CSV.exists(), reason=f"the DeepLoc 2.0 data is not at {DEEPLOC_CSV}")
def test_partition_split_of_the_deeploc_swissprot_set(tmp_path):
    start = time.perf_counter()
    dataset = load(tmp_path, DEEPLOC_CSV, split_method="partition")
    seconds = time.perf_counter() - start
    summary = dataset_summary(dataset)
    assert summary["splits"] == {
        "train": {"proteins": 17145, "Mitochondrion": 1551},
        "validation": {"proteins": 5696, "Mitochondrion": 523},
        "test": {"proteins": 5462, "Mitochondrion": 516},
    }
    assert summary["identical_sequences"]["groups"] == 0
    assert len(split_of_each(dataset)) == 28303
    print(f"DeepLoc 2.0: loaded, validated and split in {seconds:.2f} s on datasets {datasets.__version__}")


# --- demo data --------------------------------------------------------------------------------------------------


def test_demo_csv_is_deterministic_synthetic_and_learnable(tmp_path):
    first = write_demo_csv(tmp_path / "a" / "demo.csv")
    demo_main(["--output", str(tmp_path / "b.csv")])
    assert first.read_bytes() == (tmp_path / "b.csv").read_bytes()
    rows = list(csv.DictReader(open(first)))
    assert len(rows) == 400 and all(row["ACC"].startswith("SYN") for row in rows)
    assert {row["Mitochondrion"] for row in rows} == {"0", "1"}
    assert sum(row["Mitochondrion"] == "1" for row in rows) == 60
    lengths = [len(row["Sequence"]) for row in rows]
    assert min(lengths) >= 50 and sum(length > 1022 for length in lengths) == 3

    # A one-line rule on the N-terminus (Arg minus Asp/Glu in the first 30 residues) separates the classes:
    # the signal a model has to learn is there, as in real targeting peptides.
    def score(sequence):
        head = sequence[:30]
        return head.count("R") - head.count("D") - head.count("E")

    correct = sum((score(row["Sequence"]) >= 3) == (row["Mitochondrion"] == "1") for row in rows)
    assert correct / len(rows) > 0.95
    dataset = load(tmp_path, first)
    assert dataset_summary(dataset)["normalised"] == {}
