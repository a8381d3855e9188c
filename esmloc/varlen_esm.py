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

How the proteins of a flattened batch attend to themselves only: `esmloc.varlen_attention`. The int8 linear
layers: `esmloc.int8`.

Trust: the first `UnpaddedEsm` of a process runs a parity self-check per backbone family (`parity_check`): tiny
proteins through the flattened path and through the stock `EsmModel.forward` / `EsmcModel.forward`; on a mismatch (a transformers release that routes positions or
attention keywords differently) it warns once and `esmloc.engine.Engine` uses the padded stock forward.
`FORWARD_VERSION` and the transformers version are part of every feature-cache fingerprint
(`esmloc.cache.backbone_fingerprint`): a cache written by another forward is never served.
"""

import copy
import itertools
import warnings
from collections.abc import Sequence

import torch
import torch.nn.functional as F
import transformers
from torch import nn
from transformers.models.esm.modeling_esm import EsmIntermediate, EsmModel

from configuration_esmloc import ARCHITECTURES, backbone_config, backbone_family
from esmloc.int8 import Int8Linear, int8_linear_available
from esmloc.varlen_attention import ATTENTION_MODES, ATTENTION_NAME, VarlenPlan, attention_problem, choose_attention


try:  # ESM C: transformers >= 5.25
    from transformers import EsmcModel
except ImportError:
    EsmcModel = None


# Bump when the unpadded path computes anything differently (cached features then stop matching).
FORWARD_VERSION = "varlen-stock-2"  # 2: one-pass GELU; int8 inputs quantised per token


def forward_fingerprint() -> str:
    """What computed a feature: the forward's version and the transformers version whose modules it ran."""
    return f"{FORWARD_VERSION}|transformers-{transformers.__version__}"


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
