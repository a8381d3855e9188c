"""esmloc-pretrain: ESM-2's masking recipe, random crops, the held-out set, runs that resume (and refuse to mix),
a two-process run, the saved model loading through every route, and bench/accuracy.py's guard against pretraining
on held-out partitions."""

import importlib.util
import json
import random
import signal
import subprocess
import sys
import time

import numpy as np
import pytest
import torch
from transformers import DataCollatorForTokenClassification

from esmloc import mlm
from esmloc.commands import pretrain
from esmloc.sequences import DataValidationError
from tokenization_esmloc import EsmLocTokenizer

from conftest import (
    REPO, distributed_failure, loopback_only_namespace, run_offline, run_processes, train_env, write_deeploc_layout_csv,
)


PRETRAIN = [sys.executable, "-m", "esmloc.commands.pretrain"]
QUICK = ["--from_scratch", "tiny", "--max_residues", "60", "--learning_rate", "3e-3", "--validation_fraction", "0.1",
         "--disable_tqdm", "true"]
BATCH_8 = ["--per_device_train_batch_size", "8"]
AMINO_ACIDS = mlm.STANDARD_AMINO_ACIDS


def random_proteins(n: int, seed: int, low: int = 20, high: int = 150) -> list[str]:
    rng = random.Random(seed)
    return ["M" + "".join(rng.choice(AMINO_ACIDS) for _ in range(rng.randint(low, high))) for _ in range(n)]


def write_fasta(path, sequences, prefix="P"):
    path.write_text("".join(f">{prefix}{i}\n{s}\n" for i, s in enumerate(sequences)))
    return path


def run_pretrain(args, cwd, env=None, expect_ok=True, timeout=600) -> subprocess.CompletedProcess:
    result = subprocess.run(PRETRAIN + args, cwd=cwd, env=env or train_env(), capture_output=True, text=True,
                            timeout=timeout)
    if expect_ok and result.returncode != 0:
        raise AssertionError(f"esmloc-pretrain failed ({result.returncode}):\n{result.stdout[-5000:]}\n"
                             f"{result.stderr[-5000:]}")
    return result


# ------------------------------------------------------------------------------------------------ masking


def masked_batch(proteins, seed):
    """The proteins tokenised, masked (one generator each) and padded as the Trainer gets them; and the original
    tokens, padded."""
    tokenizer = EsmLocTokenizer()
    masking = mlm.ResidueMasking(tokenizer)
    examples = []
    for index, protein in enumerate(proteins):
        masked, labels = masking(tokenizer(protein)["input_ids"], np.random.default_rng([seed, index]))
        examples.append({"input_ids": masked, "labels": labels})
    batch = DataCollatorForTokenClassification(tokenizer)(examples)
    original = torch.nn.utils.rnn.pad_sequence([torch.tensor(tokenizer(p)["input_ids"]) for p in proteins],
                                               batch_first=True, padding_value=tokenizer.pad_token_id)
    return tokenizer, batch, original


def test_masking_follows_esm2_recipe_and_never_touches_special_tokens():
    tokenizer, batch, original = masked_batch(random_proteins(300, seed=1, low=50, high=400), seed=0)
    inputs, labels = batch["input_ids"], batch["labels"]
    special = torch.isin(original, torch.tensor(tokenizer.all_special_ids))  # <cls>, <eos> and all the padding
    assert (original == tokenizer.pad_token_id).sum() > 10_000  # the batch really holds padding

    selected = labels != -100
    assert not (selected & special).any()
    assert torch.equal(inputs[special], original[special])
    assert torch.equal(labels[selected], original[selected])
    residues = int((~special).sum())
    assert residues > 60_000
    assert selected.sum() / residues == pytest.approx(0.15, abs=0.005)
    # Of the selected: 80% <mask>, 10% a random standard amino acid (a twentieth of which is the original one),
    # 10% unchanged.
    n = int(selected.sum())
    masked = inputs[selected] == tokenizer.mask_token_id
    unchanged = inputs[selected] == original[selected]
    replaced = ~masked & ~unchanged
    assert masked.sum() / n == pytest.approx(0.8, abs=0.015)
    assert replaced.sum() / n == pytest.approx(0.1 * 19 / 20, abs=0.01)
    assert unchanged.sum() / n == pytest.approx(0.1 + 0.1 / 20, abs=0.01)
    # Random replacements are standard amino acids only (transformers' DataCollatorForLanguageModeling draws from the
    # whole vocabulary: <cls>, <pad>, <eos>, <unk>, <mask>, gaps, X...).
    drawn = set(tokenizer.convert_ids_to_tokens(inputs[selected][replaced].tolist()))
    assert drawn <= set(AMINO_ACIDS) and len(drawn) == 20
    # Unselected residues are left alone.
    assert torch.equal(inputs[~selected], original[~selected])
    # The masks are a function of the generator each protein gets: the same seed, the same masks.
    assert torch.equal(masked_batch(random_proteins(300, seed=1, low=50, high=400), seed=0)[1]["input_ids"], inputs)


def unmasked(example, tokenizer) -> str:
    ids = [label if label != -100 else token for token, label in zip(example["input_ids"], example["labels"])]
    return "".join(tokenizer.convert_ids_to_tokens(ids[1:-1]))


def test_crops_and_masks_move_every_epoch_and_are_seeded():
    tokenizer = EsmLocTokenizer()
    masking = mlm.ResidueMasking(tokenizer)
    rng = random.Random(4)
    long_protein = "".join(rng.choice(AMINO_ACIDS) for _ in range(500))
    dataset = mlm.MaskedProteinDataset([long_protein, "MKVLAAGIVG"], tokenizer, masking, max_residues=50, seed=7)

    def draw(epoch, index=0):
        dataset.set_epoch(epoch)
        example = dataset[index]
        assert example["input_ids"][0] == tokenizer.cls_token_id and example["input_ids"][-1] == tokenizer.eos_token_id
        return example

    examples = [draw(epoch) for epoch in range(6)]
    windows = [unmasked(example, tokenizer) for example in examples]
    assert all(len(w) == 50 and w in long_protein for w in windows)
    assert len(set(windows)) == 6
    assert len({tuple(e["labels"]) for e in examples}) == 6
    assert draw(2) == examples[2]  # drawn again: the same window and masks (what a resumed run relies on)
    other_seed = mlm.MaskedProteinDataset([long_protein], tokenizer, masking, max_residues=50, seed=8)
    assert unmasked(other_seed[0], tokenizer) != windows[0]
    assert unmasked(draw(0, index=1), tokenizer) == "MKVLAAGIVG"  # short: never cropped
    held_out = dataset.fixed()
    assert held_out == dataset.fixed() and len(held_out) == 2


def test_identical_sequences_are_read_once_and_bad_records_named(tmp_path):
    fasta = write_fasta(tmp_path / "a.fasta", ["MKVL", "MKVL", "acdef"])
    csv_file = tmp_path / "b.csv"
    csv_file.write_text("ACC,Sequence\nQ1,MKVL\nQ2,MWWW\n")
    sequences, summary = mlm.read_unique_sequences([fasta, csv_file])
    assert sequences == ["MKVL", "ACDEF", "MWWW"]
    assert summary["files"] == [{"file": "a.fasta", "records": 3, "new_sequences": 2},
                                {"file": "b.csv", "records": 2, "new_sequences": 1}]
    bad = tmp_path / "bad.csv"
    bad.write_text("ACC,Sequence\nQ1,MKVL\nQ9,MK1L\n")
    with pytest.raises(DataValidationError, match=r"bad.csv, line 3, ACC 'Q9'.*'1' at position 3"):
        mlm.read_unique_sequences([bad])


def test_held_out_proteins_depend_on_sequences_and_seed_only():
    proteins = random_proteins(200, seed=5)
    train, held = mlm.hold_out(proteins, 0.1, None, seed=1)
    assert len(held) == 20 and not set(train) & set(held) and len(train) + len(held) == 200
    assert mlm.hold_out(list(reversed(proteins)), 0.1, None, seed=1)[1] == list(reversed(held))
    assert set(mlm.hold_out(proteins, 0.1, None, seed=2)[1]) != set(held)
    assert len(mlm.hold_out(proteins, 0.1, 5, seed=1)[1]) == 5


# ------------------------------------------------------------------------------------------------ runs


@pytest.fixture(scope="module")
def proteins_fasta(tmp_path_factory):
    return write_fasta(tmp_path_factory.mktemp("data") / "proteins.fasta", random_proteins(160, seed=6))


@pytest.fixture(scope="module")
def pretrained(proteins_fasta, tmp_path_factory):
    """One short pretraining run, shared by the tests below."""
    output_dir = tmp_path_factory.mktemp("pretrained") / "esm_tiny_mlm"
    result = run_pretrain(["--train_files", str(proteins_fasta), str(proteins_fasta), "--output_dir", str(output_dir),
                           "--max_steps", "40", "--eval_steps", "20", "--save_steps", "20", "--logging_steps", "10",
                           *QUICK, *BATCH_8], cwd=tmp_path_factory.mktemp("cwd"))
    return output_dir, result.stdout + result.stderr


@pytest.mark.slow
def test_run_reports_held_out_perplexity_and_leaves_a_card(pretrained):
    output_dir, log = pretrained
    for name in ("config.json", "model.safetensors", "tokenizer_config.json", "vocab.txt", "tokenization_esmloc.py",
                 "README.md", "perplexity_curve.png", "initial_eval_results.json", "eval_results.json",
                 "pretrain_data.json", "esmloc_run.json"):
        assert (output_dir / name).is_file(), name
    before = json.loads((output_dir / "initial_eval_results.json").read_text())
    after = json.loads((output_dir / "eval_results.json").read_text())
    assert after["eval_perplexity"] < before["initial_eval_perplexity"]
    assert 0 <= after["eval_masked_accuracy"] <= 1 and after["eval_masked_tokens"] > 100
    state = json.loads((output_dir / "trainer_state.json").read_text())
    assert [e["step"] for e in state["log_history"] if "eval_perplexity" in e] == [20, 40, 40]  # 2 + the final one
    data_summary = json.loads((output_dir / "pretrain_data.json").read_text())
    assert data_summary["files"][1]["new_sequences"] == 0  # the same file twice: its proteins once
    assert data_summary["train"]["proteins"] + data_summary["held_out"]["proteins"] == 160
    assert data_summary["held_out"]["proteins"] == 16
    card = (output_dir / "README.md").read_text()
    assert "pipeline_tag: fill-mask" in card and "perplexity_curve.png" in card
    assert f"{before['initial_eval_perplexity']:.3f}" in card and f"{after['eval_perplexity']:.3f}" in card
    assert "144 distinct proteins" in card


LOAD_THREE_WAYS = """
import json, torch
from transformers import AutoTokenizer, EsmForMaskedLM
from modeling_esmloc import EsmForLocalization
path = {path!r}
mlm = EsmForMaskedLM.from_pretrained(path).eval()
tokenizer = AutoTokenizer.from_pretrained(path, trust_remote_code=True)
localization = EsmForLocalization.from_esm(path).eval()
encoded = tokenizer(["MKTAYIAKQRQISFVKSHFSRQ", "MLRTSSLFTRRVQPSLFSRN"], return_tensors="pt", padding=True)
with torch.no_grad():
    states_mlm = mlm.esm(**encoded).last_hidden_state
    states_loc = localization.esm(**encoded).last_hidden_state
    masked = encoded["input_ids"].clone(); masked[0, 3] = tokenizer.mask_token_id
    top = mlm(input_ids=masked, attention_mask=encoded["attention_mask"]).logits[0, 3].argmax().item()
print(json.dumps({{"difference": (states_mlm - states_loc).abs().max().item(), "tokenizer": type(tokenizer).__name__,
                  "top": tokenizer.convert_ids_to_tokens(top), "base": localization.config.esm_name_or_path}}))
"""


@pytest.mark.slow
def test_saved_model_loads_offline_through_every_route(pretrained, tmp_path, elsewhere):
    output_dir, _ = pretrained
    loaded = run_offline(LOAD_THREE_WAYS.format(path=str(output_dir)), elsewhere, tmp_path)
    assert loaded["difference"] < 1e-5 and loaded["tokenizer"] == "EsmLocTokenizer"
    assert loaded["base"] == str(output_dir) and loaded["top"] in AMINO_ACIDS + "XBUZO"

    # train.py starts from it (the backbone weights are the pretrained ones; the head is new).
    from esmloc.demo import write_demo_csv

    csv_file = write_demo_csv(tmp_path / "labelled.csv", n_rows=80, seed=1)
    out = tmp_path / "finetuned"
    result = subprocess.run([sys.executable, str(REPO / "train.py"), "--model_name_or_path", str(output_dir),
                             "--train_file", str(csv_file), "--output_dir", str(out), "--finetune", "frozen",
                             "--num_train_epochs", "1", "--max_residues", "60", "--num_examples_to_show", "0"],
                            cwd=elsewhere, env=train_env(), capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    from safetensors.torch import load_file

    pretrained_weights, finetuned = load_file(output_dir / "model.safetensors"), load_file(out / "model.safetensors")
    key = "esm.encoder.layer.0.attention.self.query.weight"
    assert torch.equal(pretrained_weights[key], finetuned[key])
    assert json.loads((out / "config.json").read_text())["esm_name_or_path"] == str(output_dir)


@pytest.mark.slow
def test_rerun_with_other_data_or_settings_refuses(proteins_fasta, tmp_path, monkeypatch, capsys):
    output_dir = tmp_path / "out"
    args = ["--output_dir", str(output_dir), "--max_steps", "6", "--save_steps", "3", "--eval_steps", "3", *QUICK, *BATCH_8]
    run_pretrain(["--train_files", str(proteins_fasta), *args], cwd=tmp_path)
    record = (output_dir / "esmloc_run.json").read_text()
    assert json.loads(record)["finished"] is True

    # (The same command resuming is test_killed_run_resumes_...; these stop before any training, in this process.)
    monkeypatch.delenv("WORLD_SIZE", raising=False)
    other = write_fasta(tmp_path / "other.fasta", random_proteins(100, seed=9))
    for changed, named in ((["--train_files", str(other), *args], "train_sequences.sha256"),
                           (["--train_files", str(proteins_fasta), *args, "--mlm_probability", "0.2"], "masking"),
                           (["--train_files", str(proteins_fasta), *args, "--learning_rate", "1e-3"],
                            "optimiser.learning_rate"),
                           (["--train_files", str(proteins_fasta), *args, "--resume_from_checkpoint",
                             str(tmp_path / "elsewhere" / "checkpoint-3")], "has no esmloc run record")):
        assert pretrain.main(changed) == 2
        error = capsys.readouterr().err
        assert "esmloc-pretrain: error:" in error and named in error, error
    assert (output_dir / "esmloc_run.json").read_text() == record
    assert sorted(path.name for path in output_dir.glob("checkpoint-*")) == ["checkpoint-3", "checkpoint-6"]
    # The same finished run again: nothing to do, nothing touched.
    weights = (output_dir / "model.safetensors").read_bytes()
    assert pretrain.main(["--train_files", str(proteins_fasta), *args]) == 0
    assert (output_dir / "model.safetensors").read_bytes() == weights


@pytest.mark.slow
def test_killed_run_resumes_and_ends_where_an_uninterrupted_one_does(proteins_fasta, tmp_path):
    args = ["--train_files", str(proteins_fasta), "--max_steps", "60", "--save_steps", "10", "--eval_steps", "30",
            "--logging_steps", "10", "--save_total_limit", "3", "--per_device_train_batch_size", "4", *QUICK]
    straight = tmp_path / "straight"
    run_pretrain([*args, "--output_dir", str(straight)], cwd=tmp_path)

    output_dir = tmp_path / "interrupted"
    log = open(tmp_path / "first.log", "w")
    process = subprocess.Popen(PRETRAIN + [*args, "--output_dir", str(output_dir)], cwd=tmp_path, env=train_env(),
                               stdout=log, stderr=subprocess.STDOUT)
    try:
        deadline = time.time() + 300
        while not (output_dir / "checkpoint-20" / "trainer_state.json").is_file():
            assert process.poll() is None, (tmp_path / "first.log").read_text()[-5000:]
            assert time.time() < deadline, "no checkpoint within 5 minutes"
            time.sleep(0.1)
        process.send_signal(signal.SIGKILL)
        process.wait(timeout=60)
    finally:
        if process.poll() is None:
            process.kill()
    assert not (output_dir / "model.safetensors").exists()  # it really was interrupted
    interrupted_at = max(int(p.name.split("-")[1]) for p in output_dir.glob("checkpoint-*")
                         if (p / "trainer_state.json").is_file())
    assert interrupted_at < 60

    result = run_pretrain([*args, "--output_dir", str(output_dir)], cwd=tmp_path)
    assert f"Resuming from {output_dir / f'checkpoint-{interrupted_at}'}" in result.stdout + result.stderr
    state = json.loads((output_dir / "trainer_state.json").read_text())
    assert state["global_step"] == 60
    assert [e["step"] for e in state["log_history"] if "loss" in e] == list(range(10, 61, 10))
    # The crops and masks (seeded per protein and epoch) and the order (global RNG, restored from the checkpoint):
    # the resumed run replays the uninterrupted one.
    from safetensors.torch import load_file

    resumed, uninterrupted = load_file(output_dir / "model.safetensors"), load_file(straight / "model.safetensors")
    assert max((resumed[k] - uninterrupted[k]).abs().max().item() for k in resumed) < 1e-5
    before = [json.loads((run / "initial_eval_results.json").read_text()) for run in (output_dir, straight)]
    assert before[0]["initial_eval_perplexity"] == before[1]["initial_eval_perplexity"]  # written once, kept


@pytest.mark.slow
def test_two_process_run_produces_one_model(proteins_fasta, tmp_path, elsewhere):
    command = loopback_only_namespace() + [sys.executable, "-m", "torch.distributed.run", "--nnodes", "1",
                                           "--nproc_per_node", "2", "--master_addr", "127.0.0.1",
                                           "--master_port", "29500", "-m", "esmloc.commands.pretrain"]
    output_dir = tmp_path / "out"
    result = run_processes(
        command + ["--train_files", str(proteins_fasta), "--output_dir", str(output_dir), "--use_cpu",
                   "--num_train_epochs", "2", "--eval_steps", "5", "--save_steps", "5", *QUICK, *BATCH_8],
        cwd=elsewhere, env=train_env(GLOO_SOCKET_IFNAME="lo", MASTER_ADDR="127.0.0.1"),
    )
    assert result.returncode == 0, distributed_failure(result)
    log = result.stdout + result.stderr
    assert log.count("Masked language model, metrics, perplexity curve and model card saved") == 1
    state = json.loads((output_dir / "trainer_state.json").read_text())
    # 144 training proteins, 8 per process and step, 2 processes: 9 steps an epoch, 18 in all (one process: 36).
    assert state["global_step"] == 18
    assert json.loads((output_dir / "esmloc_run.json").read_text())["total_batch_size"] == 16
    assert (output_dir / "model.safetensors").is_file() and (output_dir / "eval_results.json").is_file()


# ------------------------------------------------------------------------------------------------ the benchmark


@pytest.fixture(scope="module")
def accuracy():
    spec = importlib.util.spec_from_file_location("bench_accuracy", REPO / "bench" / "accuracy.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_benchmark_refuses_to_pretrain_on_held_out_partitions(accuracy, tmp_path):
    data_file = write_deeploc_layout_csv(tmp_path / "deeploc.csv", n_rows=100, seed=3)
    import pandas as pd

    frame = pd.read_csv(data_file)
    held_out = accuracy.held_out_sequences(data_file, [3, 4])
    assert len(held_out) == int(frame["Partition"].isin([3, 4]).sum())

    clean = tmp_path / "clean.csv"
    frame[frame["Partition"] <= 2][["ACC", "Sequence"]].to_csv(clean, index=False)
    assert accuracy.check_no_held_out(clean, held_out, [3, 4]) == int((frame["Partition"] <= 2).sum())

    leaky = tmp_path / "leaky.csv"
    leaked_row = frame[frame["Partition"] == 4].iloc[0]
    rows = pd.concat([frame[frame["Partition"] <= 2], frame[frame["Partition"] == 4].iloc[:1]])
    rows = rows.assign(ACC=[*rows["ACC"][:-1], "RENAMED"])  # the same protein under another name
    rows[["ACC", "Sequence"]].to_csv(leaky, index=False)
    with pytest.raises(accuracy.LeakageError, match=f"RENAMED \\(the sequence of {leaked_row['ACC']}\\)"):
        accuracy.check_no_held_out(leaky, held_out, [3, 4])


@pytest.mark.slow
def test_benchmark_pretrain_mode_smoke(tmp_path):
    data_file = write_deeploc_layout_csv(tmp_path / "deeploc.csv", n_rows=300, seed=11)
    output_dir = tmp_path / "results"
    env = train_env()
    result = subprocess.run([sys.executable, str(REPO / "bench" / "accuracy.py"), "--smoke", "--pretrain", "--data",
                             str(data_file), "--output_dir", str(output_dir), "--setups", "pretrain_frozen"],
                            cwd=tmp_path, env=env, capture_output=True, text=True, timeout=900)
    assert result.returncode == 0, result.stdout[-4000:] + result.stderr[-4000:]
    assert "python -m esmloc.commands.pretrain --from_scratch tiny" in result.stdout
    assert "none of partitions [3, 4] (checked)" in result.stdout
    row = "esmloc, ESM-2 `tiny` pretrained here (MLM on the training partitions), frozen"
    line = next(line for line in result.stdout.splitlines() if line.startswith(f"| {row} |"))
    assert float(line.split("|")[2]) <= 1.0
    assert "held-out perplexity before → after" in result.stdout
    results = json.loads((output_dir / "accuracy.json").read_text())
    info = results["pretraining"]["test4"]
    assert info["steps"] == 20 and info["perplexity_after"] < info["perplexity_before"]
    # Pretrained on the training partitions' proteins, all of them and nothing else.
    import pandas as pd

    smoke = pd.read_csv(output_dir / "smoke_data.csv")
    pretraining = pd.read_csv(output_dir / "pretraining" / "fold4" / "pretraining_proteins.csv")
    assert set(pretraining["Sequence"]) == set(smoke.loc[smoke["Partition"] <= 2, "Sequence"])
    frozen = results["tasks"]["mitochondrion"]["rows"][0]
    assert f"--model_name_or_path {output_dir / 'pretraining' / 'fold4' / 'backbone'}" in frozen["commands"][0]
