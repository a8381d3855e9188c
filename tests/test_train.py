"""train.py end to end: every fine-tuning mode, distributed runs, resuming, and the hub-unreachable message."""

import csv
import json
import os
import signal
import subprocess
import sys
import time

import pytest
import torch

from esmloc.demo import write_demo_csv
from esmloc.task import balanced_class_weights

from conftest import (
    QUICK, REPO, TRAIN, distributed_failure, free_port, loopback_only_namespace, run_offline, run_processes,
    run_train, train_env, write_deeploc_layout_csv,
)


@pytest.fixture(scope="module")
def proteins_csv(tmp_path_factory):
    return write_demo_csv(tmp_path_factory.mktemp("data") / "proteins.csv", n_rows=160, seed=3)


# The full run stops early: at the first evaluation no better than the best so far (patience 1), so its best
# checkpoint is always an earlier one than its last, and restoring the best one is visible in the saved model.
STOPS_EARLY = ["--num_train_epochs", "8", "--early_stopping_patience", "1"]


@pytest.fixture(scope="module")
def runs(proteins_csv, tmp_path_factory):
    """One real train.py run per fine-tuning mode, shared by the tests below."""
    outputs = {}
    for mode in ("frozen", "lora", "full"):
        output_dir = tmp_path_factory.mktemp(f"run_{mode}")
        result = run_train(["--train_file", str(proteins_csv), "--output_dir", str(output_dir), "--finetune", mode,
                            "--pooling", "attention" if mode == "full" else "mean", *QUICK,
                            *(STOPS_EARLY if mode == "full" else [])],
                           cwd=tmp_path_factory.mktemp("cwd"))
        outputs[mode] = (output_dir, result.stdout + result.stderr)
    return outputs


def read_predictions(path):
    with open(path, newline="") as handle:
        return list(csv.DictReader(handle))


LOAD_AND_PREDICT = """
import csv, json, torch
from transformers import AutoModelForSequenceClassification, AutoTokenizer
path = {path!r}
model = AutoModelForSequenceClassification.from_pretrained(path, trust_remote_code=True).eval()
tokenizer = AutoTokenizer.from_pretrained(path, trust_remote_code=True)
sequences = {sequences!r}
probabilities = []
with torch.no_grad():
    for sequence in sequences:
        logits = model(**tokenizer([sequence], return_tensors="pt")).logits
        probabilities.append(torch.softmax(logits, dim=-1)[0, 1].item())
print(json.dumps({{"probabilities": probabilities, "module": type(model).__module__}}))
"""


@pytest.mark.slow
@pytest.mark.parametrize("mode", ["frozen", "lora", "full"])
def test_run_leaves_a_loadable_evaluated_model(mode, runs, proteins_csv, tmp_path, elsewhere):
    output_dir, log = runs[mode]
    for name in ("config.json", "model.safetensors", "modeling_esmloc.py", "configuration_esmloc.py",
                 "tokenization_esmloc.py", "tokenizer_config.json", "vocab.txt", "test_results.json",
                 "test_predictions.csv", "roc_curve.png", "pr_curve.png", "confusion_matrix.png", "run_info.json"):
        assert (output_dir / name).is_file(), name
    results = json.loads((output_dir / "test_results.json").read_text())
    for key in ("test_accuracy", "test_f1", "test_mcc", "test_roc_auc", "test_pr_auc", "test_mcc_tuned",
                "test_threshold_tuned", "validation_mcc_tuned"):
        assert key in results, key
    assert "trainable parameters of" in log
    assert "true_label" in log and "probability_Mitochondrion" in log  # the table of random test proteins

    # The predictions CSV covers the test split and matches the saved model, loaded in a fresh offline process.
    rows = read_predictions(output_dir / "test_predictions.csv")
    assert list(rows[0]) == ["ACC", "true_label", "probability_Other", "probability_Mitochondrion", "predicted_label"]
    sequences_by_acc = {row["ACC"]: row["Sequence"] for row in read_predictions(proteins_csv)}
    assert len(rows) == results["test_tp"] + results["test_fp"] + results["test_tn"] + results["test_fn"]
    sequences = [sequences_by_acc[row["ACC"]] for row in rows]
    loaded = run_offline(LOAD_AND_PREDICT.format(path=str(output_dir), sequences=sequences), elsewhere, tmp_path)
    assert loaded["module"].startswith("transformers_modules")
    expected = [float(row["probability_Mitochondrion"]) for row in rows]
    assert loaded["probabilities"] == pytest.approx(expected, abs=1e-5)
    threshold = results["test_threshold_tuned"]
    for row in rows:
        predicted = "Mitochondrion" if float(row["probability_Mitochondrion"]) >= threshold else "Other"
        assert row["predicted_label"] == predicted


def evaluations_of(output_dir):
    """The run's trainer state and its evaluations, in order."""
    state = json.loads((output_dir / "trainer_state.json").read_text())
    return state, [entry for entry in state["log_history"] if "eval_mcc_tuned" in entry]


@pytest.mark.slow
def test_best_model_is_chosen_by_validation_mcc(runs):
    output_dir, _ = runs["full"]
    assert json.loads((output_dir / "run_info.json").read_text())["training"]["metric_for_best_model"] == "mcc_tuned"
    state, evaluations = evaluations_of(output_dir)
    best = max(evaluations, key=lambda entry: entry["eval_mcc_tuned"])  # the first of equals, as Trainer keeps it
    last = evaluations[-1]
    assert state["best_metric"] == best["eval_mcc_tuned"]
    # The fixture's premise: the run stopped early, at an evaluation that found the model worse than the best one
    # (not merely equal: its tuned threshold differs).
    assert best["step"] < last["step"] == state["global_step"] and len(evaluations) < 8
    assert last["eval_threshold_tuned"] != pytest.approx(best["eval_threshold_tuned"], abs=1e-6)
    # The saved model is the best one: on validation it scores what the best evaluation scored (the final report
    # predicts with exactly the saved weights), not what the last one did.
    saved = json.loads((output_dir / "test_results.json").read_text())
    assert saved["validation_mcc_tuned"] == pytest.approx(best["eval_mcc_tuned"])
    assert saved["validation_threshold_tuned"] == pytest.approx(best["eval_threshold_tuned"], abs=1e-6)


@pytest.mark.slow
def test_the_saved_model_is_the_best_checkpoint_tensor_for_tensor(runs):
    from safetensors.torch import load_file

    output_dir, log = runs["full"]  # full fine-tuning: the encoder's LayerNorms change too
    state, _ = evaluations_of(output_dir)
    best = state["best_model_checkpoint"]
    assert os.path.basename(best) != f"checkpoint-{state['global_step']}"  # an earlier checkpoint than the last
    best_weights = load_file(os.path.join(best, "model.safetensors"))
    final_weights = load_file(output_dir / "model.safetensors")
    assert set(best_weights) == set(final_weights)
    assert any(".LayerNorm.weight" in name for name in final_weights)
    for name, tensor in final_weights.items():
        assert torch.equal(best_weights[name], tensor), name
    assert "missing keys" not in log.lower()


@pytest.mark.slow
def test_run_info_records_local_files_by_name_only(runs, proteins_csv):
    run_info = (runs["frozen"][0] / "run_info.json").read_text()
    assert str(proteins_csv.parent) not in run_info
    assert json.loads(run_info)["data"]["train_file"] == proteins_csv.name


@pytest.mark.slow
def test_failed_push_keeps_the_run_and_says_why(proteins_csv, tmp_path):
    output_dir = tmp_path / "out"
    result = subprocess.run(
        TRAIN + ["--train_file", str(proteins_csv), "--output_dir", str(output_dir), *QUICK, "--num_train_epochs", "1",
                 "--push_to_hub", "--hub_model_id", "someone/esmloc-test",
                 "--hub_endpoint", f"http://127.0.0.1:{free_port()}"],
        cwd=tmp_path, env=train_env(HF_TOKEN="hf_esmloc_test_secret_token"), capture_output=True, text=True,
        timeout=600,
    )
    assert result.returncode != 0
    assert f"The model is saved in {output_dir}, but the push failed" in result.stderr
    assert "someone/esmloc-test" in result.stderr
    assert "hf_esmloc_test_secret_token" not in result.stdout + result.stderr
    for name in ("model.safetensors", "README.md", "test_results.json"):
        assert (output_dir / name).is_file()
    assert not [path for path in output_dir.rglob("*") if path.is_file() and b"esmloc_test_secret" in path.read_bytes()]


@pytest.mark.slow
def test_runs_log_no_spurious_warnings(runs):
    for mode, (_, log) in runs.items():
        assert "tokens that differ from the model config" not in log, mode  # Trainer re-aligning pad/eos ids
        assert "'pin_memory' argument is set as true" not in log, mode  # pinning on a CPU-only machine


@pytest.mark.slow
def test_finetune_modes_train_what_they_say(runs):
    counts = {}
    for mode, (output_dir, _) in runs.items():
        model_info = json.loads((output_dir / "run_info.json").read_text())["model"]
        counts[mode] = (model_info["trainable_parameters"], model_info["total_parameters"])
    # frozen: the head only (hidden 32: 32*32+32 + 32*2+2); full: everything but the unused contact head.
    assert counts["frozen"][0] == 32 * 32 + 32 + 32 * 2 + 2
    assert counts["frozen"][0] < counts["lora"][0] < counts["full"][0] < counts["full"][1]
    lora_dir = runs["lora"][0]
    adapter_config = json.loads((lora_dir / "adapter" / "adapter_config.json").read_text())
    assert set(adapter_config["target_modules"]) == {"query", "key", "value", "dense"}
    assert set(adapter_config["modules_to_save"]) == {"pooler", "classifier"}
    assert (lora_dir / "adapter" / "adapter_model.safetensors").is_file()
    merged = json.loads((lora_dir / "config.json").read_text())
    assert merged["architectures"] == ["EsmForLocalization"]  # merged, not a PEFT wrapper


def test_class_weights_balance_the_training_split():
    import numpy as np

    # 8 negatives, 2 positives: n / (k * n_c) = 10 / 16 and 10 / 4.
    assert balanced_class_weights(np.array([0] * 8 + [1] * 2), 2, multi_label=False) == [0.625, 2.5]
    # multi-label pos_weight = negatives / positives per label.
    multi_hot = np.array([[1, 0], [0, 0], [0, 1], [0, 1]], dtype=np.float32)
    assert balanced_class_weights(multi_hot, 2, multi_label=True) == [3.0, 1.0]


@pytest.mark.slow
def test_arguments_from_a_json_or_yaml_file(proteins_csv, tmp_path):
    arguments = {"from_scratch": "tiny", "train_file": str(proteins_csv), "output_dir": str(tmp_path / "out"),
                 "num_train_epochs": 1, "max_residues": 100, "seed": 7, "finetune": "frozen",
                 "num_examples_to_show": 0}
    config = tmp_path / "args.yaml"
    config.write_text("\n".join(f"{key}: {json.dumps(value)}" for key, value in arguments.items()))
    run_train([str(config)], cwd=tmp_path)
    run_info = json.loads((tmp_path / "out" / "run_info.json").read_text())
    assert run_info["training"]["seed"] == 7 and run_info["model"]["max_residues"] == 100
    assert json.loads((tmp_path / "out" / "config.json").read_text())["max_residues"] == 100


def test_a_hung_launch_fails_with_every_process_stack(tmp_path):
    # A launcher whose worker never ends: the failure must show where the worker waits, not only "timed out".
    worker = "import time\ndef waiting_for_a_peer():\n    time.sleep(600)\nwaiting_for_a_peer()\n"
    launcher = f"import subprocess, sys\nsubprocess.run([sys.executable, '-c', {worker!r}])\n"
    started = time.monotonic()
    with pytest.raises(pytest.fail.Exception, match=r"(?s)still running after 3 s.*in waiting_for_a_peer"):
        run_processes([sys.executable, "-c", launcher], cwd=tmp_path, env=train_env(), timeout=3)
    assert time.monotonic() - started < 60


@pytest.mark.slow
@pytest.mark.parametrize("launcher", ["torchrun", "accelerate"])
def test_two_process_ddp_produces_one_model(launcher, proteins_csv, tmp_path, elsewhere):
    port = "29500"  # the namespace is empty: any port is free there
    if launcher == "torchrun":
        command = loopback_only_namespace() + [sys.executable, "-m", "torch.distributed.run", "--nnodes", "1", "--nproc_per_node", "2",
                   "--master_addr", "127.0.0.1", "--master_port", port]
    else:
        command = loopback_only_namespace() + [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2",
                   "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no",
                   "--main_process_ip", "127.0.0.1", "--main_process_port", port]
    output_dir = tmp_path / "out"
    env = train_env(GLOO_SOCKET_IFNAME="lo", MASTER_ADDR="127.0.0.1")
    result = run_processes(
        command + [str(REPO / "train.py"), "--train_file", str(proteins_csv), "--output_dir", str(output_dir),
                   "--finetune", "full", "--use_cpu", *QUICK],
        cwd=elsewhere, env=env,
    )
    assert result.returncode == 0, distributed_failure(result)
    run_info = json.loads((output_dir / "run_info.json").read_text())
    assert run_info["training"]["world_size"] == 2
    assert (output_dir / "model.safetensors").is_file()
    assert result.stdout.count(f"Saved in {output_dir}/:") == 1  # the summary, from the main process only
    state = json.loads((output_dir / "trainer_state.json").read_text())
    # 112 training proteins, 16 per process and step, 2 processes: 4 steps an epoch, 8 in all (one process: 14).
    assert state["global_step"] == 8


@pytest.mark.slow
def test_killed_run_resumes_from_its_last_checkpoint(proteins_csv, tmp_path):
    output_dir = tmp_path / "out"
    args = ["--train_file", str(proteins_csv), "--output_dir", str(output_dir), "--finetune", "full",
            "--from_scratch", "tiny", "--max_residues", "200", "--per_device_train_batch_size", "4",
            "--max_steps", "120", "--save_strategy", "steps", "--save_steps", "10", "--eval_strategy", "steps",
            "--eval_steps", "10", "--logging_strategy", "steps", "--logging_steps", "10",
            "--save_total_limit", "3", "--num_examples_to_show", "0"]
    log = open(tmp_path / "first.log", "w")
    process = subprocess.Popen(TRAIN + args, cwd=tmp_path, env=train_env(), stdout=log, stderr=subprocess.STDOUT)
    try:
        deadline = time.time() + 300
        while not (output_dir / "checkpoint-20" / "trainer_state.json").is_file():
            assert process.poll() is None, (tmp_path / "first.log").read_text()[-5000:]
            assert time.time() < deadline, "no checkpoint within 5 minutes"
            time.sleep(0.2)
        process.send_signal(signal.SIGKILL)
        process.wait(timeout=60)
    finally:
        if process.poll() is None:
            process.kill()
    assert not (output_dir / "test_results.json").exists()  # it really was interrupted
    interrupted_at = max(int(p.name.split("-")[1]) for p in output_dir.glob("checkpoint-*")
                         if (p / "trainer_state.json").is_file())
    assert interrupted_at < 120

    result = run_train(args, cwd=tmp_path)
    assert f"Resuming from {output_dir / f'checkpoint-{interrupted_at}'}" in result.stdout + result.stderr
    state = json.loads((output_dir / "trainer_state.json").read_text())
    assert state["global_step"] == 120
    logged_steps = [entry["step"] for entry in state["log_history"] if "loss" in entry]
    assert logged_steps == list(range(10, 121, 10))  # the steps before the kill are kept, none repeated
    assert (output_dir / "test_results.json").is_file()


@pytest.mark.slow
@pytest.mark.parametrize("offline", [False, True])
def test_unreachable_hub_says_what_to_do(offline, proteins_csv, tmp_path):
    env = train_env(HF_ENDPOINT=f"http://127.0.0.1:{free_port()}", HF_HOME=str(tmp_path / "hf_home"))
    if not offline:
        env.pop("HF_HUB_OFFLINE")
    result = subprocess.run(
        TRAIN + ["--model_name_or_path", "facebook/esm2_t6_8M_UR50D", "--train_file", str(proteins_csv),
                 "--output_dir", str(tmp_path / "out")],
        cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300,
    )
    assert result.returncode != 0
    message = result.stderr
    assert "facebook/esm2_t6_8M_UR50D" in message
    for advice in ("HF_ENDPOINT", "git clone", "--model_name_or_path /path/to/esm2_t6_8M_UR50D", "--from_scratch"):
        assert advice in message, message[-3000:]
    assert "Traceback" not in message


@pytest.mark.slow
def test_missing_local_checkpoint_is_named(proteins_csv, tmp_path):
    result = subprocess.run(
        TRAIN + ["--model_name_or_path", str(tmp_path / "no_such_model"), "--train_file", str(proteins_csv),
                 "--output_dir", str(tmp_path / "out")],
        cwd=tmp_path, env=train_env(), capture_output=True, text=True, timeout=300,
    )
    assert result.returncode != 0
    assert f"{tmp_path / 'no_such_model'}: no such directory" in result.stderr


@pytest.fixture(scope="module")
def deeploc_csv(tmp_path_factory):
    """200 synthetic proteins in the DeepLoc 2.0 layout (multi-label), five homology partitions."""
    return write_deeploc_layout_csv(tmp_path_factory.mktemp("deeploc") / "deeploc.csv", n_rows=200, seed=5)


MULTI_LABEL_PREDICT = """
import json, torch
from transformers import AutoModelForSequenceClassification, AutoTokenizer
model = AutoModelForSequenceClassification.from_pretrained({path!r}, trust_remote_code=True).eval()
tokenizer = AutoTokenizer.from_pretrained({path!r}, trust_remote_code=True)
with torch.no_grad():
    logits = model(**tokenizer({sequences!r}, return_tensors="pt", padding=True)).logits
print(json.dumps(torch.sigmoid(logits).tolist()))
"""


@pytest.mark.slow
def test_multi_label_deeploc_run(deeploc_csv, tmp_path, elsewhere):
    from esmloc.data import LOCATIONS

    output_dir = tmp_path / "out"
    run_train(["--dataset_config", "deeploc", "--train_file", str(deeploc_csv), "--split_method", "partition",
               "--validation_partitions", "3", "--test_partitions", "4", "--output_dir", str(output_dir),
               "--finetune", "full", *QUICK], cwd=tmp_path)
    config = json.loads((output_dir / "config.json").read_text())
    assert config["problem_type"] == "multi_label_classification"
    assert [config["id2label"][str(i)] for i in range(10)] == list(LOCATIONS)
    assert len(config["class_weights"]) == 10  # BCE pos_weight per location, from the training split

    results = json.loads((output_dir / "test_results.json").read_text())
    for key in ("test_micro_f1", "test_macro_f1", "test_subset_accuracy", "test_jaccard", "test_macro_mcc_tuned",
                "test_mcc_Mitochondrion_tuned", "test_threshold_Cell_membrane_tuned", "validation_macro_mcc_tuned"):
        assert key in results, key
    assert (output_dir / "mcc_per_location.png").is_file()
    run_info = json.loads((output_dir / "run_info.json").read_text())
    assert run_info["data"]["split_sizes"] == {"train": 120, "validation": 40, "test": 40}  # partitions 0-2 / 3 / 4

    rows = read_predictions(output_dir / "test_predictions.csv")
    assert len(rows) == 40 and [f"probability_{name}" for name in LOCATIONS] == list(rows[0])[2:12]
    sequences_by_acc = {row["ACC"]: row["Sequence"] for row in read_predictions(deeploc_csv)}
    sequences = [sequences_by_acc[row["ACC"]] for row in rows[:8]]
    loaded = run_offline(MULTI_LABEL_PREDICT.format(path=str(output_dir), sequences=sequences), elsewhere, tmp_path)
    for row, probabilities in zip(rows, loaded):
        assert [float(row[f"probability_{name}"]) for name in LOCATIONS] == pytest.approx(probabilities, abs=1e-5)
