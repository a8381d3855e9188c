"""The attention of a flattened batch: each protein attends to itself only.

How the proteins of a flattened batch attend to themselves only (`VarlenPlan`, `ATTENTION_MODES`): one SDPA call
per run of equal-length proteins (`grouped`, the CPU default), one padded SDPA call with a key-padding mask (`padded`),
or one of torch's variable-length kernels, which cost the sum of the squares of the proteins' lengths with no padding:
flash attention over cumulative lengths (`varlen`, `torch.nn.attention.varlen`, CUDA, fp16/bf16), SDPA on a jagged
nested tensor (`nested`) or flex attention with a block-sparse document mask (`flex`). `choose_attention` is the one
place that decides, per device, dtype and head size, from `AUTO_ATTENTION`; a kernel is used only after it has
matched the grouped path on random inputs on that device (`kernel_problem`), else the next one in the order is.

`varlen_sdpa` is registered with transformers' `AttentionInterface` as `ATTENTION_NAME`: a view of the backbone
whose config names it (`esmloc.varlen_esm.backbone_view`) attends through the `VarlenPlan` passed as `esmloc_varlen`.
"""

import functools
import itertools
import warnings
from collections.abc import Sequence

import numpy as np
import torch
import torch.nn.functional as F
from transformers import AttentionInterface
from transformers.integrations.sdpa_attention import sdpa_attention_forward
from transformers.masking_utils import AttentionMaskInterface, sdpa_mask


ATTENTION_NAME = "esmloc_varlen_sdpa"

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
