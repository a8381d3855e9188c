"""The GPU check (issue 25): one prepared run on a CUDA machine that installs esmloc there, runs its CUDA tests and
its GPU benchmarks, and leaves their tables and logs in one folder.

Prepare, on a machine with the network and ../shared/data/ (once; nothing of it is committed):

    python bench/gpu_check.py --prepare

writes bench/results/gpu_carry/ (ignored by git): wheels/ (the packages esmloc needs that the GPU machine's python3
lacks, at the versions this environment runs, for CPython 3.12 on manylinux x86-64: CARRIED_PACKAGES) and
deeploc_lengths.txt (the DeepLoc 2.0 proteins' lengths, no sequences: the GPU machine gets the working tree, not
../shared). Then, through the device tool (one call, about 8 minutes; the machine's start is not counted):

    run(command='PYTHONUNBUFFERED=1 python3 bench/gpu_check.py --out "$OUT"',
        carry=["bench/results/gpu_carry"], timeout_s=540)

The sections run in turn, each as a subprocess with its time budget (SECTIONS, seconds; about 8 minutes in all):

- install: `pip install --no-index --no-deps` of the carried wheels and of esmloc built from the tree, into a
  folder put first on PYTHONPATH (the machine's own packages stay as they are), then an import check;
- tests: `pytest -m cuda tests/test_cuda.py` (correctness on CUDA: the engine against the CPU fp32 reference,
  batch-mates, train.py on CUDA, esmloc-predict/-embed on CUDA against CPU, flat GPU memory);
- speed: bench/gpu_speed.py (stock EsmModel against the engine with each attention kernel, 35M to 3B, and the
  engine's token budgets at 650M);
- finetune: bench/gpu_finetune.py (LoRA and full fine-tuning, with and without gradient checkpointing).

`--out DIR` receives summary.md (every section's status and tables, also printed last), results.json (the figures),
and one log per section (install.log, tests.log, speed.log, finetune.log): six files, within what the device tool
brings back. `--sections speed,finetune` runs some only (e.g. a second call after a fix; install always runs first
on the GPU). A section that fails or runs out of time is marked so; the others still run; the exit status is 1 when
any failed.

    python bench/gpu_check.py --smoke --out DIR   # CPU: tests collected (they skip: no GPU), speed and fine-tuning
                                                   # in their smoke modes; nothing installed (tests/test_bench.py)
"""

import argparse
import importlib.metadata
import importlib.util
import json
import os
import signal
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import common


# Seconds per section on the GPU machine (the smoke run has its own, SMOKE_SECTIONS). The benchmarks stop starting
# new rows DEADLINE_MARGIN seconds before their budget, so that the row in flight can finish.
SECTIONS = {"install": 40, "tests": 130, "speed": 190, "finetune": 100}
SMOKE_SECTIONS = {"install": 0, "tests": 600, "speed": 600, "finetune": 600}  # generous: a shared CPU
DEADLINE_MARGIN = {"speed": 50, "finetune": 35}
# What esmloc needs beyond the GPU machine's python3 (KINDS.md's package list: it has transformers, accelerate,
# peft, safetensors, pyarrow, pandas, scikit-learn, matplotlib, jinja2, pyyaml, pytest, xxhash): datasets 3.x and
# its own needs that the machine lacks (dill, multiprocess, and the fsspec it pins), evaluate, and the HTTP client of
# huggingface_hub 2 that esmloc.publish imports (httpx2 with httpcore2 and truststore). Downloaded at the versions
# this environment has.
CARRIED_PACKAGES = ("datasets", "evaluate", "dill", "multiprocess", "fsspec", "httpx2", "httpcore2", "truststore")
PLATFORMS = ("manylinux_2_28_x86_64", "manylinux_2_27_x86_64", "manylinux_2_17_x86_64", "manylinux2014_x86_64",
             "manylinux1_x86_64")
WHEELS = common.GPU_CARRY / "wheels"
SITE = Path(tempfile.gettempdir()) / "esmloc_gpu_site"
DEVICE_COMMAND = ("run(command='PYTHONUNBUFFERED=1 python3 bench/gpu_check.py --out \"$OUT\"', "
                  "carry=[\"bench/results/gpu_carry\"], timeout_s=540)")


def parse_arguments(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--prepare", action="store_true", help="download the wheels and write the lengths file")
    parser.add_argument("--out", type=Path, help="where summary.md, results.json and the logs go")
    parser.add_argument("--sections", type=lambda text: text.split(","), default=list(SECTIONS),
                        help=f"sections to run, comma-separated (default all: {','.join(SECTIONS)})")
    parser.add_argument("--smoke", action="store_true", help="CPU: no install, smoke modes")
    args = parser.parse_args(argv)
    unknown = set(args.sections) - set(SECTIONS)
    if unknown:
        parser.error(f"--sections: unknown {sorted(unknown)}")
    if not args.prepare and args.out is None:
        parser.error("--out DIR is required (or --prepare)")
    return args


def prepare() -> int:
    """Downloads the carried wheels (this environment's versions) and writes the DeepLoc lengths file."""
    WHEELS.mkdir(parents=True, exist_ok=True)
    for old in WHEELS.glob("*.whl"):
        old.unlink()
    pins = [f"{name}=={importlib.metadata.version(name)}" for name in CARRIED_PACKAGES]
    command = [sys.executable, "-m", "pip", "download", "--quiet", "--no-deps", "--only-binary=:all:",
               "--python-version", "3.12", "--implementation", "cp", *[f"--platform={p}" for p in PLATFORMS],
               "-d", str(WHEELS), *pins]
    print("$ " + " ".join(command))
    subprocess.run(command, check=True)
    if not common.DEEPLOC_CSV.is_file():
        print(f"{common.DEEPLOC_CSV} not found: no lengths file written (the GPU run then stops its benchmarks)")
        return 1
    lengths = common.csv_lengths(common.DEEPLOC_CSV)
    common.DEEPLOC_LENGTHS.write_text("\n".join(map(str, lengths)) + "\n")
    size = sum(path.stat().st_size for path in common.GPU_CARRY.rglob("*") if path.is_file())
    print(f"wrote {common.GPU_CARRY}: {len(list(WHEELS.glob('*.whl')))} wheels ({', '.join(pins)}) and "
          f"{len(lengths):,} lengths; {size / 2**20:.1f} MiB to carry")
    print(f"device tool call: {DEVICE_COMMAND}")
    return 0


def section_command(name: str, smoke: bool, deadline: float | None, out: Path) -> list[str]:
    python = sys.executable
    if name == "install":
        wheels = sorted(str(path) for path in WHEELS.glob("*.whl"))
        return [python, "-m", "pip", "install", "--no-index", "--no-deps", "--no-build-isolation", "--no-compile",
                "--upgrade", "--target", str(SITE), *wheels, str(common.REPO)]
    if name == "tests":
        # Four test processes where pytest-xdist is (the GPU machine has it): the train.py and CLI tests are mostly
        # process start-up, and the machine has 16 cores.
        parallel = ["-n", "4"] if not smoke and importlib.util.find_spec("xdist") else []
        return [python, "-m", "pytest", "-m", "cuda", "--strict-markers", "-rA", "--durations=15", "-p",
                "no:cacheprovider", *parallel, str(common.REPO / "tests" / "test_cuda.py")]
    script = common.REPO / "bench" / f"gpu_{name}.py"
    extra = ["--json", str(out / f"{name}.json"), *(["--smoke"] if smoke else [])]
    if deadline is not None:
        extra += ["--deadline", f"{deadline:.0f}"]
    return [python, str(script), *extra]


def run_section(name: str, command: list[str], budget: float, env: dict, log: Path) -> dict:
    """Runs one section, its output streamed to the console and to `log`, stopped (its whole process group) when it
    outlasts `budget` seconds; returns its status, seconds and output."""
    start = time.monotonic()
    output, stopped = [], threading.Event()
    with open(log, "w") as handle:
        handle.write("$ " + " ".join(command) + "\n")
        process = subprocess.Popen(command, cwd=common.REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                                   text=True, start_new_session=True)

        def stop():
            stopped.set()
            os.killpg(process.pid, signal.SIGKILL)

        timer = threading.Timer(budget, stop)
        timer.start()
        try:
            for line in process.stdout:
                handle.write(line)
                output.append(line)
                print(f"[{name}] {line}", end="", flush=True)
            process.wait()
        finally:
            timer.cancel()
        if stopped.is_set():
            status = f"stopped after its budget of {budget:.0f} s"
        else:
            status = "ok" if process.returncode == 0 else f"failed (exit status {process.returncode})"
        handle.write(f"\n[{name}: {status}]\n")
    return {"status": status, "seconds": round(time.monotonic() - start, 1), "output": "".join(output)}


def report(text: str) -> str:
    """A benchmark's report: its output from the first line that starts a report (what comes before is progress)."""
    lines = text.splitlines()
    starts = [i for i, line in enumerate(lines) if line.startswith(("GPU inference speed", "GPU fine-tuning",
                                                                      "SKIPPED"))]
    return "\n".join(lines[starts[0]:] if starts else lines[-40:])


# What tests/test_cuda.py prints of its comparisons (each a largest error against its reference).
MEASURED_MARKERS = ("largest relative", " vs ", "peak GPU memory")


def tests_report(text: str) -> str:
    """The errors the CUDA tests measured (their printed lines) and pytest's short summary: what passed, failed or
    was skipped, and why."""
    lines = text.splitlines()
    measured = [line for line in lines if any(marker in line for marker in MEASURED_MARKERS)
                and not line.startswith(("PASSED", "FAILED", "SKIPPED", "ERROR"))]
    starts = [i for i, line in enumerate(lines) if "short test summary info" in line]
    return "\n".join(measured + (lines[starts[-1]:] if starts else lines[-60:]))


def main(argv=None) -> int:
    args = parse_arguments(argv)
    if args.prepare:
        return prepare()
    import torch

    out = args.out
    out.mkdir(parents=True, exist_ok=True)
    budgets = SMOKE_SECTIONS if args.smoke else SECTIONS
    # On the GPU machine the install always comes first; a smoke run installs nothing.
    sections = [name for name in SECTIONS if name in args.sections or name == "install"]
    if args.smoke:
        sections.remove("install")
    hf_home = Path(tempfile.mkdtemp(prefix="esmloc_gpu_hf_"))
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(SITE), str(common.REPO), os.environ.get("PYTHONPATH", "")]),
           "PATH": os.pathsep.join([str(SITE / "bin"), os.environ.get("PATH", "")]), "PYTHONUNBUFFERED": "1",
           "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false",
           "HF_HOME": str(hf_home)}
    device = (f"{torch.cuda.get_device_name(0)}, CUDA {torch.version.cuda}" if torch.cuda.is_available()
              else "no GPU")
    print(f"GPU check: {device}; torch {torch.__version__}, Python {sys.version.split()[0]}; sections "
          f"{', '.join(sections)}; budgets {json.dumps({n: budgets[n] for n in sections})} s", flush=True)
    if not torch.cuda.is_available() and not args.smoke:
        print("no CUDA device here: run this on the GPU machine, or --smoke")
        return 1
    results = {}
    for name in sections:
        log = out / f"{name}.log"
        if name == "install" and not list(WHEELS.glob("*.whl")):
            results[name] = {"status": f"failed: no wheels in {WHEELS} (run --prepare before the call, and carry "
                                       "bench/results/gpu_carry)", "seconds": 0, "output": ""}
            log.write_text(results[name]["status"] + "\n")
            continue
        margin = DEADLINE_MARGIN.get(name)
        deadline = budgets[name] - margin if margin and not args.smoke else None
        results[name] = run_section(name, section_command(name, args.smoke, deadline, out), budgets[name], env, log)
        if name == "install":
            check = [sys.executable, "-c", "import datasets, evaluate, transformers, peft, esmloc.commands.train, "
                     "esmloc.commands.predict, esmloc.commands.embed; print('imports: transformers', transformers.__version__, "
                     "'datasets', datasets.__version__, 'peft', peft.__version__, 'esmloc from', esmloc.__file__)"]
            checked = subprocess.run(check, cwd=tempfile.gettempdir(), env=env, capture_output=True, text=True)
            with open(log, "a") as handle:
                handle.write(checked.stdout + checked.stderr)
            print(checked.stdout + checked.stderr[-2000:], end="")
            if checked.returncode != 0 and results[name]["status"] == "ok":
                results[name]["status"] = "failed (the import check)"

    lines = [f"# GPU check: {device}", "",
             f"torch {torch.__version__}, Python {sys.version.split()[0]}; command: python bench/gpu_check.py "
             + " ".join(argv if argv is not None else sys.argv[1:]), "",
             "| section | status | seconds |", "| --- | --- | --- |"]
    lines += [f"| {name} | {result['status']} | {result['seconds']} |" for name, result in results.items()]
    if "tests" in results:
        lines += ["", "## tests (pytest -m cuda tests/test_cuda.py)", "", "```", tests_report(results["tests"]["output"]),
                  "```"]
    for name in ("speed", "finetune"):
        if name in results:
            lines += ["", f"## {name}", "", report(results[name]["output"])]
    summary = "\n".join(lines) + "\n"
    (out / "summary.md").write_text(summary)
    figures = {}
    for name in ("speed", "finetune"):
        path = out / f"{name}.json"
        if path.is_file():
            figures[name] = json.loads(path.read_text())
            path.unlink()  # folded into results.json: the device tool brings back 8 files at most
    (out / "results.json").write_text(json.dumps(
        {"device": device, "torch": torch.__version__,
         "sections": {name: {"status": r["status"], "seconds": r["seconds"]} for name, r in results.items()},
         **figures}, indent=2))
    print("\n" + summary, flush=True)
    return 0 if all(result["status"] == "ok" for result in results.values()) else 1


if __name__ == "__main__":
    sys.exit(main())
