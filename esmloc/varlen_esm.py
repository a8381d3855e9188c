"""Padding-free ESM-2 and ESM C inference through transformers' own `EsmModel.forward` / `EsmcModel.forward`.

The proteins of a batch run flattened into one row: token ids (1, tokens), `position_ids` restarting at 0 for each
protein (both families' rotary positions take them; ESM C's `position_ids` are what its own padded forward gives each
protein, 0 at `<cls>`), and an attention function registered with transformers' `AttentionInterface`
(`varlen_sdpa`) through which each protein attends to itself only. The embeddings, projections, rotary, layer norms
and residual additions are the stock modules' own code (GELU runs in one pass: `FusedGeluIntermediate`): esmloc
keeps no copy of the ESM forward. (It once did, `PackedEsm`; bench/fork_question.py measures the stock model run
this way against it: the fork was not faster by the 15% that would have paid for keeping a copy of transformers' code
in step: README, "Speed".)

Everything runs on a *view* of the backbone (`backbone_view`): a copy of the module tree that shares every parameter
and buffer with the user's model, whose own config names `varlen_sdpa`, and in which plain `nn.Linear` layers may be
swapped for `Int8Linear` (precision int8, CPU). The model itself is never changed, and the view follows every change
of its weights (shared tensors).

A batch that holds a `<mask>` token runs padded through the model's own forward instead: ESM's token dropout rescales
the embeddings by each row's share of masked tokens, which in one flattened row would be the whole batch's share.

How the proteins of a flattened batch attend to themselves only (`VarlenPlan`, `ATTENTION_MODES`): one SDPA call
per run of equal-length proteins (`grouped`, the CPU default), one padded SDPA call with a key-padding mask (`padded`),
or one of torch's variable-length kernels, which cost the sum of the squares of the proteins' lengths with no padding:
flash attention over cumulative lengths (`varlen`, `torch.nn.attention.varlen`, CUDA, fp16/bf16), SDPA on a jagged
nested tensor (`nested`) or flex attention with a block-sparse document mask (`flex`). `choose_attention` is the one
place that decides, per device, dtype and head size, from `AUTO_ATTENTION`; a kernel is used only after it has
matched the grouped path on random inputs on that device (`kernel_problem`), else the next one in the order is.

Trust: the first `UnpaddedEsm` of a process runs a parity self-check per backbone family (`parity_check`): tiny
proteins through the flattened path and through the stock `EsmModel.forward` / `EsmcModel.forward`; on a mismatch (a transformers release that routes positions or
attention keywords differently) it warns once and `esmloc.engine.Engine` uses the padded stock forward.
`FORWARD_VERSION` and the transformers version are part of every feature-cache fingerprint
(`esmloc.cache.backbone_fingerprint`): a cache written by another forward is never served.
"""

import copy
import functools
import itertools
import warnings
from collections.abc import Sequence

import numpy as np
import torch
import torch.nn.functional as F
import transformers
from torch import nn
from transformers import AttentionInterface
from transformers.integrations.sdpa_attention import sdpa_attention_forward
from transformers.masking_utils import AttentionMaskInterface, sdpa_mask
from transformers.models.esm.modeling_esm import EsmIntermediate, EsmModel

from configuration_esmloc import ARCHITECTURES, backbone_config, backbone_family


try:  # ESM C: transformers >= 5.25
    from transformers import EsmcModel
except ImportError:
    EsmcModel = None


# Bump when the unpadded path computes anything differently (cached features then stop matching).
FORWARD_VERSION = "varlen-stock-2"  # 2: one-pass GELU; int8 inputs quantised per token
ATTENTION_NAME = "esmloc_varlen_sdpa"


def forward_fingerprint() -> str:
    """What computed a feature: the forward's version and the transformers version whose modules it ran."""
    return f"{FORWARD_VERSION}|transformers-{transformers.__version__}"


# The attention of a flattened batch, `VarlenPlan`'s modes.
ATTENTION_MODES = ("grouped", "padded", "varlen", "nested", "flex")
# What `attention="auto"` runs, per device type: the first mode of the order that runs there for the batch's dtype
# and head size (`attention_problem`) and passes its check (`kernel_problem`). CPU: grouped, measured fastest there
# (README, "Speed"). CUDA: NOT MEASURED YET (issue 25): bench/gpu_check.py times every mode side by side on a GPU and
# prints the fastest; this order is set from that. Until then, flash attention over cumulative lengths first (no
# padding, no mask), SDPA on nested tensors where flash cannot run (fp32), padded SDPA last (runs everywhere).
AUTO_ATTENTION = {"cpu": ("grouped",), "cuda": ("varlen", "nested", "padded")}
# A kernel's largest relative error (||out - ref|| / ||ref||) against the grouped path in fp32, per dtype, on random
# inputs (`kernel_problem`): fp32 far under 1e-4; bf16 operands between 1e-3 and 1e-2; fp16 about 8 times finer.
KERNEL_TOLERANCE = {torch.float32: 1e-4, torch.bfloat16: 2e-2, torch.float16: 5e-3}
FLEX_BLOCK = 128  # flex attention's block size (its default): the document mask is stored per 128 x 128 tile


class VarlenPlan:
    """Where each protein of a flattened batch lies, and how its tokens attend to each other (`mode`, one of
    `ATTENTION_MODES`).

    `grouped` (the CPU default): one SDPA call without a mask per run of equal-length proteins (batches are sorted
    by length, so runs are common). `padded`: the tokens are scattered into a (proteins, longest) grid and attend in
    one SDPA call with a key-padding mask. `varlen`: flash attention over the proteins' cumulative lengths
    (`torch.nn.attention.varlen.varlen_attn`; CUDA, fp16/bf16). `nested`: one SDPA call on jagged nested tensors
    (torch picks a variable-length kernel on CUDA). `flex`: flex attention with a document mask stored as a
    block-sparse `BlockMask`, so that tiles between different proteins are skipped (compiled on CUDA).
    """

    def __init__(self, lengths: Sequence[int], mode: str, device):
        if mode not in ATTENTION_MODES:
            raise ValueError(f"attention must be one of {ATTENTION_MODES}, got {mode!r}")
        self.mode = mode
        self.lengths = [int(length) for length in lengths]
        self.total = sum(self.lengths)
        self.longest = max(self.lengths)
        ends = list(itertools.accumulate(self.lengths))
        if mode == "padded":
            lengths_tensor = torch.tensor(self.lengths, device=device)
            protein = torch.repeat_interleave(torch.arange(len(self.lengths), device=device), lengths_tensor)
            starts = torch.cumsum(lengths_tensor, 0) - lengths_tensor
            position = torch.arange(self.total, device=device) - starts[protein]
            self.token_index = protein * self.longest + position  # each token's cell in the grid
            key_mask = torch.arange(self.longest, device=device)[None, :] < lengths_tensor[:, None]
            self.key_mask = key_mask[:, None, None, :]
        elif mode == "grouped":
            self.runs, start, first = [], 0, 0  # (start, end, proteins, length) per run of equal lengths
            for index in range(1, len(self.lengths) + 1):
                if index == len(self.lengths) or self.lengths[index] != self.lengths[first]:
                    end = start + self.lengths[first] * (index - first)
                    self.runs.append((start, end, index - first, self.lengths[first]))
                    start, first = end, index
        elif mode == "varlen":
            self.cumulative = torch.tensor([0, *ends], dtype=torch.int32, device=device)
        elif mode == "nested":
            self.offsets = torch.tensor([0, *ends], dtype=torch.int64, device=device)
            self.shortest = min(self.lengths)
        else:
            self.block_mask = document_block_mask(self.lengths, device)

    def position_ids(self, device) -> torch.Tensor:
        """Each token's position in its protein, (1, tokens): computed on the host and copied once (one `arange` per
        protein was a kernel launch per protein on a GPU)."""
        lengths = np.asarray(self.lengths)
        starts = np.repeat(np.cumsum(lengths) - lengths, lengths)
        return torch.from_numpy(np.arange(self.total) - starts)[None].to(device)

    def attend(self, query, key, value, scaling) -> torch.Tensor:
        """query, key, value: (1, heads, tokens, head_size), as transformers' attention functions receive them;
        returns (1, tokens, heads, head_size), as they return it."""
        heads, total, head_size = query.shape[1:]
        if self.mode in ("varlen", "nested", "flex"):
            # Under autocast ESM's rotary embedding leaves query and key in fp32 and value in the autocast dtype:
            # SDPA would cast all three to it; these kernels get them cast here, and run outside autocast.
            query, key, value = (x.to(value.dtype) for x in (query, key, value))
            with torch.autocast(query.device.type, enabled=False):
                return self._attend_unpadded(query, key, value, scaling)
        if self.mode == "padded":
            count = len(self.lengths)

            def grid(x):
                out = x.new_zeros(heads, count * self.longest, head_size)
                out[:, self.token_index] = x[0]
                return out.view(heads, count, self.longest, head_size).transpose(0, 1)

            context = F.scaled_dot_product_attention(grid(query), grid(key), grid(value), attn_mask=self.key_mask,
                                                     scale=scaling)
            return context.transpose(1, 2).reshape(count * self.longest, heads, head_size)[self.token_index][None]
        out = query.new_empty(1, total, heads, head_size)
        for start, end, count, length in self.runs:
            q, k, v = (x[0, :, start:end].reshape(heads, count, length, head_size).transpose(0, 1)
                       for x in (query, key, value))
            context = F.scaled_dot_product_attention(q, k, v, scale=scaling)  # (count, heads, length, head_size)
            out[0, start:end] = context.transpose(1, 2).reshape(end - start, heads, head_size)
        return out

    def _attend_unpadded(self, query, key, value, scaling):
        if self.mode == "flex":
            context = flex_attention_function(query.device.type)(query, key, value, block_mask=self.block_mask,
                                                                 scale=scaling)
            return context.transpose(1, 2)
        q, k, v = (x[0].transpose(0, 1).contiguous() for x in (query, key, value))  # (tokens, heads, head_size)
        if self.mode == "varlen":
            from torch.nn.attention.varlen import varlen_attn

            return varlen_attn(q, k, v, self.cumulative, self.cumulative, self.longest, self.longest,
                               scale=scaling)[None]

        def jagged(x):  # (proteins, heads, length j, head_size)
            return torch.nested.nested_tensor_from_jagged(x, self.offsets, min_seqlen=self.shortest,
                                                          max_seqlen=self.longest).transpose(1, 2)

        context = F.scaled_dot_product_attention(jagged(q), jagged(k), jagged(v), scale=scaling)
        return context.transpose(1, 2).values()[None]


def document_block_mask(lengths: Sequence[int], device):
    """flex attention's `BlockMask` for proteins laid end to end: a token attends to the tokens of its own protein.
    Built from the lengths directly, tile by tile (`FLEX_BLOCK` square): a tile whose query and key blocks both lie
    inside one protein is full (no mask function runs there), a tile that touches a protein boundary is partial, and
    every other tile is skipped. (`create_block_mask` would evaluate the mask over all tokens x tokens.)"""
    from torch.nn.attention.flex_attention import BlockMask

    lengths = np.asarray(lengths, dtype=np.int64)
    total = int(lengths.sum())
    blocks = -(-total // FLEX_BLOCK)
    ends = np.cumsum(lengths)
    starts = ends - lengths
    protein = np.repeat(np.arange(len(lengths)), lengths)
    first = protein[np.arange(blocks) * FLEX_BLOCK]  # the protein of each block's first and last token
    last = protein[np.minimum((np.arange(blocks) + 1) * FLEX_BLOCK, total) - 1]
    low, high = starts[first] // FLEX_BLOCK, (ends[last] - 1) // FLEX_BLOCK  # key blocks each query block reaches
    columns = np.arange(blocks)
    touched = (columns[None, :] >= low[:, None]) & (columns[None, :] <= high[:, None])
    whole = (first == last) & (np.arange(blocks) * FLEX_BLOCK + FLEX_BLOCK <= total)  # inside one protein, not cut
    full = touched & whole[:, None] & whole[None, :] & (first[:, None] == first[None, :])
    partial = touched & ~full

    def block_table(matrix):  # (count per query block, key block indices with the counted ones first)
        count = torch.from_numpy(matrix.sum(axis=1).astype(np.int32))[None, None]
        indices = torch.from_numpy(np.argsort(~matrix, axis=1, kind="stable").astype(np.int32))[None, None]
        return count.to(device), indices.to(device)

    # The protein of every token, padded to whole blocks with -1 (a protein of no real token).
    document = torch.full((blocks * FLEX_BLOCK,), -1, dtype=torch.int32)
    document[:total] = torch.from_numpy(protein.astype(np.int32))
    document = document.to(device)

    def same_protein(batch, head, query_index, key_index):
        return document[query_index] == document[key_index]

    return BlockMask.from_kv_blocks(*block_table(partial), *block_table(full), BLOCK_SIZE=FLEX_BLOCK,
                                    mask_mod=same_protein, seq_lengths=(total, total))


@functools.cache
def flex_attention_function(device_type: str):
    """flex attention, compiled on CUDA (its fused kernel; dynamic shapes, as batches differ in length); on CPU the
    unfused reference (it materialises the scores: for the tests of its numerics only, never chosen by `auto`)."""
    from torch.nn.attention import flex_attention as flex

    if device_type == "cuda":
        return torch.compile(flex.flex_attention, dynamic=True)

    def unfused(*args, **kwargs):
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message="flex_attention called without torch.compile")
            return flex.flex_attention(*args, **kwargs)

    return unfused


def attention_problem(mode: str, device, dtype: torch.dtype, head_size: int) -> str | None:
    """Why `mode` cannot run on `device` with q/k/v of `dtype` and `head_size`, or None when it can (then
    `kernel_problem` still checks what it computes)."""
    device = torch.device(device)
    if mode not in ATTENTION_MODES:
        return f"attention must be one of {ATTENTION_MODES}, got {mode!r}"
    if mode == "varlen":
        try:
            from torch.nn.attention.varlen import varlen_attn  # noqa: F401 (torch >= 2.10)
        except ImportError:
            return f"torch {torch.__version__} has no torch.nn.attention.varlen"
        if device.type != "cuda":
            return "varlen (flash attention) runs on CUDA only"
        if dtype not in (torch.float16, torch.bfloat16):
            return f"varlen (flash attention) takes fp16 or bf16, not {dtype}"
        if not torch.backends.cuda.is_flash_attention_available():
            return "this torch build has no flash attention"
        if head_size % 8 or head_size > 256:
            return f"flash attention takes head sizes that are multiples of 8 up to 256, not {head_size}"
    if mode == "flex":
        try:
            from torch.nn.attention.flex_attention import BlockMask  # noqa: F401
        except ImportError:
            return f"torch {torch.__version__} has no flex attention"
    if mode == "nested" and not hasattr(torch.nested, "nested_tensor_from_jagged"):
        return f"torch {torch.__version__} has no jagged nested tensors"
    return None


_KERNEL_PROBLEMS: dict = {}


def kernel_problem(mode: str, device, dtype: torch.dtype, head_size: int) -> str | None:
    """Once per mode, device, dtype and head size: `mode` on random proteins of uneven lengths (one of a single
    token) against the grouped path in fp32 on the same device; None when it runs and stays within
    `KERNEL_TOLERANCE`, else what went wrong (an error, or the relative error)."""
    device = torch.device(device)
    key = (mode, str(device), dtype, head_size)
    if key not in _KERNEL_PROBLEMS:
        problem = attention_problem(mode, device, dtype, head_size)
        if problem is None and mode != "grouped":
            try:
                generator = torch.Generator().manual_seed(0)
                lengths = [37, 1, 130, 12, 130]
                query, key_, value = (torch.randn(1, 2, sum(lengths), head_size, generator=generator).to(device)
                                      for _ in range(3))
                scaling = head_size ** -0.5
                with torch.no_grad(), torch.autocast(device.type, enabled=False):
                    reference = VarlenPlan(lengths, "grouped", device).attend(query, key_, value, scaling)
                    out = VarlenPlan(lengths, mode, device).attend(*(x.to(dtype) for x in (query, key_, value)),
                                                                   scaling)
                error = float((out.float() - reference).norm() / reference.norm())
                if not error <= KERNEL_TOLERANCE.get(dtype, 2e-2):  # NaN fails too
                    problem = f"differs from the grouped path by {error:.1e} (relative) in {dtype}"
            except Exception as error:  # noqa: BLE001 -- any failure means: do not use this kernel here
                problem = f"failed: {error!r}"[:300]
        _KERNEL_PROBLEMS[key] = problem
    return _KERNEL_PROBLEMS[key]


_WARNED_KERNELS = set()


def choose_attention(device, dtype: torch.dtype, head_size: int) -> str:
    """The attention mode `attention="auto"` runs: the first of `AUTO_ATTENTION[device type]` that runs here and
    passes `kernel_problem` (a kernel that fails it is skipped with a warning, once); padded for other devices."""
    device = torch.device(device)
    for mode in AUTO_ATTENTION.get(device.type, ("padded",)):
        if mode in ("grouped", "padded"):
            return mode
        problem = attention_problem(mode, device, dtype, head_size)
        if problem is None:
            problem = kernel_problem(mode, device, dtype, head_size)
            if problem is None:
                return mode
            if (mode, device.type, dtype) not in _WARNED_KERNELS:
                _WARNED_KERNELS.add((mode, device.type, dtype))
                warnings.warn(f"esmloc: the {mode} attention kernel on {device.type} ({dtype}) {problem}; using the "
                              "next attention in esmloc.varlen_esm.AUTO_ATTENTION", RuntimeWarning, stacklevel=2)
    return "padded"


def varlen_sdpa(module, query, key, value, attention_mask, scaling=None, dropout=0.0, esmloc_varlen=None, **kwargs):
    """transformers' SDPA attention, except that with `esmloc_varlen` (a `VarlenPlan`) each protein of a flattened
    batch attends to itself only."""
    if esmloc_varlen is None:
        return sdpa_attention_forward(module, query, key, value, attention_mask, scaling=scaling, dropout=dropout,
                                      **kwargs)
    return esmloc_varlen.attend(query, key, value, scaling), None


AttentionInterface.register(ATTENTION_NAME, varlen_sdpa)
AttentionMaskInterface.register(ATTENTION_NAME, sdpa_mask)  # padded calls get SDPA's masks


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


class FusedGeluIntermediate(nn.Module):
    """The view's `EsmIntermediate`: its dense layer, then GELU in one pass (`F.gelu`) instead of the four of ESM's
    own `gelu` (`x * 0.5 * (1 + erf(x / sqrt(2)))`: the same exact erf form; ESM-2 35M embeddings moved by 7e-7,
    and the padding-free tests hold the whole forward to 1e-5 of `EsmModel.forward`). Those passes over the
    (tokens, 4 x hidden) activations took about 6% of the fp32 engine's time at ESM-2 35M (bench/engine_profile.py:
    the erf and the division alone 5%)."""

    def __init__(self, dense: nn.Module):
        super().__init__()
        self.dense = dense

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        return F.gelu(self.dense(hidden_states))


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


def unsupported_reason(esm) -> str | None:
    """Why `esm` cannot run flattened (then it runs padded through its own forward), or None when it can."""
    if EsmcModel is not None and isinstance(esm, EsmcModel):
        return None  # rotary positions from `position_ids`, attention through the interface, no token dropout
    if not isinstance(esm, EsmModel):
        return f"not an EsmModel or EsmcModel ({type(esm).__name__})"
    config = esm.config
    if getattr(config, "position_embedding_type", "absolute") != "rotary" or esm.rotary_embeddings is None:
        return "only rotary position embeddings (ESM-2) take per-protein positions"
    if config.is_decoder or config.add_cross_attention:
        return "decoder / cross-attention configurations are not supported"
    return None


def backbone_view(esm: EsmModel, int8: bool = False) -> EsmModel:
    """A copy of `esm`'s module tree sharing all its parameters and buffers, whose config (a copy) selects
    `varlen_sdpa`; with `int8`, its plain `nn.Linear` layers are `Int8Linear`."""
    shared = {id(tensor): tensor for tensor in itertools.chain(esm.parameters(), esm.buffers())}
    view = copy.deepcopy(esm, shared)
    view.config._attn_implementation = ATTENTION_NAME  # the view's own config: the model's keeps its setting
    if int8:
        for module in list(view.modules()):
            for name, child in module.named_children():
                if type(child) is nn.Linear:
                    setattr(module, name, Int8Linear(child))
    for module in list(view.modules()):
        for name, child in module.named_children():
            if type(child) is EsmIntermediate:
                setattr(module, name, FusedGeluIntermediate(child.dense))
    return view.eval()


class UnpaddedEsm:
    """`UnpaddedEsm(esm)(input_ids, lengths)` takes the token ids of several proteins concatenated (`<cls>` ...
    `<eos>` each, `lengths` tokens each) and returns their last hidden states concatenated the same way: what
    `esm(ids, attention_mask).last_hidden_state` holds at the unpadded positions (within floating-point rounding).

    Args:
        esm: the backbone (`unsupported_reason(esm)` must be None).
        attention: one of `ATTENTION_MODES` (see `VarlenPlan`), or `auto`: per device, dtype and head size
            (`choose_attention`).
        int8: run the linear layers with dynamic int8 quantisation (CPU; `Int8Linear`).
    """

    def __init__(self, esm: EsmModel, attention: str = "auto", int8: bool = False):
        reason = unsupported_reason(esm)
        if reason:
            raise ValueError(f"this backbone cannot run unpadded: {reason}")
        if attention != "auto" and attention not in ATTENTION_MODES:
            raise ValueError(f"attention must be auto or one of {ATTENTION_MODES}, got {attention!r}")
        if int8 and not int8_linear_available():
            raise ValueError("int8 needs oneDNN's int8 linear (torch.ops.onednn.qlinear_pointwise), which does not "
                             "run (or does not agree with nn.Linear) on this machine")
        self.esm = esm
        self.attention = attention
        self.int8 = int8
        self.head_size = esm.config.hidden_size // esm.config.num_attention_heads
        self.view = backbone_view(esm, int8=int8)
        for module in self.view.modules():  # quantise and pack every weight now, not inside the first batches
            if isinstance(module, Int8Linear):
                module.packed_weight()

    def attention_mode(self, device, dtype: torch.dtype | None = None) -> str:
        """The `VarlenPlan` mode a batch runs on `device` with attention inputs of `dtype` (default: the autocast
        dtype where autocast is on, else the backbone's): as asked (a ValueError when it cannot run there), or for
        `auto` what `choose_attention` picks."""
        device = torch.device(device)
        if dtype is None:
            autocast = torch.is_autocast_enabled(device.type)
            dtype = torch.get_autocast_dtype(device.type) if autocast else self.esm.dtype
        if self.attention == "auto":
            return choose_attention(device, dtype, self.head_size)
        problem = attention_problem(self.attention, device, dtype, self.head_size)
        if problem:
            raise ValueError(f"attention={self.attention!r} cannot run here: {problem}")
        return self.attention

    def __call__(self, input_ids: torch.Tensor, lengths: Sequence[int]) -> torch.Tensor:
        lengths = [int(length) for length in lengths]
        if int(input_ids.shape[0]) != sum(lengths):
            raise ValueError(f"{int(input_ids.shape[0])} token ids for lengths summing to {sum(lengths)}")
        device = input_ids.device
        config = self.esm.config
        masked = config.mask_token_id is not None and bool((input_ids == config.mask_token_id).any())
        if getattr(config, "token_dropout", False) and masked:  # ESM-2 only: ESM C has no token dropout
            return self._padded(input_ids, lengths)
        plan = VarlenPlan(lengths, self.attention_mode(device), device)
        output = self.view(input_ids[None], position_ids=plan.position_ids(device), esmloc_varlen=plan)
        return output.last_hidden_state[0]

    def _padded(self, input_ids, lengths):
        """The model's own padded forward (the view's linear layers, so int8 stays int8)."""
        rows = torch.split(input_ids, lengths)
        ids = nn.utils.rnn.pad_sequence(rows, batch_first=True, padding_value=self.esm.config.pad_token_id)
        lengths_tensor = torch.tensor(lengths, device=ids.device)
        mask = torch.arange(ids.shape[1], device=ids.device)[None, :] < lengths_tensor[:, None]
        hidden = self.view(ids, attention_mask=mask.long()).last_hidden_state
        return hidden[mask]


_PARITY_OK: dict[str, bool] | None = None  # per family; None: nothing checked yet in this process
# The tiny random backbone each family's self-check runs (ESM-2: the architecture it always ran; ESM C: esmc_tiny).
PARITY_BACKBONES = {
    "esm2": {"vocab_size": 33, "hidden_size": 32, "num_hidden_layers": 2, "num_attention_heads": 4,
             "intermediate_size": 64, "position_embedding_type": "rotary", "token_dropout": True,
             "emb_layer_norm_before": False, "mask_token_id": 32, "pad_token_id": 1, "max_position_embeddings": 64},
    "esmc": ARCHITECTURES["esmc_tiny"],
}


def stock_backbone(config):
    """The stock transformers backbone of a config: `EsmModel` (no pooler) or `EsmcModel`, random weights."""
    if backbone_family(config) == "esmc":
        return EsmcModel(config)
    return EsmModel(config, add_pooling_layer=False)


def parity_check(family: str = "esm2") -> bool:
    """Once per process and backbone family (`"esm2"`, `"esmc"`): tiny proteins through `UnpaddedEsm` (grouped and
    padded attention) and through the stock forward (`EsmModel` / `EsmcModel`), one at a time, on a tiny random
    backbone of that family (fp32); False, with a warning, when they differ by more than 1e-4."""
    global _PARITY_OK
    if _PARITY_OK is None:
        _PARITY_OK = {}
    if family not in _PARITY_OK:
        stock_name = "EsmcModel" if family == "esmc" else "EsmModel"
        try:
            generator_state = torch.random.get_rng_state()
            torch.manual_seed(0)
            esm = stock_backbone(backbone_config(dict(PARITY_BACKBONES[family]))).eval()
            torch.random.set_rng_state(generator_state)
            # A batch with two proteins of equal length (one run) and a longer one; a batch of two lengths with a
            # <mask> token (ESM-2: the padded fallback).
            proteins = [[0, 5, 6, 7, 8, 9, 2], [0, 10, 11, 12, 2], [0, 13, 14, 15, 2], [0, 16, 32, 17, 2]]
            batches = (proteins[:3], [proteins[0], proteins[3]])
            with torch.inference_mode():
                stock = torch.cat([esm(torch.tensor([p])).last_hidden_state[0] for batch in batches for p in batch])
                unpadded = []
                for attention in ("grouped", "padded"):
                    flat = UnpaddedEsm(esm, attention=attention)
                    unpadded.append(torch.cat([flat(torch.tensor([t for p in batch for t in p]),
                                                    [len(p) for p in batch]) for batch in batches]))
            difference = max(float((result - stock).abs().max()) for result in unpadded)
            _PARITY_OK[family] = difference <= 1e-4
            reason = f"differs from {stock_name}.forward by {difference:.1e}"
        except Exception as error:  # noqa: BLE001 -- any failure of the unpadded path means: do not use it
            _PARITY_OK[family], reason = False, f"failed: {error!r}"
        if not _PARITY_OK[family]:
            warnings.warn(f"esmloc's padding-free {family} path {reason} with transformers "
                          f"{transformers.__version__}; falling back to the padded {stock_name}.forward",
                          RuntimeWarning, stacklevel=2)
    return _PARITY_OK[family]


def unpadded_forward_trusted(family: str = "esm2") -> bool:
    """Whether the padding-free path passed its parity self-check for this backbone family in this process."""
    return parity_check(family)
