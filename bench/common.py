"""Shared pieces of the benchmarks: the data, the model, the machine's matmul peak, FLOP counts, memory, tables."""

import csv
import os
import platform
import shlex
import statistics
import sys
import time
from pathlib import Path

import torch


REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))  # run from a checkout without installing

DEEPLOC_CSV = REPO.parent / "shared" / "data" / "deeploc2_swissprot.csv"
# What `bench/gpu_check.py --prepare` writes for the GPU machine, which gets the working tree but not ../shared and
# has no network: wheels of the packages it lacks, and the DeepLoc proteins' lengths (no sequences). Ignored by git
# (bench/results/), carried to the machine by name.
GPU_CARRY = REPO / "bench" / "results" / "gpu_carry"
DEEPLOC_LENGTHS = GPU_CARRY / "deeploc_lengths.txt"
AMINO_ACIDS = "ACDEFGHIKLMNPQRSTVWY"


def load_proteins(path: Path, n: int, smoke: bool) -> tuple[list[dict], str]:
    """The first `n` rows (ACC, Mitochondrion, Sequence) of the DeepLoc CSV. Without it: smoke runs use synthetic
    proteins from esmloc.demo; real runs exit with a message (status 0, so that a fresh checkout does not fail)."""
    if path.is_file():
        rows = []
        with open(path, newline="") as handle:
            for row in csv.DictReader(handle):
                rows.append({"ACC": row["ACC"], "Mitochondrion": row["Mitochondrion"], "Sequence": row["Sequence"]})
                if len(rows) == n:
                    break
        return rows, f"the first {len(rows)} proteins of {path}"
    if not smoke:
        print(f"SKIPPED: {path} not found. The benchmark needs the DeepLoc 2.0 CSV (see ../shared/data/README.md); "
              "--data points elsewhere, --smoke runs on synthetic proteins.")
        sys.exit(0)
    from esmloc.demo import demo_rows

    rows = [{key: str(value) for key, value in row.items()} for row in demo_rows(n_rows=n, seed=0)]
    return rows, f"{len(rows)} synthetic proteins (esmloc.demo; {path} not found)"


def csv_lengths(path: Path) -> list[int]:
    """The length of every protein of a CSV with a Sequence column, in file order."""
    with open(path, newline="") as handle:
        return [len(row["Sequence"]) for row in csv.DictReader(handle)]


def deeploc_lengths(smoke: bool = False) -> tuple[list[int], str]:
    """The residue counts of the DeepLoc 2.0 proteins in file order: from DEEPLOC_LENGTHS (the GPU machine's copy),
    else from the CSV. Without either: smoke runs take the lengths of esmloc.demo's proteins; real runs stop with a
    message (status 0, so that a fresh checkout does not fail)."""
    if DEEPLOC_LENGTHS.is_file():
        return [int(line) for line in DEEPLOC_LENGTHS.read_text().split()], f"the DeepLoc 2.0 lengths in {DEEPLOC_LENGTHS}"
    if DEEPLOC_CSV.is_file():
        return csv_lengths(DEEPLOC_CSV), f"the DeepLoc 2.0 lengths of {DEEPLOC_CSV}"
    if not smoke:
        print(f"SKIPPED: neither {DEEPLOC_LENGTHS} nor {DEEPLOC_CSV} found: run `python bench/gpu_check.py "
              "--prepare` where ../shared/data/ is (see ../shared/data/README.md), or --smoke.")
        sys.exit(0)
    from esmloc.demo import demo_rows

    return [len(row["Sequence"]) for row in demo_rows(n_rows=64, seed=0)], "the lengths of esmloc.demo's proteins"


def random_proteins(lengths, max_residues: int = 1022, seed: int = 0) -> list[str]:
    """Random amino-acid sequences of these lengths, cropped to `max_residues` (for random-weight speed runs, where
    only the lengths matter)."""
    import numpy as np

    rng = np.random.default_rng(seed)
    letters = np.frombuffer(AMINO_ACIDS.encode(), dtype=np.uint8)
    return [letters[rng.integers(0, len(letters), min(int(length), max_residues))].tobytes().decode()
            for length in lengths]


def cuda_matmul_peak_tflops(dtype=torch.bfloat16, size: int = 8192, repeats: int = 10) -> float:
    """The GPU's matmul throughput right now: (size x size) @ (size x size) on random data in `dtype`, median of
    `repeats` timed with CUDA events after three warm-ups, 2 * size^3 FLOPs each."""
    a, b = (torch.randn(size, size, device="cuda", dtype=dtype) for _ in range(2))
    for _ in range(3):
        torch.matmul(a, b)
    times = []
    for _ in range(repeats):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        torch.matmul(a, b)
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end) / 1000)
    return 2 * size**3 / statistics.median(times) / 1e12


def median_seconds(function, repeats: int) -> float:
    function()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        function()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def matmul_peaks_gflops(size: int = 4096, repeats: int = 5) -> dict[str, float]:
    """The machine's fp32 matmul throughput right now, (size x size) @ (size x size), median of `repeats` after a
    warm-up, 2 * size^3 FLOPs each, through both of torch's CPU GEMM libraries: `torch.matmul` (MKL, which runs its
    AVX2 code on AMD processors) and oneDNN (`torch.ops.mkldnn._linear_pointwise`, AVX-512 where the CPU has it).
    "peak" is the faster of the two: the compute bound must not be one that a library choice can beat."""
    a, b = torch.randn(size, size), torch.randn(size, size)
    flops = 2 * size**3
    with torch.inference_mode():
        peaks = {"torch.matmul": flops / median_seconds(lambda: torch.matmul(a, b), repeats) / 1e9}
        try:
            linear = torch.ops.mkldnn._linear_pointwise
            peaks["oneDNN"] = flops / median_seconds(lambda: linear(a, b, None, "none", [], ""), repeats) / 1e9
        except (AttributeError, RuntimeError, NotImplementedError):
            pass
    peaks["peak"] = max(peaks.values())
    return peaks


def low_precision_peaks_gflops(size: int = 4096, repeats: int = 5) -> dict[str, float]:
    """The machine's bf16 and int8 matmul throughput right now, as `matmul_peaks_gflops` measures fp32: bf16 through
    oneDNN (`_linear_pointwise` on bf16 tensors) and `torch.matmul`, the faster; int8 through oneDNN's int8 linear
    (`torch.ops.onednn.qlinear_pointwise`, uint8 input x int8 prepacked weight, fp32 output: the kernel
    `precision="int8"` runs, without the input's quantisation, which is part of the work it does)."""
    flops = 2 * size**3
    peaks = {}
    a, b = torch.randn(size, size).bfloat16(), torch.randn(size, size).bfloat16()
    with torch.inference_mode():
        bf16 = [flops / median_seconds(lambda: torch.matmul(a, b), repeats) / 1e9]
        try:
            linear = torch.ops.mkldnn._linear_pointwise
            bf16.append(flops / median_seconds(lambda: linear(a, b, None, "none", [], ""), repeats) / 1e9)
        except (AttributeError, RuntimeError, NotImplementedError):
            pass
        peaks["bf16"] = max(bf16)
        try:
            x = torch.randint(0, 255, (size, size), dtype=torch.uint8)
            weight = torch.ops.onednn.qlinear_prepack(torch.randint(-127, 127, (size, size), dtype=torch.int8), None)
            scales, zero_points = torch.full((size,), 0.01), torch.zeros(size, dtype=torch.long)
            peaks["int8"] = flops / median_seconds(lambda: torch.ops.onednn.qlinear_pointwise(
                x, 0.01, 128, weight, scales, zero_points, None, 1.0, 0, torch.float32, "none", [], ""), repeats) / 1e9
        except (AttributeError, RuntimeError, NotImplementedError):
            pass
    return peaks


FLOP_FORMULA = (
    "FLOPs per protein of L tokens (<cls> + residues + <eos>, no padding), per layer, 2 per multiply-add: "
    "QKV + output projections 8*L*d^2, feed-forward 4*L*d*d_ff for ESM-2 (two d x d_ff matrices, GELU) and "
    "6*L*d*d_ff for ESM C (three: SwiGLU's gate, up and down), attention scores and weighted values 4*L^2*d; times "
    "the number of layers. Embeddings, layer norms, softmax, activations and the head are not counted."
)
# How many d x d_ff matrices each family's feed-forward block multiplies by (configuration_esmloc.BACKBONE_FAMILIES).
FEED_FORWARD_MATRICES = {"esm2": 2, "esmc": 3}


def backbone_flops(token_lengths, backbone_config) -> float:
    """The forward pass's FLOPs over proteins of `token_lengths` tokens, for an ESM-2 or ESM C backbone config
    (FLOP_FORMULA)."""
    from configuration_esmloc import backbone_family

    config = backbone_config
    d, d_ff, layers = config.hidden_size, config.intermediate_size, config.num_hidden_layers
    feed_forward = 2 * FEED_FORWARD_MATRICES[backbone_family(config)]
    return float(sum(layers * (8 * L * d * d + feed_forward * L * d * d_ff + 4 * L * L * d) for L in token_lengths))


def reset_peak_rss() -> bool:
    """Resets this process's peak resident set size (Linux: /proc/self/clear_refs); False if not possible."""
    try:
        with open("/proc/self/clear_refs", "w") as handle:
            handle.write("5")
        return True
    except OSError:
        return False


def peak_rss_mb() -> float | None:
    """This process's peak resident set size since start or the last reset (VmHWM), in MiB."""
    try:
        with open("/proc/self/status") as handle:
            for line in handle:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) / 1024
    except OSError:
        pass
    return None


def machine_description() -> str:
    cpu = platform.processor() or "unknown CPU"
    try:
        with open("/proc/cpuinfo") as handle:
            for line in handle:
                if line.startswith("model name"):
                    cpu = line.split(":", 1)[1].strip()
                    break
    except OSError:
        pass
    import transformers

    return (f"{cpu}, {os.cpu_count()} CPUs, torch {torch.__version__} ({torch.get_num_threads()} threads), "
            f"transformers {transformers.__version__}, Python {platform.python_version()}")


class OtherLoad:
    """Measures how busy *other* processes kept the CPUs during a `with` block: the machine's busy CPU time
    (/proc/stat) minus this process's own (and its waited-for children's), as a fraction of all CPUs over the
    block's wall time. A benchmark on a shared machine is contaminated when this is not near 0."""

    fraction: float | None = None

    @staticmethod
    def _machine_busy_seconds() -> float | None:
        try:
            with open("/proc/stat") as handle:
                values = [int(value) for value in handle.readline().split()[1:]]
        except OSError:
            return None
        idle = values[3] + (values[4] if len(values) > 4 else 0)
        return (sum(values) - idle) / os.sysconf("SC_CLK_TCK")

    @staticmethod
    def _own_seconds() -> float:
        times = os.times()
        return times.user + times.system + times.children_user + times.children_system

    def __enter__(self):
        self._busy, self._own, self._wall = self._machine_busy_seconds(), self._own_seconds(), time.perf_counter()
        return self

    def __exit__(self, *exc):
        busy = self._machine_busy_seconds()
        wall = time.perf_counter() - self._wall
        if busy is not None and self._busy is not None and wall > 0:
            others = (busy - self._busy) - (self._own_seconds() - self._own)
            self.fraction = max(0.0, others) / (wall * (os.cpu_count() or 1))
        return False


def wait_until_quiet(threshold: float = 0.05, window: float = 5.0, timeout: float = 900.0) -> float | None:
    """Waits (up to `timeout` s) until other processes use less than `threshold` of the CPUs over a `window`;
    returns the last measured fraction."""
    deadline = time.monotonic() + timeout
    while True:
        with OtherLoad() as load:
            time.sleep(window)
        if load.fraction is None or load.fraction < threshold or time.monotonic() > deadline:
            return load.fraction
        print(f"waiting: other processes keep {100 * load.fraction:.0f}% of the CPUs busy", file=sys.stderr)


def add_quiet_machine_arguments(parser, max_wait: bool = True) -> None:
    """The options of a benchmark that repeats its measurement on a quiet machine (`repeat_is_kept`)."""
    parser.add_argument("--max_other_load", type=float, default=0.05,
                        help="a repeat during which other processes kept more than this share of the CPUs busy is "
                             "discarded and run again (default 0.05); each repeat first waits for such a quiet moment")
    parser.add_argument("--retries", type=int, default=6, help="discarded repeats allowed in all (default 6)")
    if max_wait:
        parser.add_argument("--max_wait", type=float, default=900,
                            help="seconds each repeat waits at most for a quiet moment (default 900)")


def repeat_is_kept(args, worst: float, repeat: int, attempts: int, summary: str) -> bool:
    """Whether the repeat just measured counts: not when other processes kept more than --max_other_load of the
    CPUs busy during it, while --retries allows another attempt (smoke runs keep every repeat). Says which on
    stderr, with the repeat's `summary`."""
    if worst > args.max_other_load and attempts < args.repeats + args.retries and not args.smoke:
        print(f"repeat {repeat + 1} discarded (contaminated): {summary}", file=sys.stderr, flush=True)
        return False
    print(f"repeat {repeat + 1}/{args.repeats}: {summary}", file=sys.stderr, flush=True)
    return True


def load_average() -> str:
    try:
        return " ".join(f"{value:.2f}" for value in os.getloadavg())
    except OSError:
        return "n/a"


def command_line() -> str:
    return "python " + " ".join(shlex.quote(arg) for arg in [os.path.relpath(sys.argv[0], REPO), *sys.argv[1:]])


def table(headers: list[str], rows: list[list]) -> str:
    """A Markdown table."""
    lines = ["| " + " | ".join(headers) + " |", "|" + "|".join(" --- " for _ in headers) + "|"]
    lines += ["| " + " | ".join(str(cell) for cell in row) + " |" for row in rows]
    return "\n".join(lines)


def median(values):
    values = [value for value in values if value is not None]
    return statistics.median(values) if values else None


STARTED = time.time()  # when the benchmark started (it imports this module first): the start of a table's dates
TABLES_DIR = REPO / "docs" / "bench"
SMOKE_LINE = ("- **run: SMOKE RUN** (a tiny model and a few proteins, to check that the script runs): these figures "
              "are not measurements")


def write_table(name: str, title: str, body: str, *, smoke: bool = False,
                other_load: str | None = None) -> Path | None:
    """Writes a benchmark's result (`body`: its Markdown table(s) and notes) to docs/bench/<name>.md, which the
    documentation includes, headed by what a reader needs to judge and repeat it: the command, the dates (UTC), the
    machine, the load average and `other_load` (the script's own measure of other processes' share of the CPUs),
    and whether it was a smoke run. Returns the path (and prints it). The environment variable ESMLOC_BENCH_TABLES
    names another folder (the tests use one of their own).

    A smoke run says so above its table, and never replaces a measured table: where docs/bench/<name>.md holds one,
    nothing is written and None is returned."""
    path = Path(os.environ.get("ESMLOC_BENCH_TABLES") or TABLES_DIR) / f"{name}.md"
    if smoke and path.is_file() and SMOKE_LINE not in path.read_text():
        print(f"{path} holds a measured table: a smoke run leaves it as it is")
        return None
    start, end = (time.strftime("%Y-%m-%d %H:%M", time.gmtime(moment)) for moment in (STARTED, time.time()))
    dates = start if start == end else f"{start} to {end[11:] if start[:10] == end[:10] else end}"
    header = [f"<!-- written by bench/{Path(sys.argv[0]).name}: rerun its command to replace it -->", "",
              f"**{title}**", "", f"- command: `{command_line()}`", f"- date: {dates} UTC",
              f"- machine: {machine_description()}",
              f"- load: load average {load_average()} at the end" + (f"; {other_load}" if other_load else "")]
    text = "\n".join(header + ([SMOKE_LINE] if smoke else []) + ["", body.strip(), ""])
    path.parent.mkdir(parents=True, exist_ok=True)
    temporary = path.with_name(f".{path.name}.tmp")
    temporary.write_text(text)
    temporary.replace(path)  # whole or not at all
    print(f"table written to {path}")
    return path


def report(name: str, title: str, result: str, notes: list[str], *, smoke: bool, load_before: str,
           other_load: str) -> Path | None:
    """Prints a benchmark's result (title, command, machine and load, `notes`, the Markdown table `result`) and
    writes it to docs/bench/<name>.md (`write_table`). `load_before`: the load average when it started;
    `other_load`: its own measure of other processes' share of the CPUs."""
    print()
    print(title)
    print(f"command: {command_line()}")
    print(f"machine: {machine_description()}; load average before {load_before}, after {load_average()}; "
          f"{other_load}")
    print("\n".join(notes))
    print()
    print(result)
    return write_table(name, title, "\n\n".join([result, *notes]), smoke=smoke,
                       other_load=f"load average before {load_before}; {other_load}")

