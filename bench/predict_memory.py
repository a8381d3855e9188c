"""Peak memory of esmloc-predict does not grow with the input: peak RSS at a small and a large number of proteins.

    python bench/predict_memory.py                    # 10,000 and 400,000 short proteins (several minutes)
    python bench/predict_memory.py --smoke            # 2,000 and 20,000 (the test runs this)
    python bench/predict_memory.py --sizes 10000 200000 --tool embed       # esmloc-embed (resumable parts)
    python bench/predict_memory.py --sizes 10000 200000 --resumable        # esmloc-predict's large-job path
    python bench/predict_memory.py --one_protein --sizes 4000 40000         # one protein of 4,000 / 40,000 residues

Each size runs `python -m esmloc.commands.predict` in a process of its own on a FASTA file of synthetic proteins (50-150
residues, deterministic) with a tiny random-weight model (the model's size does not change what grows with the input;
a small one keeps the run short), and reports that process's peak resident set size (getrusage ru_maxrss). Streaming
prediction must hold only a chunk of records at a time: the target is the larger run's peak within 5% of the
smaller one's.

With `--one_protein` the sizes are the residues of a single protein, predicted whole by a model saved with
`long_proteins="windows"` (windows of 1022 residues): attention stays within a window and the windows run a token
budget's worth at a time, so peak memory may grow with the protein's length (its residue states), never with its
square (a 40,000-residue protein run whole would need 40,000^2 attention scores per head and layer, 6.4 GB in fp32).
"""

import argparse
import os
import random
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from common import REPO, command_line, table, write_table


CHILD = """
import resource, sys
from esmloc.commands.{tool} import main
status = main(sys.argv[1:])
print("peak_rss_kib", resource.getrusage(resource.RUSAGE_SELF).ru_maxrss, flush=True)
sys.exit(status)
"""


def write_fasta(path: Path, n: int, seed: int = 0) -> Path:
    rng = random.Random(seed)
    residues = "LAGVSERTIDPKQNFYMHWC"
    with open(path, "w") as handle:
        for index in range(n):
            handle.write(f">sp|B{index:08d}|SYN_{index}\n{''.join(rng.choices(residues, k=rng.randint(50, 150)))}\n")
    return path


def write_one_protein(path: Path, residues: int, seed: int = 0) -> Path:
    rng = random.Random(seed)
    path.write_text(f">sp|L{residues:08d}|LONG\n{''.join(rng.choices('LAGVSERTIDPKQNFYMHWC', k=residues))}\n")
    return path


def save_tiny_model(path: Path, **config) -> Path:
    sys.path.insert(0, str(REPO / "tests"))
    from conftest import tiny_model  # the tests' tiny architecture
    from esmloc.saving import save_model

    return save_model(tiny_model(max_residues=1022, **config), path)


def measure(model_dir: Path, fasta: Path, output: Path, tool: str = "predict", extra=()) -> tuple[float, float]:
    """(peak RSS in MiB, seconds) of one esmloc-predict (or esmloc-embed) process."""
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"}
    started = time.perf_counter()
    result = subprocess.run([sys.executable, "-c", CHILD.format(tool=tool), str(model_dir), str(fasta), "-o",
                             str(output), "--no_progress", *extra], env=env, capture_output=True, text=True)
    seconds = time.perf_counter() - started
    if result.returncode != 0:
        raise SystemExit(f"esmloc-{tool} failed:\n{result.stderr[-3000:]}")
    peak_kib = int(result.stdout.split("peak_rss_kib")[-1].split()[0])
    return peak_kib / 1024, seconds


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--sizes", type=int, nargs=2, default=[10_000, 400_000])
    parser.add_argument("--smoke", action="store_true", help="2,000 and 20,000 proteins")
    parser.add_argument("--tool", choices=["predict", "embed"], default="predict")
    parser.add_argument("--resumable", action="store_true", help="esmloc-predict --resumable (the large-job path)")
    parser.add_argument("--one_protein", action="store_true",
                        help="sizes are the residues of one protein, predicted whole in windows")
    args = parser.parse_args(argv)
    sizes = [2_000, 20_000] if args.smoke else args.sizes
    print(f"command: {command_line()}")
    with tempfile.TemporaryDirectory() as work:
        work = Path(work)
        model_dir = save_tiny_model(work / "model", **({"long_proteins": "windows"} if args.one_protein else {}))
        rows = []
        for n in sizes:
            fasta = (write_one_protein if args.one_protein else write_fasta)(work / f"proteins-{n}.fasta", n)
            output = work / (f"predictions-{n}.csv" if args.tool == "predict" else f"embeddings-{n}.parquet")
            peak, seconds = measure(model_dir, fasta, output, args.tool, ["--resumable"] if args.resumable else [])
            rows.append([f"{n:,}", f"{peak:.1f}", f"{seconds:.1f}", f"{n / seconds:,.0f}"])
            fasta.unlink()
        growth = float(rows[1][1]) / float(rows[0][1]) - 1
    unit = "residues of one protein" if args.one_protein else "proteins"
    result = table([unit, "process peak RSS (MiB)", "seconds", "residues/s" if args.one_protein else "proteins/s"], rows)
    verdict = f"peak RSS growth from {sizes[0]:,} to {sizes[1]:,} {unit}: {100 * growth:+.1f}% (target: within 5%)"
    print(result)
    print(verdict)
    path = "predict --resumable" if args.resumable else args.tool
    name = f"predict_memory-{path.replace(' --', '-')}" + ("-one_protein" if args.one_protein else "")
    what = ("one protein of each size predicted whole in windows" if args.one_protein
            else "synthetic proteins of 50-150 residues")
    write_table(name, f"Peak memory of esmloc-{path}, one single-thread process per size, tiny random-weight model, "
                f"{what}", f"{result}\n\n{verdict}", smoke=args.smoke)


if __name__ == "__main__":
    main()
