"""esmloc-predict: FASTA and CSV in, CSV out, in input order, thresholds, malformed records, streaming chunks."""

import csv
import gzip
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from esmloc.saving import save_model, tokenizer_for
from esmloc.commands.predict import main as predict_main

from conftest import PROTEINS, tiny_model


NAMES = ["sp|P12345|ONE_HUMAN Protein one", "tr|Q9XYZ1|TWO_YEAST", "plain_id some description", "P4", "P5", "P6"]
SEQUENCES = [PROTEINS[0], PROTEINS[1], PROTEINS[2], PROTEINS[3], "A" * 1100, PROTEINS[0]]
ACCS = ["P12345", "Q9XYZ1", "plain_id", "P4", "P5", "P6"]


def write_fasta(path, names, sequences, width=60):
    with open(path, "w") as handle:
        for name, sequence in zip(names, sequences):
            handle.write(f">{name}\n")
            for start in range(0, len(sequence), width):
                handle.write(sequence[start:start + width] + "\n")
    return path


def write_csv(path, rows, columns=("ACC", "Kingdom", "Sequence")):
    with open(path, "w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(columns)
        writer.writerows(rows)
    return path


def run_predict(args, cwd):
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONUNBUFFERED": "1"}
    return subprocess.run([sys.executable, "-m", "esmloc.commands.predict", *map(str, args)], cwd=cwd, env=env,
                          capture_output=True, text=True, timeout=300)


def read_rows(path):
    with open(path, newline="") as handle:
        return list(csv.DictReader(handle))


def expected_probabilities(model, sequences):
    tokenizer = tokenizer_for(model.config)
    with torch.inference_mode():
        return np.concatenate([model(**tokenizer([s], return_tensors="pt")).logits.softmax(-1).numpy()
                               for s in sequences])


@pytest.fixture(scope="module")
def binary_model(tmp_path_factory):
    model = tiny_model(max_residues=300)
    path = save_model(model, tmp_path_factory.mktemp("binary_model"))
    return model, path


def test_fasta_in_csv_out_in_input_order_with_the_tuned_threshold(binary_model, tmp_path, elsewhere):
    model, model_dir = binary_model
    model_dir = Path(shutil.copytree(model_dir, tmp_path / "model"))
    expected = expected_probabilities(model, SEQUENCES)
    threshold = float(np.median(expected[:, 1]))  # a tuned threshold that splits the proteins
    config = json.loads((model_dir / "config.json").read_text())
    (model_dir / "config.json").write_text(json.dumps({**config, "decision_thresholds": threshold}))
    # The config decides, as for the pipeline; test_results.json is read only for models saved before.
    (model_dir / "test_results.json").write_text(json.dumps({"test_threshold_tuned": 0.0, "test_mcc": 0.5}))
    fasta = write_fasta(tmp_path / "proteins.fasta", NAMES, SEQUENCES)
    output = tmp_path / "out" / "predictions.csv"
    result = run_predict([model_dir, fasta, "-o", output, "--max_tokens_per_batch", "700"], cwd=elsewhere)
    assert result.returncode == 0, result.stderr
    assert "decision_thresholds of the model's config.json" in result.stderr and f"{threshold:.4g}" in result.stderr
    rows = read_rows(output)
    assert list(rows[0]) == ["ACC", "probability_Other", "probability_Mitochondrion", "predicted_label"]
    assert [row["ACC"] for row in rows] == ACCS
    probabilities = np.array([[float(row["probability_Other"]), float(row["probability_Mitochondrion"])]
                              for row in rows])
    np.testing.assert_allclose(probabilities, expected, atol=1e-5)
    for row, p in zip(rows, expected[:, 1]):
        assert row["predicted_label"] == ("Mitochondrion" if p >= threshold else "Other")
    assert {row["predicted_label"] for row in rows} == {"Mitochondrion", "Other"}


def test_csv_input_with_an_explicit_threshold_and_small_chunks(binary_model, tmp_path, elsewhere):
    model, model_dir = binary_model
    table = write_csv(tmp_path / "proteins.csv", [(acc, "Metazoa", seq) for acc, seq in zip(ACCS, SEQUENCES)])
    whole, chunked = tmp_path / "whole.csv", tmp_path / "chunked.csv"
    assert predict_main([str(model_dir), str(table), "-o", str(whole), "--no_progress"]) == 0
    result = run_predict([model_dir, table, "-o", chunked, "--threshold", "0.0", "--chunk_size", "2",
                          "--no_progress"], cwd=elsewhere)
    assert result.returncode == 0, result.stderr
    assert "0.0 (--threshold)" in result.stderr
    rows = read_rows(chunked)
    assert [row["ACC"] for row in rows] == ACCS
    assert all(row["predicted_label"] == "Mitochondrion" for row in rows)  # every p >= 0
    np.testing.assert_allclose([float(row["probability_Mitochondrion"]) for row in rows],
                               [float(row["probability_Mitochondrion"]) for row in read_rows(whole)], atol=1e-6)


def test_default_threshold_is_half_without_a_training_run(binary_model, tmp_path):
    model, model_dir = binary_model
    fasta = write_fasta(tmp_path / "p.fa.gz".replace(".gz", ""), NAMES[:2], SEQUENCES[:2])
    with open(fasta, "rb") as source, gzip.open(tmp_path / "p.fa.gz", "wb") as target:
        target.write(source.read())
    output = tmp_path / "predictions.csv"
    assert predict_main([str(model_dir), str(tmp_path / "p.fa.gz"), "-o", str(output), "--no_progress"]) == 0
    rows = read_rows(output)
    for row in rows:
        expected = "Mitochondrion" if float(row["probability_Mitochondrion"]) >= 0.5 else "Other"
        assert row["predicted_label"] == expected


@pytest.mark.parametrize("kind", ["fasta", "csv"])
def test_a_malformed_record_fails_the_run_and_writes_nothing(kind, binary_model, tmp_path, elsewhere):
    model, model_dir = binary_model
    tmp_path = tmp_path / "work"
    tmp_path.mkdir()
    sequences = list(SEQUENCES)
    sequences[3] = "MKTAY1AK"  # '1' is not a residue
    if kind == "fasta":
        path = write_fasta(tmp_path / "bad.fasta", NAMES, sequences)
        line = 1 + sum(1 + -(-len(s) // 60) for s in sequences[:3])  # the header line of the 4th record
    else:
        path = write_csv(tmp_path / "bad.csv", [(acc, "Fungi", seq) for acc, seq in zip(ACCS, sequences)])
        line = 5  # header is line 1
    output = tmp_path / "predictions.csv"
    output.write_text("an earlier result\n")
    result = run_predict([model_dir, path, "-o", output], cwd=elsewhere)
    assert result.returncode == 2
    assert f"{path}, line {line}, ACC 'P4'" in result.stderr
    assert "'1' at position 6" in result.stderr and "nothing written" in result.stderr
    assert output.read_text() == "an earlier result\n"  # untouched
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted([path.name, output.name])  # no temporary left


def test_missing_columns_and_missing_files_are_reported(binary_model, tmp_path, capsys):
    model, model_dir = binary_model
    table = write_csv(tmp_path / "no_sequence.csv", [("P1", "MKT")], columns=("ACC", "Seq"))
    assert predict_main([str(model_dir), str(table), "-o", str(tmp_path / "o.csv")]) == 2
    assert "missing column(s) ['Sequence']" in capsys.readouterr().err
    assert predict_main([str(model_dir), str(tmp_path / "absent.fasta"), "-o", str(tmp_path / "o.csv")]) == 2
    assert "no such file" in capsys.readouterr().err
    assert not (tmp_path / "o.csv").exists()


def test_multi_label_model_uses_per_label_thresholds(tmp_path, elsewhere):
    names = ["Cytoplasm", "Nucleus", "Mitochondrion"]
    model = tiny_model(id2label=dict(enumerate(names)), problem_type="multi_label_classification")
    tokenizer = tokenizer_for(model.config)
    with torch.inference_mode():
        expected = torch.sigmoid(torch.cat([model(**tokenizer([s], return_tensors="pt")).logits
                                            for s in SEQUENCES])).numpy()
    thresholds = np.median(expected, axis=0)
    model.config.decision_thresholds = thresholds.tolist()
    model_dir = save_model(model, tmp_path / "model")
    fasta = write_fasta(tmp_path / "p.fasta", NAMES, SEQUENCES)
    output = tmp_path / "predictions.csv"
    result = run_predict([model_dir, fasta, "-o", output], cwd=elsewhere)
    assert result.returncode == 0, result.stderr
    rows = read_rows(output)
    assert list(rows[0]) == ["ACC"] + [f"probability_{name}" for name in names] + ["predicted_labels"]
    got = np.array([[float(row[f"probability_{name}"]) for name in names] for row in rows])
    np.testing.assert_allclose(got, expected, atol=1e-5)
    for row, probabilities in zip(rows, expected):
        assert row["predicted_labels"] == ";".join(n for n, p, t in zip(names, probabilities, thresholds) if p >= t)


def test_a_tokenizer_that_crops_otherwise_than_the_model_is_refused(binary_model, tmp_path, capsys):
    _, model_dir = binary_model
    model_dir = Path(shutil.copytree(model_dir, tmp_path / "model"))
    tokenizer_config = model_dir / "tokenizer_config.json"
    settings = json.loads(tokenizer_config.read_text())
    tokenizer_config.write_text(json.dumps({**settings, "max_residues": 100}))
    fasta = write_fasta(tmp_path / "p.fasta", NAMES[:1], SEQUENCES[:1])
    assert predict_main([str(model_dir), str(fasta), "-o", str(tmp_path / "o.csv")]) == 2
    assert "max_residues 100 in the tokenizer, 300 in the config" in capsys.readouterr().err
    assert not (tmp_path / "o.csv").exists()
