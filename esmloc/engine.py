"""The batched inference engine: ESM-2 hidden states, pooled features and class probabilities for many proteins.

One engine serves everything that runs the backbone without gradients: cached-feature training (`esmloc.cache`),
the final evaluation in `train.py` and `esmloc-predict`.

    engine = Engine(model, tokenizer)                  # an EsmForLocalization and its EsmLocTokenizer
    probabilities = engine.predict_probabilities(sequences)   # (n, num_labels), input order
    features = engine.embed(sequences, kind="mean")   # (n, hidden) float32; "cls" likewise; "residues": a list

What makes it fast:

- Proteins are tokenised once (EsmLocTokenizer's fast path), sorted by length and cut into batches bounded by a token
  budget, `max_tokens_per_batch` (padded size = proteins x longest), rather than by a protein count: many short
  proteins or a few long ones per batch, and almost no padding.
- The backbone runs *packed* (`PackedEsm`): the tokens of a batch are concatenated into one (tokens, hidden) matrix,
  so the linear layers never see padding; query, key and value are one matmul; attention runs through
  `scaled_dot_product_attention` once per run of equal-length proteins, with no mask (on CUDA: one call per batch
  with a key-padding mask). `PackedEsm` reads the weights of the model's own `EsmModel` and computes what
  `EsmModel.forward` computes (equal within 1e-5 in fp32, tests/test_engine.py); a backbone it does not recognise
  (unmerged LoRA layers, absolute positions, a decoder) runs through `EsmModel.forward` on padded batches with SDPA.
- On CPU in fp32 the linear layers go through oneDNN (`torch.ops.mkldnn._linear_pointwise`, GELU and the residual
  addition fused), when the op exists and agrees with `F.linear`: `F.linear` and `torch.matmul` use MKL, which runs
  its AVX2 code on AMD processors; oneDNN uses AVX-512 there and was measured 2.3x faster on this project's 2-core
  AMD EPYC machine (the same fp32 results within rounding).
- On CPU, `workers` batches run at once in threads, each with its share of torch's intra-op threads (by default one
  batch per core on up to 4 cores): per-core batches scale better than splitting every small operation across the
  cores, and far better on a shared machine, where split operations wait for each other.
- `torch.inference_mode`; on CUDA bf16 autocast (fp16 where bf16 is unsupported); fp32 on CPU, where bf16 autocast
  is faster but not accurate enough to be the default (bench/embedding_throughput.py --variants all: 2.6e-2 error in
  the mean embeddings against fp32; `precision="bf16"` asks for it).
- No work on the contact head, which inference never needs.

Results always come back in input order, whatever order the batches ran in.
"""

from collections import deque
from collections.abc import Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from contextlib import nullcontext
from itertools import islice

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn
from tqdm.auto import tqdm
from transformers.models.esm.modeling_esm import EsmModel

from esmloc import task


FEATURE_KINDS = ("mean", "cls", "residues")
PRECISIONS = ("auto", "fp32", "bf16", "fp16", "int8")
# What `precision="auto"` runs per device type: the fastest precision whose cost, measured on trained models by
# bench/precision_accuracy.py, stays within AUTO_LIMITS. On CPU neither bf16 nor int8 did (README, "Speed"), so fp32.
AUTO_LIMITS = {"max_probability_difference": 0.01, "max_mcc_drop": 0.005}
AUTO_PRECISION = {"cpu": "fp32"}
# Token budgets (padded tokens per batch). CPU: measured with bench/embedding_throughput.py --budgets on 2 cores
# (ESM-2 8M): 1024-4096 within 3% of each other, 8192 slower, 2048 best; batches whose activations stay in the
# caches beat big ones. A GPU wants large batches (not measured here).
DEFAULT_MAX_TOKENS_PER_BATCH = {"cpu": 2048, "cuda": 65536}


def default_max_tokens_per_batch(device) -> int:
    return DEFAULT_MAX_TOKENS_PER_BATCH.get(torch.device(device).type, DEFAULT_MAX_TOKENS_PER_BATCH["cpu"])


def length_batches(lengths: Sequence[int], max_tokens_per_batch: int) -> list[np.ndarray]:
    """Indices grouped into batches of similar length whose padded size (batch x longest) stays within the
    budget; a protein longer than the budget gets a batch of its own. Longest first, so that a batch too big
    for the device fails at once rather than at the end."""
    lengths = np.asarray(lengths)
    order = np.argsort(-lengths, kind="stable")
    batches, current = [], []
    for index in order:
        # Sorted longest first: a batch's first protein sets its padded length.
        if current and (len(current) + 1) * lengths[current[0]] > max_tokens_per_batch:
            batches.append(np.asarray(current))
            current = []
        current.append(index)
    if current:
        batches.append(np.asarray(current))
    return batches


def resolve_precision(device, precision: str = "auto") -> str:
    """The precision that runs on `device` for `precision`: fp32, bf16, fp16 or int8 (`auto` per AUTO_PRECISION;
    on CUDA bf16 autocast, or fp16 where bf16 is unsupported)."""
    if precision not in PRECISIONS:
        raise ValueError(f"precision must be one of {PRECISIONS}, got {precision!r}")
    device = torch.device(device)
    if precision == "auto":
        if device.type == "cuda":
            return "bf16" if torch.cuda.is_bf16_supported() else "fp16"
        return AUTO_PRECISION.get(device.type, "fp32")
    return precision


def autocast_dtype(device, precision: str = "auto") -> torch.dtype | None:
    """The autocast dtype for `precision` on `device`; None means no autocast (fp32, or int8 linear layers with
    fp32 everything else)."""
    return {"fp32": None, "int8": None, "bf16": torch.bfloat16, "fp16": torch.float16}[
        resolve_precision(device, precision)]


def _torch_linear(x, weight, bias, gelu=False, residual=None):
    out = F.linear(x, weight, bias)
    if gelu:
        out = F.gelu(out)
    return out if residual is None else residual + out


# oneDNN builds (and caches) a kernel for every input shape it meets; packed batches have a different number of
# rows nearly every time, and memory grew with the number of proteins predicted (+14% RSS from 5k to 50k proteins,
# bench/predict_memory.py). Rows are padded to a multiple of this, so that a run meets a bounded set of shapes
# (<= max_tokens_per_batch / ONEDNN_ROW_BUCKET per layer kind); the zero rows cost at most 63 rows of work per call.
ONEDNN_ROW_BUCKET = 64


def _onednn_linear(x, weight, bias, gelu=False, residual=None):
    """The same as `_torch_linear` through oneDNN, with GELU (erf) or the residual addition fused into the matmul."""
    ops = torch.ops.mkldnn._linear_pointwise
    rows = x.shape[0]
    extra = -rows % ONEDNN_ROW_BUCKET
    if extra:
        x = F.pad(x, (0, 0, 0, extra))
        residual = None if residual is None else F.pad(residual, (0, 0, 0, extra))
    if residual is not None:
        out = ops.binary(x, residual, weight, bias, "add")
    else:
        out = ops(x, weight, bias, "gelu" if gelu else "none", [], "none" if gelu else "")
    return out[:rows] if extra else out


def _int8_weight(weight: torch.Tensor):
    """A linear weight quantised for oneDNN's int8 linear: symmetric int8 per output channel (scale = max|w| / 127),
    prepacked; returns (packed weight, scales, zero points)."""
    scales = (weight.detach().float().abs().amax(dim=1) / 127).clamp(min=1e-12)
    quantised = torch.round(weight.detach().float() / scales[:, None]).clamp(-127, 127).to(torch.int8)
    zero_points = torch.zeros(weight.shape[0], dtype=torch.long)
    return torch.ops.onednn.qlinear_prepack(quantised, None), scales, zero_points


def _int8_linear(x, packed_weight, bias, gelu=False, residual=None):
    """`_torch_linear` with dynamic int8 quantisation, through oneDNN (`torch.ops.onednn.qlinear_pointwise`, the
    kernel torch's x86 int8 path lowers to): the input is quantised to uint8 with one scale and zero point per call
    (from its minimum and maximum), the weight per output channel (`_int8_weight`); the int32 accumulators come
    back as fp32, with GELU or the residual addition fused. Rows are padded to ONEDNN_ROW_BUCKET as in
    `_onednn_linear` (zero rows leave the range unchanged: it always includes 0)."""
    weight, scales, zero_points = packed_weight
    rows = x.shape[0]
    extra = -rows % ONEDNN_ROW_BUCKET
    if extra:
        x = F.pad(x, (0, 0, 0, extra))
        residual = None if residual is None else F.pad(residual, (0, 0, 0, extra))
    low, high = torch.aminmax(x)
    low, high = min(float(low), 0.0), max(float(high), 0.0)
    scale = (high - low) / 255 or 1.0
    zero_point = int(round(-low / scale))
    quantised = (x * (1 / scale)).add_(zero_point).round_().clamp_(0, 255).to(torch.uint8)
    ops = torch.ops.onednn.qlinear_pointwise
    if residual is not None:
        out = ops.binary(quantised, scale, zero_point, weight, scales, zero_points, residual.contiguous(), bias, 1.0,
                         0, torch.float32, 1.0, 0, "sum", 1.0, "none", [], "")
    else:
        out = ops(quantised, scale, zero_point, weight, scales, zero_points, bias, 1.0, 0, torch.float32,
                  "gelu" if gelu else "none", [], "none" if gelu else "")
    return out[:rows] if extra else out


def int8_linear_available() -> bool:
    """Whether oneDNN's int8 linear (`_int8_linear`) runs here and stays within int8 rounding of `F.linear`."""
    global _INT8_OK
    if _INT8_OK is None:
        try:
            generator = torch.Generator().manual_seed(0)
            x, w, b, r = (torch.randn(*shape, generator=generator) for shape in ((7, 64), (40, 64), (40,), (7, 40)))
            packed = _int8_weight(w)
            # A matmul over 64 products of inputs and weights each within half a step of their grids: well under 0.3.
            _INT8_OK = all(
                torch.allclose(_int8_linear(x, packed, b, **kw), _torch_linear(x, w, b, **kw), atol=0.3, rtol=0)
                for kw in ({}, {"gelu": True}, {"residual": r})
            )
        except (RuntimeError, AttributeError, NotImplementedError):
            _INT8_OK = False
    return _INT8_OK


_INT8_OK = None


def onednn_linear_available() -> bool:
    """Whether oneDNN's fp32 linear (with fused GELU / residual) runs here and agrees with `F.linear`."""
    global _ONEDNN_OK
    if _ONEDNN_OK is None:
        try:
            generator = torch.Generator().manual_seed(0)
            x, w, b, r = (torch.randn(*shape, generator=generator) for shape in ((7, 24), (40, 24), (40,), (7, 40)))
            _ONEDNN_OK = all(
                torch.allclose(_onednn_linear(x, w, b, **kw), _torch_linear(x, w, b, **kw), atol=1e-5, rtol=1e-5)
                for kw in ({}, {"gelu": True}, {"residual": r})
            )
        except (RuntimeError, AttributeError, NotImplementedError):
            _ONEDNN_OK = False
    return _ONEDNN_OK


_ONEDNN_OK = None


def _exactly(module, cls) -> bool:
    return type(module) is cls


class PackedEsm:
    """An unpadded forward pass over the weights of an `EsmModel` (ESM-2: rotary positions, pre-LayerNorm).

    `PackedEsm(esm)(input_ids, lengths)` takes the token ids of several proteins concatenated (`<cls>` ... `<eos>`
    each, `lengths` tokens each) and returns their last hidden states, concatenated the same way: exactly what
    `esm(ids, attention_mask).last_hidden_state` holds at the unpadded positions (within floating-point rounding).
    The fused query/key/value matrix it builds is rebuilt whenever one of its parts changes, so the object stays
    valid while the model changes.
    """

    def __init__(self, esm: EsmModel, attention: str = "auto", onednn: bool | None = None, int8: bool = False):
        reason = self.unsupported_reason(esm)
        if reason:
            raise ValueError(f"PackedEsm cannot run this backbone: {reason}")
        if attention not in ("auto", "grouped", "padded"):
            raise ValueError(f"attention must be auto, grouped or padded, got {attention!r}")
        self.esm = esm
        self.attention = attention
        self.onednn = onednn_linear_available() if onednn is None else onednn
        if int8 and not int8_linear_available():
            raise ValueError("int8 needs oneDNN's int8 linear (torch.ops.onednn.qlinear_pointwise), which does not "
                             "run (or does not agree with F.linear) on this machine")
        self.int8 = int8
        self._int8_cache: dict = {}
        config = esm.config
        self.num_heads = config.num_attention_heads
        self.head_size = config.hidden_size // config.num_attention_heads
        self._rotary_cache: dict = {}
        self._qkv_cache: dict = {}

    @staticmethod
    def unsupported_reason(esm) -> str | None:
        """Why `PackedEsm` cannot reproduce `esm.forward`, or None when it can."""
        if not isinstance(esm, EsmModel):
            return f"not an EsmModel ({type(esm).__name__})"
        config = esm.config
        if getattr(config, "position_embedding_type", "absolute") != "rotary" or esm.rotary_embeddings is None:
            return "only rotary position embeddings (ESM-2) are supported"
        if config.is_decoder or config.add_cross_attention:
            return "decoder / cross-attention configurations are not supported"
        if config.hidden_size % config.num_attention_heads:
            return "hidden_size is not a multiple of num_attention_heads"
        if getattr(esm.rotary_embeddings, "rope_type", {}) not in ({}, "default", None):
            return "only default rotary embeddings are supported"
        if not _exactly(esm.embeddings.word_embeddings, nn.Embedding):
            return "the word embeddings are wrapped"
        if esm.embeddings.layer_norm is not None and not _exactly(esm.embeddings.layer_norm, nn.LayerNorm):
            return "the embedding layer norm is wrapped"
        if not _exactly(esm.encoder.emb_layer_norm_after, nn.LayerNorm):
            return "emb_layer_norm_after is missing or wrapped"
        for index, layer in enumerate(esm.encoder.layer):
            attention = layer.attention
            linears = (attention.self.query, attention.self.key, attention.self.value, attention.output.dense,
                       layer.intermediate.dense, layer.output.dense)
            norms = (attention.LayerNorm, layer.LayerNorm)
            if not all(_exactly(module, nn.Linear) and module.bias is not None for module in linears):
                return f"layer {index} has linear layers other than plain nn.Linear with bias (e.g. unmerged LoRA)"
            if not all(_exactly(module, nn.LayerNorm) for module in norms):
                return f"layer {index} has wrapped layer norms"
            if getattr(attention.self, "position_embedding_type", "rotary") != "rotary":
                return f"layer {index} does not use rotary positions"
        return None

    def _rotary(self, max_length: int, device, dtype):
        """cos and sin of every position up to `max_length`, as `EsmRotaryEmbedding` computes them (sin with the
        sign of `rotate_half` folded in)."""
        key = (device, dtype)
        cached = self._rotary_cache.get(key)
        rotary = self.esm.rotary_embeddings
        if cached is None or cached[0].shape[0] < max_length or cached[2] != rotary.inv_freq._version:
            length = max(max_length, 1026)
            positions = torch.arange(length, device=device)
            freqs = positions[:, None].float() * rotary.inv_freq.to(device=device, dtype=torch.float)[None, :]
            emb = torch.cat((freqs, freqs), dim=-1)
            cos = (emb.cos() * rotary.attention_scaling).to(dtype)
            sin = (emb.sin() * rotary.attention_scaling).to(dtype)
            half = sin.shape[-1] // 2
            signed_sin = torch.cat((-sin[:, :half], sin[:, half:]), dim=-1)
            cached = (cos, signed_sin, rotary.inv_freq._version)
            self._rotary_cache[key] = cached
        return cached[0], cached[1]

    def __call__(self, input_ids: torch.Tensor, lengths: Sequence[int]) -> torch.Tensor:
        esm, config = self.esm, self.esm.config
        device = input_ids.device
        lengths = [int(length) for length in lengths]
        total = int(input_ids.shape[0])
        if total != sum(lengths):
            raise ValueError(f"{total} token ids for lengths summing to {sum(lengths)}")
        num_heads, head_size, hidden = self.num_heads, self.head_size, config.hidden_size
        starts = np.concatenate([[0], np.cumsum(lengths)]).tolist()
        lengths_tensor = torch.tensor(lengths, device=device)
        sequence_of_token = torch.repeat_interleave(torch.arange(len(lengths), device=device), lengths_tensor)
        positions = torch.arange(total, device=device) - torch.tensor(starts[:-1], device=device)[sequence_of_token]

        # Embeddings (EsmEmbeddings.forward): token dropout rescaling, optional layer norm.
        embeddings = esm.embeddings
        hidden_states = embeddings.word_embeddings(input_ids)
        if embeddings.token_dropout:
            is_mask = input_ids == embeddings.mask_token_id
            hidden_states = hidden_states.masked_fill(is_mask.unsqueeze(-1), 0.0)
            mask_ratio_train = 0.15 * 0.8  # as in EsmEmbeddings
            observed = torch.zeros(len(lengths), device=device).index_add_(0, sequence_of_token, is_mask.float())
            observed = observed / lengths_tensor
            hidden_states = (hidden_states * (1 - mask_ratio_train) / (1 - observed)[sequence_of_token, None]).to(
                hidden_states.dtype
            )
        if embeddings.layer_norm is not None:
            hidden_states = embeddings.layer_norm(hidden_states)

        # Rotary embeddings are applied in float32, as EsmModel does under autocast too.
        cos, signed_sin = self._rotary(max(lengths), device, torch.float32)
        cos, signed_sin = cos[positions].unsqueeze(1), signed_sin[positions].unsqueeze(1)
        half = head_size // 2
        scale = head_size**-0.5
        attention_mode = self.attention
        if attention_mode == "auto":
            attention_mode = "padded" if device.type == "cuda" else "grouped"
        plan = self._attention_plan(lengths, starts, attention_mode, positions, sequence_of_token, lengths_tensor)
        if self.int8:
            if device.type != "cpu":
                raise ValueError(f"int8 runs on CPU only, not on {device.type}")
            linear, prepared = _int8_linear, self._int8_weight
        else:
            linear = _onednn_linear if (self.onednn and device.type == "cpu" and hidden_states.dtype == torch.float32
                                        and not torch.is_autocast_enabled("cpu")) else _torch_linear
            prepared = lambda key, weight: weight  # noqa: E731

        for index, layer in enumerate(esm.encoder.layer):
            attention = layer.attention
            normed = attention.LayerNorm(hidden_states)
            qkv_weight, qkv_bias = self._qkv_weights(index, attention.self)
            qkv = linear(normed, prepared(("qkv", index), qkv_weight), qkv_bias)
            # Rotary embeddings on query and key together: x * cos + rotate_half(x) * sin.
            query_key = qkv[:, :2 * hidden].view(total, 2 * num_heads, head_size).float()
            swapped = torch.cat((query_key[..., half:], query_key[..., :half]), dim=-1)
            query_key = torch.addcmul(query_key * cos, swapped, signed_sin).to(qkv.dtype)
            value = qkv[:, 2 * hidden:].view(total, num_heads, head_size)
            context = self._attend(query_key[:, :num_heads], query_key[:, num_heads:], value, plan, scale)
            hidden_states = linear(context, prepared(("output", index), attention.output.dense.weight),
                                   attention.output.dense.bias, residual=hidden_states)
            normed = layer.LayerNorm(hidden_states)
            intermediate = linear(normed, prepared(("intermediate", index), layer.intermediate.dense.weight),
                                  layer.intermediate.dense.bias, gelu=True)
            hidden_states = linear(intermediate, prepared(("feed_forward_output", index), layer.output.dense.weight),
                                   layer.output.dense.bias, residual=hidden_states)
        return esm.encoder.emb_layer_norm_after(hidden_states)

    def _qkv_weights(self, index, attention):
        """The query, key and value projections as one (3 x hidden, hidden) matrix: one matmul instead of three.
        Rebuilt whenever one of the six tensors changed (in place or replaced)."""
        tensors = (attention.query.weight, attention.key.weight, attention.value.weight,
                   attention.query.bias, attention.key.bias, attention.value.bias)
        stamp = tuple((t.data_ptr(), t._version, t.dtype, t.device) for t in tensors)
        cached = self._qkv_cache.get(index)
        if cached is None or cached[0] != stamp:
            with torch.no_grad():
                cached = (stamp, torch.cat(tensors[:3]), torch.cat(tensors[3:]))
            self._qkv_cache[index] = cached
        return cached[1], cached[2]

    def _int8_weight(self, key, weight):
        """`weight` quantised and prepacked for `_int8_linear`, cached under `key` while the tensor is the same
        object, unchanged (so the object stays valid while the model changes, as `_qkv_weights`)."""
        # The fused query/key/value matrix is made under inference mode (no version counter), but it is rebuilt,
        # a new object, whenever a part changes.
        version = None if weight.is_inference() else weight._version
        cached = self._int8_cache.get(key)
        if cached is None or cached[0] is not weight or cached[1] != version:
            cached = (weight, version, _int8_weight(weight))
            self._int8_cache[key] = cached
        return cached[2]

    @staticmethod
    def _attention_plan(lengths, starts, mode, positions, sequence_of_token, lengths_tensor):
        if mode == "padded":
            longest = max(lengths)
            token_index = sequence_of_token * longest + positions  # each token's row in a (proteins x longest) grid
            key_mask = torch.arange(longest, device=positions.device)[None, :] < lengths_tensor[:, None]
            return ("padded", len(lengths), longest, token_index, key_mask[:, None, None, :])
        # Runs of equal-length proteins (batches are sorted by length) share one SDPA call without a mask.
        runs, first = [], 0
        for index in range(1, len(lengths) + 1):
            if index == len(lengths) or lengths[index] != lengths[first]:
                runs.append((starts[first], starts[index], index - first, lengths[first]))
                first = index
        return ("grouped", runs)

    def _attend(self, query, key, value, plan, scale):
        """Multi-head attention of each protein over itself; inputs and output are (tokens, heads, head_size)."""
        total, num_heads, head_size = value.shape
        if plan[0] == "padded":
            _, count, longest, token_index, key_mask = plan

            def padded(x):
                out = x.new_zeros(count * longest, num_heads, head_size)
                out[token_index] = x
                return out.view(count, longest, num_heads, head_size).transpose(1, 2)

            context = F.scaled_dot_product_attention(padded(query), padded(key), padded(value), attn_mask=key_mask,
                                                     scale=scale)
            context = context.transpose(1, 2).reshape(count * longest, num_heads * head_size)
            return context[token_index]
        runs = plan[1]
        if len(runs) == 1:
            start, end, count, length = runs[0]
            context = F.scaled_dot_product_attention(
                *(x.view(count, length, num_heads, head_size).transpose(1, 2) for x in (query, key, value)),
                scale=scale,
            )
            return context.transpose(1, 2).reshape(total, num_heads * head_size)
        context = value.new_empty(total, num_heads, head_size)
        for start, end, count, length in runs:
            out = F.scaled_dot_product_attention(
                *(x[start:end].view(count, length, num_heads, head_size).transpose(1, 2) for x in (query, key, value)),
                scale=scale,
            )
            context[start:end].view(count, length, num_heads, head_size).copy_(out.transpose(1, 2))
        return context.view(total, num_heads * head_size)


class Engine:
    """Batched, length-sorted, token-budgeted inference with one `EsmForLocalization` (or any model with an `esm`
    backbone) and its tokenizer.

    Args:
        model: the model; its backbone is `model.esm` (a PEFT-wrapped model is looked through).
        tokenizer: an `EsmLocTokenizer` (crops exactly as the model's config says).
        max_tokens_per_batch: padded tokens per batch (proteins x longest); default per device type.
        device: where to run; default the model's device.
        precision: `auto` (per device: `AUTO_PRECISION`, fp32 on CPU; bf16 or fp16 autocast on CUDA), `fp32`,
            `bf16` or `fp16` (autocast), or `int8` (CPU, `PackedEsm` only: the backbone's linear layers with dynamic
            int8 quantisation through oneDNN, everything else fp32; a protein's result then depends slightly on the
            other proteins of its batch, which share one input scale per linear layer).
        progress: show a progress bar.
        packed: use `PackedEsm` when the backbone allows it (False: always `EsmModel.forward` on padded batches).
        attention: `PackedEsm`'s attention: `grouped` (per run of equal lengths, no mask; the CPU default) or
            `padded` (one masked call per batch; the CUDA default).
        onednn: run `PackedEsm`'s fp32 CPU linear layers through oneDNN (default: when it is available and agrees
            with `F.linear`).
        workers: batches run at once (see `map_batches`); default on CPU: torch's intra-op threads, at most 4;
            on CUDA 1.
    """

    def __init__(self, model, tokenizer, max_tokens_per_batch: int | None = None, device=None,
                 precision: str = "auto", progress: bool = True, packed: bool = True, attention: str = "auto",
                 onednn: bool | None = None, workers: int | None = None):
        self.model = model
        self.tokenizer = tokenizer
        self.device = torch.device(device) if device is not None else next(model.parameters()).device
        self.max_tokens_per_batch = max_tokens_per_batch or default_max_tokens_per_batch(self.device)
        self.precision = precision
        self.precision_name = resolve_precision(self.device, precision)  # part of a feature cache's key
        self.autocast_dtype = autocast_dtype(self.device, precision)
        self.progress = progress
        base = model.get_base_model() if hasattr(model, "get_base_model") else model
        self.base_model = base
        self.esm = base.esm
        if workers is None:
            workers = min(torch.get_num_threads(), 4) if self.device.type == "cpu" else 1
        self.workers = max(1, workers)
        self.packed = None
        int8 = self.precision_name == "int8"
        reason = PackedEsm.unsupported_reason(self.esm) if packed else "packed=False"
        if int8 and (reason or self.device.type != "cpu"):
            raise ValueError(f"precision int8 runs on CPU through PackedEsm only, here: "
                             f"{reason or self.device.type}")
        if not reason:
            self.packed = PackedEsm(self.esm, attention=attention, onednn=onednn, int8=int8)

    def encode(self, sequences: Sequence[str]) -> list[list[int]]:
        """Token ids (`<cls>` residues `<eos>`, normalised and cropped by the tokenizer) of each protein."""
        return self.tokenizer(list(sequences))["input_ids"] if len(sequences) else []

    def _autocast(self):
        if self.autocast_dtype is None:
            return nullcontext()
        return torch.autocast(self.device.type, dtype=self.autocast_dtype)

    def map_batches(self, encoded: Sequence[Sequence[int]], function, desc: str = "Embedding", bar=None
                    ) -> Iterator[tuple[np.ndarray, object]]:
        """Runs the backbone on every batch and `function(lengths, hidden)` on its packed hidden states (a
        (sum of lengths, hidden) tensor, proteins in the order of the batch's indices); yields `(indices, result)`
        in batch order. Eval mode, `torch.inference_mode`, autocast per `precision`.

        On CPU with the packed backbone the batches run in `workers` threads at once, each with an equal share of
        torch's intra-op threads (default: one thread per worker on up to 4 cores): one batch per core scales
        better than every small operation split across the cores (and much better on a machine shared with other
        work, where split operations wait for each other)."""
        batches = length_batches([len(ids) for ids in encoded], self.max_tokens_per_batch)
        workers = min(self.workers, len(batches)) if self.packed is not None else 1

        def run(batch_indices):
            ids = [encoded[i] for i in batch_indices]
            lengths = [len(x) for x in ids]
            with torch.inference_mode(), self._autocast():
                return batch_indices, function(lengths, self._backbone(ids, lengths))

        was_training = self.model.training
        self.model.eval()
        try:
            if bar is None:
                bar = tqdm(total=len(encoded), desc=desc, unit="protein", disable=not self.progress)
            else:
                bar = nullcontext(bar)  # the caller's: advanced here, closed by the caller
            with bar as bar:
                if workers <= 1:
                    for batch_indices in batches:
                        result = run(batch_indices)
                        yield result
                        bar.update(len(batch_indices))
                    return
                threads = torch.get_num_threads()
                per_worker = max(1, threads // workers)
                torch.set_num_threads(per_worker)  # new threads start with the process-wide setting
                try:
                    with ThreadPoolExecutor(workers, initializer=torch.set_num_threads,
                                            initargs=(per_worker,)) as pool:
                        pending, remaining = deque(), iter(batches)
                        for batch_indices in islice(remaining, 2 * workers):  # a bounded number in flight
                            pending.append(pool.submit(run, batch_indices))
                        while pending:
                            result = pending.popleft().result()
                            following = next(remaining, None)
                            if following is not None:
                                pending.append(pool.submit(run, following))
                            yield result
                            bar.update(len(result[0]))
                finally:
                    torch.set_num_threads(threads)
        finally:
            self.model.train(was_training)

    def hidden_state_batches(self, encoded: Sequence[Sequence[int]], desc: str = "Embedding"
                             ) -> Iterator[tuple[np.ndarray, list[int], torch.Tensor]]:
        """Yields `(indices, lengths, hidden)` per batch: the positions (in `encoded`) of the batch's proteins, their
        token counts and their last hidden states packed into one (sum of lengths, hidden) tensor, in the order of
        `indices`."""
        for indices, (lengths, hidden) in self.map_batches(encoded, lambda lengths, hidden: (lengths, hidden), desc):
            yield indices, lengths, hidden

    def _backbone(self, ids, lengths) -> torch.Tensor:
        if self.packed is not None:
            flat = torch.tensor([token for x in ids for token in x], dtype=torch.long, device=self.device)
            return self.packed(flat, lengths)
        padded = self.tokenizer.pad({"input_ids": ids}, return_tensors="pt")
        attention_mask = padded["attention_mask"].to(self.device)
        hidden = self.esm(padded["input_ids"].to(self.device), attention_mask=attention_mask).last_hidden_state
        return hidden[attention_mask.bool()]

    @staticmethod
    def pool(hidden: torch.Tensor, lengths: Sequence[int], kind: str) -> torch.Tensor:
        """Per-protein vectors from packed hidden states: `mean` over residues (without `<cls>`/`<eos>`, as
        `EsmLocPooler` does) or the `<cls>` state."""
        starts = np.concatenate([[0], np.cumsum(lengths)[:-1]]).astype(np.int64)
        if kind == "cls":
            return hidden[torch.as_tensor(starts, device=hidden.device)]
        if kind != "mean":
            raise ValueError(f"pool kind must be mean or cls, got {kind!r}")
        # One reduction per protein: torch's blocked sums are as accurate as the pooler's padded sum.
        rows = [hidden[start + 1:start + length - 1].float().sum(dim=0) / max(length - 2, 1)
                for start, length in zip(starts.tolist(), lengths)]
        return torch.stack(rows)

    @staticmethod
    def residues(hidden: torch.Tensor, lengths: Sequence[int]) -> list[torch.Tensor]:
        """Each protein's residue states (without `<cls>`/`<eos>`)."""
        out, start = [], 0
        for length in lengths:
            out.append(hidden[start + 1:start + length - 1])
            start += length
        return out

    def embed(self, sequences: Sequence[str], kind: str = "mean", desc: str = "Embedding"):
        """Features per protein in input order: `mean`/`cls` give a float32 array (n, hidden); `residues` gives a
        list of float32 arrays (residues, hidden)."""
        return self.embed_encoded(self.encode(sequences), kind, desc)

    def embed_encoded(self, encoded, kind: str = "mean", desc: str = "Embedding", on_batch=None, keep: bool = True):
        """`embed` for token ids already encoded. `on_batch(indices, rows)` is called after each batch with the
        positions and features of its proteins (the feature cache writes its shards from there); with
        `keep=False` nothing is collected and None is returned."""
        if kind not in FEATURE_KINDS:
            raise ValueError(f"kind must be one of {FEATURE_KINDS}, got {kind!r}")
        results = None
        if keep:
            if kind == "residues":
                results = [None] * len(encoded)
            else:
                results = np.zeros((len(encoded), self.esm.config.hidden_size), dtype=np.float32)
        def features(lengths, hidden):
            if kind == "residues":
                return [x.float().cpu().numpy() for x in self.residues(hidden, lengths)]
            return self.pool(hidden, lengths, kind).float().cpu().numpy()

        for indices, rows in self.map_batches(encoded, features, desc=desc):
            if keep:
                for index, row in zip(indices, rows, strict=True):
                    results[index] = row
            if on_batch is not None:
                on_batch(indices, rows)
        return results

    def logits_from_hidden(self, hidden: torch.Tensor, lengths: Sequence[int]) -> torch.Tensor:
        """The model's head (`classify`) on packed hidden states, through a padded view with an attention mask,
        so that every pooling mode runs exactly the model's own code."""
        count, longest = len(lengths), max(lengths)
        padded = hidden.new_zeros(count, longest, hidden.shape[-1], dtype=torch.float32)
        mask = torch.arange(longest, device=hidden.device)[None, :] < torch.as_tensor(
            np.asarray(lengths), device=hidden.device)[:, None]
        padded[mask] = hidden.float()
        return self.base_model.classify(padded, mask.long()).logits

    def probabilities_from_logits(self, logits: torch.Tensor) -> torch.Tensor:
        return task.probabilities(logits, task.is_multi_label(self.base_model.config))

    def predict_probabilities(self, sequences: Sequence[str], desc: str = "Predicting", bar=None) -> np.ndarray:
        """Class probabilities (n, num_labels) in input order: sigmoid per label for multi-label models, softmax
        otherwise (`esmloc.task.probabilities`). `bar`: see `map_batches`."""
        encoded = self.encode(sequences)
        results = np.zeros((len(encoded), self.base_model.config.num_labels), dtype=np.float32)
        def probabilities(lengths, hidden):
            return self.probabilities_from_logits(self.logits_from_hidden(hidden, lengths)).cpu().numpy()

        for indices, rows in self.map_batches(encoded, probabilities, desc=desc, bar=bar):
            results[indices] = rows
        return results

    def probabilities_from_features(self, features, kind: str) -> np.ndarray:
        """Class probabilities from pooled (`mean`/`cls`) features, in chunks, with the model's own head."""
        if kind not in ("mean", "cls"):
            raise ValueError("probabilities_from_features takes pooled (mean or cls) features")
        head = self.base_model
        was_training = head.training
        head.eval()
        out = []
        try:
            with torch.inference_mode():
                for start in range(0, len(features), 4096):
                    pooled = torch.as_tensor(np.asarray(features[start:start + 4096]), device=self.device)
                    out.append(self.probabilities_from_logits(head.classify_pooled(pooled).logits).cpu().numpy())
        finally:
            head.train(was_training)
        num_labels = head.config.num_labels
        return np.concatenate(out) if out else np.zeros((0, num_labels), dtype=np.float32)


def predict_probabilities(model, tokenizer, sequences, max_tokens_per_batch: int | None = None, device=None,
                          progress: bool = True, desc: str = "Predicting", precision: str = "auto",
                          feature_cache=None) -> np.ndarray:
    """Class probabilities for each protein, shape (n, num_labels), in input order.

    With `feature_cache` (an `esmloc.cache.FeatureCache` root) and mean or `<cls>` pooling, the pooled features
    come from (and go to) that cache, keyed by the backbone weights, so a protein the same backbone has already
    embedded is not run again; the head then runs on the cached float32 vectors, which gives the same
    probabilities as running the backbone again."""
    engine = Engine(model, tokenizer, max_tokens_per_batch=max_tokens_per_batch, device=device,
                    precision=precision, progress=progress)
    pooling = engine.base_model.config.pooling
    if feature_cache is not None and pooling in ("mean", "cls"):
        from esmloc.cache import cached_features

        features = cached_features(engine, sequences, kind=pooling, cache_dir=feature_cache, desc=desc)
        return engine.probabilities_from_features(features, pooling)
    return engine.predict_probabilities(sequences, desc=desc)
