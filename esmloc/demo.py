"""Synthetic demo data for the offline quickstart: `python -m esmloc.demo [--output PATH] [--rows N] [--seed S]`.

Writes a deterministic CSV with the columns `ACC, Mitochondrion, Sequence` (integer 0/1 labels, ACCs `SYN00001`,
...). The proteins are made up, not real, but their labels are learnable the way real ones are: positives start
with a mitochondrial-targeting-peptide-like presequence (an amphipathic helix, rich in Arg, Ser and hydrophobic
residues, with no Asp or Glu); negatives do not, some start with a signal peptide (a hydrophobic core after a short
positive stretch) and some carry a nuclear localisation signal, so that "positive charge somewhere" is not enough.
"""

import csv
import math
import random
import sys
from pathlib import Path

from huggingface_hub import constants as hub_constants

from esmloc import cli
from esmloc.files import atomic_file


DEFAULT_OUTPUT = "data/demo_mitochondrion.csv"
DEMO_ROWS = 400
# Amino-acid frequencies of UniProtKB/Swiss-Prot (%): the mature part of every protein.
_BACKGROUND = {
    "L": 9.9, "A": 8.3, "G": 7.1, "V": 6.9, "E": 6.8, "S": 6.6, "I": 5.9, "K": 5.8, "R": 5.5, "D": 5.5,
    "T": 5.3, "P": 4.7, "N": 4.1, "Q": 3.9, "F": 3.9, "Y": 2.9, "M": 2.4, "H": 2.3, "C": 1.4, "W": 1.1,
}  # fmt: skip
_HYDROPHOBIC = {"L": 4, "A": 3, "I": 2, "V": 2, "F": 1}
_HELIX_POLAR = {"R": 5, "S": 2, "K": 1, "T": 1, "A": 1, "G": 1}
_SIGNAL_CORE = {"L": 5, "A": 3, "V": 2, "I": 1, "F": 1}
_NUCLEAR_SIGNALS = ("PKKKRKV", "KRPAATKKAGQAKKKK", "PAAKRVKLD")
_LONG_PROTEINS = 3  # longer than ESM-2's 1022 residues, so that cropping is exercised


def _draw(rng: random.Random, weights: dict[str, float], length: int) -> str:
    return "".join(rng.choices(list(weights), weights=list(weights.values()), k=length))


def _presequence(rng: random.Random) -> str:
    """An N-terminal targeting peptide: a helix with a hydrophobic face and an Arg/Ser face (100 degrees a turn)."""
    residues = [
        _draw(rng, _HYDROPHOBIC if (position * 100) % 360 < 160 else _HELIX_POLAR, 1)
        for position in range(1, rng.randint(20, 40) - 3)
    ]
    return "M" + "".join(residues) + "R" + _draw(rng, {"F": 1, "Y": 1, "L": 1}, 1) + "S"  # R-2 cleavage motif


def _signal_peptide(rng: random.Random) -> str:
    """A secretory signal peptide: short positive n-region, hydrophobic h-region, c-region ending in A-x-A."""
    n_region = _draw(rng, {"K": 1, "R": 1, "S": 1, "T": 1}, rng.randint(1, 4))
    h_region = _draw(rng, _SIGNAL_CORE, rng.randint(8, 14))
    c_region = _draw(rng, {"S": 1, "G": 1, "T": 1}, 2) + "A" + _draw(rng, {"S": 1, "Q": 1, "G": 1}, 1) + "A"
    return "M" + n_region + h_region + c_region


def demo_rows(n_rows: int = 400, positive_fraction: float = 0.15, seed: int = 0) -> list[dict]:
    """The demo proteins as `{"ACC", "Mitochondrion", "Sequence"}` dicts; the same arguments give the same rows."""
    rng = random.Random(seed)
    positives = set(rng.sample(range(n_rows), round(n_rows * positive_fraction)))
    long_ones = set(rng.sample(range(n_rows), min(_LONG_PROTEINS, n_rows)))
    rows = []
    for index in range(n_rows):
        if index in long_ones:
            length = rng.randint(1030, 1300)
        else:
            length = min(600, max(50, round(rng.lognormvariate(math.log(280), 0.5))))
        if index in positives:
            start = _presequence(rng)
        elif rng.random() < 0.25:
            start = _signal_peptide(rng)
        else:
            start = "M"
        sequence = start + _draw(rng, _BACKGROUND, max(length - len(start), 20))
        if index not in positives and rng.random() < 0.1:
            cut = rng.randint(len(sequence) // 3, 2 * len(sequence) // 3)
            sequence = sequence[:cut] + rng.choice(_NUCLEAR_SIGNALS) + sequence[cut:]
        rows.append({"ACC": f"SYN{index + 1:05d}", "Mitochondrion": int(index in positives), "Sequence": sequence})
    return rows


def write_demo_csv(path=DEFAULT_OUTPUT, n_rows: int = DEMO_ROWS, positive_fraction: float = 0.15, seed: int = 0
                   ) -> Path:
    """Writes `demo_rows(...)` as a CSV to `path` (folders are created; written whole or not at all) and returns
    the path."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with atomic_file(path, "w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=["ACC", "Mitochondrion", "Sequence"], lineterminator="\n")
        writer.writeheader()
        writer.writerows(demo_rows(n_rows, positive_fraction, seed))
    return path


def demo_file() -> Path:
    """The default demo set (DEMO_ROWS proteins, seed 0) as a CSV in the Hugging Face cache
    ($HF_HOME/esmloc/demo/), generated on first use; what `python train.py` trains on without a data file."""
    path = Path(hub_constants.HF_HOME) / "esmloc" / "demo" / f"demo_mitochondrion-{DEMO_ROWS}-seed0.csv"
    return path if path.is_file() else write_demo_csv(path)


def write_command(argv=None) -> int:
    parser = cli.ArgumentParser(prog="python -m esmloc.demo", description=__doc__.split("\n\n")[0])
    parser.add_argument("--output", default=DEFAULT_OUTPUT, help=f"CSV file to write (default: {DEFAULT_OUTPUT})")
    parser.add_argument("--rows", type=cli.positive_int, default=DEMO_ROWS,
                        help=f"number of proteins (default: {DEMO_ROWS})")
    parser.add_argument("--positive_fraction", type=float, default=0.15, help="share of Mitochondrion proteins")
    parser.add_argument("--seed", type=int, default=0, help="random seed (default: 0)")
    args = parser.parse_args(argv)
    if not 0 <= args.positive_fraction <= 1:
        parser.error(f"argument --positive_fraction: must lie in [0, 1], got {args.positive_fraction}")
    cli.check_output_file(args.output, option="--output")
    path = write_demo_csv(args.output, args.rows, args.positive_fraction, args.seed)
    positives = round(args.rows * args.positive_fraction)
    print(f"Wrote {args.rows} synthetic proteins ({positives} Mitochondrion) to {path}")
    return 0


def main(argv=None) -> int:
    return cli.run("python -m esmloc.demo", write_command, argv)


if __name__ == "__main__":
    sys.exit(main())
