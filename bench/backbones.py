"""What each backbone costs here: ESM-2 and ESM C sizes side by side, proteins/s and share of the compute bound.

    python bench/backbones.py                  # ESM-2 8M/35M/150M/650M, ESM C 300M/600M; fp32 and bf16; 16 proteins
    python bench/backbones.py --architectures esm2_t33_650M,esmc_300m --precisions fp32 --repeats 5
    python bench/backbones.py --smoke          # tiny ESM-2 and ESM C, a few proteins: checks that the script runs

Every backbone embeds the same proteins (the first --n rows of the DeepLoc 2.0 CSV, cropped to 1,022 residues as the
model does; the first 16 average about 410 residues) through esmloc's engine (`Engine(...).embed(sequences,
"mean")`: padding-free, even token-budget batches, inference mode), with random weights (the architecture's compute,
not its accuracy: no pretrained weights can be downloaded here). One row per backbone and precision:

- proteins/s and real tokens/s: medians over the repeats;
- GFLOP / protein: the backbone's forward FLOPs over these proteins (formula below, family-aware: ESM C's
  feed-forward is SwiGLU, three d x d_ff matrices where ESM-2 has two), divided by their number;
- % of compute bound: the achieved FLOP/s over the machine's matmul peak at the row's precision, measured in the same
  repeat right before the backbone runs (bench/common.py: 4096^3 matmuls, the faster of MKL and oneDNN);
- time / protein vs ESM-2 650M: the median over the repeats of the row's seconds over ESM-2 650M's seconds at the same
  precision, both measured in the same repeat: what choosing ESM C 300M, which its publishers report about as good
  as ESM-2 650M, saves (n/a when ESM-2 650M is not among --architectures).

Each repeat runs every backbone in turn (alternating the order) after waiting for a quiet machine; a repeat during
which other processes kept more than --max_other_load of the CPUs busy is discarded and run again. Backbones are
built once (the largest, 650M, takes about 2.6 GB in fp32), before the first repeat. The table is also written to
docs/bench/backbones.md.
"""

import argparse
import sys
import time
from pathlib import Path

import torch

import common


DEFAULT_ARCHITECTURES = ["esm2_t6_8M", "esm2_t12_35M", "esm2_t30_150M", "esm2_t33_650M", "esmc_300m", "esmc_600m"]
REFERENCE = "esm2_t33_650M"  # the cost every row is compared with (see the docstring)


def parse_arguments(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--architectures", type=lambda text: text.split(","), default=DEFAULT_ARCHITECTURES,
                        help="comma-separated names from configuration_esmloc.ARCHITECTURES (default: "
                             + ",".join(DEFAULT_ARCHITECTURES) + ")")
    parser.add_argument("--precisions", type=lambda text: text.split(","), default=["fp32", "bf16"],
                        help="the engine's precisions to time (default fp32,bf16; int8 also possible)")
    parser.add_argument("--n", type=int, default=16, help="number of proteins (default 16)")
    parser.add_argument("--repeats", type=int, default=3, help="repeats of every backbone (default 3)")
    common.add_quiet_machine_arguments(parser)
    parser.add_argument("--data", type=Path, default=common.DEEPLOC_CSV)
    parser.add_argument("--smoke", action="store_true", help="tiny ESM-2 and ESM C, 4 proteins, 1 repeat")
    args = parser.parse_args(argv)
    if args.smoke:
        args.architectures, args.n, args.repeats = ["tiny", "esmc_tiny"], min(args.n, 4), 1
    from configuration_esmloc import ARCHITECTURES

    unknown = [name for name in args.architectures if name not in ARCHITECTURES]
    if unknown:
        parser.error(f"--architectures: unknown {unknown}; one of {', '.join(ARCHITECTURES)}")
    if set(args.precisions) - {"fp32", "bf16", "int8"}:
        parser.error(f"--precisions: unknown {sorted(set(args.precisions) - {'fp32', 'bf16', 'int8'})}")
    return args


def backbone_name(architecture: str, config) -> str:
    """`ESM C 300M (esmc_300m)`: the family as people name it, the size, the architecture's name."""
    from configuration_esmloc import FAMILY_NAMES, backbone_family

    size = architecture.rsplit("_", 1)[-1].upper() if architecture not in ("tiny", "esmc_tiny") else "tiny"
    return f"{FAMILY_NAMES[backbone_family(config)]} {size} (`{architecture}`)"


def main(argv=None):
    args = parse_arguments(argv)
    from configuration_esmloc import EsmLocConfig, backbone_config
    from esmloc.engine import Engine
    from esmloc.saving import tokenizer_for
    from modeling_esmloc import EsmForLocalization

    rows, source = common.load_proteins(args.data, args.n, args.smoke)
    sequences = [row["Sequence"] for row in rows]
    load_before = common.load_average()
    backbones = {}
    for architecture in args.architectures:
        print(f"building {architecture} (random weights)", file=sys.stderr, flush=True)
        torch.manual_seed(0)
        model = EsmForLocalization(EsmLocConfig(esm_config=backbone_config(architecture))).eval()
        tokenizer = tokenizer_for(model.config)
        lengths = [len(ids) for ids in tokenizer(sequences)["input_ids"]]
        engines = {precision: Engine(model, tokenizer, precision=precision, progress=False)
                   for precision in args.precisions}
        for engine in engines.values():  # warm-up: thread pools, kernels, int8 packing
            engine.embed(sequences[:2], "mean")
        backbones[architecture] = {
            "name": backbone_name(architecture, model.config.esm_config), "engines": engines, "tokens": sum(lengths),
            "parameters": sum(p.numel() for p in model.esm.parameters()),
            "flops": common.backbone_flops(lengths, model.config.esm_config)}

    seconds = {(a, p): [] for a in args.architectures for p in args.precisions}
    peaks, contamination, repeat, attempts = [], [], 0, 0
    while repeat < args.repeats:
        if not args.smoke:
            common.wait_until_quiet(args.max_other_load, timeout=args.max_wait)
        attempts += 1
        timings, others, measured = {}, [], {}
        order = args.architectures if repeat % 2 == 0 else args.architectures[::-1]
        for architecture in order:
            with common.OtherLoad() as load:  # the peak right before the backbone runs: the bound it is held to
                size = 1024 if args.smoke else 4096
                measured[architecture] = {"fp32": common.matmul_peaks_gflops(size)["peak"],
                                          **common.low_precision_peaks_gflops(size)}
            others.append(load.fraction)
            for precision, engine in backbones[architecture]["engines"].items():
                with common.OtherLoad() as load:
                    start = time.perf_counter()
                    engine.embed(sequences, "mean")
                    timings[architecture, precision] = time.perf_counter() - start
                others.append(load.fraction)
        worst = max((fraction for fraction in others if fraction is not None), default=0.0)
        summary = ", ".join(f"{a} {p} {args.n / timings[a, p]:.2f}" for a, p in timings) + " proteins/s" \
            + f"; other processes used up to {100 * worst:.0f}% of the CPUs"
        if not common.repeat_is_kept(args, worst, repeat, attempts, summary):
            continue
        for key, value in timings.items():
            seconds[key].append(value)
        peaks.append(measured)
        contamination.append(worst)
        repeat += 1

    header = ["backbone", "parameters", "GFLOP / protein", "precision", "proteins / s", "real tokens / s",
              "% of compute bound", "time / protein vs ESM-2 650M"]
    table_rows = []
    for architecture in args.architectures:
        backbone = backbones[architecture]
        for precision in args.precisions:
            per_repeat = seconds[architecture, precision]
            bound = common.median([backbone["flops"] / s / 1e9 / peak[architecture][precision]
                                   if precision in peak[architecture] else None
                                   for s, peak in zip(per_repeat, peaks)])
            reference = seconds.get((REFERENCE, precision))
            ratio = common.median([s / r for s, r in zip(per_repeat, reference)]) if reference else None
            table_rows.append([
                backbone["name"], f"{backbone['parameters'] / 1e6:,.{0 if backbone['parameters'] >= 1e7 else 2}f}M",
                f"{backbone['flops'] / args.n / 1e9:,.1f}", precision,
                f"{common.median([args.n / s for s in per_repeat]):.2f}",
                f"{common.median([backbone['tokens'] / s for s in per_repeat]):,.0f}",
                f"{100 * bound:.0f}%" if bound is not None else "n/a",
                f"{ratio:.2f}x" if ratio is not None else "n/a"])
    residues = sum(min(len(s), 1022) for s in sequences) / len(sequences)
    title = (f"What each backbone costs: {source} (mean {residues:.0f} residues after cropping), random weights, "
             f"esmloc's engine; median of {args.repeats} repeat(s)")
    other_load = (f"other processes' share of the CPUs during the kept repeats: at most "
                  f"{100 * max(contamination):.0f}% ({attempts - args.repeats} repeat(s) discarded)")
    peak_note = "; ".join(
        f"{precision} {common.median([peak[a][precision] for peak in peaks for a in peak if precision in peak[a]]):.0f}"
        for precision in args.precisions if any(precision in peak[a] for peak in peaks for a in peak))
    notes = [f"matmul peaks (GFLOP/s, median over the backbones' measurements): {peak_note}", common.FLOP_FORMULA]
    common.report("backbones", title, common.table(header, table_rows), notes, smoke=args.smoke,
                  load_before=load_before, other_load=other_load)

if __name__ == "__main__":
    main()
