"""Shared test helpers (test files import them from here, never from one another), and the suite's rules.

- Tiny random-weight ESM models, fresh offline processes, multi-process launches in a loopback-only network
  namespace, train.py runs, a stand-in for HfApi and a real mirror server (olah).
- Markers (registered in setup.cfg): `slow` (multi-process and subprocess training runs, the browser, the mirror,
  the benchmarks' smoke runs: `pytest -m "not slow"` is the fast loop) and `cuda` (skipped without a GPU).
- Skips: `ALLOWED_SKIPS` are the only reasons a test may be skipped in CI (`.ci/run` sets ESMLOC_STRICT_SKIPS=1);
  every run ends with a summary of its skips.
"""

import csv
import hashlib
import json
import os
import random
import re
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections import Counter
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch
import yaml

from configuration_esmloc import ESM2_ARCHITECTURES, EsmLocConfig
from modeling_esmloc import EsmForLocalization


REPO = Path(__file__).resolve().parents[1]
DEEPLOC_CSV = REPO.parent / "shared" / "data" / "deeploc2_swissprot.csv"

# --- skips ---------------------------------------------------------------------------------------------------------
# The reasons a test may be skipped in CI, where ESMLOC_STRICT_SKIPS=1 (.ci/run sets it): a reason starting with
# anything else fails the test there, because CI has everything else a test needs (chromium, unshare, the DeepLoc
# file in ../shared/data, a working int8 kernel, every package of the test extra). On a machine without them (a
# laptop without chromium) those tests skip, saying why, and the run still passes.
NO_GPU = "no GPU (CUDA) here"
OTHER_DATASETS_MAJOR = "for CI's run on the other datasets major"  # .ci/run runs the dataset tests on 3.x and 5.x
ALLOWED_SKIPS = (NO_GPU, OTHER_DATASETS_MAJOR)
STRICT_SKIPS = os.environ.get("ESMLOC_STRICT_SKIPS") == "1"
# Reasons a machine may lack, named once for the tests that need the thing.
NO_LOOPBACK_NAMESPACE = ("cannot create a loopback-only network namespace (unshare/ip): refusing to start a PyTorch "
                         "rendezvous store that listens on all interfaces")


def skip_reason(report) -> str:
    if isinstance(report.longrepr, tuple):  # (file, line, "Skipped: reason")
        return report.longrepr[2].removeprefix("Skipped: ")
    return str(report.longrepr)


def pytest_collection_modifyitems(config, items):
    if not torch.cuda.is_available():
        for item in items:
            if "cuda" in item.keywords:
                item.add_marker(pytest.mark.skip(reason=NO_GPU))


@pytest.hookimpl(wrapper=True)
def pytest_runtest_makereport(item, call):
    report = yield
    if STRICT_SKIPS and report.skipped and not hasattr(report, "wasxfail"):
        reason = skip_reason(report)
        if not reason.startswith(ALLOWED_SKIPS):
            report.outcome = "failed"
            report.longrepr = (f"skipped for a reason CI does not allow (ESMLOC_STRICT_SKIPS=1): {reason}\n"
                               f"allowed (tests/conftest.py ALLOWED_SKIPS): {'; '.join(ALLOWED_SKIPS)}")
    return report


def pytest_terminal_summary(terminalreporter, config):
    if config.option.collectonly:
        return
    reasons = Counter(skip_reason(report) for report in terminalreporter.stats.get("skipped", [])
                      if not hasattr(report, "wasxfail"))
    rule = "only the allowed reasons (ESMLOC_STRICT_SKIPS=1)" if STRICT_SKIPS else "any reason (ESMLOC_STRICT_SKIPS unset)"
    terminalreporter.section(f"skip summary: {sum(reasons.values())} skipped, {rule}")
    for reason, count in reasons.most_common():
        allowed = "allowed" if reason.startswith(ALLOWED_SKIPS) else "not allowed in CI"
        terminalreporter.line(f"{count:4d}  {allowed:17s}  {reason}")


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


# --- train.py in a subprocess, multi-process launches ---------------------------------------------------------------


TRAIN = [sys.executable, str(REPO / "train.py")]
QUICK = ["--from_scratch", "tiny", "--num_train_epochs", "2", "--per_device_train_batch_size", "16",
         "--max_residues", "200", "--num_examples_to_show", "3"]


def train_env(**extra) -> dict:
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false",
           "PYTHONUNBUFFERED": "1", **extra}
    env.pop("WORLD_SIZE", None)
    return env


def run_train(args, cwd, env=None, timeout=600) -> subprocess.CompletedProcess:
    result = subprocess.run(TRAIN + args, cwd=cwd, env=env or train_env(), capture_output=True, text=True,
                            timeout=timeout)
    if result.returncode != 0:
        raise AssertionError(f"train.py failed ({result.returncode}):\n{result.stdout[-5000:]}\n{result.stderr[-5000:]}")
    return result


def distributed_failure(result: subprocess.CompletedProcess) -> str:
    """What a failed multi-process run printed: the first failing process's traceback comes early in stderr, the
    launcher's report of it at the end, so both ends are shown."""
    stderr = result.stderr if len(result.stderr) < 8000 else result.stderr[:4000] + "\n[...]\n" + result.stderr[-4000:]
    return result.stdout[-2000:] + stderr


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


def loopback_only_prefix() -> list[str] | None:
    """A command prefix that runs a command in a network namespace of its own holding only the loopback interface,
    or None where none can be made (no unshare / ip, or not allowed). PyTorch's rendezvous store (torchrun's agent,
    accelerate's rank 0) listens on all interfaces whatever --master_addr says; in such a namespace the only
    interface is 127.0.0.1."""
    for prefix in (["unshare", "--net"], ["unshare", "--map-root-user", "--net"]):
        try:
            probe = subprocess.run(prefix + ["ip", "link", "set", "lo", "up"], capture_output=True)
        except FileNotFoundError:
            return None
        if probe.returncode == 0:
            return prefix + ["sh", "-c", 'ip link set lo up && exec "$@"', "sh"]
    return None


def loopback_only_namespace() -> list[str]:
    """`loopback_only_prefix()`, or the test skips: it never starts a store listening on every interface."""
    prefix = loopback_only_prefix()
    if prefix is None:
        pytest.skip(NO_LOOPBACK_NAMESPACE)
    return prefix


# --- several processes ---------------------------------------------------------------------------------------------

LARGE_JOB_RESIDUES = "LAGVSERTIDPKQNFYMHWC"


def write_proteins(path, n=240, seed=0, bad_at=None):
    """A FASTA file of n proteins (20-320 residues: some longer than the models' 200, so cropping matters), with
    repeated records (same ACC and sequence) spread over the file; `bad_at`: that record gets a '1'."""
    rng = random.Random(seed)
    records = []
    for index in range(n):
        if index % 37 == 36:
            records.append(records[index // 3])  # a repeat of an earlier record, in another part
            continue
        sequence = "".join(rng.choices(LARGE_JOB_RESIDUES, k=rng.randint(20, 320)))
        records.append((f"sp|A{index:05d}|P_{index}", sequence))
    if bad_at is not None:
        name, sequence = records[bad_at]
        records[bad_at] = (name, sequence[:5] + "1" + sequence[6:])
    with open(path, "w") as handle:
        for name, sequence in records:
            handle.write(f">{name}\n{sequence}\n")
    return path


def distributed_env(**extra) -> dict:
    """The environment of a two-process CPU launch on 127.0.0.1: offline, one thread a process."""
    values = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1",
              "GLOO_SOCKET_IFNAME": "lo", "MASTER_ADDR": "127.0.0.1", **extra}
    values.pop("WORLD_SIZE", None)
    return values


def two_processes(launcher, module, args, cwd) -> subprocess.CompletedProcess:
    """`module` run by two CPU processes, started by `torchrun` or `accelerate launch`, in a loopback-only network
    namespace."""
    if launcher == "torchrun":
        launch = [sys.executable, "-m", "torch.distributed.run", "--nnodes", "1", "--nproc_per_node", "2",
                  "--master_addr", "127.0.0.1", "--master_port", "29500", "-m", module]
    else:
        launch = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2",
                  "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no",
                  "--main_process_ip", "127.0.0.1", "--main_process_port", "29500", "-m", module]
    return run_processes(loopback_only_namespace() + launch + [str(arg) for arg in args], cwd=cwd,
                         env=distributed_env())


def read_csv_rows(path) -> list[list[str]]:
    with open(path, newline="") as handle:
        return list(csv.reader(handle))


def assert_same_predictions(actual, expected):
    """Two predictions CSVs hold the same rows in the same order, probabilities within 1e-5."""
    actual, expected = read_csv_rows(actual), read_csv_rows(expected)
    assert [row[0] for row in actual] == [row[0] for row in expected]  # header, rows, order, repeats
    assert [row[-1] for row in actual] == [row[-1] for row in expected]
    np.testing.assert_allclose(np.array([row[1:-1] for row in actual[1:]], dtype=float),
                               np.array([row[1:-1] for row in expected[1:]], dtype=float), atol=1e-5)


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


@pytest.fixture(autouse=True, scope="session")
def bench_tables_elsewhere(tmp_path_factory):
    """The benchmarks' smoke runs write their tables into a folder of the test run, never into docs/bench/ (the
    processes the tests start inherit the variable)."""
    os.environ["ESMLOC_BENCH_TABLES"] = str(tmp_path_factory.mktemp("bench_tables"))
    yield
    os.environ.pop("ESMLOC_BENCH_TABLES", None)


# --- the hub: a stand-in for HfApi, a real mirror server (olah), git work trees --------------------------------------


FAKE_TOKEN = "hf_esmlocFAKEtoken0123456789abcdefXYZ"


def front_matter(card: str) -> tuple[dict, str]:
    """A card's YAML metadata and its body."""
    match = re.match(r"^---\n(.*?)\n---\n(.*)$", card, re.DOTALL)
    assert match, "the card does not start with a YAML block"
    return yaml.safe_load(match.group(1)), match.group(2)


def directory_digest(path: Path) -> str:
    digest = hashlib.sha256()
    for file in sorted(p for p in Path(path).rglob("*") if p.is_file()):
        digest.update(str(file.relative_to(path)).encode())
        digest.update(hashlib.sha256(file.read_bytes()).digest())
    return digest.hexdigest()


def assert_no_token(*texts, directories=()):
    for text in texts:
        assert FAKE_TOKEN not in text
    for directory in directories:
        for file in Path(directory).rglob("*"):
            if file.is_file():
                assert FAKE_TOKEN.encode() not in file.read_bytes(), file


class RecordingHfApi:
    """Stands in for `huggingface_hub.HfApi`: records what push_output_dir asks for (one class per test)."""

    calls: list
    existing_private = None
    fail_on: str | None = None
    error: Exception | None = None

    def __init__(self, endpoint=None, token=None, **kwargs):
        self.calls.append(("init", {"endpoint": endpoint, "token": token, **kwargs}))

    def _maybe_fail(self, name):
        if self.fail_on == name:
            raise self.error

    def create_repo(self, repo_id, *, repo_type=None, private=None, exist_ok=False, **kwargs):
        self.calls.append(("create_repo", {"repo_id": repo_id, "repo_type": repo_type, "private": private,
                                           "exist_ok": exist_ok, **kwargs}))
        self._maybe_fail("create_repo")

    def repo_info(self, repo_id, *, repo_type=None, **kwargs):
        self.calls.append(("repo_info", {"repo_id": repo_id}))
        return SimpleNamespace(private=self.existing_private)

    def create_commit(self, repo_id, *, operations, commit_message, repo_type=None, **kwargs):
        files = {}
        for operation in operations:
            with operation.as_file() as handle:
                files[operation.path_in_repo] = handle.read()
        self.calls.append(("create_commit", {"repo_id": repo_id, "files": files, "repo_type": repo_type,
                                             "commit_message": commit_message}))
        self._maybe_fail("create_commit")


@pytest.fixture
def hub(monkeypatch):
    """Replaces HfApi inside esmloc.publish by a fresh recording class; HF_TOKEN holds a recognisable fake."""
    from esmloc import publish

    api = type("Hub", (RecordingHfApi,), {"calls": []})
    monkeypatch.setattr(publish, "HfApi", api)
    monkeypatch.setenv("HF_TOKEN", FAKE_TOKEN)
    monkeypatch.delenv("HF_ENDPOINT", raising=False)
    return api


def calls_named(hub, name):
    return [arguments for call, arguments in hub.calls if call == name]


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def clean_env(tmp_path: Path, **extra) -> dict:
    """A fresh process's environment: no HF_* settings or tokens from outside, an empty HF_HOME, no proxy for
    127.0.0.1, nothing imported from the repository by accident."""
    home = tmp_path / f"hf_home_{len(list(tmp_path.glob('hf_home_*')))}"
    home.mkdir()
    env = {key: value for key, value in os.environ.items() if not key.startswith(("HF_", "HUGGING_FACE"))}
    env.update(HF_HOME=str(home), PYTHONPATH="", TOKENIZERS_PARALLELISM="false", NO_PROXY="127.0.0.1,localhost",
               no_proxy="127.0.0.1,localhost", **extra)
    return env


def git(*arguments, cwd: Path):
    subprocess.run(["git", "-c", "user.name=esmloc tests", "-c", "user.email=tests@esmloc.invalid",
                    "-c", "commit.gpgsign=false", *arguments], cwd=cwd, check=True, capture_output=True, text=True)


class GitWorkTreeHub:
    """A stand-in for HfApi whose commits land in git work trees laid out as olah mirrors them
    (`<root>/models/<org>/<name>`, branch main): what a push sends is exactly what the mirror serves."""

    def __init__(self, root: Path):
        self.root = root
        self.pushed: dict[str, set[str]] = {}

    def create_repo(self, repo_id, *, repo_type="model", private=None, exist_ok=False):
        path = self.root / f"{repo_type}s" / repo_id
        if not (path / ".git").is_dir():
            path.mkdir(parents=True)
            git("init", "-q", cwd=path)
            git("symbolic-ref", "HEAD", "refs/heads/main", cwd=path)

    def repo_info(self, repo_id, *, repo_type="model"):
        return SimpleNamespace(private=None)

    def create_commit(self, repo_id, *, operations, commit_message, repo_type="model"):
        path = self.root / f"{repo_type}s" / repo_id
        for operation in operations:
            target = path / operation.path_in_repo
            target.parent.mkdir(parents=True, exist_ok=True)
            with operation.as_file() as handle:
                target.write_bytes(handle.read())
        git("add", "-A", cwd=path)
        git("commit", "-q", "-m", commit_message, cwd=path)
        self.pushed[repo_id] = {operation.path_in_repo for operation in operations}


class OlahMirror:
    """`olah` serving `<root>/mirrors` offline on 127.0.0.1, started as a subprocess."""

    def __init__(self, root: Path):
        self.root = root
        self.mirrors = root / "mirrors"
        self.mirrors.mkdir(parents=True)
        self.log = root / "olah.out"
        self.process = None
        self.url = None

    def start(self, attempts: int = 3, timeout: float = 90):
        for _ in range(attempts):  # a free port can be taken between the probe and olah's bind: try another
            port = free_port()
            config = self.root / "olah.toml"
            config.write_text(
                "[basic]\n"
                f'host = "127.0.0.1"\nport = {port}\n'
                f"repos-path = {json.dumps(str(self.root / 'cache'))}\n"
                f"mirrors-path = [{json.dumps(str(self.mirrors))}]\n"
                "[accessibility]\noffline = true\n"
            )
            with self.log.open("w") as log:
                self.process = subprocess.Popen(
                    [sys.executable, "-m", "olah.server", "-c", str(config), "--log-path", str(self.root / "logs")],
                    cwd=self.root, env=clean_env(self.root), stdout=log, stderr=subprocess.STDOUT,
                )
            self.url = f"http://127.0.0.1:{port}"
            deadline = time.monotonic() + timeout
            no_proxy = urllib.request.build_opener(urllib.request.ProxyHandler({}))
            while time.monotonic() < deadline and self.process.poll() is None:
                try:
                    no_proxy.open(f"{self.url}/api/models/esmloc/absent/revision/main", timeout=2)
                    return self
                except urllib.error.HTTPError:  # an answer (olah answers 401 for a repository it lacks)
                    return self
                except OSError:  # not listening yet
                    time.sleep(0.3)
            self.stop()
        raise RuntimeError(f"olah did not start:\n{self.log_tail()}")

    def stop(self):
        if self.process is not None and self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(timeout=15)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait(timeout=15)
        self.process = None

    def log_tail(self) -> str:
        return self.log.read_text()[-3000:] if self.log.is_file() else "(no olah log)"


@pytest.fixture(scope="module")
def mirror(tmp_path_factory):
    """olah serving a folder of git work trees (`mirror.mirrors`) offline on 127.0.0.1."""
    if shutil.which("git") is None:
        pytest.skip("git is not installed")
    pytest.importorskip("olah", reason="olah (the mirror server) comes with the [test] extra")
    server = OlahMirror(tmp_path_factory.mktemp("olah")).start()
    try:
        yield server
    finally:
        server.stop()
