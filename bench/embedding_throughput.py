"""Embedding throughput: esmloc's inference engine vs the loop a user writes, and the fraction of the compute bound.

    python bench/embedding_throughput.py                 # N=256 DeepLoc proteins, ESM-2 8M architecture, 3 repeats
    python bench/embedding_throughput.py --n 512 --repeats 5 --variants all
    python bench/embedding_throughput.py --smoke         # tiny model, a few proteins: checks that the script runs

Each repeat measures, one after the other on the same proteins (the first N rows of the DeepLoc 2.0 CSV, cropped to
1022 residues as the model does), mean-pooled embeddings computed by:

- baseline: the plain loop a user writes: proteins in dataset order, batches of 8 padded to the longest
  (`tokenizer(batch, padding=True)`), `model.esm(**batch)` under `torch.no_grad()` with the library's default
  attention (SDPA in transformers 5), masked mean over residues;
- engine: `esmloc.engine.Engine(...).embed(sequences, "mean")` (even token-budget batches, padding-free forward,
  inference mode, everything from tokenisation to the pooled vectors in input order); the `Engine` is built before
  the timings (its set-up, printed apart, is the padding-free view and, for int8, every weight quantised and packed:
  a long job pays it once, and esm-cpp's loading and quantisation are not timed either);
- engine at each of --precisions (default fp32,bf16,int8): `precision="bf16"` (autocast), `"int8"` (dynamic int8
  linear layers through oneDNN); each with its error against the fp32 engine and its share of the compute bound at
  the precision it runs in (bf16 and int8 matmul peaks are measured in the same run, as fp32's);
- sorted + token budget, EsmModel.forward: the engine's batching with the stock model on padded batches;
- with --peer esm-cpp: the C++ peer (bench/peer_esm_cpp.py; installed into its own environment on first use) on
  the same weights and token ids, fp32 and, from ESM-2 150M up, int8 (those of --precisions); one protein per call (its only way to
  return hidden states); its time is its forward passes only (process start and model loading excluded);
- with --variants all, also: the engine running one batch at a time (all threads on each operation), and the engine
  with the batches it ran before they were balanced (sorted by length under a padded budget, so the last batches are
  small and a worker may wait idle at the end); --budgets adds the engine with other token budgets.

The backbone has random weights (the chosen ESM-2 architecture: the same compute as the pretrained model). The
compute bound is the FLOPs of the real tokens (formula printed) divided by the machine's matmul peak at the
precision a variant runs in, measured in the same run right before each repeat: a 4096 x 4096 x 4096 matmul,
median of 5; fp32 through torch.matmul (MKL) and through oneDNN, the faster of the two (on AMD processors MKL runs
its AVX2 code and oneDNN is about twice as fast); bf16 likewise; int8 through oneDNN's int8 linear.
"% of compute bound" is the achieved FLOP/s over that peak. Figures are medians over the repeats; ratios are medians
of the per-repeat ratios. "RSS rise" is the process's peak resident set size during a variant's first run minus its
resident size just before: the memory that variant added. It is not the variant's own peak: memory that earlier
variants freed is reused first, so it depends on the run order (bench/predict_memory.py measures whole processes).
The peer runs in its own process: n/a. The table is also written to docs/bench/embedding_throughput-ARCH.md.
"""

import argparse
import time
from pathlib import Path

import numpy as np
import torch

import common


def parse_arguments(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--n", type=int, default=256, help="number of proteins (default 256)")
    parser.add_argument("--repeats", type=int, default=3, help="repeats of every variant (default 3)")
    parser.add_argument("--architecture", default="esm2_t6_8M",
                        help="ESM-2 architecture: esm2_t6_8M (default), esm2_t12_35M, esm2_t30_150M, esm2_t33_650M")
    parser.add_argument("--precisions", type=lambda text: text.split(","), default=["fp32", "bf16", "int8"],
                        help="precisions to time (default fp32,bf16,int8): the engine's, and the peer's where it has them")
    parser.add_argument("--peer", choices=["none", "esm-cpp"], default="none",
                        help="also time the esm-cpp peer (installed into bench/results/esm-cpp-venv on first use)")
    parser.add_argument("--no_baseline", action="store_true",
                        help="skip the plain loop (slow at large sizes); ratios are then against the fp32 engine")
    parser.add_argument("--max_tokens_per_batch", type=int, default=None, help="the engine's token budget")
    parser.add_argument("--budgets", type=lambda text: [int(x) for x in text.split(",")], default=None,
                        help="also time the engine with each of these token budgets, e.g. 1024,2048,8192")
    parser.add_argument("--baseline_batch_size", type=int, default=8)
    parser.add_argument("--variants", choices=["main", "all"], default="main",
                        help="main: baseline, engine at each precision, sorted+budget padded; all: also one batch at a time")
    parser.add_argument("--threads", type=int, default=None, help="torch.set_num_threads (default: torch's)")
    common.add_quiet_machine_arguments(parser)
    parser.add_argument("--data", type=Path, default=common.DEEPLOC_CSV)
    parser.add_argument("--smoke", action="store_true", help="tiny model, 12 proteins, 1 repeat")
    args = parser.parse_args(argv)
    if args.smoke:
        args.n, args.repeats, args.architecture = min(args.n, 12), 1, "tiny"
    unknown = set(args.precisions) - {"fp32", "bf16", "int8"}
    if unknown:
        parser.error(f"--precisions: unknown {sorted(unknown)}")
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
    from esmloc.engine import Engine, length_batches
    from esmloc.saving import tokenizer_for
    from modeling_esmloc import EsmForLocalization

    rows, source = common.load_proteins(args.data, args.n, args.smoke)
    sequences = [row["Sequence"] for row in rows]
    torch.manual_seed(0)
    model = EsmForLocalization(EsmLocConfig(esm_config=dict(ESM2_ARCHITECTURES[args.architecture]))).eval()
    tokenizer = tokenizer_for(model.config)
    encoded = tokenizer(sequences)["input_ids"]
    lengths = [len(ids) for ids in encoded]
    flops = common.backbone_flops(lengths, model.config.esm_config)
    load_before = common.load_average()
    budget = args.max_tokens_per_batch

    def engine(**kwargs):
        return Engine(model, tokenizer, progress=False, **{"max_tokens_per_batch": budget, **kwargs})

    # Engines are built before the timings, as esm-cpp's loading and quantisation happen before its own: what is
    # timed is the steady state a long job runs in; the set-up (the padding-free view; for int8 every weight
    # quantised and packed) is reported apart.
    setup_seconds, engines = {}, {}

    def prepared(name, **kwargs):
        start = time.perf_counter()
        engines[name] = engine(**kwargs)
        setup_seconds[name] = time.perf_counter() - start
        return engines[name]

    # The precision each variant computes in: its compute bound is that precision's matmul peak.
    variants, precision_of = {}, {}
    if not args.no_baseline:
        variants["baseline (dataset order, batch 8, padded)"] = lambda: baseline_embed(
            model, tokenizer, sequences, args.baseline_batch_size)
    for precision in args.precisions:
        name = "engine" if precision == "fp32" else f"engine, {precision}"
        variants[name] = lambda built=prepared(name, precision=precision): built.embed(sequences, "mean")
        precision_of[name] = precision
    name = "sorted + token budget, EsmModel.forward"
    variants[name] = lambda built=prepared(name, packed=False): built.embed(sequences, "mean")
    if args.variants == "all":
        name = "engine, one batch at a time (workers=1)"
        variants[name] = lambda built=prepared(name, workers=1): built.embed(sequences, "mean")
        # The engine's batches before balancing: sorted by length under a padded budget, the last ones small.
        name = "engine, length-sorted batches (not balanced)"
        unbalanced = prepared(name)
        unbalanced.batches = lambda lengths: length_batches(lengths, unbalanced.max_tokens_per_batch)
        variants[name] = lambda: unbalanced.embed(sequences, "mean")
    for other in args.budgets or []:
        name = f"engine, max_tokens_per_batch {other}"
        variants[name] = lambda built=prepared(name, max_tokens_per_batch=other): built.embed(sequences, "mean")
    peer_seconds = {}
    if args.peer == "esm-cpp":
        import peer_esm_cpp

        python = peer_esm_cpp.ensure_environment()
        work = Path(__file__).resolve().parent / "results" / "esm-cpp" / args.architecture
        weights = peer_esm_cpp.write_masked_lm_weights(model.esm, work / "model.safetensors")
        supported = ["fp32"]
        if model.config.esm_config.num_hidden_layers >= peer_esm_cpp.INT8_MIN_LAYERS:
            supported.append("int8")
        for precision in [p for p in supported if p in args.precisions]:
            name = f"esm-cpp {peer_esm_cpp.ESM_CPP_REQUIREMENT.split('==')[1]}, {precision}, one protein per call"

            def peer(precision=precision, name=name):
                embeddings, seconds = peer_esm_cpp.run_peer(python, weights, encoded, work, int8=precision == "int8",
                                                            threads=torch.get_num_threads())
                peer_seconds[name] = seconds
                return embeddings

            variants[name] = peer
            precision_of[name] = precision
    names = list(variants)
    # Warm-up (first-call costs: thread pools, kernels), on a few proteins.
    few = sequences[:4]
    baseline_embed(model, tokenizer, few, args.baseline_batch_size)
    for built in engines.values():
        built.embed(few, "mean")

    seconds = {name: [] for name in names}
    peaks, library_peaks, memory, outputs, contamination = [], [], {}, {}, []
    repeat, attempts = 0, 0
    while repeat < args.repeats:
        if not args.smoke:
            common.wait_until_quiet(args.max_other_load, timeout=args.max_wait)
        attempts += 1
        timings, others = {}, []
        with common.OtherLoad() as load:
            measured = common.matmul_peaks_gflops(1024 if args.smoke else 4096)
            low = common.low_precision_peaks_gflops(1024 if args.smoke else 4096)
        others.append(load.fraction)
        order = names if repeat % 2 == 0 else names[::-1]  # alternate, so that drifting load hits both
        for name in order:
            resident = common.peak_rss_mb() if common.reset_peak_rss() else None
            with common.OtherLoad() as load:
                start = time.perf_counter()
                result = variants[name]()
                timings[name] = peer_seconds.get(name, time.perf_counter() - start)
            others.append(load.fraction)
            if repeat == 0 and name not in outputs:
                outputs[name] = result
                if resident is not None and name not in peer_seconds:
                    memory[name] = common.peak_rss_mb() - resident
        worst = max((fraction for fraction in others if fraction is not None), default=0.0)
        summary = (f"matmul peaks fp32 {measured['peak']:.0f}, "
                   + ", ".join(f"{key} {value:.0f}" for key, value in low.items()) + " GFLOP/s; "
                   + ", ".join(f"{name}: {args.n / timings[name]:.2f}" for name in names) + " seq/s"
                   + f"; other processes used up to {100 * worst:.0f}% of the CPUs")
        if not common.repeat_is_kept(args, worst, repeat, attempts, summary):
            continue
        for name in names:
            seconds[name].append(timings[name])
        peaks.append({"fp32": measured["peak"], **low})
        library_peaks.append(measured)
        contamination.append(worst)
        repeat += 1

    baseline_name = names[0]
    reference = outputs["engine"] if "engine" in outputs else outputs[baseline_name]
    header = ["variant", "seq/s", "real tokens/s", "GFLOP/s", "precision", "% of compute bound",
              f"x {baseline_name.split(' (')[0]}", "max abs diff vs fp32 engine",
              "RSS rise, run-order dependent (MiB)"]
    table_rows = []
    for name in names:
        per_repeat = seconds[name]
        precision = precision_of.get(name, "fp32")
        seq_s = common.median([args.n / s for s in per_repeat])
        tokens_s = common.median([sum(lengths) / s for s in per_repeat])
        gflops = common.median([flops / s / 1e9 for s in per_repeat])
        bound = common.median([flops / s / 1e9 / peak[precision] if precision in peak else None
                               for s, peak in zip(per_repeat, peaks)])
        ratio = common.median([b / s for s, b in zip(per_repeat, seconds[baseline_name])])
        diff = float(np.abs(np.asarray(outputs[name]) - reference).max())
        table_rows.append([name, f"{seq_s:.2f}", f"{tokens_s:,.0f}", f"{gflops:.1f}", precision,
                           f"{100 * bound:.0f}%" if bound is not None else "n/a", f"{ratio:.2f}x", f"{diff:.1e}",
                           f"{memory[name]:.0f}" if name in memory else "n/a"])
    peak = common.median([p["fp32"] for p in peaks])
    bound_seq_s = peak * 1e9 / (flops / args.n)
    title = (f"Embedding throughput: {source}, ESM-2 {args.architecture} architecture (random weights), "
             f"max_residues {model.config.max_residues}; {sum(lengths):,} real tokens, {flops / 1e12:.3f} TFLOP; "
             f"median of {args.repeats} repeat(s)")
    other_load = (f"other processes' share of the CPUs during the kept repeats: at most "
                  f"{100 * max(contamination):.0f}% ({attempts - args.repeats} repeat(s) discarded)")
    libraries = ", ".join(f"{name} {common.median([m[name] for m in library_peaks]):.0f}"
                          for name in library_peaks[0] if name != "peak")
    low_peaks = ", ".join(f"{key} {common.median([p.get(key) for p in peaks]):.0f}"
                          for key in peaks[0] if key != "fp32")
    fp32_peaks = ", ".join(f"{p['fp32']:.0f}" for p in peaks)
    notes = [
        f"fp32 matmul peak: {peak:.0f} GFLOP/s (median of the faster library per repeat: {fp32_peaks}; medians by "
        f"library: {libraries}) -> compute bound {bound_seq_s:.1f} seq/s for these proteins; low-precision peaks "
        f"(GFLOP/s): {low_peaks}",
        f"engine token budget: {engine().max_tokens_per_batch}; engine set-up, not timed (as esm-cpp's loading and "
        "quantisation): " + ", ".join(f"{name} {seconds:.2f} s" for name, seconds in setup_seconds.items()),
        common.FLOP_FORMULA,
    ]
    common.report(f"embedding_throughput-{args.architecture}", title, common.table(header, table_rows), notes,
                  smoke=args.smoke, load_before=load_before, other_load=other_load)

if __name__ == "__main__":
    main()
