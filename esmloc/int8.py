"""Dynamic int8 linear layers for CPU inference (`precision="int8"`): oneDNN's int8 GEMM
(`torch.ops.onednn.qlinear_pointwise`) on weights quantised per output channel and inputs quantised per token,
fp32 out. `Int8Linear` replaces the plain `nn.Linear` layers of the engine's view of the backbone
(`esmloc.varlen_esm.backbone_view`); `int8_linear_runs` says whether the kernel runs here at all (a test's skip),
`int8_linear_available` whether it is accurate (the engine's refusal).
"""

import torch
import torch.nn.functional as F
from torch import nn


# oneDNN builds (and keeps) kernels and buffers for every input shape it meets; flattened batches have a different
# number of rows nearly every time, and peak memory grew with the number of proteins predicted (bench/predict_memory.py,
# tiny model: +19% from 3k to 30k proteins unpadded; +9% from 10k to 400k with rows padded to a multiple of 64;
# +1% with 256). Rows are padded to a multiple of this, so that a run meets a bounded set of shapes; the zero rows
# cost at most 255 rows of work per call, about 6% of a 2048-token batch on average.
ONEDNN_ROW_BUCKET = 256


def _quantise_weight(weight: torch.Tensor):
    """A linear weight for oneDNN's int8 linear: symmetric int8 per output channel (scale = max|w| / 127),
    prepacked; returns (packed weight, scales, zero points)."""
    scales = (weight.detach().float().abs().amax(dim=1) / 127).clamp(min=1e-12)
    quantised = torch.round(weight.detach().float() / scales[:, None]).clamp(-127, 127).to(torch.int8)
    zero_points = torch.zeros(weight.shape[0], dtype=torch.long)
    return torch.ops.onednn.qlinear_prepack(quantised, None), scales, zero_points


# Inputs are quantised per row (token), symmetric: each token's int8 products then depend on that token alone, and
# int32 accumulation is exact, so a protein's int8 result does not depend on the other proteins of its batch (with one
# scale per call it did: the batch's largest value set every token's step). oneDNN takes one zero point: 128, the
# middle of uint8.
INPUT_ZERO_POINT = 128


def _quantise_input(x):
    """x (rows, features) as uint8, per row: round(x / scale) + 128, scale = max|row| / 127; returns
    (uint8 rows, scales (rows, 1)). Rounded to int8 v, whose bits read as uint8 and XOR 0x80 are v + 128; max|row|
    from the row's max and min. The same bytes as `(x / scale).round() + 128` cast to uint8, faster: fp32 to uint8
    conversion is twice as slow as to int8 here, and `abs` writes a copy of x (one-off timings at 650M shapes, one
    thread: 40-60% less time)."""
    largest = torch.maximum(x.amax(dim=1, keepdim=True), x.amin(dim=1, keepdim=True).neg_())
    scales = (largest / 127).clamp_(min=1e-12)
    quantised = (x / scales).round_().to(torch.int8).view(torch.uint8).bitwise_xor_(INPUT_ZERO_POINT)
    return quantised, scales


class Int8Linear(nn.Module):
    """An `nn.Linear` with dynamic int8 quantisation through oneDNN (`torch.ops.onednn.qlinear_pointwise`, the kernel
    torch's x86 int8 path lowers to): each input row quantised to uint8 with its own scale (`_quantise_input`), the
    weight per output channel; the int32 accumulators come back as fp32 and are scaled per row. Holds the original
    layer and quantises its weight again whenever that changes. Rows are padded to ONEDNN_ROW_BUCKET (zero rows)."""

    def __init__(self, linear: nn.Linear):
        super().__init__()
        self.linear = linear
        self._packed = None

    def packed_weight(self):
        """The layer's weight quantised and prepacked (`_quantise_weight`), again whenever the weight changed."""
        weight = self.linear.weight
        stamp = (weight.data_ptr(), None if weight.is_inference() else weight._version)
        if self._packed is None or self._packed[0] != stamp:
            self._packed = (stamp, _quantise_weight(weight))
        return self._packed[1]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        weight, scales, zero_points = self.packed_weight()
        shape = x.shape
        x = x.reshape(-1, shape[-1]).float()
        rows = x.shape[0]
        extra = -rows % ONEDNN_ROW_BUCKET
        if extra:
            x = F.pad(x, (0, 0, 0, extra))
        with torch.profiler.record_function("esmloc::quantise_input"):  # bench/engine_profile.py reports its share
            quantised, row_scales = _quantise_input(x)
        out = torch.ops.onednn.qlinear_pointwise(quantised, 1.0, INPUT_ZERO_POINT, weight, scales, zero_points, None,
                                                 1.0, 0, torch.float32, "none", [], "")
        out = out[:rows].mul_(row_scales[:rows])
        if self.linear.bias is not None:
            out.add_(self.linear.bias)
        return out.reshape(*shape[:-1], out.shape[-1])


def int8_linear_runs() -> bool:
    """Whether oneDNN's int8 linear (`torch.ops.onednn.qlinear_pointwise`, behind `Int8Linear`) runs in this torch
    build on this CPU at all; whether it is accurate is `int8_linear_available`'s question."""
    global _INT8_RUNS
    if _INT8_RUNS is None:
        try:
            Int8Linear(nn.Linear(64, 40))(torch.zeros(7, 64))
            _INT8_RUNS = True
        except (RuntimeError, AttributeError, NotImplementedError):
            _INT8_RUNS = False
    return _INT8_RUNS


def int8_linear_available() -> bool:
    """Whether oneDNN's int8 linear (`Int8Linear`) runs here and stays within int8 rounding of `nn.Linear`."""
    global _INT8_OK
    if _INT8_OK is None:
        _INT8_OK = int8_linear_runs()
        if _INT8_OK:
            generator = torch.Generator().manual_seed(0)
            linear = nn.Linear(64, 40)
            with torch.no_grad():
                linear.weight.copy_(torch.randn(40, 64, generator=generator))
                linear.bias.copy_(torch.randn(40, generator=generator))
                x = torch.randn(7, 64, generator=generator)
                # A matmul over 64 products of inputs and weights each within half a step of their grids: well
                # under 0.3.
                _INT8_OK = torch.allclose(Int8Linear(linear)(x), linear(x), atol=0.3, rtol=0)
    return _INT8_OK


_INT8_RUNS = _INT8_OK = None
