"""The stock `EsmModel.forward`, padding-free: the question whether esmloc needs its own forward (`PackedEsm`).

transformers 5's ESM passes `position_ids` to its rotary embeddings and any extra keyword to the attention function
registered under `config._attn_implementation` (`AttentionInterface`). So a batch can run through the unmodified
model flattened into one row (`input_ids` (1, tokens), positions restarting at each protein) with a registered
attention function that attends within each protein only: here SDPA once per run of equal-length proteins, the same
grouping `PackedEsm` uses, without a mask. What stays stock: the embeddings, separate query/key/value projections
through `F.linear` (MKL), rotary, layer norms, GELU, the residual additions.

`StockVarlenEsm(esm)` has `PackedEsm`'s call signature, `(flat_ids, lengths) -> packed last hidden states`, so the
engine's batching, threads and pooling run unchanged around it (bench/embedding_throughput.py swaps it in).
"""

import torch
import torch.nn.functional as F
from transformers import AttentionInterface
from transformers.integrations.sdpa_attention import sdpa_attention_forward


ATTENTION_NAME = "esmloc_bench_varlen_sdpa"


def varlen_sdpa(module, query, key, value, attention_mask, scaling=None, dropout=0.0, esm_runs=None, **kwargs):
    """Attention within each protein of a flattened batch; `esm_runs`: (start, end, proteins, length) per run of
    equal-length proteins. Without `esm_runs` (an ordinary padded call) it is transformers' SDPA attention."""
    if esm_runs is None:
        return sdpa_attention_forward(module, query, key, value, attention_mask, scaling=scaling, dropout=dropout,
                                      **kwargs)
    heads, total, head_size = query.shape[1:]
    out = query.new_empty(1, total, heads, head_size)
    for start, end, count, length in esm_runs:
        q, k, v = (x[0, :, start:end].reshape(heads, count, length, head_size).transpose(0, 1)
                   for x in (query, key, value))
        context = F.scaled_dot_product_attention(q, k, v, scale=scaling)
        out[0, start:end] = context.permute(0, 2, 1, 3).reshape(end - start, heads, head_size)
    return out, None


AttentionInterface.register(ATTENTION_NAME, varlen_sdpa)


class StockVarlenEsm:
    """Runs `esm` (a stock `EsmModel`) padding-free; sets its attention implementation to `varlen_sdpa` (which
    behaves as SDPA on ordinary calls)."""

    def __init__(self, esm):
        self.esm = esm
        esm.set_attn_implementation(ATTENTION_NAME)

    def __call__(self, input_ids: torch.Tensor, lengths) -> torch.Tensor:
        lengths = [int(length) for length in lengths]
        positions = torch.cat([torch.arange(length, device=input_ids.device) for length in lengths])
        runs, start, first = [], 0, 0
        for index in range(1, len(lengths) + 1):
            if index == len(lengths) or lengths[index] != lengths[first]:
                end = start + lengths[first] * (index - first)
                runs.append((start, end, index - first, lengths[first]))
                start, first = end, index
        output = self.esm(input_ids[None], position_ids=positions[None], esm_runs=runs)
        return output.last_hidden_state[0]
