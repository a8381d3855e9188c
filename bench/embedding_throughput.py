"""Embedding throughput: esmloc's inference engine vs the loop a user writes, and the fraction of the compute bound.

    python bench/embedding_throughput.py                 # N=256 DeepLoc proteins, ESM-2 8M architecture, 3 repeats
    python bench/embedding_throughput.py --n 512 --repeats 5 --variants all
    python bench/embedding_throughput.py --smoke         # tiny model, a few proteins: checks that the script runs

Each repeat measures, one after the other on the same proteins (the first N rows of the DeepLoc 2.0 CSV, cropped to
1022 residues as the model does), mean-pooled embeddings computed by:

- baseline: the plain loop a user writes: proteins in dataset order, batches of 8 padded to the longest
  (`tokenizer(batch, padding=True)`), `model.esm(**batch)` under `torch.no_grad()` with the library's default
  attention (SDPA in transformers 5), masked mean over residues;
- engine: `esmloc.engine.Engine(...).embed(sequences, "mean")` (length-sorted token-budget batches, packed forward,
  inference mode, everything from tokenisation to the pooled vectors in input order);
- with --variants all, also: sorted + budget (the engine's batching with `EsmModel.forward` on padded batches, no
  packing), the engine running one batch at a time (all threads on each operation), the engine with its linear
  layers through `F.linear` (MKL) instead of oneDNN, and the engine under bf16 autocast on the CPU (reported with its
  error against fp32); --budgets adds the engine with other token budgets.

The backbone has random weights (the ESM-2 8M architecture: the same compute as the pretrained model). The compute
bound is the FLOPs of the real tokens (formula printed) divided by the machine's fp32 matmul peak, measured in the
same run right before each repeat: a 4096 x 4096 x 4096 matmul, median of 5, through torch.matmul (MKL) and
through oneDNN, the faster of the two (on AMD processors MKL runs its AVX2 code and oneDNN is about twice as fast).
"% of compute bound" is the achieved FLOP/s over that peak. Figures are medians over the repeats; ratios are medians
of the per-repeat ratios. Peak memory is the process's peak resident set size during each variant (first repeat),
minus the resident size before it.
"""

import argparse
import sys
import time
from pathlib import Path

import numpy as np
import torch

import common


def parse_arguments(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--n", type=int, default=256, help="number of proteins (default 256)")
    parser.add_argument("--repeats", type=int, default=3, help="repeats of every variant (default 3)")
    parser.add_argument("--architecture", default="esm2_t6_8M", help="ESM-2 architecture (default esm2_t6_8M)")
    parser.add_argument("--max_tokens_per_batch", type=int, default=None, help="the engine's token budget")
    parser.add_argument("--budgets", type=lambda text: [int(x) for x in text.split(",")], default=None,
                        help="also time the engine with each of these token budgets, e.g. 1024,2048,8192")
    parser.add_argument("--baseline_batch_size", type=int, default=8)
    parser.add_argument("--variants", choices=["main", "all"], default="main",
                        help="main: baseline and engine; all: also sorted+budget without packing, and bf16")
    parser.add_argument("--threads", type=int, default=None, help="torch.set_num_threads (default: torch's)")
    parser.add_argument("--max_other_load", type=float, default=0.05,
                        help="a repeat during which other processes kept more than this share of the CPUs busy is "
                             "discarded and run again (default 0.05); each repeat first waits for such a quiet moment")
    parser.add_argument("--retries", type=int, default=6, help="discarded repeats allowed in all (default 6)")
    parser.add_argument("--data", type=Path, default=common.DEEPLOC_CSV)
    parser.add_argument("--smoke", action="store_true", help="tiny model, 12 proteins, 1 repeat")
    args = parser.parse_args(argv)
    if args.smoke:
        args.n, args.repeats, args.architecture = min(args.n, 12), 1, "tiny"
    return args


def baseline_embed(model, tokenizer, sequences, batch_size):
    """The loop a user writes: dataset order, fixed-size batches padded to the longest."""
    out = []
    with torch.no_grad():
        for start in range(0, len(sequences), batch_size):
            batch = tokenizer(sequences[start:start + batch_size], padding=True, return_tensors="pt")
            hidden = model.esm(**batch).last_hidden_state
            residues = batch["attention_mask"].clone()
            residues[:, 0] = 0
            residues[torch.arange(len(residues)), batch["attention_mask"].sum(1) - 1] = 0  # <eos>
            out.append((hidden * residues[..., None]).sum(1) / residues.sum(1, keepdim=True).clamp(min=1))
    return torch.cat(out).numpy()


def main(argv=None):
    args = parse_arguments(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    from configuration_esmloc import ESM2_ARCHITECTURES, EsmLocConfig
    from esmloc.engine import Engine
    from esmloc.saving import tokenizer_for
    from modeling_esmloc import EsmForLocalization

    rows, source = common.load_proteins(args.data, args.n, args.smoke)
    sequences = [row["Sequence"] for row in rows]
    torch.manual_seed(0)
    model = EsmForLocalization(EsmLocConfig(esm_config=dict(ESM2_ARCHITECTURES[args.architecture]))).eval()
    tokenizer = tokenizer_for(model.config)
    lengths = [len(ids) for ids in tokenizer(sequences)["input_ids"]]
    flops = common.esm_flops(lengths, model.config.esm_config)
    load_before = common.load_average()

    variants = {
        "baseline (dataset order, batch 8, padded)": lambda: baseline_embed(model, tokenizer, sequences,
                                                                            args.baseline_batch_size),
        "engine": lambda: Engine(model, tokenizer, max_tokens_per_batch=args.max_tokens_per_batch,
                                 progress=False).embed(sequences, "mean"),
    }
    if args.variants == "all":
        variants["sorted + token budget, EsmModel.forward"] = lambda: Engine(
            model, tokenizer, max_tokens_per_batch=args.max_tokens_per_batch, progress=False, packed=False
        ).embed(sequences, "mean")
        variants["engine, one batch at a time (workers=1)"] = lambda: Engine(
            model, tokenizer, max_tokens_per_batch=args.max_tokens_per_batch, progress=False, workers=1
        ).embed(sequences, "mean")
        variants["engine, linear layers through F.linear (MKL)"] = lambda: Engine(
            model, tokenizer, max_tokens_per_batch=args.max_tokens_per_batch, progress=False, onednn=False
        ).embed(sequences, "mean")
        variants["engine, bf16 autocast"] = lambda: Engine(
            model, tokenizer, max_tokens_per_batch=args.max_tokens_per_batch, progress=False, precision="bf16"
        ).embed(sequences, "mean")
    for budget in args.budgets or []:
        variants[f"engine, max_tokens_per_batch {budget}"] = (
            lambda budget=budget: Engine(model, tokenizer, max_tokens_per_batch=budget, progress=False).embed(
                sequences, "mean"))
    names = list(variants)
    # Warm-up (first-call costs: thread pools, kernels), on a few proteins.
    few = sequences[:4]
    baseline_embed(model, tokenizer, few, args.baseline_batch_size)
    Engine(model, tokenizer, progress=False).embed(few, "mean")

    seconds = {name: [] for name in names}
    peaks, library_peaks, memory, outputs, contamination = [], [], {}, {}, []
    repeat, attempts = 0, 0
    while repeat < args.repeats:
        if not args.smoke:
            common.wait_until_quiet(args.max_other_load)
        attempts += 1
        timings, others = {}, []
        with common.OtherLoad() as load:
            measured = common.matmul_peaks_gflops(1024 if args.smoke else 4096)
        others.append(load.fraction)
        order = names if repeat % 2 == 0 else names[::-1]  # alternate, so that drifting load hits both
        for name in order:
            resident = common.peak_rss_mb() if common.reset_peak_rss() else None
            with common.OtherLoad() as load:
                start = time.perf_counter()
                result = variants[name]()
                timings[name] = time.perf_counter() - start
            others.append(load.fraction)
            if repeat == 0 and name not in outputs:
                outputs[name] = result
                if resident is not None:
                    memory[name] = common.peak_rss_mb() - resident
        worst = max((fraction for fraction in others if fraction is not None), default=0.0)
        summary = (f"matmul peak {measured['peak']:.0f} GFLOP/s; "
                   + ", ".join(f"{name}: {args.n / timings[name]:.2f}" for name in names) + " seq/s"
                   + f"; other processes used up to {100 * worst:.0f}% of the CPUs")
        if worst > args.max_other_load and attempts < args.repeats + args.retries and not args.smoke:
            print(f"repeat {repeat + 1} discarded (contaminated): {summary}", file=sys.stderr)
            continue
        print(f"repeat {repeat + 1}/{args.repeats}: {summary}", file=sys.stderr)
        for name in names:
            seconds[name].append(timings[name])
        peaks.append(measured["peak"])
        library_peaks.append(measured)
        contamination.append(worst)
        repeat += 1
    load_after = common.load_average()

    baseline_name = names[0]
    reference = outputs[baseline_name]
    header = ["variant", "seq/s", "real tokens/s", "GFLOP/s", "% of compute bound", "x baseline",
              "max abs diff vs baseline", "peak memory (MiB)"]
    table_rows = []
    for name in names:
        per_repeat = seconds[name]
        seq_s = common.median([args.n / s for s in per_repeat])
        tokens_s = common.median([sum(lengths) / s for s in per_repeat])
        gflops = common.median([flops / s / 1e9 for s in per_repeat])
        bound = common.median([flops / s / 1e9 / peak for s, peak in zip(per_repeat, peaks)])
        ratio = common.median([b / s for s, b in zip(per_repeat, seconds[baseline_name])])
        diff = float(np.abs(np.asarray(outputs[name]) - reference).max())
        table_rows.append([name, f"{seq_s:.2f}", f"{tokens_s:,.0f}", f"{gflops:.1f}", f"{100 * bound:.0f}%",
                           f"{ratio:.2f}x", f"{diff:.1e}",
                           f"{memory[name]:.0f}" if name in memory else "n/a"])
    peak = common.median(peaks)
    bound_seq_s = peak * 1e9 / (flops / args.n)
    print()
    print(f"Embedding throughput: {source}, ESM-2 {args.architecture} architecture (random weights), "
          f"max_residues {model.config.max_residues}; {sum(lengths):,} real tokens, {flops / 1e12:.3f} TFLOP; "
          f"median of {args.repeats} repeat(s)")
    print(f"command: {common.command_line()}")
    print(f"machine: {common.machine_description()}; load average before {load_before}, after {load_after}; "
          f"other processes' share of the CPUs during the kept repeats: at most "
          f"{100 * max(contamination):.0f}% ({attempts - args.repeats} repeat(s) discarded)")
    libraries = ", ".join(f"{name} {common.median([m[name] for m in library_peaks]):.0f}"
                          for name in library_peaks[0] if name != "peak")
    print(f"fp32 matmul peak: {peak:.0f} GFLOP/s (median of the faster library per repeat: "
          f"{', '.join(f'{p:.0f}' for p in peaks)}; medians by library: {libraries}) "
          f"-> compute bound {bound_seq_s:.1f} seq/s for these proteins")
    print(f"engine token budget: {Engine(model, tokenizer, max_tokens_per_batch=args.max_tokens_per_batch).max_tokens_per_batch}")
    print(common.FLOP_FORMULA)
    print()
    print(common.table(header, table_rows))


if __name__ == "__main__":
    main()
