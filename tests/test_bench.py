"""The benchmark scripts still run (smoke mode: tiny model, a few proteins; not timed, no figures checked), and
write their tables for the documentation (bench/common.py's write_table)."""

import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from conftest import REPO, loopback_only_namespace


pytestmark = pytest.mark.slow  # each runs a benchmark script in a fresh process


def bench_common():
    spec = importlib.util.spec_from_file_location("bench_common", REPO / "bench" / "common.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_write_table_heads_the_table_with_command_date_machine_and_load(tmp_path, monkeypatch):
    common = bench_common()
    monkeypatch.setenv("ESMLOC_BENCH_TABLES", str(tmp_path))
    monkeypatch.setattr(sys, "argv", [str(REPO / "bench" / "example.py"), "--n", "8"])
    body = common.table(["variant", "seq/s"], [["engine", "12.50"]])
    path = common.write_table("example-8M", "Example: 8 proteins", body + "\n\nnote", other_load="others 0%")
    text = path.read_text()
    assert path == tmp_path / "example-8M.md" and not list(tmp_path.glob(".*.tmp"))
    lines = text.splitlines()
    assert "**Example: 8 proteins**" in lines
    assert "- command: `python bench/example.py --n 8`" in lines
    assert any(line.startswith("- date: 20") and line.endswith(" UTC") for line in lines)
    assert any(line.startswith("- machine: ") and "torch " in line for line in lines)
    assert any(line.startswith("- load: load average ") and line.endswith("; others 0%") for line in lines)
    assert "SMOKE" not in text and text.endswith("| engine | 12.50 |\n\nnote\n")


def test_a_smoke_run_says_so_and_never_replaces_a_measured_table(tmp_path, monkeypatch):
    common = bench_common()
    monkeypatch.setenv("ESMLOC_BENCH_TABLES", str(tmp_path))
    smoke = common.write_table("example", "Example", "| a |\n| --- |\n| 1 |", smoke=True)
    assert common.SMOKE_LINE in smoke.read_text()
    assert common.write_table("example", "Example", "| a |\n| --- |\n| 2 |", smoke=True) == smoke  # smoke over smoke
    measured = common.write_table("example", "Example", "| a |\n| --- |\n| 3 |")  # a measurement replaces it
    assert common.SMOKE_LINE not in measured.read_text()
    assert common.write_table("example", "Example", "| a |\n| --- |\n| 4 |", smoke=True) is None
    assert "| 3 |" in measured.read_text() and "| 4 |" not in measured.read_text()


@pytest.mark.parametrize("script", ["embedding_throughput.py", "frozen_training.py", "precision_accuracy.py",
                                    "engine_profile.py", "int8_candidates.py", "fork_question.py", "ddp_teardown.py",
                                    "explain_cost.py", "backbones.py"])
def test_bench_script_runs_in_smoke_mode(script, tmp_path):
    if script == "ddp_teardown.py":
        loopback_only_namespace()  # its 2-process runs need one
    if script == "fork_question.py" and subprocess.run(["git", "cat-file", "-e", "0d553df"], cwd=REPO,
                                                       capture_output=True).returncode != 0:
        pytest.skip("a shallow clone: the fork's commit is not here")
    extra = ["--work_dir", str(tmp_path / "work")] if script == "frozen_training.py" else []
    tables = tmp_path / "tables"
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_HOME": str(tmp_path / "hf_home"),
           "ESMLOC_BENCH_TABLES": str(tables)}
    result = subprocess.run([sys.executable, str(REPO / "bench" / script), "--smoke", *extra], cwd=tmp_path, env=env,
                            capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    assert "command: python bench/" in result.stdout
    table = [line for line in result.stdout.splitlines() if line.startswith("| ")]
    assert len(table) >= 3  # header + at least two measured rows
    written = list(tables.iterdir())  # the table for the documentation: the same rows, marked as a smoke run
    assert len(written) == 1 and written[0].name.startswith(Path(script).stem), written
    text = written[0].read_text()
    assert f"- command: `python bench/{script} --smoke" in text and "**run: SMOKE RUN**" in text
    assert [line for line in text.splitlines() if line.startswith("| ")] == table
    if script == "embedding_throughput.py":
        assert "% of compute bound" in table[0] and "x baseline" in table[0]
        variants = [line.split(" | ")[0][2:] for line in table[2:]]
        # Every precision by default, and the stock model on sorted, padded batches.
        assert {"engine", "engine, bf16", "sorted + token budget, EsmModel.forward"} <= set(variants)
        assert "low-precision peaks (GFLOP/s): bf16" in result.stdout
    elif script == "precision_accuracy.py":
        assert "max abs probability difference vs fp32" in table[0] and "test MCC" in table[0]
        assert {line.split(" | ")[1] for line in table[2:]} >= {"fp32", "bf16"}
        assert "qualifying on every model: fp32" in result.stdout
    elif script == "engine_profile.py":
        assert "linear layers" in table[0] and [line.split(" | ")[0][2:] for line in table[2:]] == [
            "fp32", "bf16", "int8"]
    elif script == "int8_candidates.py":
        assert {line.split(" | ")[1] for line in table[2:]} >= {"fp32, oneDNN", "int8, oneDNN qlinear (esmloc)"}
    elif script == "fork_question.py":
        assert [line.split(" | ")[0][2:] for line in table[2:]][0].startswith("PackedEsm (the fork")
        assert "for keeping it" in result.stdout
    elif script == "explain_cost.py":
        assert all(column in table[0] for column in ("forward passes", "GFLOP", "CPU s (own)",
                                                     "x faster than per-residue fp32", "other load"))
        methods = [line.split(" | ")[0][2:] for line in table[2:]]
        assert methods == ["per-residue occlusion (before), fp32",
                           "strided occlusion (esmloc.explain, default budget), fp32"]
        # The smoke protein has 300 residues: every one occluded before, windows every 2 residues now.
        assert [line.split(" | ")[3:5] for line in table[2:]] == [["5 / 1", "301"], ["5 / 2", "152"]]
        assert "stride by protein length: 100: 1 (window 5)" in result.stdout
    elif script == "ddp_teardown.py":  # a run and 2 cycles of each teardown order; the new ones ended (old ones may hang)
        runs, cycles = [[line.split(" | ") for line in table if line.startswith(("| old", "| new"))][i:i + 2]
                        for i in (0, 2)]
        assert [row[:2] for row in runs] == [["| old", "1"], ["| new", "1"]] and runs[1][2:4] == ["1", "0"]
        assert [row[0] for row in cycles] == ["| old", "| new"] and cycles[1][:5] == ["| new", "1", "2", "2", "0 |"]
    elif script == "frozen_training.py":
        assert "speed-up" in table[0] and "max abs difference" in result.stdout
    elif script == "backbones.py":  # both families, each at both default precisions, held to their compute bound
        assert all(column in table[0] for column in ("proteins / s", "GFLOP / protein", "% of compute bound"))
        assert [line.split(" | ")[0:4:3] for line in table[2:]] == [
            ["| ESM-2 tiny (`tiny`)", "fp32"], ["| ESM-2 tiny (`tiny`)", "bf16"],
            ["| ESM C tiny (`esmc_tiny`)", "fp32"], ["| ESM C tiny (`esmc_tiny`)", "bf16"]]
        assert all(line.split(" | ")[6].endswith("%") for line in table[2:])


@pytest.mark.parametrize("architecture", ["esm2_t33_650M", "esmc_300m"])
def test_the_flop_count_is_twice_the_layers_linear_weights_per_token_plus_attention(architecture):
    """bench/common.backbone_flops against the backbone itself: 2 FLOPs per weight of every linear layer of every
    transformer layer, per token (ESM C's SwiGLU has three feed-forward matrices, ESM-2 two), + attention 4*L^2*d."""
    import torch

    from configuration_esmloc import EsmLocConfig, backbone_config
    from modeling_esmloc import EsmForLocalization

    config = backbone_config(architecture)
    with torch.device("meta"):  # shapes only
        backbone = EsmForLocalization(EsmLocConfig(esm_config=config)).esm
    linear = sum(module.weight.numel() for name, module in backbone.named_modules()
                 if isinstance(module, torch.nn.Linear) and ("layer." in name or "layers." in name))
    tokens = 402
    expected = 2 * tokens * linear + config.num_hidden_layers * 4 * tokens**2 * config.hidden_size
    assert bench_common().backbone_flops([tokens], config) == expected


def test_gpu_check_runs_in_smoke_mode(tmp_path):
    """bench/gpu_check.py, the one script a GPU session runs, in its CPU smoke mode: the CUDA tests collected and
    skipped, the speed and fine-tuning benchmarks on a tiny model, everything in the output folder."""
    sys.path.insert(0, str(REPO / "bench"))
    import gpu_check

    # The docstring names the device tool's call that the code prints.
    assert gpu_check.DEVICE_COMMAND in " ".join(gpu_check.__doc__.split())
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_HOME": str(tmp_path / "hf_home")}
    out = tmp_path / "out"
    result = subprocess.run([sys.executable, str(REPO / "bench" / "gpu_check.py"), "--smoke", "--out", str(out)],
                            cwd=tmp_path, env=env, capture_output=True, text=True, timeout=1800)
    assert result.returncode == 0, result.stdout[-5000:] + result.stderr[-3000:]
    # What comes back from the device tool: at most 8 files, no folders.
    assert sorted(path.name for path in out.iterdir()) == ["finetune.log", "results.json", "speed.log", "summary.md",
                                                          "tests.log"]
    summary = (out / "summary.md").read_text()
    for section in ("tests", "speed", "finetune"):
        assert f"| {section} | ok |" in summary
    assert "no GPU" in summary and " skipped" in summary and " passed" not in summary  # collected, skipped here
    rows = {line.split(" | ")[0][2:]: line for line in summary.splitlines() if line.startswith("| (")}
    assert {"(a) stock, file order, batches of 8", "(b) stock, sorted, token budget", "(c) engine, padded",
            "(c) engine, nested", "(c) engine, flex", "(c) engine, varlen"} <= set(rows)
    assert "does not run here: varlen (flash attention) runs on CUDA only" in rows["(c) engine, varlen"]
    assert "failed" not in rows["(c) engine, flex"] and "failed" not in rows["(c) engine, nested"]
    assert "recommended esmloc.engine.DEFAULT_MAX_TOKENS_PER_BATCH['cuda']" in summary
    # Fine-tuning: the first row of each model and mode first, then the rest.
    assert [line.split(" | ")[:4] for line in summary.splitlines() if line.startswith("| tiny |")] == [
        ["| tiny", "lora", "yes", "512"], ["| tiny", "full", "no", "512"], ["| tiny", "full", "yes", "1024"]]
    results = json.loads((out / "results.json").read_text())
    assert {name: section["status"] for name, section in results["sections"].items()} == {
        "tests": "ok", "speed": "ok", "finetune": "ok"}
    assert results["speed"]["tiny"]["fastest_attention"] in ("padded", "nested", "flex")
    assert set(results["finetune"]["recommendations"]) == {"tiny lora", "tiny full"}
