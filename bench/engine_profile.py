"""Where the engine's time goes: torch.profiler over `Engine.embed`, operations grouped by kind, per precision.

    python bench/engine_profile.py --architecture esm2_t12_35M --n 32
    python bench/engine_profile.py --smoke

One batch at a time (workers=1, all threads on each operation), so that operation times add up to the wall time.
Groups: linear layers (F.linear, oneDNN int8), attention (SDPA), layer norms, activation quantisation (int8
only: min/max, scaling, rounding, the uint8 copy), and everything else (rotary, copies, GELU, residual additions,
pooling, Python).
"""

import argparse
import sys
from pathlib import Path

import torch
from torch.profiler import ProfilerActivity, profile

import common


GROUPS = [
    ("linear layers", ("mkldnn::_linear_pointwise", "onednn::qlinear_pointwise", "aten::linear", "aten::addmm",
                       "aten::mm", "aten::bmm", "aten::matmul")),
    ("attention (SDPA)", ("aten::scaled_dot_product_attention", "aten::_scaled_dot_product")),
    ("layer norms", ("aten::layer_norm", "aten::native_layer_norm")),
]
QUANTISATION = "esmloc::quantise_input"  # a record_function range around the int8 path's input quantisation


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--architecture", default="esm2_t12_35M")
    parser.add_argument("--n", type=int, default=32)
    parser.add_argument("--precisions", type=lambda text: text.split(","), default=["fp32", "bf16", "int8"])
    parser.add_argument("--data", type=Path, default=common.DEEPLOC_CSV)
    parser.add_argument("--smoke", action="store_true")
    args = parser.parse_args(argv)
    if args.smoke:
        args.architecture, args.n = "tiny", 8
    from configuration_esmloc import ESM2_ARCHITECTURES, EsmLocConfig
    from esmloc.engine import Engine
    from esmloc.saving import tokenizer_for
    from modeling_esmloc import EsmForLocalization

    rows, source = common.load_proteins(args.data, args.n, args.smoke)
    sequences = [row["Sequence"] for row in rows]
    torch.manual_seed(0)
    model = EsmForLocalization(EsmLocConfig(esm_config=dict(ESM2_ARCHITECTURES[args.architecture]))).eval()
    tokenizer = tokenizer_for(model.config)
    table = []
    for precision in args.precisions:
        engine = Engine(model, tokenizer, progress=False, precision=precision, workers=1)
        engine.embed(sequences[:2], "mean")  # warm-up
        with profile(activities=[ProfilerActivity.CPU]) as prof:
            engine.embed(sequences, "mean")
        events = [event for event in prof.key_averages() if event.key]
        total = sum(event.self_cpu_time_total for event in events)
        shares = dict.fromkeys([name for name, _ in GROUPS], 0.0)
        for event in events:
            group = next((name for name, prefixes in GROUPS if event.key.startswith(prefixes)), None)
            if group:
                shares[group] += event.self_cpu_time_total
        # The quantisation range's children (min/max, arithmetic, the uint8 copy) fall in no other group.
        shares["activation quantisation (int8)"] = sum(event.cpu_time_total for event in events
                                                       if event.key == QUANTISATION)
        shares["everything else"] = total - sum(shares.values())
        table.append([precision, f"{total / 1e6:.2f}"] + [f"{100 * value / total:.0f}%" for value in shares.values()])
    title = f"Engine profile: {source}, ESM-2 {args.architecture} architecture (random weights), workers=1"
    result = common.table(["precision", "profiled CPU s"] + [name for name, _ in GROUPS]
                          + ["activation quantisation (int8)", "everything else"], table)
    print(title)
    print(f"command: {common.command_line()}")
    print(f"machine: {common.machine_description()}; load average {common.load_average()}")
    print()
    print(result)
    common.write_table(f"engine_profile-{args.architecture}", title, result, smoke=args.smoke)


if __name__ == "__main__":
    sys.exit(main())
