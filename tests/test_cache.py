"""The feature cache (hits, invalidation, resume after an interruption) and cached-feature training (the same model
as the ordinary Trainer path)."""

import csv
import json
import shutil
import threading

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from esmloc import cache
from esmloc.demo import write_demo_csv
from esmloc.engine import Engine
from esmloc.saving import tokenizer_for
from esmloc.commands.train import main as train_main
from tokenization_esmloc import EsmLocTokenizer

from conftest import PROTEINS, tiny_model


SEQUENCES = PROTEINS + ["MKTAYIAKQRQISFVKSHFSRQ", "A" * 1100, "mlkqvaGHT" * 12, "W", "MKTAYIAKQRQISFVKSHFSRQ"]


class CountingEngine(Engine):
    """An Engine that counts the proteins its backbone runs on and can be made to fail after some batches."""

    def __init__(self, *args, fail_after_batches=None, **kwargs):
        super().__init__(*args, **kwargs)
        self.proteins_run, self.batches_run, self.fail_after_batches = 0, 0, fail_after_batches
        self._lock = threading.Lock()  # batches run in worker threads

    def _backbone(self, ids, lengths):
        with self._lock:
            if self.fail_after_batches is not None and self.batches_run >= self.fail_after_batches:
                raise KeyboardInterrupt("simulated interruption")
            self.proteins_run += len(ids)
            self.batches_run += 1
        return super()._backbone(ids, lengths)


def make_engine(model=None, **kwargs):
    model = model if model is not None else tiny_model()
    return CountingEngine(model, tokenizer_for(model.config), progress=False, **kwargs)


def committed_files(directory):
    return sorted(path.name for path in directory.rglob("*") if path.is_file())


@pytest.mark.parametrize("kind", ["mean", "cls", "residues"])
def test_second_run_is_served_from_the_cache(kind, tmp_path):
    engine = make_engine(max_tokens_per_batch=500)
    first = cache.cached_features(engine, SEQUENCES, kind, tmp_path)
    # Two entries of SEQUENCES are the same protein: embedded once.
    assert engine.proteins_run == len(set(SEQUENCES))
    engine.proteins_run = 0
    second = cache.cached_features(engine, SEQUENCES, kind, tmp_path)
    assert engine.proteins_run == 0
    direct = engine.embed(SEQUENCES, kind)
    if kind == "residues":
        assert all(isinstance(x, np.memmap) or isinstance(x.base, np.memmap) for x in second)  # memory-mapped
        assert all(x.dtype == np.float16 for x in second)
        for a, b, c in zip(first, second, direct):
            np.testing.assert_array_equal(a, b)
            np.testing.assert_allclose(a.astype(np.float32), c, rtol=1e-3, atol=1e-3)  # float16 storage
    else:
        assert second.dtype == np.float32
        np.testing.assert_array_equal(first, second)
        np.testing.assert_allclose(second, direct, atol=1e-6)
    assert not [name for name in committed_files(tmp_path) if name.startswith(".tmp")]


def test_changed_weights_are_never_served_stale_features(tmp_path):
    model = tiny_model()
    engine = make_engine(model)
    before = cache.cached_features(engine, SEQUENCES, "mean", tmp_path)
    fingerprint = cache.backbone_fingerprint(model.esm)
    with torch.no_grad():
        model.esm.encoder.layer[1].output.dense.weight[3, 5] += 0.5  # one weight of the last layer
    assert cache.backbone_fingerprint(model.esm) != fingerprint
    engine.proteins_run = 0
    after = cache.cached_features(engine, SEQUENCES, "mean", tmp_path)
    assert engine.proteins_run == len(set(SEQUENCES))  # everything computed again
    assert np.abs(after - before).max() > 1e-4
    np.testing.assert_allclose(after, engine.embed(SEQUENCES, "mean"), atol=1e-6)
    assert len([path for path in tmp_path.iterdir() if path.is_dir()]) == 2  # one directory per backbone


def test_fingerprint_covers_every_backbone_weight_but_not_the_unused_contact_head():
    model = tiny_model()
    fingerprint = cache.backbone_fingerprint(model.esm)
    with torch.no_grad():
        model.esm.contact_head.regression.weight.add_(1.0)
    assert cache.backbone_fingerprint(model.esm) == fingerprint
    with torch.no_grad():
        model.esm.embeddings.word_embeddings.weight[7, 0] += 1e-3
    assert cache.backbone_fingerprint(model.esm) != fingerprint
    assert cache.backbone_fingerprint(tiny_model(seed=1).esm) != fingerprint


def test_crop_settings_and_sequences_key_the_cache(tmp_path):
    model = tiny_model(max_residues=100)
    engine = make_engine(model)
    cache.cached_features(engine, SEQUENCES, "mean", tmp_path)
    changed = list(SEQUENCES)
    changed[3] = changed[3][:-1] + "W"  # one residue of one protein
    engine.proteins_run = 0
    features = cache.cached_features(engine, changed, "mean", tmp_path)
    assert engine.proteins_run == 1
    np.testing.assert_allclose(features, engine.embed(changed, "mean"), atol=1e-6)
    # Residues beyond the crop do not change what the backbone sees: a hit.
    long_variant = list(SEQUENCES)
    long_variant[6] = "A" * 1200
    engine.proteins_run = 0
    cache.cached_features(engine, long_variant, "mean", tmp_path)
    assert engine.proteins_run == 0
    # Another crop setting is another cache directory.
    model.config.crop = "n_terminal"
    engine = make_engine(model)
    cache.cached_features(engine, SEQUENCES, "mean", tmp_path)
    assert engine.proteins_run == len(set(SEQUENCES))


def test_sequence_key_is_the_tokenizers_rule():
    class KeepsFive(EsmLocTokenizer):  # another rule: the key must follow it, never re-implement the default one
        def normalize_and_crop(self, text):
            return super().normalize_and_crop(text)[:5]

    tokenizer, five = EsmLocTokenizer(max_residues=8, crop="n_terminal"), KeepsFive(max_residues=8)
    assert cache.sequence_key(" mktAYiakQ", tokenizer) == cache.sequence_key("MKTAYIAKQR", tokenizer)
    assert cache.sequence_key("MKTAYIAK", tokenizer) != cache.sequence_key("MKTAYIAQ", tokenizer)
    assert cache.sequence_key("MKTAYIAK", five) == cache.sequence_key("MKTAYWWW", five)


def test_interrupted_run_resumes_with_what_is_missing(tmp_path):
    sequences = [f"MKT{'ACDEFGHIKLMNPQRSTVWY'[i % 20] * (i + 1)}W" for i in range(30)]
    expected = make_engine().embed(sequences, "mean")
    engine = make_engine(max_tokens_per_batch=80, fail_after_batches=4)
    with pytest.raises(KeyboardInterrupt):
        cache.cached_features(engine, sequences, "mean", tmp_path, shard_rows=1)
    files = committed_files(tmp_path)
    assert not [name for name in files if name.startswith(".tmp")]
    indexes = list(tmp_path.rglob("*.index.json"))
    done = sum(len(json.loads(path.read_text())["keys"]) for path in indexes)
    assert len(indexes) >= 2 and 0 < done < len(sequences)  # the batches before the interruption were kept
    # The next run embeds only the rest and returns everything.
    engine = make_engine(max_tokens_per_batch=80)
    features = cache.cached_features(engine, sequences, "mean", tmp_path)
    assert engine.proteins_run == len(sequences) - done
    np.testing.assert_allclose(features, expected, atol=1e-6)


def test_a_shard_without_its_index_is_not_used(tmp_path):
    engine = make_engine()
    cache.cached_features(engine, SEQUENCES, "mean", tmp_path)
    (index_path,) = tmp_path.rglob("*.index.json")
    index_path.unlink()  # as if the run died between writing the data and the index
    # ... or while writing the index: a half-written temporary file is not an index.
    (index_path.parent / f".tmp-0123-{index_path.name}").write_text('{"keys": ["abc')
    engine.proteins_run = 0
    cache.cached_features(engine, SEQUENCES, "mean", tmp_path)
    assert engine.proteins_run == len(set(SEQUENCES))


# --- cached-feature training vs the ordinary Trainer path ------------------------------------------------------


@pytest.fixture(scope="module")
def proteins_csv(tmp_path_factory):
    return write_demo_csv(tmp_path_factory.mktemp("data") / "proteins.csv", n_rows=80, seed=5)


def train(proteins_csv, output_dir, *extra):
    train_main(["--from_scratch", "tiny", "--train_file", str(proteins_csv), "--output_dir", str(output_dir),
                "--num_train_epochs", "2", "--per_device_train_batch_size", "8", "--max_residues", "200",
                "--num_examples_to_show", "0", "--learning_rate", "3e-3", "--use_cpu", *extra])


def predictions(output_dir):
    with open(output_dir / "test_predictions.csv", newline="") as handle:
        rows = list(csv.DictReader(handle))
    return [row["ACC"] for row in rows], np.array([float(row["probability_Mitochondrion"]) for row in rows])


# Attention pooling trains on float16 residue states: its weights may differ by float16 rounding.
@pytest.mark.slow
@pytest.mark.parametrize("pooling, weight_tolerance, probability_tolerance", [("mean", 1e-5, 1e-6),
                                                                             ("attention", 1e-3, 1e-4)])
def test_cached_and_ordinary_paths_train_the_same_model(pooling, weight_tolerance, probability_tolerance,
                                                        proteins_csv, tmp_path):
    cached_dir, ordinary_dir, cache_dir = tmp_path / "cached", tmp_path / "ordinary", tmp_path / "features"
    train(proteins_csv, cached_dir, "--pooling", pooling, "--feature_cache_dir", str(cache_dir))
    train(proteins_csv, ordinary_dir, "--pooling", pooling, "--no_feature_cache")
    assert any(cache_dir.rglob("*.npy"))  # the cached path really ran
    kind = "residues" if pooling == "attention" else "mean"
    assert all(path.name.split("-")[1] == kind for path in cache_dir.iterdir())
    # The same saved model (a full EsmForLocalization) and the same predictions.
    cached, ordinary = load_file(cached_dir / "model.safetensors"), load_file(ordinary_dir / "model.safetensors")
    assert cached.keys() == ordinary.keys() and any(key.startswith("esm.") for key in cached)
    for key in cached:
        torch.testing.assert_close(cached[key], ordinary[key], atol=weight_tolerance, rtol=0, msg=key)
    cached_accs, cached_probabilities = predictions(cached_dir)
    ordinary_accs, ordinary_probabilities = predictions(ordinary_dir)
    assert cached_accs == ordinary_accs
    np.testing.assert_allclose(cached_probabilities, ordinary_probabilities, atol=probability_tolerance, rtol=0)
    # Both trained: the head moved away from its initialisation the same way.
    initial = tiny_model().classifier.out_proj.weight
    assert not torch.allclose(cached["classifier.out_proj.weight"], initial)
    cached_state = json.loads((cached_dir / "trainer_state.json").read_text())
    ordinary_state = json.loads((ordinary_dir / "trainer_state.json").read_text())
    assert cached_state["best_model_checkpoint"].split("/")[-1] == ordinary_state["best_model_checkpoint"].split("/")[-1]
    losses = [[entry["loss"] for entry in state["log_history"] if "loss" in entry]
              for state in (cached_state, ordinary_state)]
    np.testing.assert_allclose(losses[0], losses[1], atol=weight_tolerance)


@pytest.mark.slow
def test_cached_training_resumes_from_its_checkpoint(proteins_csv, tmp_path):
    output_dir, cache_dir = tmp_path / "run", tmp_path / "features"
    train(proteins_csv, output_dir, "--feature_cache_dir", str(cache_dir))
    reference = load_file(output_dir / "model.safetensors")
    # Keep only the first epoch's checkpoint and run again: the Trainer resumes the head from it.
    checkpoints = sorted(output_dir.glob("checkpoint-*"), key=lambda path: int(path.name.split("-")[1]))
    assert len(checkpoints) == 2
    for path in [checkpoints[1], output_dir / "model.safetensors", output_dir / "trainer_state.json"]:
        if path.is_dir():
            shutil.rmtree(path)
        else:
            path.unlink()
    record = json.loads((output_dir / "esmloc_run.json").read_text())
    (output_dir / "esmloc_run.json").write_text(json.dumps({**record, "finished": False}))  # as a killed run leaves it
    head_checkpoint = load_file(checkpoints[0] / "model.safetensors")
    assert all(key.startswith(("classifier.", "pooler.")) for key in head_checkpoint)  # the head alone
    train(proteins_csv, output_dir, "--feature_cache_dir", str(cache_dir))
    state = json.loads((output_dir / "trainer_state.json").read_text())
    assert state["global_step"] == int(checkpoints[0].name.split("-")[1]) * 2
    resumed = load_file(output_dir / "model.safetensors")
    for key in reference:
        torch.testing.assert_close(resumed[key], reference[key], atol=1e-6, rtol=0, msg=key)
