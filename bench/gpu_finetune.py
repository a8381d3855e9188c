"""GPU fine-tuning speed and memory (issue 25): training steps of ESM-2 650M (LoRA and full fine-tuning) and 3B (LoRA)
on batches bounded by a token budget, with and without gradient checkpointing.

    python bench/gpu_finetune.py              # a CUDA machine (bench/gpu_check.py runs this)
    python bench/gpu_finetune.py --smoke      # CPU, tiny model, a few steps: checks that the script runs

A step is what train.py's Trainer runs with `--bf16` (and `--gradient_checkpointing`): `EsmForLocalization`'s
forward on a padded batch under bf16 autocast over fp32 weights, the loss's backward, a fused AdamW step over the
trainable parameters, zero_grad. LoRA is train.py's own set-up (`esmloc.finetuning.prepare_finetuning`: r 8 on query, key,
value and dense, the head trained in full). Checkpointing is switched on through the model's own method, as the
Trainer does (`activation_checkpointing_enable` where transformers has it, else `gradient_checkpointing_enable`).

Batches: random proteins with the lengths of the first DeepLoc 2.0 proteins (`common.deeploc_lengths`, cropped to
1022 residues), sorted by length into batches whose padded size (proteins x longest) stays within the token budget
(`esmloc.engine.length_batches`), of which --steps are drawn evenly across the length range, so that short and long
batches are both timed; random labels. --warmup steps run first, untimed.

tokens/s: the real tokens (<cls>, residues, <eos>) of the timed steps over their time (padding excluded; "padded
tokens/s" includes it). "% of bf16 bound": the useful training FLOPs of the real tokens (forward FLOPs, formula
printed, x3 for full fine-tuning: forward, gradients of activations and of weights; x2 for LoRA, whose frozen
weights get no gradient; checkpointing's second forward is not counted, so its cost shows) over the bf16 matmul
peak measured in the same run. "peak GiB": torch.cuda.max_memory_allocated over the row's steps (weights, gradients,
optimizer state, activations). A row that runs out of memory says OOM; a run that reaches --deadline seconds skips
the rows left (listed). Last, per model and mode, the fastest token budget with checkpointing, and the largest that
fits 40 GiB and 80 GiB cards: the figures train.py's GPU defaults are chosen from.
"""

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np
import torch

import common


# (architecture, finetune mode, gradient checkpointing, token budget). The first row of each architecture and mode
# runs first (see main); a run out of time drops the last rows. About 75 s on an H200 if steps reach 30% of the bf16
# peak (estimated from FLOPs, not measured).
ROWS = [
    ("esm2_t33_650M", "lora", True, 16384),
    ("esm2_t33_650M", "full", True, 16384),
    ("esm2_t36_3B", "lora", True, 16384),
    ("esm2_t33_650M", "lora", False, 16384),
    ("esm2_t33_650M", "full", False, 16384),
    ("esm2_t33_650M", "lora", True, 32768),
    ("esm2_t33_650M", "full", True, 32768),
    ("esm2_t33_650M", "lora", True, 65536),
    ("esm2_t33_650M", "full", True, 65536),
    ("esm2_t36_3B", "lora", True, 32768),
    ("esm2_t36_3B", "lora", True, 65536),
]
SMOKE_ROWS = [("tiny", "lora", True, 512), ("tiny", "full", False, 512), ("tiny", "full", True, 1024)]
CARDS_GIB = (40, 80)


def parse_arguments(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--steps", type=int, default=4, help="timed steps per row (default 4)")
    parser.add_argument("--warmup", type=int, default=1, help="untimed steps first (default 1)")
    parser.add_argument("--proteins", type=int, default=4000, help="the pool of proteins batches are drawn from")
    parser.add_argument("--deadline", type=float, default=None, help="seconds after which the rows left are skipped")
    parser.add_argument("--json", type=Path, default=None, help="also write the results here")
    parser.add_argument("--smoke", action="store_true", help="CPU, tiny model, 2 steps per row")
    args = parser.parse_args(argv)
    if args.smoke:
        args.steps, args.warmup, args.proteins = 2, 1, 24
    return args


def enable_checkpointing(model, enabled: bool) -> None:
    """Gradient (activation) checkpointing on or off through the model's own methods, as the Trainer calls them
    (transformers renamed them after 5.17; a PEFT model passes them on to its base model)."""
    prefix = "activation" if hasattr(model, "activation_checkpointing_enable") else "gradient"
    getattr(model, f"{prefix}_checkpointing_{'enable' if enabled else 'disable'}")()


def build(size: str, mode: str, device):
    from configuration_esmloc import ESM2_ARCHITECTURES, EsmLocConfig
    from esmloc.commands.train import ModelArguments
    from esmloc.finetuning import prepare_finetuning
    from modeling_esmloc import EsmForLocalization

    torch.manual_seed(0)
    with torch.device(device):
        model = EsmForLocalization(EsmLocConfig(esm_config=dict(ESM2_ARCHITECTURES[size])))
    return prepare_finetuning(model, ModelArguments(finetune=mode)).to(device).train()


def drawn_batches(tokens: list[int], budget: int, count: int) -> list[np.ndarray]:
    """`count` of the budget's length-sorted batches, evenly spread from the longest proteins to the shortest."""
    from esmloc.engine import length_batches

    batches = length_batches(tokens, budget)
    picks = np.unique(np.linspace(0, len(batches) - 1, count).round().astype(int))
    return [batches[i] for i in picks]


def run_row(model, mode, checkpointing, budget, encoded, labels, args, device) -> dict:
    enable_checkpointing(model, checkpointing)
    tokens = [len(ids) for ids in encoded]
    batches = drawn_batches(tokens, budget, args.warmup + args.steps)
    warmup, timed = batches[:args.warmup], batches[args.warmup:] or batches
    parameters = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(parameters, lr=1e-5, fused=device.type == "cuda")
    pad = model.config.pad_token_id

    def step(batch):
        longest = max(tokens[i] for i in batch)
        ids = torch.full((len(batch), longest), pad, dtype=torch.long)
        for row, index in enumerate(batch):
            ids[row, :tokens[index]] = torch.as_tensor(encoded[index])
        mask = (ids != pad).long()
        with torch.autocast(device.type, dtype=torch.bfloat16):
            loss = model(input_ids=ids.to(device), attention_mask=mask.to(device),
                         labels=torch.as_tensor(labels[batch], device=device)).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        return len(batch) * longest

    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    for batch in warmup:
        step(batch)
    if mode == "lora":  # a checkpointed segment whose inputs need no gradient would leave the adapters untrained
        lora = [p for name, p in model.named_parameters() if "lora_" in name]
        with torch.autocast(device.type, dtype=torch.bfloat16):
            model(input_ids=torch.as_tensor([encoded[0]], device=device)).logits.sum().backward()
        if not lora or any(p.grad is None for p in lora):  # (zeros are fine: lora_B starts at zero)
            raise RuntimeError("no gradient reached some LoRA layers")
        optimizer.zero_grad(set_to_none=True)
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    start = time.perf_counter()
    padded = sum(step(batch) for batch in timed)
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    seconds = time.perf_counter() - start
    real = sum(tokens[i] for batch in timed for i in batch)
    peak = torch.cuda.max_memory_allocated(device) / 2**30 if device.type == "cuda" else None
    optimizer = None  # its states free before the next row (not `del`: step() closes over it)
    return {"seconds": seconds, "real_tokens": real, "padded_tokens": padded, "steps": len(timed),
            "peak_gib": peak, "flops": common.backbone_flops([tokens[i] for batch in timed for i in batch],
                                                       model.config.esm_config) * (2 if mode == "lora" else 3)}


HEADER = ["model", "finetune", "checkpointing", "token budget", "tokens/s", "padded tokens/s", "% of bf16 bound",
          "peak GiB", "s/step"]


def table_row(row, result: dict, peak_tflops: float) -> str:
    """The Markdown row of one measured (or failed) configuration."""
    cells = [row[0], row[1], "yes" if row[2] else "no", row[3]]
    if "error" in result:
        cells += [result["error"], "", "", "", ""]
    else:
        seconds = result["seconds"]
        cells += [f"{result['real_tokens'] / seconds:,.0f}", f"{result['padded_tokens'] / seconds:,.0f}",
                  f"{100 * result['flops'] / seconds / 1e12 / peak_tflops:.1f}%",
                  f"{result['peak_gib']:.1f}" if result["peak_gib"] is not None else "n/a",
                  f"{seconds / result['steps']:.2f}"]
    return "| " + " | ".join(str(cell) for cell in cells) + " |"


def main(argv=None):
    args = parse_arguments(argv)
    from esmloc.saving import tokenizer_for
    from configuration_esmloc import EsmLocConfig

    start = time.monotonic()
    device = torch.device("cuda" if torch.cuda.is_available() and not args.smoke else "cpu")
    if device.type != "cuda" and not args.smoke:
        print("SKIPPED: no CUDA device (this benchmark is for a GPU; --smoke runs it on the CPU).")
        return 0
    lengths, source = common.deeploc_lengths(smoke=args.smoke)
    sequences = common.random_proteins(lengths[:args.proteins])
    encoded = tokenizer_for(EsmLocConfig())(sequences)["input_ids"]
    labels = np.random.default_rng(0).integers(0, 2, len(encoded))
    if device.type == "cuda":
        peak_tflops = common.cuda_matmul_peak_tflops()
        gpu = f"{torch.cuda.get_device_name(device)}, {torch.cuda.get_device_properties(device).total_memory / 2**30:.0f} GiB"
    else:
        peak_tflops = common.low_precision_peaks_gflops(512, 3)["bf16"] / 1000
        gpu = "no GPU (CPU smoke run)"
    rows = SMOKE_ROWS if args.smoke else ROWS
    # The header first and each row as soon as it is measured: a run stopped from outside keeps what it measured.
    print(f"\nGPU fine-tuning: {gpu}; random proteins with {source} (first {len(encoded)}), cropped to 1022 residues, "
          f"random weights, bf16 autocast, fused AdamW; {args.warmup} warm-up + {args.steps} timed steps per row; "
          f"measured bf16 matmul peak {peak_tflops:.3g} TFLOP/s")
    print(f"command: {common.command_line()}")
    print(f"machine: {common.machine_description()}")
    print(common.FLOP_FORMULA)
    print()
    print(common.table(HEADER, []), flush=True)
    # Models are built once per pass for each architecture and mode; the first pass runs the first row of each (the
    # ones the issue asks for), the second the rest, so that a run short of time still has every model and mode.
    groups = list(dict.fromkeys((size, mode) for size, mode, _, _ in rows))
    firsts = [next(row for row in rows if row[:2] == group) for group in groups]
    results, skipped = {}, []
    for todo in (firsts, [row for row in rows if row not in firsts]):
        for size, mode in groups:
            group_rows = [row for row in todo if row[:2] == (size, mode)]
            if not group_rows:
                continue
            if args.deadline and time.monotonic() - start > args.deadline:
                skipped += group_rows
                continue
            model = build(size, mode, device)
            for row in group_rows:
                if args.deadline and time.monotonic() - start > args.deadline:
                    skipped.append(row)
                    continue
                try:
                    results[row] = run_row(model, mode, row[2], row[3], encoded, labels, args, device)
                except torch.cuda.OutOfMemoryError:
                    results[row] = {"error": "OOM"}
                except Exception as error:  # noqa: BLE001 -- a failing row is reported, the others still run
                    results[row] = {"error": f"{type(error).__name__}: {error}"[:200]}
                print(table_row(row, results[row], peak_tflops), flush=True)
                if device.type == "cuda":
                    torch.cuda.empty_cache()
            del model
            if device.type == "cuda":
                torch.cuda.empty_cache()

    print()
    if skipped:
        print("skipped (out of time): " + "; ".join(f"{s} {m} checkpointing={c} budget={b}" for s, m, c, b in skipped))
    recommendations = {}
    for size, mode in groups:
        measured = {row[3]: results[row] for row in results if row[:2] == (size, mode) and row[2]
                    and "error" not in results[row]}
        if not measured:
            continue
        fastest = max(measured, key=lambda b: measured[b]["real_tokens"] / measured[b]["seconds"])
        fits = {card: max([b for b, r in measured.items() if r["peak_gib"] is not None and r["peak_gib"] <= 0.9 * card],
                          default=None) for card in CARDS_GIB}
        recommendations[f"{size} {mode}"] = {"fastest_budget": fastest, **{f"fits_{c}GiB": b for c, b in fits.items()}}
        print(f"{size} {mode} with checkpointing: fastest budget {fastest} tokens; largest measured budget within 90% "
              "of a card: " + ", ".join(f"{card} GiB {fits[card] or 'none'}" for card in CARDS_GIB)
              + f" (train.py --bf16 --gradient_checkpointing batches proteins grouped by length: "
              f"--per_device_train_batch_size {max(1, fastest // 1024)} keeps a batch of the longest proteins, 1024 "
              "tokens each, within the fastest budget)")
    if args.json:
        args.json.write_text(json.dumps({"gpu": gpu, "peak_bf16_tflops": peak_tflops, "recommendations": recommendations,
                                         "rows": [{"row": list(row), **result} for row, result in results.items()],
                                         "skipped": [list(row) for row in skipped]}, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
