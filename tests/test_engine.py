"""The inference engine: padding-free forward pass, token-budget batches, input order, padding invariance, pooling,
and the tokenizer's fast path."""

import heapq
import random

import numpy as np
import pytest
import torch

from configuration_esmloc import ESM2_ARCHITECTURES, EsmLocConfig
from esmloc import engine as engine_module, varlen_attention, varlen_esm
from esmloc.engine import Engine, balanced_batches, length_batches, predict_probabilities
from esmloc.saving import tokenizer_for
from modeling_esmloc import EsmForLocalization
from tokenization_esmloc import EsmLocTokenizer

from conftest import PROTEINS, tiny_model


# Short and long proteins, one cropped (1100 residues > max_residues), a <mask> token (token-dropout rescaling),
# and equal-length proteins (one attention call for several proteins).
SEQUENCES = PROTEINS + ["MK<mask>TAYIAKQR", "MKTAYIAKQRQISFVKSHFSRQ", "MKTAYIAKQRQISFVKSHFSRA", "A" * 1100,
                        "mlkqvaGHT" * 12, "W"]


def reference_hidden(model, tokenizer, sequence):
    """What a user gets running the model on one protein alone (no padding at all)."""
    with torch.inference_mode():
        return model.esm(**tokenizer([sequence], return_tensors="pt")).last_hidden_state[0]


def reference_probabilities(model, tokenizer, sequences):
    """The model run on each distinct protein alone."""
    with torch.inference_mode():
        distinct = {s: model(**tokenizer([s], return_tensors="pt")).logits.softmax(-1)[0].numpy()
                    for s in dict.fromkeys(sequences)}
    return np.stack([distinct[s] for s in sequences])


# Every attention that runs on CPU; varlen (flash attention) runs on CUDA only: tests/test_cuda.py.
@pytest.mark.parametrize("attention", ["grouped", "padded", "nested", "flex"])
def test_padding_free_forward_equals_esm_forward_one_by_one(attention):
    model = tiny_model(max_residues=300)
    tokenizer = tokenizer_for(model.config)
    # One batch at a time: flex's eager CPU path in worker threads trips the `kernels` package's per-thread state
    # (transformers 5.25); the other modes run with the default workers.
    workers = 1 if attention == "flex" else None
    engine = Engine(model, tokenizer, max_tokens_per_batch=700, progress=False, attention=attention, workers=workers)
    assert engine.packed is not None and engine.packed.attention == attention
    encoded = engine.encode(SEQUENCES)
    seen = []
    for indices, lengths, hidden in engine.hidden_state_batches(encoded):
        assert len(indices) > 0 and hidden.shape == (sum(lengths), model.config.hidden_size)
        start = 0
        for index, length in zip(indices, lengths):
            expected = reference_hidden(model, tokenizer, SEQUENCES[index])
            torch.testing.assert_close(hidden[start:start + length], expected, atol=1e-5, rtol=1e-5)
            start += length
            seen.append(index)
    assert sorted(seen) == list(range(len(SEQUENCES)))


def test_empty_input_gives_empty_results():
    model = tiny_model()
    engine = Engine(model, tokenizer_for(model.config), progress=False)
    assert engine.predict_probabilities([]).shape == (0, 2)
    assert engine.embed([], "mean").shape == (0, model.config.hidden_size)
    assert engine.embed([], "residues") == []


def test_results_come_back_in_input_order():
    model = tiny_model()
    tokenizer = tokenizer_for(model.config)
    sequences = SEQUENCES * 3
    order = list(range(len(sequences)))
    random.Random(0).shuffle(order)
    engine = Engine(model, tokenizer, max_tokens_per_batch=1000, progress=False)
    probabilities = engine.predict_probabilities(sequences)
    shuffled = engine.predict_probabilities([sequences[i] for i in order])
    # Batches hold other proteins in another order: equal up to float rounding of differently sized matmuls.
    np.testing.assert_allclose(shuffled, probabilities[order], rtol=0, atol=1e-6)
    np.testing.assert_allclose(probabilities, reference_probabilities(model, tokenizer, sequences), atol=1e-5)
    features = engine.embed(sequences, "mean")
    np.testing.assert_allclose(engine.embed([sequences[i] for i in order], "mean"), features[order], rtol=0,
                               atol=1e-5)


@pytest.mark.parametrize("pooling", ["mean", "cls", "attention"])
def test_results_do_not_depend_on_the_batch_a_protein_lands_in(pooling):
    """Padding invariance: one protein per batch, a few per batch and everything in one batch agree with running
    the model on each protein alone."""
    model = tiny_model(pooling=pooling)
    tokenizer = tokenizer_for(model.config)
    expected = reference_probabilities(model, tokenizer, SEQUENCES)
    for budget in (1, 600, 10**6):
        for packed in (True, False):
            engine = Engine(model, tokenizer, max_tokens_per_batch=budget, progress=False, packed=packed)
            np.testing.assert_allclose(engine.predict_probabilities(SEQUENCES), expected, atol=1e-5,
                                       err_msg=f"budget {budget}, packed {packed}")


def test_worker_threads_change_nothing_but_the_speed():
    model = tiny_model()
    tokenizer = tokenizer_for(model.config)
    threads = torch.get_num_threads()
    one = Engine(model, tokenizer, max_tokens_per_batch=300, progress=False, workers=1)
    three = Engine(model, tokenizer, max_tokens_per_batch=300, progress=False, workers=3)
    np.testing.assert_allclose(three.predict_probabilities(SEQUENCES * 2), one.predict_probabilities(SEQUENCES * 2),
                               atol=1e-6, rtol=0)
    assert torch.get_num_threads() == threads  # the intra-op setting is restored
    # A failing batch surfaces in the caller, and the setting is restored all the same.
    three._backbone = lambda ids, lengths: (_ for _ in ()).throw(RuntimeError("boom"))
    with pytest.raises(RuntimeError, match="boom"):
        three.embed(SEQUENCES * 2, "mean")
    assert torch.get_num_threads() == threads and not model.training


def test_pooled_features_are_what_the_model_pools():
    model = tiny_model()
    tokenizer = tokenizer_for(model.config)
    engine = Engine(model, tokenizer, max_tokens_per_batch=800, progress=False)
    mean, cls, residues = (engine.embed(SEQUENCES, kind) for kind in ("mean", "cls", "residues"))
    assert mean.dtype == np.float32 and mean.shape == (len(SEQUENCES), model.config.hidden_size)
    for index, sequence in enumerate(SEQUENCES):
        batch = tokenizer([sequence], return_tensors="pt")
        hidden = reference_hidden(model, tokenizer, sequence)
        with torch.inference_mode():
            pooled, _ = model.pooler(hidden[None], batch["attention_mask"])  # the model's own mean pooling
        np.testing.assert_allclose(mean[index], pooled[0].numpy(), atol=1e-5)
        np.testing.assert_allclose(cls[index], hidden[0].numpy(), atol=1e-5)
        np.testing.assert_allclose(residues[index], hidden[1:-1].numpy(), atol=1e-5)
    # The head on pooled features gives the model's probabilities.
    np.testing.assert_allclose(engine.probabilities_from_features(mean, "mean"),
                               reference_probabilities(model, tokenizer, SEQUENCES), atol=1e-5)


def test_unmerged_lora_runs_padding_free_through_its_own_layers():
    """The padding-free path runs the stock modules, so PEFT's LoRA layers (unmerged) apply as in the model."""
    from peft import LoraConfig, get_peft_model

    model = tiny_model()
    peft_model = get_peft_model(model, LoraConfig(r=4, target_modules=["query", "value"], init_lora_weights=False))
    peft_model.eval()
    tokenizer = tokenizer_for(model.config)
    engine = Engine(peft_model, tokenizer, progress=False)
    assert engine.packed is not None
    with torch.inference_mode():
        expected = np.concatenate([peft_model(**tokenizer([s], return_tensors="pt")).logits.softmax(-1).numpy()
                                   for s in SEQUENCES])
    np.testing.assert_allclose(engine.predict_probabilities(SEQUENCES), expected, atol=1e-5)


def test_engine_follows_weight_changes():
    model = tiny_model()
    tokenizer = tokenizer_for(model.config)
    engine = Engine(model, tokenizer, progress=False)
    before = engine.embed(SEQUENCES[:3], "mean")
    with torch.no_grad():
        model.esm.encoder.layer[0].attention.self.key.weight.mul_(1.5)  # in place: the fused QKV must be rebuilt
    after = engine.embed(SEQUENCES[:3], "mean")
    assert np.abs(after - before).max() > 1e-3
    expected = np.stack([reference_hidden(model, tokenizer, s)[1:-1].mean(0).numpy() for s in SEQUENCES[:3]])
    np.testing.assert_allclose(after, expected, atol=1e-5)


def test_module_level_predict_restores_training_mode():
    model = tiny_model().train()
    probabilities = predict_probabilities(model, tokenizer_for(model.config), SEQUENCES[:4], progress=False)
    assert model.training and probabilities.shape == (4, 2)
    np.testing.assert_allclose(probabilities.sum(1), 1.0, atol=1e-6)


def test_length_batches_respect_the_token_budget():
    rng = random.Random(1)
    lengths = [rng.randint(3, 600) for _ in range(500)]
    for budget in (1, 600, 2048, 10**6):
        batches = length_batches(lengths, budget)
        assert sorted(np.concatenate(batches).tolist()) == list(range(len(lengths)))
        for batch in batches:
            padded = len(batch) * max(lengths[i] for i in batch)
            assert padded <= budget or len(batch) == 1
        flat = [lengths[i] for batch in batches for i in batch]
        assert flat == sorted(flat, reverse=True)  # longest first, so little padding


def test_balanced_batches_are_even_and_respect_the_token_budget():
    rng = random.Random(2)
    for n, budget, parts in [(500, 2048, 2), (500, 600, 4), (37, 2048, 3), (3, 2048, 2), (0, 2048, 2),
                             (200, 1, 2), (200, 10**6, 1)]:
        lengths = [rng.randint(3, 600) for _ in range(n)]
        batches = balanced_batches(lengths, budget, parts)
        assert sorted(np.concatenate(batches).tolist() if batches else []) == list(range(n))
        tokens = [sum(lengths[i] for i in batch) for batch in batches]
        assert all(t <= budget or len(batch) == 1 for t, batch in zip(tokens, batches))
        for batch in batches:  # longest first within a batch, and batches by their longest protein
            assert [lengths[i] for i in batch] == sorted((lengths[i] for i in batch), reverse=True)
        assert [lengths[b[0]] for b in batches] == sorted((lengths[b[0]] for b in batches), reverse=True)
        shared = [t for t, batch in zip(tokens, batches) if t <= budget]
        if n > 4 * parts and budget > 600:
            assert len(batches) % parts == 0
            assert max(shared) - min(shared) <= 600  # within one protein of each other


def test_balanced_batches_keep_both_workers_busy_on_a_few_proteins():
    # The first 8 DeepLoc proteins (tokens): sorted under a padded budget they made batches of 1654 and 528 tokens,
    # so one of two workers sat idle for two thirds of the other's batch.
    lengths = [128, 80, 80, 80, 80, 80, 630, 1024]
    assert [sum(lengths[i] for i in b) for b in length_batches(lengths, 2048)] == [1654, 528]
    tokens = [sum(lengths[i] for i in b) for b in balanced_batches(lengths, 2048, parts=2)]
    assert len(tokens) == 2 and max(tokens) <= 1.02 * sum(lengths) / 2


def test_balancing_a_proteome_takes_a_few_passes(monkeypatch):
    # 28,000 proteins of DeepLoc-like lengths. One batch more per pass took 112 passes (9.7 s) on DeepLoc's own
    # lengths; 1% more per pass takes a few.
    rng = np.random.default_rng(0)
    lengths = np.minimum(rng.lognormal(6.0, 0.6, 28_000).astype(int), 1022) + 2
    pops, heappop = [], heapq.heappop
    monkeypatch.setattr(engine_module.heapq, "heappop", lambda heap: pops.append(1) or heappop(heap))
    batches = balanced_batches(lengths, 2048, parts=2)
    assert len(pops) <= 8 * len(lengths)
    # The batches stay nearly full: 6684 of them here, against 6674 with one batch more per pass.
    assert lengths.sum() / (len(batches) * 2048) > 0.94 and len(batches) % 2 == 0


@pytest.mark.parametrize("mode", ["nested", "flex"])
def test_variable_length_kernels_attend_within_each_protein(mode):
    """Proteins laid end to end across flex's 128-token tiles (a tile inside one protein, proteins sharing a tile,
    one of a single token, a last tile cut short) attend as the grouped path makes them, in fp32 and bf16."""
    lengths = [128, 128, 1, 300, 5, 5, 256, 77]
    generator = torch.Generator().manual_seed(0)
    query, key, value = (torch.randn(1, 3, sum(lengths), 16, generator=generator) for _ in range(3))
    reference = varlen_attention.VarlenPlan(lengths, "grouped", "cpu").attend(query, key, value, 0.25)
    out = varlen_attention.VarlenPlan(lengths, mode, "cpu").attend(query, key, value, 0.25)
    assert out.shape == reference.shape == (1, sum(lengths), 3, 16)
    torch.testing.assert_close(out, reference, atol=1e-5, rtol=1e-5)
    low = varlen_attention.VarlenPlan(lengths, mode, "cpu").attend(*(x.bfloat16() for x in (query, key, value)), 0.25)
    assert low.dtype == torch.bfloat16
    assert float((low.float() - reference).norm() / reference.norm()) < 1e-2


def test_the_document_block_mask_skips_tiles_between_proteins():
    lengths = [100, 60, 300, 1]  # tokens 0-99, 100-159, 160-459, 460
    mask = varlen_attention.document_block_mask(lengths, "cpu")
    dense = mask.to_dense()[0, 0]  # (query tiles, key tiles): 1 where a tile is computed
    # Tile 0 holds proteins 1 and 2 (to token 159 in tile 1); tile 1 proteins 2 and 3; tiles 2-3 only protein 3,
    # which tile 3 shares with protein 4 (token 460).
    expected = torch.tensor([[1, 1, 0, 0], [1, 1, 1, 1], [0, 1, 1, 1], [0, 1, 1, 1]])
    assert dense.tolist() == expected.tolist()
    full = mask.full_kv_num_blocks[0, 0].tolist()  # only tile (2, 2) lies inside one protein on both sides
    assert full == [0, 0, 1, 0]
    # A last tile cut short (tokens 256-299) is never full, even inside one protein: its keys past the end are masked.
    short = varlen_attention.document_block_mask([100, 200], "cpu")
    assert short.to_dense()[0, 0].tolist() == [[1, 1, 1], [1, 1, 1], [1, 1, 1]]
    assert short.full_kv_num_blocks[0, 0].tolist() == [0, 1, 0]


def test_auto_attention_takes_the_first_kernel_that_runs_and_passes_its_check(monkeypatch):
    monkeypatch.setitem(varlen_attention.AUTO_ATTENTION, "cpu", ("varlen", "flex", "grouped"))
    monkeypatch.setattr(varlen_attention, "_KERNEL_PROBLEMS", {})
    # varlen does not run on CPU (flash attention): the next one, flex, runs and matches the grouped path.
    assert varlen_attention.attention_problem("varlen", "cpu", torch.bfloat16, 16) == "varlen (flash attention) runs on CUDA only"
    assert varlen_attention.choose_attention("cpu", torch.float32, 16) == "flex"
    model = tiny_model()
    tokenizer = tokenizer_for(model.config)
    engine = Engine(model, tokenizer, progress=False, workers=1)
    assert engine.attention_mode() == "flex"
    np.testing.assert_allclose(engine.predict_probabilities(SEQUENCES), reference_probabilities(model, tokenizer,
                                                                                                SEQUENCES), atol=1e-5)
    # A kernel that computes something else is skipped, with one warning, for the next in the order.
    monkeypatch.setattr(varlen_attention, "_KERNEL_PROBLEMS", {})
    monkeypatch.setattr(varlen_attention, "flex_attention_function",
                        lambda device_type: lambda query, key, value, **kwargs: value * 2)
    with pytest.warns(RuntimeWarning, match="the flex attention kernel on cpu .* differs from the grouped path"):
        assert varlen_attention.choose_attention("cpu", torch.float32, 16) == "grouped"
    assert Engine(model, tokenizer, progress=False).attention_mode() == "grouped"


def test_an_attention_that_cannot_run_here_is_refused_at_once():
    model = tiny_model()
    with pytest.raises(ValueError, match="attention='varlen' cannot run here: varlen .* runs on CUDA only"):
        Engine(model, tokenizer_for(model.config), progress=False, attention="varlen")
    with pytest.raises(ValueError, match="attention must be auto or one of"):
        Engine(model, tokenizer_for(model.config), progress=False, attention="sparse")


def test_engine_balances_batches_only_where_attention_runs_without_padding():
    model = tiny_model()
    tokenizer = tokenizer_for(model.config)
    lengths = [128, 80, 80, 80, 80, 80, 630, 1024]
    balanced = balanced_batches(lengths, 2048, parts=2)
    cpu = Engine(model, tokenizer, max_tokens_per_batch=2048, progress=False, workers=2)
    assert [b.tolist() for b in cpu.batches(lengths)] == [b.tolist() for b in balanced]
    for kwargs in ({"packed": False}, {"attention": "padded"}):  # padded batches: sorted, padded budget
        engine = Engine(model, tokenizer, max_tokens_per_batch=2048, progress=False, workers=2, **kwargs)
        assert [b.tolist() for b in engine.batches(lengths)] == [b.tolist() for b in length_batches(lengths, 2048)]
    for attention in ("nested", "flex"):  # the variable-length kernels cost tokens, as grouped does
        engine = Engine(model, tokenizer, max_tokens_per_batch=2048, progress=False, workers=2, attention=attention)
        assert [b.tolist() for b in engine.batches(lengths)] == [b.tolist() for b in balanced]


# --- tokenizer fast path ---------------------------------------------------------------------------------------


def generic_ids(tokenizer, sequences):
    """The ids of the generic (trie) path of the slow tokenizer, with the fast path switched off."""
    tokenizer._residue_fast_path = lambda: None
    try:
        return tokenizer(sequences)["input_ids"]
    finally:
        del tokenizer._residue_fast_path


@pytest.mark.parametrize("kwargs", [{}, {"max_residues": 50, "crop": "n_terminal"}, {"max_residues": 51}])
def test_tokenizer_fast_path_gives_the_generic_ids(kwargs):
    tokenizer = EsmLocTokenizer(**kwargs)
    assert tokenizer._residue_fast_path() is not None
    sequences = SEQUENCES + [" mk ta\ny ", "MK*", "mkXBUZO*", "mk<mask>aa",
                             "".join(random.Random(2).choice("LAGVSERTIDPKQNFYMHWCXBUZO") for _ in range(3000))]
    assert tokenizer(sequences)["input_ids"] == generic_ids(tokenizer, sequences)
    for not_a_protein in ("", " * ", "MKJJ", "MK*A", "MK..--XBUZO", "<cls>MK<eos>", "mk<unk>aa"):  # both paths refuse
        with pytest.raises(ValueError, match="empty sequence|not a residue"):
            tokenizer(not_a_protein)
        with pytest.raises(ValueError, match="empty sequence|not a residue"):
            generic_ids(tokenizer, [not_a_protein])


def test_tokenizer_fast_path_steps_aside_for_added_residue_tokens():
    tokenizer = EsmLocTokenizer()
    tokenizer.add_tokens(["MK"])  # now "MK" is one token: one character per token would be wrong
    assert tokenizer._residue_fast_path() is None
    ids = tokenizer("AMKA")["input_ids"]
    assert len(ids) == 5 and ids == generic_ids(tokenizer, ["AMKA"])[0]


def test_the_model_itself_is_not_changed_by_the_engine():
    """The padding-free path runs on a view sharing the weights: the model keeps its attention implementation and
    modules, and the view follows in-place weight changes."""
    model = tiny_model()
    before = model.esm.config._attn_implementation
    modules = [type(module) for module in model.modules()]
    engine = Engine(model, tokenizer_for(model.config), progress=False)
    assert model.esm.config._attn_implementation == before != engine.packed.view.config._attn_implementation
    assert [type(module) for module in model.modules()] == modules
    assert model.config.esm_config._attn_implementation == before
    view_weight = engine.packed.view.encoder.layer[0].attention.self.query.weight
    assert view_weight is model.esm.encoder.layer[0].attention.self.query.weight
    view_intermediate = engine.packed.view.encoder.layer[0].intermediate  # one-pass GELU in the view only
    assert type(view_intermediate) is varlen_esm.FusedGeluIntermediate
    assert view_intermediate.dense.weight is model.esm.encoder.layer[0].intermediate.dense.weight


def test_absolute_positions_run_padded_through_the_model():
    """A backbone with learned absolute positions (ESM-1b style) cannot take per-protein positions: it runs padded."""
    from transformers import EsmModel

    model = tiny_model()
    config = model.esm.config.__class__(**{**model.esm.config.to_dict(), "position_embedding_type": "absolute"})
    model.esm = EsmModel(config, add_pooling_layer=False).eval()
    tokenizer = tokenizer_for(model.config)
    engine = Engine(model, tokenizer, progress=False)
    assert engine.packed is None
    np.testing.assert_allclose(engine.predict_probabilities(SEQUENCES),
                               reference_probabilities(model, tokenizer, SEQUENCES), atol=1e-5)


def test_padding_free_forward_on_the_esm2_8m_architecture():
    """The real layer sizes (320 hidden, 20 heads of 16): what the benchmarks and users run."""
    torch.manual_seed(0)
    model = EsmForLocalization(EsmLocConfig(esm_config=dict(ESM2_ARCHITECTURES["esm2_t6_8M"]))).eval()
    tokenizer = tokenizer_for(model.config)
    sequences = [PROTEINS[1], PROTEINS[0], PROTEINS[3], PROTEINS[3][::-1]]
    engine = Engine(model, tokenizer, progress=False)
    for indices, lengths, hidden in engine.hidden_state_batches(engine.encode(sequences)):
        start = 0
        for index, length in zip(indices, lengths):
            expected = reference_hidden(model, tokenizer, sequences[index])
            torch.testing.assert_close(hidden[start:start + length], expected, atol=2e-5, rtol=1e-5)
            start += length
