"""Did esmloc's own ESM forward (`PackedEsm`, removed) pay for itself? It against the stock padding-free path.

    python bench/fork_question.py --architecture esm2_t12_35M --n 48
    python bench/fork_question.py --smoke

esmloc ran its own copy of transformers' ESM forward up to commit 0d553df (`esmloc/packed_esm.py`: fused
query/key/value, oneDNN linear layers with GELU and the residual addition fused). The issue that asked the question
set the bar: keep the fork only if it is at least 15% faster at the sizes users run. This script takes the fork's
module from that commit (`git show`; it needs the repository's history) and times, inside the same engine batching
and threads, alternating, on the first N DeepLoc proteins (cropped to 1022 residues): the fork; the engine as it is
(transformers' `EsmModel.forward` padding-free, `esmloc.varlen_esm`); and the engine with the view's `nn.Linear`
layers swapped for oneDNN fp32 ones (the fork's other ingredient, without the fork). Medians of the repeats; the
largest embedding difference from the fork's.
"""

import argparse
import importlib.util
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

import common


FORK_COMMIT = "0d553df"
BAR = 1.15


class OneDNNLinear(nn.Module):
    """An nn.Linear through oneDNN's fp32 linear (rows padded to 256, as the fork did)."""

    def __init__(self, linear):
        super().__init__()
        self.linear = linear

    def forward(self, x):
        shape = x.shape
        x = x.reshape(-1, shape[-1])
        rows = x.shape[0]
        extra = -rows % 256
        if extra:
            x = F.pad(x, (0, 0, 0, extra))
        out = torch.ops.mkldnn._linear_pointwise(x, self.linear.weight, self.linear.bias, "none", [], "")
        return out[:rows].reshape(*shape[:-1], out.shape[-1])


def load_fork():
    source = subprocess.run(["git", "show", f"{FORK_COMMIT}:esmloc/packed_esm.py"], cwd=common.REPO,
                            capture_output=True, text=True)
    if source.returncode != 0:
        raise SystemExit(f"cannot read the fork from commit {FORK_COMMIT} (a clone with history is needed): "
                         f"{source.stderr.strip()}")
    path = Path(tempfile.mkdtemp()) / "packed_esm_fork.py"
    path.write_text(source.stdout)
    spec = importlib.util.spec_from_file_location("packed_esm_fork", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.PackedEsm


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--architecture", default="esm2_t6_8M")
    parser.add_argument("--n", type=int, default=128)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--smoke", action="store_true", help="tiny model, 8 proteins, 1 repeat")
    args = parser.parse_args(argv)
    if args.smoke:
        args.architecture, args.n, args.repeats = "tiny", 8, 1
    from configuration_esmloc import ESM2_ARCHITECTURES, EsmLocConfig
    from esmloc.engine import Engine
    from esmloc.saving import tokenizer_for
    from modeling_esmloc import EsmForLocalization

    rows, source = common.load_proteins(common.DEEPLOC_CSV, args.n, args.smoke)
    sequences = [row["Sequence"] for row in rows]
    torch.manual_seed(0)
    model = EsmForLocalization(EsmLocConfig(esm_config=dict(ESM2_ARCHITECTURES[args.architecture]))).eval()
    tokenizer = tokenizer_for(model.config)
    stock = Engine(model, tokenizer, progress=False)
    fork = Engine(model, tokenizer, progress=False)
    fork.packed = load_fork()(model.esm)  # the fork's call signature is the padding-free path's
    fork.batches = stock.batches  # and it runs the same batches
    onednn = Engine(model, tokenizer, progress=False)
    for module in list(onednn.packed.view.modules()):
        for name, child in module.named_children():
            if type(child) is nn.Linear:
                setattr(module, name, OneDNNLinear(child))
    variants = {"PackedEsm (the fork, commit " + FORK_COMMIT + ")": fork,
                "stock EsmModel padding-free (the engine)": stock,
                "stock, nn.Linear through oneDNN": onednn}
    seconds = {name: [] for name in variants}
    outputs = {}
    load_before = common.load_average()
    for repeat in range(args.repeats):
        names = list(variants) if repeat % 2 == 0 else list(variants)[::-1]
        for name in names:
            start = time.perf_counter()
            outputs[name] = variants[name].embed(sequences, "mean")
            seconds[name].append(time.perf_counter() - start)
    fork_name = next(iter(variants))
    table = []
    for name in variants:
        ratio = common.median([f / s for f, s in zip(seconds[fork_name], seconds[name])])
        table.append([name, f"{common.median([args.n / s for s in seconds[name]]):.2f}", f"{ratio:.2f}x",
                      f"{float(np.abs(outputs[name] - outputs[fork_name]).max()):.1e}"])
    lead = common.median([s / f for f, s in zip(seconds[fork_name], seconds[list(variants)[1]])])
    title = (f"The fork question: {source}, ESM-2 {args.architecture} architecture (random weights), median of "
             f"{args.repeats} alternating repeat(s)")
    result = common.table(["forward", "proteins/s", "x the fork", "max abs diff vs the fork"], table)
    verdict = (f"the fork ahead of the engine by {lead:.2f}x: {'above' if lead >= BAR else 'below'} the {BAR:.2f}x "
               "bar for keeping it")
    print(title)
    print(f"command: {common.command_line()}")
    print(f"machine: {common.machine_description()}; load average before {load_before}, after "
          f"{common.load_average()}")
    print()
    print(result)
    print(f"\n{verdict}")
    common.write_table(f"fork_question-{args.architecture}", title, f"{result}\n\n{verdict}", smoke=args.smoke,
                       other_load=f"load average before {load_before}")


if __name__ == "__main__":
    sys.exit(main())
