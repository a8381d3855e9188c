"""GPU inference speed (issue 25): the stock EsmModel a user runs against esmloc's engine with each of its
padding-free attention kernels, at ESM-2 35M, 150M, 650M and 3B, side by side in one run.

    python bench/gpu_speed.py                        # a CUDA machine: every size (bench/gpu_check.py runs this)
    python bench/gpu_speed.py --sizes esm2_t33_650M --n 2000 --repeats 5
    python bench/gpu_speed.py --smoke                # CPU, tiny model, a few proteins: checks that the script runs

Proteins: random amino-acid sequences with the lengths of the first N DeepLoc 2.0 proteins in file order
(`common.deeploc_lengths`), cropped to 1022 residues; random weights of each architecture (the compute of the
pretrained model). Every variant returns mean-pooled embeddings (float32, on the host, input order), computed in bf16
autocast over fp32 weights (the engine's CUDA default), so that the ratios measure batching and attention, not
precision:

- (a) stock, file order, batches of 8: `EsmModel` with transformers' default attention (SDPA) under
  `torch.no_grad()`, batches of 8 in file order padded to their longest: the loop a user writes;
- (b) stock, sorted, token budget: the same model on batches sorted by length whose padded size stays within the
  engine's token budget (`esmloc.engine.length_batches`);
- (c) engine, MODE: `esmloc.engine.Engine(..., attention=MODE).embed(sequences, "mean")` for each padding-free
  attention (`esmloc.varlen_attention.ATTENTION_MODES`, grouped aside: one SDPA call per run of equal lengths suits CPUs);
  the line under the table names the one `attention="auto"` picks here.

proteins/s and tokens/s count the real tokens (<cls>, residues, <eos>). "% of bf16 bound": the FLOPs of the real
tokens (formula printed) per second over the bf16 matmul peak measured in the same run (8192^3 on random data,
median of 10 after warm-up, CUDA events). "peak GiB": torch.cuda.max_memory_allocated during the variant's first
pass, above what was allocated before it (the weights): it must not grow with the number of proteins. Every variant
is warmed up on two small batches first (compilation, kernel choice: flex attention compiles on its first calls).
Figures are medians over --repeats passes; variants alternate order between passes. Then, at 650M, the engine's
fastest attention at several token budgets: the CUDA default of `max_tokens_per_batch` (esmloc/engine.py) is set from
that table. A run that reaches --deadline seconds skips what is left (said under the tables), so that bench/gpu_check.py
keeps to its time on the GPU machine.
"""

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np
import torch

import common


# Proteins per size: about 1.5 s per engine pass on an H200 if the engine reaches 40% of the bf16 peak (estimated
# from the FLOPs of DeepLoc's mean length, 494 tokens; not measured). Sizes run in RUN_ORDER: the goals are at 650M,
# and a run out of time drops the least important sizes.
PROTEINS_PER_SIZE = {"esm2_t12_35M": 3000, "esm2_t30_150M": 1500, "esm2_t33_650M": 600, "esm2_t36_3B": 150}
RUN_ORDER = ("esm2_t33_650M", "esm2_t36_3B", "esm2_t30_150M", "esm2_t12_35M")
BUDGET_SIZE = "esm2_t33_650M"
BUDGETS = (16384, 32768, 65536, 131072)
STOCK_BATCH = 8


def parse_arguments(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--sizes", type=lambda text: text.split(","), default=list(PROTEINS_PER_SIZE),
                        help="ESM-2 architectures (configuration_esmloc.ESM2_ARCHITECTURES), comma-separated")
    parser.add_argument("--n", type=int, default=None, help=f"proteins per size (default {PROTEINS_PER_SIZE})")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--attentions", type=lambda text: text.split(","), default=None,
                        help="the engine's attentions to time (default: every padding-free one but grouped)")
    parser.add_argument("--max_tokens_per_batch", type=int, default=None,
                        help="the engine's (and (b)'s padded) token budget; default the engine's for the device")
    parser.add_argument("--budgets", type=lambda text: [int(x) for x in text.split(",")], default=list(BUDGETS),
                        help=f"token budgets timed at {BUDGET_SIZE} with the fastest attention ('' for none)")
    parser.add_argument("--deadline", type=float, default=None, help="seconds after which what is left is skipped")
    parser.add_argument("--json", type=Path, default=None, help="also write the results here")
    parser.add_argument("--smoke", action="store_true", help="CPU, tiny model, 12 proteins, 1 repeat")
    args = parser.parse_args(argv)
    if args.smoke:
        args.sizes, args.n, args.repeats, args.budgets = ["tiny"], 12, 1, [256, 1024]
    return args


def synchronize(device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def stock_embed(esm, tokenizer, sequences, batches, device) -> np.ndarray:
    """The loop a user writes: each batch (indices) padded to its longest, `EsmModel` under `torch.no_grad()` and
    bf16 autocast, the masked mean over residues (<cls> and <eos> excluded)."""
    out = np.zeros((len(sequences), esm.config.hidden_size), dtype=np.float32)
    with torch.no_grad(), torch.autocast(device.type, dtype=torch.bfloat16):
        for batch in batches:
            batch = list(batch)
            encoded = tokenizer([sequences[i] for i in batch], padding=True, return_tensors="pt").to(device)
            hidden = esm(**encoded).last_hidden_state.float()
            residues = encoded["attention_mask"].clone()
            residues[:, 0] = 0
            residues[torch.arange(len(batch), device=device), encoded["attention_mask"].sum(1) - 1] = 0  # <eos>
            pooled = (hidden * residues[..., None]).sum(1) / residues.sum(1, keepdim=True).clamp(min=1)
            out[batch] = pooled.cpu().numpy()
    return out


class Clock:
    """The run's deadline (None: none)."""

    def __init__(self, seconds):
        self.start, self.seconds = time.monotonic(), seconds

    def elapsed(self) -> float:
        return time.monotonic() - self.start

    def out_of_time(self) -> bool:
        return self.seconds is not None and self.elapsed() > self.seconds


def measure(variants: dict, device, repeats: int, clock: Clock, sequences) -> dict:
    """Times every variant (name -> function returning the embeddings) `repeats` times, alternating their order;
    returns name -> {"seconds": [...], "peak_gib": ..., "output": ..., "error": ...}."""
    results = {name: {"seconds": [], "peak_gib": None, "output": None, "error": None} for name in variants}
    for name, function in variants.items():  # warm-up: two small batches of different shapes
        try:
            function(sequences[:16])
            function(sequences[16:40])
        except Exception as error:  # noqa: BLE001 -- a variant that fails is reported, the others still run
            results[name]["error"] = f"{type(error).__name__}: {error}"[:200]
    for repeat in range(repeats):
        names = [name for name in variants if results[name]["error"] is None]
        for name in names if repeat % 2 == 0 else names[::-1]:
            if repeat and clock.out_of_time():
                continue
            before = torch.cuda.memory_allocated(device) if device.type == "cuda" else 0
            if device.type == "cuda":
                torch.cuda.reset_peak_memory_stats(device)
            try:
                synchronize(device)
                start = time.perf_counter()
                output = variants[name](sequences)
                synchronize(device)
                results[name]["seconds"].append(time.perf_counter() - start)
            except Exception as error:  # noqa: BLE001
                results[name]["error"] = f"{type(error).__name__}: {error}"[:200]
                continue
            if results[name]["output"] is None:
                results[name]["output"] = output
                if device.type == "cuda":
                    results[name]["peak_gib"] = (torch.cuda.max_memory_allocated(device) - before) / 2**30
    return results


def build_model(size: str, device):
    from configuration_esmloc import ESM2_ARCHITECTURES, EsmLocConfig
    from modeling_esmloc import EsmForLocalization

    torch.manual_seed(0)
    with torch.device(device):  # initialised where it runs: a 3B model's random init on the host takes minutes
        model = EsmForLocalization(EsmLocConfig(esm_config=dict(ESM2_ARCHITECTURES[size])))
    return model.eval()


def rows_for(results: dict, n: int, tokens: int, flops: float, peak_tflops: float, reference: str) -> list[list]:
    rows = []
    reference_seconds = common.median(results[reference]["seconds"]) if reference in results else None
    reference_output = results[reference]["output"] if reference in results else None
    for name, result in results.items():
        if not result["seconds"]:
            rows.append([name, "failed: " + result["error"] if result["error"] else "skipped (time)", *[""] * 5])
            continue
        seconds = common.median(result["seconds"])
        difference = ""
        if reference_output is not None and result["output"] is not None:
            difference = f"{float(np.abs(result['output'] - reference_output).max()):.1e}"
        rows.append([name, f"{n / seconds:,.1f}", f"{tokens / seconds:,.0f}",
                     f"{100 * flops / seconds / 1e12 / peak_tflops:.1f}%",
                     f"{reference_seconds / seconds:.2f}x" if reference_seconds else "n/a",
                     f"{result['peak_gib']:.2f}" if result["peak_gib"] is not None else "n/a", difference])
    return rows


HEADER = ["variant", "proteins/s", "tokens/s", "% of bf16 bound", "x (a)", "peak GiB", "max abs diff vs (a)"]


def main(argv=None):
    args = parse_arguments(argv)
    from esmloc import varlen_attention
    from esmloc.engine import Engine, default_max_tokens_per_batch, length_batches
    from esmloc.saving import tokenizer_for

    clock = Clock(args.deadline)
    device = torch.device("cuda" if torch.cuda.is_available() and not args.smoke else "cpu")
    if device.type != "cuda" and not args.smoke:
        print("SKIPPED: no CUDA device (this benchmark is for a GPU; --smoke runs it on the CPU).")
        return 0
    all_lengths, source = common.deeploc_lengths(smoke=args.smoke)
    if device.type == "cuda":
        peak_tflops = common.cuda_matmul_peak_tflops()
        gpu = f"{torch.cuda.get_device_name(device)}, {torch.cuda.get_device_properties(device).total_memory / 2**30:.0f} GiB"
    else:
        peak_tflops = common.low_precision_peaks_gflops(512, 3)["bf16"] / 1000
        gpu = "no GPU (CPU smoke run)"
    budget = args.max_tokens_per_batch or default_max_tokens_per_batch(device)
    attentions = args.attentions or [mode for mode in varlen_attention.ATTENTION_MODES if mode != "grouped"]
    order = [size for size in RUN_ORDER if size in args.sizes] + [size for size in args.sizes if size not in RUN_ORDER]
    skipped, summary, auto_choice, fastest = [], {}, {}, {}
    # The header first and each table as soon as it is measured (sizes in RUN_ORDER): a run stopped from outside
    # keeps what it measured.
    print(f"\nGPU inference speed: {gpu}; {source}, first N proteins per size, cropped to 1022 residues, random "
          f"weights, bf16 autocast; engine token budget {budget}; median of {args.repeats} pass(es); measured bf16 "
          f"matmul peak {peak_tflops:.3g} TFLOP/s")
    print(f"command: {common.command_line()}")
    print(f"machine: {common.machine_description()}")
    print(common.FLOP_FORMULA, flush=True)
    for size in order:
        if clock.out_of_time():
            skipped.append(size)
            continue
        n = args.n or PROTEINS_PER_SIZE.get(size, 1000)
        lengths = all_lengths[:n]
        sequences = common.random_proteins(lengths)
        model = build_model(size, device)
        tokenizer = tokenizer_for(model.config)
        tokens = [len(sequence) + 2 for sequence in sequences]
        flops = common.backbone_flops(tokens, model.config.esm_config)
        head_size = model.config.esm_config.hidden_size // model.config.esm_config.num_attention_heads

        def stock(batches_of):
            return lambda chosen: stock_embed(model.esm, tokenizer, chosen, batches_of(chosen), device)

        variants = {
            f"(a) stock, file order, batches of {STOCK_BATCH}": stock(
                lambda chosen: [range(i, min(i + STOCK_BATCH, len(chosen))) for i in range(0, len(chosen), STOCK_BATCH)]),
            "(b) stock, sorted, token budget": stock(
                lambda chosen: length_batches([len(s) + 2 for s in chosen], budget)),
        }
        unavailable = {}
        for mode in attentions:
            problem = varlen_attention.attention_problem(mode, device, torch.bfloat16, head_size)
            if problem:
                unavailable[f"(c) engine, {mode}"] = problem
                continue
            # One batch at a time, as on CUDA (on CPU, flex's eager path in worker threads trips the `kernels`
            # package's per-thread state under transformers 5.25).
            engine = Engine(model, tokenizer, device=device, precision="bf16", attention=mode,
                            max_tokens_per_batch=budget, progress=False, workers=1)
            variants[f"(c) engine, {mode}"] = lambda chosen, engine=engine: engine.embed(chosen, "mean")
        auto_choice[size] = Engine(model, tokenizer, device=device, precision="bf16", max_tokens_per_batch=budget,
                                   progress=False).attention_mode()
        results = measure(variants, device, args.repeats, clock, sequences)
        for name, problem in unavailable.items():
            results[name] = {"seconds": [], "peak_gib": None, "output": None, "error": f"does not run here: {problem}"}
        reference = next(iter(variants))
        print(f"\n### {size} ({n} proteins, {sum(tokens):,} tokens, {flops / 1e12:.1f} TFLOP)\n")
        print(common.table(HEADER, rows_for(results, n, sum(tokens), flops, peak_tflops, reference)))
        engines = {name: common.median(r["seconds"]) for name, r in results.items()
                   if name.startswith("(c)") and r["seconds"]}
        summary[size] = {"proteins": n, "tokens": sum(tokens), "tflop": flops / 1e12,
                         "variants": {name: {"seconds": r["seconds"], "peak_gib": r["peak_gib"], "error": r["error"]}
                                      for name, r in results.items()}}
        if engines:
            best = min(engines, key=engines.get)
            fastest[size] = best.split(", ", 1)[1]
            seconds_a = common.median(results[reference]["seconds"]) if results[reference]["seconds"] else None
            summary[size]["fastest_attention"] = fastest[size]
            summary[size]["engine_vs_a"] = seconds_a / engines[best] if seconds_a else None
            summary[size]["engine_bound"] = flops / engines[best] / 1e12 / peak_tflops
        print(f"\nattention='auto' picks here: {auto_choice[size]}; fastest: {fastest.get(size, 'n/a')}", flush=True)
        if size == (BUDGET_SIZE if not args.smoke else args.sizes[0]) and args.budgets and fastest.get(size):
            budget_variants = {
                f"engine, {fastest[size]}, {other} tokens": lambda chosen, engine=Engine(
                    model, tokenizer, device=device, precision="bf16", attention=fastest[size],
                    max_tokens_per_batch=other, progress=False, workers=1): engine.embed(chosen, "mean")
                for other in args.budgets}
            budget_results = measure(budget_variants, device, args.repeats, clock, sequences)
            print(f"\n### {size}, token budgets ({fastest[size]} attention)\n")
            print(common.table([*HEADER[:4], "x first budget", *HEADER[5:]],
                               rows_for(budget_results, n, sum(tokens), flops, peak_tflops,
                                        next(iter(budget_variants)))), flush=True)
            timed = {other: common.median(r["seconds"]) for other, r in zip(args.budgets, budget_results.values())
                     if r["seconds"]}
            if timed:
                quickest = min(timed.values())
                # The smallest budget within 3% of the fastest: bigger batches then buy nothing but memory.
                summary["recommended_cuda_budget"] = min(b for b, s in timed.items() if s <= 1.03 * quickest)
        model = variants = results = None  # the engines hold the model: free them before the next size
        budget_variants = budget_results = None
        if device.type == "cuda":
            torch.cuda.empty_cache()

    print()
    if skipped:
        print(f"skipped (out of time after {clock.elapsed():.0f} s): {', '.join(skipped)}")
    if fastest:
        print("fastest engine attention per size: " + ", ".join(f"{size} {mode}" for size, mode in fastest.items()))
    goal = summary.get(BUDGET_SIZE)
    if goal and goal.get("engine_vs_a"):
        met = goal["engine_vs_a"] >= 2 and goal["engine_bound"] >= 0.40
        print(f"goal at 650M (engine >= 2x (a) and >= 40% of the bf16 bound): {goal['engine_vs_a']:.2f}x, "
              f"{100 * goal['engine_bound']:.0f}%: {'met' if met else 'NOT met'}")
    if device.type == "cuda" and "flex" in attentions:  # each size compiles flex again; more means recompiles
        from torch._dynamo.utils import counters

        print(f"torch.compile for flex attention: {counters['stats']['unique_graphs']} graph(s) compiled in this run "
              f"({len(auto_choice)} size(s))")
    if "recommended_cuda_budget" in summary:
        print(f"recommended esmloc.engine.DEFAULT_MAX_TOKENS_PER_BATCH['cuda'] (smallest budget within 3% of the "
              f"fastest at {BUDGET_SIZE if not args.smoke else args.sizes[0]}): {summary['recommended_cuda_budget']}")
    if args.json:
        args.json.write_text(json.dumps({"gpu": gpu, "peak_bf16_tflops": peak_tflops, "budget": budget,
                                         "auto_choice": auto_choice, "skipped": skipped, **summary}, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
