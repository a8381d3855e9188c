"""Shared test helpers: tiny random-weight ESM models and fresh offline processes."""

import csv
import json
import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from configuration_esmloc import ESM2_ARCHITECTURES, EsmLocConfig
from modeling_esmloc import EsmForLocalization


REPO = Path(__file__).resolve().parents[1]
DEEPLOC_CSV = REPO.parent / "shared" / "data" / "deeploc2_swissprot.csv"

PROTEINS = [
    "MLRTSSLFTRRVQPSLFSRNILRLQSTAAIPKAGLEVSSGK",
    "mktayiakqrqisfvkshfsrqleerlglieVQAPILSRVGDGTQDNLSGAEKAVQVKVKALPDAQFEVVHSLAKWKRQTLGQHDFSAGEGLYTHMKALRPDEDRLSPLHSVYVDQWDWERVMGDGERQFSTLKSTVEAIWAGIKATEAAVSEEFGLAPFLPDQIHFVHSQELLSRYPDLDAKGRERAIAKDLGAVFLVGIGGKLSDGHRHDVRAPDYDDWSTPSELGHAGLNGDILVWNPVLEDAFELSSMGIRVDADTLKHQLALTGDEDRLELEWHQALLRGEMPQTIGGGIGQSRLTMLLLQLPHFDDVHQD",
    "MSE",
    "MADEEKLPPGWEKRMSRSSGRVYYFNHITNASQWERPSG",
]


def tiny_config(**kwargs) -> EsmLocConfig:
    """The tiny ESM-2-shaped architecture (2 layers, 32 hidden) with the head options given."""
    return EsmLocConfig(esm_config=dict(ESM2_ARCHITECTURES["tiny"]), **kwargs)


def tiny_model(seed: int = 0, **kwargs) -> EsmForLocalization:
    """A randomly initialised tiny model whose head gives visibly different outputs for different inputs."""
    torch.manual_seed(seed)
    model = EsmForLocalization(tiny_config(**kwargs))
    for parameter in list(model.pooler.parameters()) + list(model.classifier.parameters()):
        torch.nn.init.normal_(parameter, std=0.5)  # the default 0.02 init gives near-identical logits
    return model.eval()


def run_offline(code: str, cwd: Path, tmp_path: Path, env: dict | None = None) -> dict:
    """Runs `code` in a fresh Python process with no network access to the Hub, an empty HF_HOME and `cwd`
    as working directory (so nothing is imported from the repository by accident); returns the JSON the code
    prints on its last line."""
    hf_home = tmp_path / "empty_hf_home"
    hf_home.mkdir(exist_ok=True)
    full_env = {
        **os.environ,
        "HF_HUB_OFFLINE": "1",
        "HF_DATASETS_OFFLINE": "1",
        "HF_HOME": str(hf_home),
        "PYTHONPATH": "",
        "TOKENIZERS_PARALLELISM": "false",
        **(env or {}),
    }
    result = subprocess.run(
        [sys.executable, "-c", code], cwd=cwd, env=full_env, capture_output=True, text=True, timeout=600
    )
    if result.returncode != 0:
        raise AssertionError(f"subprocess failed ({result.returncode}):\n{result.stdout}\n{result.stderr}")
    return json.loads(result.stdout.strip().splitlines()[-1])


def run_processes(command: list, cwd: Path, env: dict, timeout: int = 600) -> subprocess.CompletedProcess:
    """Runs a multi-process launch (torchrun, accelerate launch) like `subprocess.run(..., capture_output=True,
    text=True)`. A launch still running after `timeout` seconds fails the test with every one of its Python
    processes' stacks (faulthandler, on SIGABRT), so that a hang shows where each process waits."""
    import psutil  # accelerate's dependency

    env = {**env, "PYTHONFAULTHANDLER": "1"}
    with subprocess.Popen(command, cwd=cwd, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                          start_new_session=True) as process:
        try:
            stdout, stderr = process.communicate(timeout=timeout)
        except subprocess.TimeoutExpired:
            for child in psutil.Process(process.pid).children(recursive=True):  # the workers first, then their
                child.send_signal(signal.SIGABRT)                                # launcher (it stops them on failure)
            time.sleep(2)
            process.send_signal(signal.SIGABRT)
            try:
                stdout, stderr = process.communicate(timeout=60)
            except subprocess.TimeoutExpired:
                os.killpg(process.pid, signal.SIGKILL)
                stdout, stderr = process.communicate()
            pytest.fail(f"{' '.join(map(str, command))}\nstill running after {timeout} s; its processes' stacks "
                        f"(SIGABRT) and output:\n{stdout[-3000:]}\n{stderr[-12000:]}")
        finally:
            if process.poll() is None:
                os.killpg(process.pid, signal.SIGKILL)
    return subprocess.CompletedProcess(command, process.returncode, stdout, stderr)


@pytest.fixture
def elsewhere(tmp_path) -> Path:
    """A working directory outside the repository."""
    path = tmp_path / "elsewhere"
    path.mkdir()
    return path


def write_deeploc_layout_csv(path: Path, n_rows: int, seed: int) -> Path:
    """A small synthetic file in the DeepLoc 2.0 layout: the demo generator's proteins, Mitochondrion from the demo
    label, the other nine locations drawn at random (multi-label), five homology partitions."""
    from esmloc.data import LOCATIONS
    from esmloc.demo import demo_rows

    rng = random.Random(0)
    with open(path, "w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(["ACC", "Kingdom", "Partition", "Membrane", *LOCATIONS, "Sequence"])
        for index, row in enumerate(demo_rows(n_rows=n_rows, seed=seed)):
            locations = [int(row["Mitochondrion"]) if name == "Mitochondrion" else int(rng.random() < 0.2)
                         for name in LOCATIONS]
            writer.writerow([row["ACC"], "Metazoa", index % 5, rng.randint(0, 1), *locations, row["Sequence"]])
    return path


def run_main(main, argv, capsys):
    """A tool's `main` run in-process as its console script runs it: (exit status, stdout, stderr)."""
    status = main([str(argument) for argument in argv])
    captured = capsys.readouterr()
    return status, captured.out, captured.err
