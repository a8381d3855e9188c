"""Large jobs: esmloc-predict in 1 and 2 processes on DeepLoc proteins; scaling efficiency, peak RSS, projections.

    python bench/large_jobs.py                 # the first 2,000 DeepLoc proteins, ESM-2 8M architecture
    python bench/large_jobs.py --n 28303 --skip_default   # all of them: 36 min (2 processes) + 71 min (1)
    python bench/large_jobs.py --smoke         # 48 synthetic proteins, tiny model (the test runs this)

Three configurations of the same command on the same CSV (ACC, Sequence) and model (the ESM-2 8M architecture
with random weights, cropped as its config says: 1022 residues, middle):

- `1 process, 1 thread`: `esmloc-predict` (OMP_NUM_THREADS=1): the per-process rate;
- `1 process, all threads`: `esmloc-predict` as a user runs it today (torch's default threads, the engine's
  per-core batches): the baseline;
- `2 processes, 1 thread each`: `torchrun --nproc_per_node 2 -m esmloc.commands.predict` (gloo, in a loopback-only
  network namespace, as the tests run it), which splits the input by tokens and merges the parts.

Times are measured inside each process from the start of `esmloc.commands.predict.main` to its end (model loading, planning,
validation, prediction, merge; not the interpreter's import of torch, which costs the same in every
configuration); a configuration's time is its slowest process's. Scaling efficiency = rate with 2 processes /
(2 x the 1-process, 1-thread rate); the target is >= 85%. The outputs of the 1- and 2-process runs are compared
(same rows and order; largest probability difference).

The projections multiply the measured 1-thread per-process rate by N processes and the measured efficiency:
they are arithmetic, not measurements; `--per_process_rate` projects from another rate (e.g. one GPU's, measured
with `esmloc-predict` on that GPU).
"""

import argparse
import csv
import os
import re
import subprocess
import sys
import tempfile
from pathlib import Path

from common import (DEEPLOC_CSV, REPO, command_line, load_average, load_proteins, machine_description, table,
                    write_table)


CHILD = """
import os, resource, sys, time
from esmloc.commands.predict import main
started = time.perf_counter()
status = main(sys.argv[1:])
print(f"BENCH rank={os.environ.get('RANK', '0')} seconds={time.perf_counter() - started:.3f} "
      f"peak_rss_kib={resource.getrusage(resource.RUSAGE_SELF).ru_maxrss}", flush=True)
sys.exit(status)
"""
PROJECTIONS = {"human proteome": 20_400, "UniRef50": 60_000_000}
PROCESS_COUNTS = (1, 8, 64)


def save_model(path: Path, smoke: bool) -> Path:
    import torch

    from configuration_esmloc import ESM2_ARCHITECTURES, EsmLocConfig
    from esmloc.saving import save_model as save
    from modeling_esmloc import EsmForLocalization

    torch.manual_seed(0)
    architecture = ESM2_ARCHITECTURES["tiny" if smoke else "esm2_t6_8M"]
    return save(EsmForLocalization(EsmLocConfig(esm_config=dict(architecture))).eval(), path)


def write_csv(path: Path, rows) -> Path:
    with open(path, "w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(["ACC", "Sequence"])
        writer.writerows((row["ACC"], row["Sequence"]) for row in rows)
    return path


def launcher(processes: int) -> list[str]:
    if processes == 1:
        return []
    sys.path.insert(0, str(REPO / "tests"))
    from conftest import loopback_only_prefix  # the store of torch.distributed then listens on lo only

    prefix = loopback_only_prefix()
    if prefix is None:
        sys.exit("cannot create a loopback-only network namespace (unshare/ip): not starting a PyTorch rendezvous "
                 "store that listens on all interfaces")
    return prefix + [sys.executable, "-m", "torch.distributed.run", "--nnodes", "1", "--nproc_per_node",
                     str(processes), "--master_addr", "127.0.0.1", "--master_port", "29500"]


def run(work: Path, model: Path, data: Path, output: Path, processes: int, threads: int | None) -> dict:
    script = work / "child.py"
    script.write_text(CHILD)
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "GLOO_SOCKET_IFNAME": "lo", "MASTER_ADDR": "127.0.0.1",
           "PYTHONPATH": str(REPO)}
    env.pop("WORLD_SIZE", None)
    env.pop("OMP_NUM_THREADS", None)
    if threads:
        env["OMP_NUM_THREADS"] = str(threads)
    command = launcher(processes) + ([] if processes > 1 else [sys.executable]) + [
        str(script), str(model), str(data), "-o", str(output), "--no_progress"]
    result = subprocess.run(command, env=env, capture_output=True, text=True, cwd=work)
    if result.returncode != 0:
        raise SystemExit(f"{' '.join(command)} failed:\n{result.stdout[-3000:]}\n{result.stderr[-3000:]}")
    found = re.findall(r"BENCH rank=(\d+) seconds=([\d.]+) peak_rss_kib=(\d+)", result.stdout)
    if len(found) != processes:
        raise SystemExit(f"expected {processes} measurements, got {found}:\n{result.stderr[-3000:]}")
    computed = re.findall(r"Computed: (.*)", result.stderr)
    return {"seconds": max(float(seconds) for _, seconds, _ in found),
            "process_seconds": [float(seconds) for _, seconds, _ in sorted(found)],
            "rss_mib": [int(kib) / 1024 for _, _, kib in sorted(found)],
            "computed": computed[-1] if computed else ""}


def compare(one: Path, two: Path) -> tuple[bool, float]:
    with open(one, newline="") as a, open(two, newline="") as b:
        first, second = list(csv.reader(a)), list(csv.reader(b))
    same_rows = [row[0] for row in first] == [row[0] for row in second] and len(first) == len(second)
    difference = max((abs(float(x) - float(y)) for r1, r2 in zip(first[1:], second[1:])
                      for x, y in zip(r1[1:-1], r2[1:-1])), default=0.0)
    return same_rows, difference


def duration(seconds: float) -> str:
    if seconds < 120:
        return f"{seconds:.0f} s"
    if seconds < 7200:
        return f"{seconds / 60:.0f} min"
    if seconds < 3 * 86400:
        return f"{seconds / 3600:.1f} h"
    return f"{seconds / 86400:.1f} days"


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--n", type=int, default=2000, help="proteins: the first N of the DeepLoc CSV")
    parser.add_argument("--data", type=Path, default=DEEPLOC_CSV)
    parser.add_argument("--smoke", action="store_true", help="48 proteins, tiny model")
    parser.add_argument("--skip_default", action="store_true",
                        help="leave out `1 process, all threads` (saves a third of the time of a full-size run); "
                             "ratios are then against the 1-process, 1-thread run")
    parser.add_argument("--per_process_rate", type=float, default=None,
                        help="proteins/s of one process (e.g. one GPU) to project from, instead of the measured one")
    args = parser.parse_args(argv)
    n = 48 if args.smoke else args.n
    print(f"command: {command_line()}")
    load_before = load_average()
    print(f"machine: {machine_description()}; load average before: {load_before}")
    rows, source = load_proteins(args.data, n, args.smoke)
    with tempfile.TemporaryDirectory() as work:
        work = Path(work)
        model = save_model(work / "model", args.smoke)
        data = write_csv(work / "proteins.csv", rows)
        print(f"data: {source}; model: {'tiny' if args.smoke else 'ESM-2 8M architecture'} (random weights), "
              "cropped to 1022 residues (middle)")
        configurations = [("1 process, 1 thread", 1, 1), ("1 process, all threads (today's default)", 1, None),
                          ("2 processes, 1 thread each (torchrun)", 2, 1)]
        if args.skip_default:
            configurations.pop(1)
        results = {}
        # The 2-process run first: on a shared machine, whatever else starts later disturbs the longer 1-thread run
        # (one core) less than the run that needs both.
        for name, processes, threads in sorted(configurations, key=lambda item: -item[1]):
            results[name] = run(work, model, data, work / f"{processes}-{threads}.csv", processes, threads)
        same_rows, difference = compare(work / "1-1.csv", work / "2-1.csv")
    single = n / results["1 process, 1 thread"]["seconds"]
    reference = configurations[1 if len(configurations) == 3 else 0][0]
    baseline = n / results[reference]["seconds"]
    rate_two = n / results["2 processes, 1 thread each (torchrun)"]["seconds"]
    efficiency = rate_two / (2 * single)
    lines = []
    for name, _, _ in configurations:
        result = results[name]
        rate = n / result["seconds"]
        lines.append([name, f"{result['seconds']:.1f}", f"{rate:.2f}", f"{rate / baseline:.2f}x",
                      " / ".join(f"{rss:.0f}" for rss in result["rss_mib"]),
                      " / ".join(f"{seconds:.1f}" for seconds in result["process_seconds"])])
    measured = [table(["configuration", "seconds", "proteins/s", f"x {reference}", "peak RSS per process (MiB)",
                       "seconds per process"], lines)]
    measured += [f"{name}: {results[name]['computed']}" for name, _, _ in configurations if results[name]["computed"]]
    measured.append(f"scaling efficiency, 1 -> 2 processes: {100 * efficiency:.0f}% of linear (target >= 85%)")
    measured.append(f"2-process output vs 1-process output: same rows in the same order: {same_rows}; largest "
                    f"probability difference {difference:.2g}")
    print("\n".join(measured))
    print(f"load average after: {load_average()} (the machine is shared: other work competes for the 2 cores)")
    per_process = args.per_process_rate or single
    origin = "--per_process_rate" if args.per_process_rate else "the measured 1-process, 1-thread rate"
    projection = [[f"{count} process(es)"] + [duration(total / (per_process * count * (efficiency if count > 1
                                                                                        else 1.0)))
                                                 for total in PROJECTIONS.values()]
                  for count in PROCESS_COUNTS]
    projected = (f"PROJECTION (arithmetic, not a measurement): {per_process:.2f} proteins/s per process ({origin}) x "
                 f"N processes x {100 * efficiency:.0f}% efficiency, proteins of DeepLoc's length distribution\n\n"
                 + table(["processes at that rate"] + [f"{name} ({count:,})" for name, count in PROJECTIONS.items()],
                         projection))
    print(f"\n{projected}")
    write_table("large_jobs", f"Large jobs: esmloc-predict in 1 and 2 processes, {source}; "
                f"{'tiny model' if args.smoke else 'ESM-2 8M architecture'} (random weights)",
                "\n\n".join(measured) + "\n\n" + projected, smoke=args.smoke,
                other_load=f"load average before {load_before}")


if __name__ == "__main__":
    main()
