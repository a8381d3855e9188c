"""The README, followed top to bottom as a new user would: every bash and Python block, in order, in a fresh
directory, offline, each step on the files the steps before it wrote.

An HTML comment right above a block says what else to expect of it:
- `<!-- readme-test: hub "MESSAGE" -->`: the block needs the Hugging Face Hub; offline it must fail with MESSAGE;
- `<!-- readme-test: server URL -->`: the block starts a server; it must answer at URL (on a free port: the test
  adds `--port P` to the command, so that it never meets another server on 7860), and is stopped;
- `<!-- readme-test: skip (REASON) -->`: not run (only the reasons in SKIPS: installing, the test suite itself).
The README's own quick path uses small settings (`--max_residues 64 --num_train_epochs 1`), so nothing is
substituted except the port. A block that launches `torchrun` runs in a loopback-only network namespace, as the
multi-process tests do (PyTorch's rendezvous store listens on every interface).
"""

import csv
import os
import re
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest

from conftest import REPO, loopback_only_namespace


README = REPO / "README.md"
BLOCK = re.compile(r"(?:<!-- readme-test: (?P<kind>\w+) (?P<argument>.*?) -->\n)?```(?P<language>\w*)\n(?P<code>.*?)```",
                   re.DOTALL)
SKIPS = {"(installs packages: the test runs in the environment they made)", "(the test suite itself)"}
# What the README says the steps write, in the words it uses for them.
WRITTEN = ["data/demo_mitochondrion.csv", "esmloc_output/config.json", "esmloc_output/model.safetensors",
           "esmloc_output/README.md", "esmloc_output/test_results.json", "esmloc_output/test_predictions.csv",
           "esmloc_output/training_log.jsonl", "predictions.csv", "proteins.fasta", "explanations/explanations.csv",
           "explanations/P1.png", "explanations/P2.png", "embeddings.parquet", "predictions_2proc.csv",
           "predictions_resumable.csv", "demo_dataset/README.md"]


def readme_blocks() -> list[dict]:
    """The README's bash and Python blocks, in order, each with its marker (kind "run" where there is none)."""
    blocks = []
    for match in BLOCK.finditer(README.read_text()):
        if match["language"] in ("bash", "python"):
            blocks.append({"kind": match["kind"] or "run", "argument": match["argument"],
                           "language": match["language"], "code": match["code"]})
    return blocks


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def serve_and_stop(command: list, cwd: Path, env: dict, url: str, timeout: float = 600) -> None:
    """Starts the server, waits until `url` answers 200 (failing if the server exits first), then stops it."""
    with subprocess.Popen(command, cwd=cwd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                          start_new_session=True) as server:
        try:
            deadline = time.monotonic() + timeout
            while True:
                if server.poll() is not None:
                    pytest.fail(f"the server exited ({server.returncode}):\n{server.stdout.read()[-3000:]}")
                try:
                    with urllib.request.urlopen(url, timeout=10) as response:
                        assert response.status == 200
                        break
                except OSError:
                    if time.monotonic() > deadline:
                        pytest.fail(f"{url} did not answer within {timeout} s")
                    time.sleep(2)
        finally:
            os.killpg(server.pid, signal.SIGTERM)
            try:
                server.wait(timeout=30)
            except subprocess.TimeoutExpired:
                os.killpg(server.pid, signal.SIGKILL)


def offline_env(tmp_path: Path) -> dict:
    env = {key: value for key, value in os.environ.items()
           if key not in ("HF_TOKEN", "HF_ENDPOINT", "ESMLOC_MODEL", "WORLD_SIZE")}
    return {**env, "HF_HUB_OFFLINE": "1", "HF_HOME": str(tmp_path / "hf_home"), "PYTHONPATH": "",
            "PATH": os.path.dirname(sys.executable) + os.pathsep + env.get("PATH", ""),
            "GRADIO_ANALYTICS_ENABLED": "False", "TOKENIZERS_PARALLELISM": "false"}


def test_the_readme_marks_every_block_it_does_not_simply_run():
    blocks = readme_blocks()
    assert sum(block["kind"] == "run" for block in blocks) >= 7
    assert {block["kind"] for block in blocks} <= {"run", "hub", "server", "skip"}
    assert {block["argument"] for block in blocks if block["kind"] == "skip"} <= SKIPS
    for block in blocks:
        if block["kind"] == "hub":
            assert re.fullmatch(r'"[^"]+"', block["argument"]), block


@pytest.mark.slow
def test_the_readme_runs_top_to_bottom_in_a_fresh_directory(tmp_path):
    work = tmp_path / "fresh"
    work.mkdir()
    env = offline_env(tmp_path)
    for number, block in enumerate(readme_blocks(), 1):
        code = block["code"]
        if block["kind"] == "skip":
            continue
        where = f"README block {number} ({block['kind']}):\n{code}"
        command = ["bash", "-e", "-o", "pipefail", "-c", code] if block["language"] == "bash" else [
            sys.executable, "-c", code]
        if "torchrun " in code:
            command = loopback_only_namespace() + command
        if block["kind"] == "server":
            port = free_port()
            url = block["argument"].replace(":7860", f":{port}")
            serve_and_stop(["bash", "-c", f"exec {code.split('#')[0].strip()} --port {port}"], work, env, url)
            continue
        result = subprocess.run(command, cwd=work, env=env, capture_output=True, text=True, timeout=1200)
        output = result.stdout + result.stderr
        if block["kind"] == "hub":
            message = block["argument"].strip('"')
            assert result.returncode != 0 and message in output, f"{where}\n---\n{output[-3000:]}"
            assert "Traceback" not in output, f"{where}\n---\n{output[-3000:]}"
        else:
            assert result.returncode == 0, f"{where}\n--- exit {result.returncode}\n{output[-5000:]}"

    missing = [name for name in WRITTEN if not (work / name).is_file()]
    assert not missing, f"the README names files its steps did not write: {missing}"
    readme = " ".join(README.read_text().split())
    with open(work / "predictions.csv", newline="") as handle:
        header = next(csv.reader(handle))
    assert f"`{', '.join(header)}`" in readme  # the layout the README describes is the one written
    with open(work / "predictions_2proc.csv", newline="") as two, open(work / "predictions.csv", newline="") as one:
        assert [row[0] for row in csv.reader(two)] == [row[0] for row in csv.reader(one)]


def test_python_app_py_without_a_model_is_one_line(tmp_path):
    """app.py serves ./esmloc_output, where the README's start saves its model; without one it says so in a line."""
    pytest.importorskip("gradio", reason="the demo needs the demo extra: pip install -e '.[demo]'")
    result = subprocess.run([sys.executable, str(REPO / "app.py")], cwd=tmp_path, env=offline_env(tmp_path),
                            capture_output=True, text=True, timeout=600)
    assert result.returncode == 2
    assert result.stderr == "python app.py: error: model ./esmloc_output: no such directory\n"
