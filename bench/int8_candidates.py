"""Which int8 linear layer to use: the candidates on the ESM-2 35M and 650M linear shapes, one thread each.

    python bench/int8_candidates.py            # rows = the CPU token budget (2048), median of 5
    python bench/int8_candidates.py --smoke

Candidates, all dynamic quantisation (weights int8 per output channel ahead of time, inputs quantised per call):

- oneDNN int8 linear, `torch.ops.onednn.qlinear_pointwise` (the kernel torch's x86 int8 path lowers to), input
  quantised by `esmloc.int8._quantise_input`: what `precision="int8"` runs (`int8.Int8Linear`);
- `torch.ao.quantization.quantize_dynamic` (FBGEMM; deprecated in torch 2.13, with quantized tensor types that are
  to be removed);
- torchao `Int8DynamicActivationInt8WeightConfig` in eager mode (the successor torch points to; measured only when
  torchao is installed: it is no dependency, and transformers imports it when present);
- references: fp32 and bf16 through oneDNN (`_linear_pointwise`).

GFLOP/s = 2 * rows * in * out / seconds (the input's quantisation counted in the int8 rows' time); the error is the
largest absolute difference from the fp32 output (inputs N(0, 1), weights as nn.Linear initialises them).
"""

import argparse
import warnings

import torch

import common


def candidates(linear):
    from esmloc.int8 import Int8Linear

    weight, bias = linear.weight, linear.bias
    onednn = torch.ops.mkldnn._linear_pointwise
    out = {"fp32, oneDNN": lambda x: onednn(x, weight, bias, "none", [], "")}
    weight16, bias16 = weight.bfloat16(), bias.bfloat16()
    out["bf16, oneDNN"] = lambda x: onednn(x.bfloat16(), weight16, bias16, "none", [], "").float()
    out["int8, oneDNN qlinear (esmloc)"] = Int8Linear(linear)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        from torch.ao.quantization import quantize_dynamic

        dynamic = quantize_dynamic(torch.nn.Sequential(linear), {torch.nn.Linear}, dtype=torch.qint8)
    out["int8, torch.ao quantize_dynamic (FBGEMM)"] = dynamic
    try:
        import copy

        from torchao.quantization import Int8DynamicActivationInt8WeightConfig, quantize_

        torchao_linear = copy.deepcopy(torch.nn.Sequential(linear))
        quantize_(torchao_linear, Int8DynamicActivationInt8WeightConfig())
        out["int8, torchao eager"] = torchao_linear
    except ImportError:
        pass
    return out


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rows", type=int, default=2048)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--smoke", action="store_true")
    args = parser.parse_args(argv)
    shapes = {"35M": (480, 1920), "650M": (1280, 5120)}
    if args.smoke:
        args.rows, args.repeats, shapes = 128, 1, {"tiny": (64, 256)}
    torch.set_num_threads(1)
    torch.manual_seed(0)
    rows, load_before = [], common.load_average()
    with torch.inference_mode():
        for size, (hidden, intermediate) in shapes.items():
            for fan_in, fan_out in ((hidden, intermediate), (intermediate, hidden)):
                linear = torch.nn.Linear(fan_in, fan_out).eval()
                x = torch.randn(args.rows, fan_in)
                reference = torch.nn.functional.linear(x, linear.weight, linear.bias)
                flops = 2 * args.rows * fan_in * fan_out
                for name, function in candidates(linear).items():
                    error = float((function(x) - reference).abs().max())
                    rate = flops / common.median_seconds(lambda: function(x), args.repeats) / 1e9
                    rows.append([f"{size} {fan_in}->{fan_out}", name, f"{rate:.0f}", f"{error:.1e}"])
    title = f"int8 candidates: {args.rows} rows, 1 thread, median of {args.repeats}"
    result = common.table(["linear (in -> out)", "candidate", "GFLOP/s", "max abs error vs fp32"], rows)
    print(title)
    print(f"command: {common.command_line()}")
    print(f"machine: {common.machine_description()}; load average before {load_before}, after "
          f"{common.load_average()}")
    print()
    print(result)
    common.write_table("int8_candidates", title, result, smoke=args.smoke,
                       other_load=f"load average before {load_before}")


if __name__ == "__main__":
    main()
