"""Precisions of the inference engine (auto / fp32 / bf16 / int8), the padding-free path's parity self-check and the
forward's version in the feature cache's key."""

import warnings

import numpy as np
import pytest
import torch

from esmloc import cache, int8, varlen_esm
from esmloc.engine import AUTO_PRECISION, Engine, resolve_precision
from esmloc.saving import tokenizer_for

from conftest import PROTEINS, tiny_model


SEQUENCES = PROTEINS + ["MKTAYIAKQRQISFVKSHFSRQ" * 5, "MLSRAVCGTSRQLAPVLGYLGSRQKHSLPDLPYDYGALEPHINAQIMQLHHSKHHAAYV"]

# Whether the kernel runs at all decides the skip; whether it is right is tested (a wrong kernel fails, never skips).
needs_int8 = pytest.mark.skipif(not int8.int8_linear_runs(),
                                reason="oneDNN's int8 linear does not run in this torch build")


def test_auto_is_fp32_on_cpu_and_every_precision_names_itself():
    assert AUTO_PRECISION["cpu"] == "fp32" and resolve_precision("cpu", "auto") == "fp32"
    model = tiny_model()
    tokenizer = tokenizer_for(model.config)
    for precision, name in [("auto", "fp32"), ("fp32", "fp32"), ("bf16", "bf16")] + (
            [("int8", "int8")] if int8.int8_linear_runs() else []):
        assert Engine(model, tokenizer, precision=precision, progress=False).precision_name == name
    with pytest.raises(ValueError, match="precision must be one of"):
        Engine(model, tokenizer, precision="int4")


@needs_int8
def test_int8_linear_is_within_int8_rounding_of_nn_linear():
    """Each output of the kernel lies within the sum of its products' rounding errors of nn.Linear's: input and weight
    each within half a step of their grids (per input row, per output channel), without a systematic error. The
    engine's own check agrees, so it does not refuse int8 (a kernel that runs but is wrong fails here, and the
    engine's int8 tests fail with its ValueError: none of them skips for it)."""
    generator = torch.Generator().manual_seed(0)
    linear = torch.nn.Linear(96, 48)
    x = torch.randn(13, 96, generator=generator) * torch.logspace(-2, 1, 13)[:, None]  # rows of every magnitude
    with torch.no_grad():
        linear.weight.copy_(torch.randn(48, 96, generator=generator))
        expected, actual = linear(x), int8.Int8Linear(linear)(x)
    weight = linear.weight.detach()
    input_step = x.abs().amax(dim=1, keepdim=True) / 127  # (rows, 1)
    weight_step = weight.abs().amax(dim=1)[None, :] / 127  # (1, outputs)
    bound = (x.abs().sum(dim=1, keepdim=True) * weight_step / 2 + input_step / 2 * weight.abs().sum(dim=1)[None, :]
             + x.shape[1] * input_step * weight_step / 4)
    error = (actual - expected).abs()
    assert (error <= bound * 1.0001 + 1e-6).all(), f"largest error / bound: {(error / bound).max():.3f}"
    assert error.max() > 1e-5  # int8 indeed, not fp32
    # Rounding noise, not a systematic error: the least-squares scale of the outputs against nn.Linear's is 1 within
    # 1% (-0.2% with this seed; a kernel 2% off in scale stays within the bound above, not within this).
    product = (expected - linear.bias).detach()  # the bias is added in fp32
    scale_error = ((actual - expected) * product).sum() / (product * product).sum()
    assert abs(scale_error) < 0.01, f"outputs {100 * scale_error:+.1f}% off in scale"
    assert int8.int8_linear_available()


@needs_int8
def test_int8_stays_close_to_fp32_and_is_not_fp32():
    model = tiny_model(max_residues=300)
    tokenizer = tokenizer_for(model.config)
    fp32 = Engine(model, tokenizer, progress=False).embed(SEQUENCES, "mean")
    int8 = Engine(model, tokenizer, progress=False, precision="int8").embed(SEQUENCES, "mean")
    difference = np.abs(int8 - fp32).max()
    assert 0 < difference < 0.05 * np.abs(fp32).max()
    probabilities = [Engine(model, tokenizer, progress=False, precision=p).predict_probabilities(SEQUENCES)
                     for p in ("fp32", "int8")]
    np.testing.assert_allclose(probabilities[1], probabilities[0], atol=0.02)


@needs_int8
def test_int8_result_of_a_protein_does_not_depend_on_its_batch():
    """Inputs are quantised per token: a protein's int8 features are the same alone, with short batch-mates and with
    one whose activations are far larger (with one scale per call, the batch's largest value set every step)."""
    model = tiny_model(max_residues=300)
    tokenizer = tokenizer_for(model.config)
    with torch.no_grad():  # a batch-mate with an outlier residue: one embedding row 50x larger
        model.esm.embeddings.word_embeddings.weight[tokenizer.convert_tokens_to_ids("W")] *= 50
    engine = Engine(model, tokenizer, progress=False, precision="int8", max_tokens_per_batch=10**6)
    protein, mates = SEQUENCES[-1], ["W" * 40 + SEQUENCES[0], SEQUENCES[1]]
    alone = engine.embed([protein], "mean")[0]
    together = engine.embed([protein] + mates, "mean")[0]
    np.testing.assert_allclose(together, alone, atol=1e-5, rtol=0)
    assert not np.allclose(alone, Engine(model, tokenizer, progress=False).embed([protein], "mean")[0], atol=1e-4)


@needs_int8
def test_int8_follows_weight_changes():
    model = tiny_model()
    tokenizer = tokenizer_for(model.config)
    engine = Engine(model, tokenizer, progress=False, precision="int8")
    before = engine.embed(SEQUENCES[:2], "mean")
    with torch.no_grad():
        model.esm.encoder.layer[0].intermediate.dense.weight.mul_(3.0)
    after = engine.embed(SEQUENCES[:2], "mean")
    fresh = Engine(model, tokenizer, progress=False, precision="int8").embed(SEQUENCES[:2], "mean")
    assert np.abs(after - before).max() > 1e-3
    np.testing.assert_allclose(after, fresh, atol=1e-6)


@needs_int8
def test_int8_linear_meets_row_counts_in_buckets(monkeypatch):
    """oneDNN caches a kernel per shape: the int8 linear layers only ever see multiples of ONEDNN_ROW_BUCKET."""
    rows_seen = []
    original = int8._quantise_input

    def spy(x):
        rows_seen.append(x.shape[0])
        return original(x)

    monkeypatch.setattr(int8, "_quantise_input", spy)
    model = tiny_model(max_residues=300)
    Engine(model, tokenizer_for(model.config), progress=False, precision="int8").embed(SEQUENCES, "mean")
    assert rows_seen and all(rows % int8.ONEDNN_ROW_BUCKET == 0 for rows in rows_seen)


def test_input_quantisation_is_round_to_nearest_per_row_plus_128():
    generator = torch.Generator().manual_seed(0)
    x = torch.randn(64, 300, generator=generator) * torch.logspace(-3, 2, 64)[:, None]
    x[0] = 0.0  # an all-zero row (padding)
    x[1, 7], x[2, 9] = -1e3, 1e3  # a row whose largest magnitude is negative, one positive
    x[3] = 0.0
    x[3, :255] = torch.cat([torch.tensor([127.0]), torch.arange(-126.5, 127.0)])  # scale 1: exact halves, to even
    quantised, scales = int8._quantise_input(x)
    expected_scales = (x.abs().amax(dim=1, keepdim=True) / 127).clamp(min=1e-12)
    expected = (torch.round(x / expected_scales) + int8.INPUT_ZERO_POINT).to(torch.uint8)
    assert quantised.dtype == torch.uint8 and torch.equal(scales, expected_scales)
    assert torch.equal(quantised, expected)
    assert quantised[1, 7] == 1 and quantised[2, 9] == 255 and (quantised[0] == 128).all()
    assert quantised[3, 1] == 128 - 126 and quantised[3, 128] == 128  # -126.5 -> -126, 0.5 -> 0


@needs_int8
def test_int8_leaves_the_model_itself_in_fp32():
    """int8 swaps the linear layers of the engine's view only: the model keeps its nn.Linear layers and weights."""
    model = tiny_model()
    weights = {name: tensor.clone() for name, tensor in model.state_dict().items()}
    engine = Engine(model, tokenizer_for(model.config), progress=False, precision="int8")
    int8_layers = [module for module in engine.packed.view.modules() if isinstance(module, int8.Int8Linear)]
    assert int8_layers and all(layer._packed is not None for layer in int8_layers)  # quantised when built
    assert not any(isinstance(module, int8.Int8Linear) for module in model.modules())
    engine.embed(SEQUENCES, "mean")
    assert all(torch.equal(tensor, weights[name]) for name, tensor in model.state_dict().items())


def test_int8_without_the_padding_free_path_is_refused():
    model = tiny_model()
    with pytest.raises(ValueError, match="int8 runs on CPU through the padding-free path only"):
        Engine(model, tokenizer_for(model.config), precision="int8", packed=False)


def test_a_failed_parity_check_warns_once_and_falls_back_to_the_stock_forward(monkeypatch):
    model = tiny_model()
    tokenizer = tokenizer_for(model.config)
    reference = Engine(model, tokenizer, progress=False, packed=False).embed(SEQUENCES, "mean")
    original_call = varlen_esm.UnpaddedEsm.__call__
    monkeypatch.setattr(varlen_esm.UnpaddedEsm, "__call__", lambda self, ids, lengths: original_call(self, ids, lengths)
                        + 1e-3)  # e.g. a transformers release that routes positions differently
    monkeypatch.setattr(varlen_esm, "_PARITY_OK", None)
    with pytest.warns(RuntimeWarning, match="falling back to the padded EsmModel.forward"):
        engine = Engine(model, tokenizer, progress=False)
    assert engine.packed is None
    np.testing.assert_allclose(engine.embed(SEQUENCES, "mean"), reference, atol=1e-6)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # once per process
        assert Engine(model, tokenizer, progress=False).packed is None
    monkeypatch.setattr(varlen_esm, "_PARITY_OK", None)
    monkeypatch.setattr(varlen_esm.UnpaddedEsm, "__call__", original_call)
    assert Engine(model, tokenizer, progress=False).packed is not None


def test_the_feature_cache_key_holds_the_forward_version_and_the_precision(monkeypatch, tmp_path):
    model = tiny_model()
    tokenizer = tokenizer_for(model.config)
    fingerprint = cache.backbone_fingerprint(model.esm)
    monkeypatch.setattr(varlen_esm, "FORWARD_VERSION", "varlen-stock-next")
    assert cache.backbone_fingerprint(model.esm) != fingerprint
    monkeypatch.undo()
    monkeypatch.setattr(varlen_esm.transformers, "__version__", "5.99.0")
    assert cache.backbone_fingerprint(model.esm) != fingerprint
    monkeypatch.undo()
    paths = {precision: cache.FeatureCache.for_engine(Engine(model, tokenizer, precision=precision, progress=False),
                                                      "mean", root=tmp_path).path
             for precision in ["fp32", "bf16"] + (["int8"] if int8.int8_linear_runs() else [])}
    assert len(set(paths.values())) == len(paths) and all(path.name.endswith(p) for p, path in paths.items())
