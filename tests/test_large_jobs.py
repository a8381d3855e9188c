"""Large jobs (esmloc.jobs): several processes equal one, kill and resume, fingerprints, esmloc-embed."""

import json
import re
import shutil
import signal
import subprocess
import sys
import time

import numpy as np
import pandas as pd
import pytest
import torch

from esmloc import jobs, loading
from esmloc.commands.embed import main as embed_main
from esmloc.embeddings import read_residues
from esmloc.engine import Engine
from esmloc.commands.predict import main as predict_main
from esmloc.saving import save_model
from esmloc.sequences import read_sequences

from conftest import (REPO, assert_same_predictions, distributed_env, distributed_failure, loopback_only_namespace,
                      tiny_model, two_processes, write_proteins)


@pytest.fixture(scope="module")
def work(tmp_path_factory):
    root = tmp_path_factory.mktemp("large")
    save_model(tiny_model(max_residues=200), root / "model")
    save_model(tiny_model(seed=1, max_residues=200, pooling="attention"), root / "attention_model")
    write_proteins(root / "proteins.fasta")
    return root


def test_parts_are_dealt_out_by_tokens_in_contiguous_runs():
    # One long part and many short ones: by record count the first process would get 4x the work.
    assert jobs.assign_parts([400] + [50] * 8, 2) == [0, 1, 1, 1, 1, 1, 1, 1, 1]
    assert jobs.assign_parts([10] * 8, 2) == [0, 0, 0, 0, 1, 1, 1, 1]
    assert jobs.assign_parts([10] * 3, 4) == [0, 2, 3]  # more processes than parts: one idles
    assert [jobs.default_part_size(n) for n in (10, 2_000, 20_400, 60_000_000)] == [16, 16, 32, 4096]


@pytest.mark.slow
def test_two_processes_predict_what_one_process_predicts(work, tmp_path):
    one = tmp_path / "one.csv"
    assert predict_main([str(work / "model"), str(work / "proteins.fasta"), "-o", str(one), "--no_progress"]) == 0
    two = tmp_path / "two.csv"
    result = two_processes("torchrun", "esmloc.commands.predict", [work / "model", work / "proteins.fasta", "-o", two,
                                                          "--no_progress", "--chunk_size", "64"], cwd=tmp_path)
    log = result.stdout + result.stderr
    assert result.returncode == 0, distributed_failure(result)
    assert "240 proteins in 15 parts of 16, 2 process(es)" in log
    assert log.count("Wrote 240 predictions") == 1 and "record ID(s) occur more than once" in log
    shares = [int(parts) for parts in re.findall(r"process \d: (\d+) parts", log)]
    assert len(shares) == 2 and sum(shares) == 15 and min(shares) >= 5  # both worked, on about equal token shares
    assert_same_predictions(two, one)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["one.csv", "two.csv"]  # parts merged and removed


def test_repeated_sequences_are_found_with_their_first_record():
    from array import array

    high, low = array("Q"), array("Q")
    for sequence in "MKV MW MKV MA MW MKV MAA MA".split():
        digest = jobs.sequence_digest(sequence)
        high.append(digest[0])
        low.append(digest[1])
    repeats, repeat_of = jobs.find_repeats(high, low)
    assert repeats.tolist() == [2, 4, 5, 7] and repeat_of.tolist() == [0, 1, 0, 3]


@pytest.mark.slow
def test_two_processes_embed_what_one_process_and_the_engine_embed(work, tmp_path, monkeypatch):
    args = [work / "attention_model", work / "proteins.fasta", "--no_progress", "--chunk_size", "40"]
    residue_args = ["--per_residue", tmp_path / "residues", "--per_residue_dtype", "float32"]
    result = two_processes("accelerate", "esmloc.commands.embed", args + ["-o", tmp_path / "two.parquet", *residue_args],
                           cwd=tmp_path)
    assert result.returncode == 0, distributed_failure(result)
    assert "2 process(es)" in result.stderr and "attention pooling" in result.stderr
    assert "6 record(s) repeat the sequence of an earlier record" in result.stderr
    # Each distinct sequence is embedded once in the whole job: the repeats lie in other windows of 40 records.
    embedded = []
    encode = Engine.encode
    monkeypatch.setattr(Engine, "encode", lambda self, sequences: embedded.extend(sequences) or encode(self, sequences))
    assert embed_main([str(a) for a in args] + ["-o", str(tmp_path / "one.parquet")]) == 0
    distinct = {record.sequence for record in read_sequences(work / "proteins.fasta")}
    assert len(embedded) == len(distinct) == 234
    monkeypatch.undo()
    assert embed_main([str(a) for a in args] + ["-o", str(tmp_path / "mean.parquet"), "--pooling", "mean"]) == 0

    two, one = pd.read_parquet(tmp_path / "two.parquet"), pd.read_parquet(tmp_path / "one.parquet")
    records = list(read_sequences(work / "proteins.fasta"))
    assert list(two.ACC) == list(one.ACC) == [record.acc for record in records]  # order and repeats
    assert list(two.sequence_sha256) == list(one.sequence_sha256)
    np.testing.assert_allclose(np.stack(two.embedding.to_numpy()), np.stack(one.embedding.to_numpy()), atol=1e-5)

    model, tokenizer = loading.load_model_dir(work / "attention_model")
    engine = Engine(model, tokenizer, progress=False)
    sequences = [record.sequence for record in records]
    mean = pd.read_parquet(tmp_path / "mean.parquet")
    np.testing.assert_allclose(np.stack(mean.embedding.to_numpy()), engine.embed(sequences, kind="mean"), atol=1e-5)
    # Attention pooling is the model's own pooler, on the states its prediction head sees.
    expected = []
    with torch.inference_mode():
        for sequence in sequences[:20]:
            encoded = tokenizer([sequence], return_tensors="pt")
            states = model.esm(**encoded).last_hidden_state
            expected.append(model.pooler(states, encoded["attention_mask"])[0][0].numpy())
    np.testing.assert_allclose(np.stack(two.embedding.to_numpy()[:20]), np.stack(expected), atol=1e-5)

    # Per-residue states: one entry per distinct sequence, cropped as the model says, equal to the engine's.
    index = json.loads((tmp_path / "residues" / "index.json").read_text())["weight_map"]
    assert set(index) == set(two.sequence_sha256) and len(index) < len(two)
    residues = engine.embed(sequences, kind="residues")
    assert max(len(states) for states in residues) == 200 < max(len(s) for s in sequences)
    for key, states in list(zip(two.sequence_sha256, residues))[:40]:
        np.testing.assert_allclose(read_residues(tmp_path / "residues", key), states, atol=1e-5)

    import datasets

    loaded = datasets.load_dataset("parquet", data_files=str(tmp_path / "two.parquet"), split="train",
                                   cache_dir=str(tmp_path / "hf"))
    assert loaded.num_rows == 240 and len(loaded[0]["embedding"]) == model.esm.config.hidden_size


@pytest.mark.slow
def test_a_bad_record_in_the_second_share_stops_both_processes_with_one_message(work, tmp_path):
    bad = write_proteins(tmp_path / "bad.fasta", bad_at=230)  # near the end: the second process's share
    output = tmp_path / "out.csv"
    result = two_processes("torchrun", "esmloc.commands.predict", [work / "model", bad, "-o", output, "--no_progress"],
                           cwd=tmp_path)
    assert result.returncode != 0
    log = result.stdout + result.stderr
    assert log.count("esmloc-predict: error") == 1, log[-5000:]
    assert f"{bad}, line {2 * 230 + 1}, ACC 'A00230'" in log and "'1' at position 6" in log
    assert sorted(p.name for p in tmp_path.iterdir()) == ["bad.fasta"]  # nothing written, no parts


def run_until_parts_exist(command, parts_dir, minimum, log_path):
    with open(log_path, "w") as log:
        process = subprocess.Popen(command, env=distributed_env(), stdout=log, stderr=subprocess.STDOUT)
        try:
            deadline = time.time() + 300
            while len(list(parts_dir.glob("part-*.csv"))) < minimum:
                assert process.poll() is None, log_path.read_text()[-5000:]
                assert time.time() < deadline, "no parts within 5 minutes"
                time.sleep(0.05)
            process.send_signal(signal.SIGKILL)
            process.wait(timeout=60)
        finally:
            if process.poll() is None:
                process.kill()


@pytest.mark.slow
def test_a_killed_job_resumes_and_a_changed_model_discards_old_parts(work, tmp_path, capsys):
    proteins = write_proteins(tmp_path / "many.fasta", n=1600, seed=5)
    model_dir = tmp_path / "model"
    shutil.copytree(work / "model", model_dir)
    output, parts = tmp_path / "out.csv", tmp_path / "out.csv.parts"
    args = [str(model_dir), str(proteins), "-o", str(output), "--no_progress", "--resumable", "--chunk_size", "16"]
    run_until_parts_exist([sys.executable, "-m", "esmloc.commands.predict", *args], parts, 5, tmp_path / "killed.log")
    assert not output.exists()
    done = len(list(parts.glob("part-*.csv")))
    assert 5 <= done < 100  # interrupted: 1600 records are 100 parts of 16
    saved = tmp_path / "saved.parts"
    shutil.copytree(parts, saved)

    capsys.readouterr()
    assert predict_main(args) == 0
    assert f"Resuming from {parts}: {done} of 100 parts already done" in capsys.readouterr().err
    uninterrupted = tmp_path / "uninterrupted.csv"
    assert predict_main([str(model_dir), str(proteins), "-o", str(uninterrupted), "--no_progress"]) == 0
    assert_same_predictions(output, uninterrupted)
    assert not parts.exists()

    # The same parts, but the model changed since: they are discarded, never mixed into the new output.
    shutil.copytree(saved, parts)
    shutil.rmtree(model_dir)
    save_model(tiny_model(seed=2, max_residues=200), model_dir)
    assert predict_main(args) == 0
    assert "holds parts of an earlier run with a different model_weights: discarding them" in capsys.readouterr().err
    assert predict_main([str(model_dir), str(proteins), "-o", str(uninterrupted), "--no_progress"]) == 0
    assert_same_predictions(output, uninterrupted)


@pytest.mark.slow
def test_the_benchmark_runs_in_smoke_mode(tmp_path):
    loopback_only_namespace()  # its 2-process runs need one
    result = subprocess.run([sys.executable, str(REPO / "bench" / "large_jobs.py"), "--smoke"], cwd=tmp_path,
                            env=distributed_env(HF_HOME=str(tmp_path / "hf_home")), capture_output=True, text=True,
                            timeout=600)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    assert "command: python bench/large_jobs.py --smoke" in result.stdout
    assert "same rows in the same order: True" in result.stdout and "PROJECTION (arithmetic" in result.stdout
    table = [line for line in result.stdout.splitlines() if line.startswith("| 2 processes")]
    assert len(table) == 1


def test_embed_takes_a_stock_esm2_checkpoint(work, tmp_path):
    from transformers import EsmConfig, EsmForMaskedLM

    from configuration_esmloc import ESM2_ARCHITECTURES
    from modeling_esmloc import EsmForLocalization
    from esmloc.saving import tokenizer_for

    torch.manual_seed(3)
    EsmForMaskedLM(EsmConfig(**ESM2_ARCHITECTURES["tiny"])).save_pretrained(tmp_path / "esm2")
    output = tmp_path / "stock.parquet"
    assert embed_main([str(tmp_path / "esm2"), str(work / "proteins.fasta"), "-o", str(output), "--no_progress",
                       "--pooling", "cls"]) == 0
    model = EsmForLocalization.from_esm(tmp_path / "esm2").eval()
    sequences = [record.sequence for record in read_sequences(work / "proteins.fasta")]
    expected = Engine(model, tokenizer_for(model.config), progress=False).embed(sequences, kind="cls")
    np.testing.assert_allclose(np.stack(pd.read_parquet(output).embedding.to_numpy()), expected, atol=1e-5)
    assert embed_main([str(tmp_path / "esm2"), str(work / "proteins.fasta"), "-o", str(output),
                       "--pooling", "attention"]) == 2  # a stock checkpoint has no trained attention pooler
