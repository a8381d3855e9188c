"""What a per-residue explanation of one long protein costs: the occlusion explainer (esmloc.explain, windows every
`stride` residues as its token budget allows) beside the per-residue occlusion it replaced (a window of 5 centred on
every residue: one forward pass per residue), in the same run, on ESM-2 architectures with random weights.

    python bench/explain_cost.py                                   # 8M, 35M, 150M; a 1,022-residue protein
    python bench/explain_cost.py --architectures esm2_t6_8M --precisions fp32,bf16 --full_baseline
    python bench/explain_cost.py --smoke

Timing needs no trained weights: the cost of a forward pass does not depend on their values. The protein is drawn
from Swiss-Prot's amino-acid frequencies (esmloc.demo) with a fixed seed. Each method runs once to warm up, then
`--repeats` times; the table gives the median of the wall time and of this process's CPU time. The per-residue
method is timed on its first `--baseline_passes` variants (the same engine call it made, all its variants at once)
and scaled to all of them, since every variant has the protein's length and costs the same (`--full_baseline` runs
them all). On a shared machine each measurement waits (up to `--max_wait` s) until other processes use less than
`--max_other_load` of the CPUs, and the load they caused while it ran is printed per row: rows measured under load
are slower than the machine can do (their CPU seconds / cores say more), ratios less so.
"""

import argparse
import os
import random
import statistics
import sys
import time

import torch

import common


PER_RESIDUE_WINDOW = 5  # the method as it was first written: window 5 centred on every residue


def random_protein(residues: int, seed: int = 0) -> str:
    from esmloc.demo import _BACKGROUND, _draw

    return "M" + _draw(random.Random(seed), _BACKGROUND, residues - 1)


def run_per_residue(explainer, ids, passes: int) -> None:
    """The per-residue method's first `passes` variants in one engine call, as it ran them (all at once)."""
    variants = explainer.occluded(ids, window=PER_RESIDUE_WINDOW)[:passes]
    engine = explainer.engine
    for _ in engine.map_batches(variants, lambda lengths, hidden: engine.logits_from_hidden(hidden, lengths)):
        pass


def own_cpu_seconds() -> float:
    times = os.times()
    return times.user + times.system


def measure(function, repeats: int) -> tuple[float, float, float | None]:
    """Medians over `repeats` runs of `function()`: wall seconds and this process's CPU seconds (all its threads;
    on a loaded machine, CPU seconds / cores estimates the quiet wall time better than the wall time does); and the
    share of the CPUs other processes used meanwhile."""
    walls, cpus = [], []
    with common.OtherLoad() as load:
        for _ in range(repeats):
            cpu, wall = own_cpu_seconds(), time.perf_counter()
            function()
            walls.append(time.perf_counter() - wall)
            cpus.append(own_cpu_seconds() - cpu)
    return statistics.median(walls), statistics.median(cpus), load.fraction


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--architectures", type=lambda text: text.split(","),
                        default=["esm2_t6_8M", "esm2_t12_35M", "esm2_t30_150M"])
    parser.add_argument("--residues", type=int, default=1022)
    parser.add_argument("--precisions", type=lambda text: text.split(","), default=["fp32"])
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--baseline_passes", type=int, default=48,
                        help="variants of the per-residue method timed and scaled to all (default 48)")
    parser.add_argument("--full_baseline", action="store_true", help="time every variant of the per-residue method")
    parser.add_argument("--max_other_load", type=float, default=0.05)
    parser.add_argument("--max_wait", type=float, default=900, help="seconds to wait for a quiet machine, each time")
    parser.add_argument("--smoke", action="store_true")
    args = parser.parse_args(argv)
    if args.smoke:
        args.architectures, args.residues, args.repeats, args.full_baseline = ["tiny"], 300, 1, True
    from configuration_esmloc import ESM2_ARCHITECTURES, EsmLocConfig
    from esmloc.explain import DEFAULT_TOKEN_BUDGET, Explainer, occlusion_centres, stride_for, window_for
    from esmloc.saving import tokenizer_for
    from modeling_esmloc import EsmForLocalization

    def quiet():
        if not args.smoke:
            common.wait_until_quiet(args.max_other_load, timeout=args.max_wait)

    sequence = random_protein(args.residues)
    quiet()
    peak = common.matmul_peaks_gflops(1024 if args.smoke else 4096)["peak"]
    rows = []
    for architecture in args.architectures:
        torch.manual_seed(0)
        model = EsmForLocalization(EsmLocConfig(esm_config=dict(ESM2_ARCHITECTURES[architecture]))).eval()
        tokenizer = tokenizer_for(model.config)
        for precision in args.precisions:
            explainer = Explainer(model, tokenizer, precision=precision)
            ids = explainer.engine.encode([sequence])[0]
            residues = len(ids) - 2
            pass_gflop = common.backbone_flops([len(ids)], model.config.esm_config) / 1e9
            all_passes = residues + 1
            passes = all_passes if args.full_baseline else min(args.baseline_passes, all_passes)
            run_per_residue(explainer, ids, 2 * explainer.engine.workers)  # warm-up
            quiet()
            wall, cpu, load = measure(lambda: run_per_residue(explainer, ids, passes), args.repeats)
            scale = all_passes / passes
            if precision == args.precisions[0]:
                baseline_seconds = wall * scale
            scaled = "" if passes == all_passes else f" ({passes} passes timed, scaled)"
            rows.append([f"per-residue occlusion (before), {precision}", architecture, residues,
                         f"{PER_RESIDUE_WINDOW} / 1", all_passes, f"{all_passes * pass_gflop:.0f}",
                         f"{wall * scale:.1f}{scaled}", f"{cpu * scale:.1f}", f"{wall / passes:.3f}",
                         f"{baseline_seconds / (wall * scale):.2f}x", f"{load:.0%}"])
            # No warm-up of its own: the per-residue runs warmed the same engine on the same shapes.
            quiet()
            wall, cpu, load = measure(lambda: explainer.explain(sequence), args.repeats)
            stride = explainer.stride_for(residues)
            passes = len(occlusion_centres(residues, stride)) + 1
            passes += explainer.attention_pooling  # the pooling weights' own forward pass
            rows.append([f"strided occlusion (esmloc.explain, default budget), {precision}", architecture, residues,
                         f"{window_for(stride)} / {stride}", passes, f"{passes * pass_gflop:.0f}", f"{wall:.1f}",
                         f"{cpu:.1f}", f"{wall / passes:.3f}", f"{baseline_seconds / wall:.1f}x", f"{load:.0%}"])
    strides = ", ".join(f"{length}: {stride_for(length, DEFAULT_TOKEN_BUDGET)} "
                        f"(window {window_for(stride_for(length, DEFAULT_TOKEN_BUDGET))})"
                        for length in (100, 220, 300, 500, 750, 1022))
    print(f"Explanation cost: one protein of {args.residues} residues, ESM-2 architectures with random weights; "
          f"seconds: median of {args.repeats} after a warm-up")
    print(f"command: {common.command_line()}")
    print(f"machine: {common.machine_description()}; load average {common.load_average()}; fp32 matmul peak "
          f"{peak:.0f} GFLOP/s at the start")
    print(f"default token budget {DEFAULT_TOKEN_BUDGET}: stride by protein length: {strides}")
    body = (common.table(["method", "architecture", "residues", "window / stride", "forward passes", "GFLOP",
                          "seconds", "CPU s (own)", "s per pass", "x faster than per-residue fp32", "other load"], rows)
            + f"\n\nGFLOP: the backbone's, {common.FLOP_FORMULA}\n\nDefault token budget {DEFAULT_TOKEN_BUDGET}: "
            f"stride by protein length: {strides}")
    print()
    print(body)
    common.write_table("explain_cost", f"Explanation cost: one protein of {args.residues} residues, ESM-2 "
                       f"architectures with random weights, seconds the median of {args.repeats}", body,
                       smoke=args.smoke)


if __name__ == "__main__":
    sys.exit(main())
