"""`PackedEsm`: esmloc's own forward pass of an ESM-2 `EsmModel`, unpadded (a fork of transformers' ESM forward).

Mirrors `transformers.models.esm.modeling_esm` (`EsmEmbeddings`, `EsmSelfAttention` with rotary positions,
`EsmLayer`, `EsmEncoder`) of transformers 5.0 to 5.24 (checked against 5.24; MIRRORED_TRANSFORMERS below), for the
ESM-2 configuration only (rotary, pre-LayerNorm, encoder, plain `nn.Linear` / `nn.LayerNorm` modules: checked with
exact type checks by `PackedEsm.unsupported_reason`).

Why a fork (bench/embedding_throughput.py, the row "stock EsmModel, padding-free (varlen SDPA)": the stock model run
padding-free through transformers' own `position_ids` and a registered variable-length attention): the packed forward
fuses query/key/value into one matmul and runs the linear layers through oneDNN with GELU and the residual addition
fused (and offers int8 linear layers); the stock modules call `F.linear` (MKL, AVX2 code on AMD processors). Measured
numbers are in the README ("Speed").

Trust: the first `PackedEsm` built in a process runs a parity self-check (`parity_check`): two tiny proteins through
`EsmModel.forward` and through the packed forward of a tiny random ESM-2 of the same transformers version. On a
mismatch it warns once and `packed_forward_trusted()` is False, and `esmloc.engine.Engine` falls back to the stock
forward. `FORK_VERSION` (with the transformers version) is part of every feature-cache fingerprint
(`esmloc.cache.backbone_fingerprint`): a cache written by another forward is never served.
"""

import warnings
from collections.abc import Sequence

import numpy as np
import torch
import torch.nn.functional as F
import transformers
from torch import nn
from transformers.models.esm.modeling_esm import EsmModel


# Bump when the packed forward computes anything differently (cached features then stop matching).
FORK_VERSION = "packed-esm-2"
MIRRORED_TRANSFORMERS = ">=5.0,<=5.24"


def fork_fingerprint() -> str:
    """What computed a feature: the fork's version and the transformers version it ran against."""
    return f"{FORK_VERSION}|transformers-{transformers.__version__}"


def _torch_linear(x, weight, bias, gelu=False, residual=None):
    out = F.linear(x, weight, bias)
    if gelu:
        out = F.gelu(out)
    return out if residual is None else residual + out


# oneDNN builds (and keeps) kernels and buffers for every input shape it meets; packed batches have a different
# number of rows nearly every time, and peak memory grew with the number of proteins predicted (bench/predict_memory.py,
# tiny model: +19% from 3k to 30k proteins unpadded; +9% from 10k to 400k with rows padded to a multiple of 64;
# +1% with 256). Rows are padded to a multiple of this, so that a run meets a bounded set of shapes
# (max_tokens_per_batch / ONEDNN_ROW_BUCKET per layer kind, 8 at the CPU default); the zero rows cost at most 255
# rows of work per call, about 6% of a 2048-token batch on average.
ONEDNN_ROW_BUCKET = 256


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


def _quantise_input(x):
    """x as uint8 with one scale and zero point (asymmetric, the range from x's minimum and maximum, 0 included)."""
    low, high = torch.aminmax(x)
    low, high = min(float(low), 0.0), max(float(high), 0.0)
    scale = (high - low) / 255 or 1.0
    zero_point = int(round(-low / scale))
    return (x * (1 / scale)).add_(zero_point).round_().clamp_(0, 255).to(torch.uint8), scale, zero_point


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
    with torch.profiler.record_function("esmloc::quantise_input"):  # bench/engine_profile.py reports its share
        quantised, scale, zero_point = _quantise_input(x)
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


_PARITY_OK = None


def parity_check() -> bool:
    """Once per process: two tiny proteins (one with a <mask> token) through `EsmModel.forward` and through
    `PackedEsm` on a tiny random ESM-2 (fp32, the linear layers as PackedEsm runs them here); False, with a warning,
    when they differ by more than 1e-4."""
    global _PARITY_OK
    if _PARITY_OK is None:
        try:
            from transformers import EsmConfig

            generator_state = torch.random.get_rng_state()
            torch.manual_seed(0)
            config = EsmConfig(vocab_size=33, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                               intermediate_size=64, position_embedding_type="rotary", token_dropout=True,
                               emb_layer_norm_before=False, mask_token_id=32, pad_token_id=1,
                               max_position_embeddings=64)
            esm = EsmModel(config, add_pooling_layer=False).eval()
            torch.random.set_rng_state(generator_state)
            proteins = [[0, 5, 6, 7, 8, 9, 2], [0, 10, 32, 11, 2]]
            with torch.inference_mode():
                packed = PackedEsm(esm)(torch.tensor([t for p in proteins for t in p]),
                                                     [len(p) for p in proteins])
                stock = torch.cat([esm(torch.tensor([p])).last_hidden_state[0] for p in proteins])
            difference = float((packed - stock).abs().max())
            _PARITY_OK = difference <= 1e-4
            reason = f"differs from EsmModel.forward by {difference:.1e}"
        except Exception as error:  # noqa: BLE001: any failure of the fork means: do not use it
            _PARITY_OK, reason = False, f"failed: {error!r}"
        if not _PARITY_OK:
            warnings.warn(f"esmloc's packed ESM forward {reason} with transformers {transformers.__version__} "
                          f"(mirrors {MIRRORED_TRANSFORMERS}); falling back to the stock EsmModel.forward",
                          RuntimeWarning, stacklevel=2)
    return _PARITY_OK


def packed_forward_trusted() -> bool:
    """Whether the packed forward passed its parity self-check in this process."""
    return parity_check()
