"""No run returns a wrong result with exit status 0 (issue 10): reruns into a used --output_dir, checkpoints that
restore every tensor, outputs that would replace inputs, unlearnable data, directories that are not esmloc models,
and one clear voice on the command line."""

import csv
import hashlib
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from transformers import EsmConfig, EsmForMaskedLM, EsmForSequenceClassification, Trainer, TrainingArguments

from configuration_esmloc import ESM2_ARCHITECTURES
from esmloc.demo import demo_rows, write_demo_csv
from esmloc.engine import Engine
from esmloc.saving import save_model, tokenizer_for
from esmloc.commands.predict import main as predict_main

from conftest import PROTEINS, QUICK, REPO, TRAIN, run_train, tiny_model, train_env, write_deeploc_layout_csv


def run(args, cwd, env=None) -> subprocess.CompletedProcess:
    return subprocess.run(TRAIN + args, cwd=cwd, env=env or train_env(), capture_output=True, text=True, timeout=600)


def digest(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def write_rows(path: Path, rows) -> Path:
    with open(path, "w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=["ACC", "Mitochondrion", "Sequence"])
        writer.writeheader()
        writer.writerows(rows)
    return path


FAST = [*QUICK, "--num_train_epochs", "1"]


# --- 1. a used --output_dir ----------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def finished_run(tmp_path_factory):
    """A finished frozen run on data A, and a file B with other proteins."""
    work = tmp_path_factory.mktemp("rerun")
    data_a = write_demo_csv(work / "a.csv", n_rows=120, seed=1)
    data_b = write_demo_csv(work / "b.csv", n_rows=120, seed=2)
    output_dir = work / "out"
    run_train(["--train_file", str(data_a), "--output_dir", str(output_dir), *FAST], cwd=work)
    return work, data_a, data_b, output_dir


def snapshot(directory: Path) -> dict:
    return {str(path.relative_to(directory)): digest(path) for path in sorted(directory.rglob("*")) if path.is_file()}


def test_rerun_with_other_data_is_refused_and_changes_nothing(finished_run):
    work, _, data_b, output_dir = finished_run
    before = snapshot(output_dir)
    result = run(["--train_file", str(data_b), "--output_dir", str(output_dir), *FAST], cwd=work)
    assert result.returncode == 2, result.stderr[-3000:]
    assert "holds another run" in result.stderr and "data.train_file" in result.stderr
    assert "--overwrite_output_dir" in result.stderr and "another --output_dir" in result.stderr
    assert "Traceback" not in result.stderr
    assert snapshot(output_dir) == before


def test_rerun_with_another_architecture_gets_the_same_clear_refusal(finished_run):
    work, data_a, _, output_dir = finished_run
    args = ["--train_file", str(data_a), "--output_dir", str(output_dir), *FAST, "--from_scratch", "esm2_t6_8M"]
    result = run(args, cwd=work)
    assert result.returncode == 2
    assert "model.from_scratch: 'tiny' -> 'esm2_t6_8M'" in result.stderr and "Traceback" not in result.stderr


def test_rerun_of_the_finished_identical_run_keeps_its_results(finished_run):
    work, data_a, _, output_dir = finished_run
    before = snapshot(output_dir)
    result = run(["--train_file", str(data_a), "--output_dir", str(output_dir), *FAST], cwd=work)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "already finished" in result.stderr
    assert snapshot(output_dir) == before  # train_results.json is not rewritten with train_loss 0.0


def test_explicit_checkpoint_of_another_run_is_refused(finished_run, tmp_path):
    work, _, data_b, output_dir = finished_run
    checkpoint = sorted(output_dir.glob("checkpoint-*"))[-1]
    assert (checkpoint / "esmloc_run.json").is_file()
    result = run(["--train_file", str(data_b), "--output_dir", str(tmp_path / "new"), *FAST,
                  "--resume_from_checkpoint", str(checkpoint)], cwd=work)
    assert result.returncode == 2
    assert f"--resume_from_checkpoint {checkpoint} belongs to another run" in result.stderr
    assert not (tmp_path / "new" / "model.safetensors").exists()


def test_a_run_without_a_record_is_refused_and_overwrite_starts_afresh(finished_run, tmp_path):
    work, _, data_b, output_dir = finished_run
    old = Path(shutil.copytree(output_dir, tmp_path / "old"))
    (old / "esmloc_run.json").unlink()  # as an older esmloc left it
    result = run(["--train_file", str(data_b), "--output_dir", str(old), *FAST], cwd=work)
    assert result.returncode == 2 and "without an esmloc run record" in result.stderr

    old_weights = digest(old / "model.safetensors")
    result = run_train(["--train_file", str(data_b), "--output_dir", str(old), *FAST, "--overwrite_output_dir"],
                       cwd=work)
    assert "Resuming" not in result.stderr
    assert digest(old / "model.safetensors") != old_weights
    record = json.loads((old / "esmloc_run.json").read_text())
    assert record["finished"] and record["data"]["train_file"]["name"] == "b.csv"
    assert json.loads((old / "run_info.json").read_text())["data"]["train_file"] == "b.csv"


# --- 2. every tensor round-trips through checkpoints -----------------------------------------------------------------


def test_saved_weights_load_with_the_plain_load_state_dict_trainer_uses(tmp_path):
    model = tiny_model()
    save_model(model, tmp_path / "model")
    state = load_file(tmp_path / "model" / "model.safetensors")
    assert not [key for key in state if key.endswith((".gamma", ".beta"))]
    fresh = tiny_model(seed=1)
    fresh.load_state_dict(state, strict=False)
    for name, tensor in model.state_dict().items():
        if "inv_freq" not in name:
            torch.testing.assert_close(fresh.state_dict()[name], tensor, rtol=0, atol=0, msg=name)


class Proteins(torch.utils.data.Dataset):
    def __init__(self, model, n=24):
        tokenizer = tokenizer_for(model.config)
        rows = demo_rows(n_rows=n, seed=4)
        self.items = [{**tokenizer(row["Sequence"][:60]), "labels": row["Mitochondrion"]} for row in rows]

    def __len__(self):
        return len(self.items)

    def __getitem__(self, index):
        return self.items[index]


def test_resuming_restores_every_tensor_of_the_checkpoint(tmp_path):
    model = tiny_model()
    data = Proteins(model)
    args = dict(output_dir=str(tmp_path), per_device_train_batch_size=4, save_strategy="steps", save_steps=3,
                learning_rate=1e-2, report_to="none", use_cpu=True, disable_tqdm=True)
    Trainer(model=model, args=TrainingArguments(max_steps=3, **args), train_dataset=data,
            data_collator=_collate(model)).train()
    saved = load_file(tmp_path / "checkpoint-3" / "model.safetensors")

    resumed = tiny_model(seed=7)  # other weights everywhere, LayerNorms included
    with torch.no_grad():
        for name, parameter in resumed.named_parameters():
            if "LayerNorm" in name:
                parameter.add_(1.0)
    trainer = Trainer(model=resumed, args=TrainingArguments(max_steps=3, **args), train_dataset=data,
                      data_collator=_collate(model))
    trainer.train(resume_from_checkpoint=str(tmp_path / "checkpoint-3"))  # nothing left to train: loads only
    state = resumed.state_dict()
    assert any("encoder.layer.0.attention.LayerNorm.weight" in key for key in saved)
    for name, tensor in saved.items():
        torch.testing.assert_close(state[name], tensor, rtol=0, atol=0, msg=name)


def _collate(model):
    from transformers import DataCollatorWithPadding

    return DataCollatorWithPadding(tokenizer_for(model.config))


# --- 3, 5, 8, 9: esmloc-predict -------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    return save_model(tiny_model(max_residues=300), tmp_path_factory.mktemp("model"))


def write_fasta(path, records):
    path.write_text("".join(f">{acc}\n{sequence}\n" for acc, sequence in records))
    return path


def test_output_that_is_the_input_is_refused_before_reading(model_dir, tmp_path, capsys):
    fasta = write_fasta(tmp_path / "p.fasta", [("P1", PROTEINS[0])])
    before = fasta.read_bytes()
    link = tmp_path / "link.csv"
    link.symlink_to(fasta)
    for output in (fasta, tmp_path / "." / "p.fasta", link):
        assert predict_main([str(model_dir), str(fasta), "-o", str(output)]) == 2
        assert "is the input file" in capsys.readouterr().err
    assert predict_main([str(model_dir), str(fasta), "-o", str(model_dir / "config.json")]) == 2
    assert fasta.read_bytes() == before


def _stock_sequence_classifier(path):
    config = EsmConfig(**ESM2_ARCHITECTURES["tiny"])
    EsmForSequenceClassification(config).save_pretrained(path)
    return path


def _stock_masked_lm(path):
    EsmForMaskedLM(EsmConfig(**ESM2_ARCHITECTURES["tiny"])).save_pretrained(path)
    return path


def _truncated(path, model_dir):
    shutil.copytree(model_dir, path)
    weights = path / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[: weights.stat().st_size // 2])
    return path


def _without_tokenizer(path, model_dir):
    shutil.copytree(model_dir, path)
    (path / "tokenizer_config.json").unlink()
    return path


@pytest.mark.parametrize("kind, expected", [
    ("sequence_classifier", "a stock ESM-2 checkpoint (EsmForSequenceClassification), not an esmloc model: train "
                            "from it with train.py --model_name_or_path"),
    ("masked_lm", "a stock ESM-2 checkpoint (EsmForMaskedLM)"),
    ("truncated", "damaged or truncated weights file"),
    ("no_tokenizer", "the tokenizer is missing (tokenizer_config.json)"),
])
def test_a_directory_that_is_not_an_esmloc_model_gets_one_message(kind, expected, model_dir, tmp_path):
    path = tmp_path / kind
    {"sequence_classifier": lambda: _stock_sequence_classifier(path), "masked_lm": lambda: _stock_masked_lm(path),
     "truncated": lambda: _truncated(path, model_dir), "no_tokenizer": lambda: _without_tokenizer(path, model_dir)}[kind]()
    fasta = write_fasta(tmp_path / "p.fasta", [("P1", PROTEINS[0])])
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    result = subprocess.run([sys.executable, "-m", "esmloc.commands.predict", str(path), str(fasta), "-o",
                             str(tmp_path / "o.csv")], env=env, capture_output=True, text=True, timeout=300)
    assert result.returncode == 2
    assert expected in result.stderr and str(path) in result.stderr
    assert "Traceback" not in result.stderr and len(result.stderr.strip().splitlines()) <= 3
    assert not (tmp_path / "o.csv").exists()

    push = subprocess.run([sys.executable, "-m", "esmloc.commands.push", str(path), "--hub_model_id", "alice/x",
                           "--hub_endpoint", "http://127.0.0.1:9"], env=env, capture_output=True, text=True,
                          timeout=300)
    assert push.returncode != 0 and "Traceback" not in push.stderr and expected in push.stderr


def test_train_names_a_damaged_checkpoint(model_dir, tmp_path):
    path = _truncated(tmp_path / "damaged", model_dir)
    result = run(["--model_name_or_path", str(path), "--train_file", str(write_demo_csv(tmp_path / "d.csv", 60)),
                  "--output_dir", str(tmp_path / "out")], cwd=tmp_path)
    assert result.returncode == 2
    assert f"{path / 'model.safetensors'}: damaged or truncated weights file" in result.stderr
    assert "Traceback" not in result.stderr


def test_repeated_record_ids_are_reported_and_kept(model_dir, tmp_path, capsys):
    fasta = write_fasta(tmp_path / "p.fasta", [("P1", PROTEINS[0]), ("P2", PROTEINS[3]), ("P1", PROTEINS[2]),
                                               ("P1", PROTEINS[3]), ("P3", "MKT")])
    assert predict_main([str(model_dir), str(fasta), "-o", str(tmp_path / "o.csv"), "--no_progress"]) == 0
    err = capsys.readouterr().err
    assert "1 record ID(s) occur more than once" in err and "P1 (x3)" in err
    with open(tmp_path / "o.csv", newline="") as handle:
        assert [row["ACC"] for row in csv.DictReader(handle)] == ["P1", "P2", "P1", "P1", "P3"]


class Recorder:
    def __init__(self):
        self.updates = []

    def update(self, n):
        self.updates.append(n)


def test_progress_moves_with_every_batch_not_every_chunk(model_dir):
    model, tokenizer = tiny_model(max_residues=300), tokenizer_for(tiny_model(max_residues=300).config)
    engine = Engine(model, tokenizer, max_tokens_per_batch=200, progress=False, workers=1)
    bar = Recorder()
    sequences = [row["Sequence"][:100] for row in demo_rows(n_rows=40, seed=0)]
    engine.predict_probabilities(sequences, bar=bar)
    assert len(bar.updates) >= 20 and sum(bar.updates) == 40


def test_predict_memory_benchmark_smoke(tmp_path):
    result = subprocess.run([sys.executable, str(REPO / "bench" / "predict_memory.py"), "--sizes", "300", "1500"],
                            cwd=tmp_path, env={**os.environ, "HF_HUB_OFFLINE": "1"}, capture_output=True, text=True,
                            timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "peak RSS growth from 300 to 1,500 proteins" in result.stdout


# --- 4, 6, 7, 10: train.py's input checks and voice ---------------------------------------------------------------


def test_single_class_training_data_is_refused_with_counts(tmp_path):
    rows = [{**row, "Mitochondrion": 0} for row in demo_rows(n_rows=60, seed=1)]
    data = write_rows(tmp_path / "negatives.csv", rows)
    result = run(["--train_file", str(data), "--output_dir", str(tmp_path / "out"), *FAST], cwd=tmp_path)
    assert result.returncode == 2, result.stderr[-3000:]
    assert "train split (42 proteins; Other 42, Mitochondrion 0) has no protein labelled Mitochondrion" in result.stderr
    assert not (tmp_path / "out" / "model.safetensors").exists()


def test_validation_without_positives_is_refused(tmp_path):
    rows = demo_rows(n_rows=60, seed=1)
    train = write_rows(tmp_path / "train.csv", rows[:30])
    validation = write_rows(tmp_path / "validation.csv", [row for row in rows[30:45] if not row["Mitochondrion"]])
    test = write_rows(tmp_path / "test.csv", rows[45:])
    result = run(["--train_file", str(train), "--validation_file", str(validation), "--test_file", str(test),
                  "--output_dir", str(tmp_path / "out"), *FAST], cwd=tmp_path)
    assert result.returncode == 2
    assert "the validation split" in result.stderr and "to tune its decision threshold on" in result.stderr


def test_a_location_without_training_positives_is_named(tmp_path):
    path = write_deeploc_layout_csv(tmp_path / "deeploc.csv", n_rows=100, seed=5)
    with open(path, newline="") as handle:
        rows = list(csv.DictReader(handle))
    for row in rows:
        row["Peroxisome"] = "1" if row["Partition"] in ("3", "4") else "0"
    with open(path, "w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
    result = run(["--dataset_config", "deeploc", "--train_file", str(path), "--split_method", "partition",
                  "--output_dir", str(tmp_path / "out"), *FAST], cwd=tmp_path)
    assert result.returncode == 2
    assert "has no protein labelled Peroxisome" in result.stderr and "Traceback" not in result.stderr


def test_bad_data_gets_one_message_with_file_line_and_acc(tmp_path):
    rows = demo_rows(n_rows=30, seed=1)
    rows[6]["Sequence"] = "MKT1LV"
    data = write_rows(tmp_path / "bad.csv", rows)
    result = run(["--train_file", str(data), "--output_dir", str(tmp_path / "out"), *FAST], cwd=tmp_path)
    assert result.returncode == 2
    assert f"{data}, line 8, ACC '{rows[6]['ACC']}'" in result.stderr and "'1' at position 4" in result.stderr
    assert "Traceback" not in result.stderr


def test_train_without_data_runs_the_demo_and_says_so(tmp_path):
    env = train_env(HF_HOME=str(tmp_path / "hf_home"))
    result = run_train(["--output_dir", str(tmp_path / "out"), "--num_train_epochs", "1", "--max_residues", "64",
                        "--num_examples_to_show", "4"], cwd=tmp_path, env=env)
    log = result.stdout + result.stderr
    assert "No --train_file: training on esmloc's synthetic demo set" in log
    assert "RANDOM weights (--from_scratch esm2_t6_8M)" in log
    # readable output: the summary once, the decision rule above the examples, no progress bars in a log
    assert log.count("esmloc dataset (mitochondrion") == 1
    threshold = json.loads((tmp_path / "out" / "test_results.json").read_text())["test_threshold_tuned"]
    assert f"Predicted: Mitochondrion if its probability >= {threshold:.3f}, else Other." in result.stdout
    assert "it/s]" not in log and "%|" not in log
    assert "missing keys" not in log.lower()
    info = json.loads((tmp_path / "out" / "run_info.json").read_text())
    assert info["data"]["split_sizes"] == {"train": 280, "validation": 40, "test": 80}


def test_full_finetuning_at_full_length_on_cpu_advises_cropping(tmp_path):
    result = run(["--finetune", "full", "--from_scratch", "tiny", "--train_file", str(tmp_path / "absent.csv"),
                  "--output_dir", str(tmp_path / "out")], cwd=tmp_path)
    assert result.returncode == 2 and "absent.csv: no such data file" in result.stderr
    assert "--max_residues 256 makes training many times faster" in result.stderr
