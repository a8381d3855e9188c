"""Long proteins whole (`long_proteins="windows"`): where the windows lie, how their states combine, and every path
that honours the rule: the model's own forward (pipeline, Trainer, LoRA), the engine, the feature cache, saved
models, train.py, esmloc-predict, esmloc-embed and the explanations."""

import csv
import json
import os
import random
import subprocess
import sys

import numpy as np
import pyarrow.parquet as pq
import pytest
import torch

from configuration_esmloc import EsmLocConfig
from esmloc.cache import FeatureCache, cached_features, sequence_key
from esmloc.commands.embed import main as embed_main
from esmloc.commands.predict import main as predict_main
from esmloc.embeddings import read_residues
from esmloc.engine import Engine
from esmloc.errors import InputError
from esmloc.explain import Explainer, seen_positions
from esmloc.loading import load_model_dir
from esmloc.saving import save_model, tokenizer_for
from esmloc.sequences import crop_note
from tokenization_esmloc import EsmLocTokenizer, window_spans

from conftest import PROTEINS, REPO, run_main, run_offline, tiny_model


WINDOW, OVERLAP = 20, 6  # a small window, so that a 50-residue protein needs four
SHORT = [protein.upper() for protein in PROTEINS if len(protein) <= WINDOW] + ["MKV", "A" * WINDOW]
LONG = "".join(random.Random(5).choice("ACDEFGHIKLMNPQRSTVWY") for _ in range(50))
# LONG's windows, worked out by hand: (50 - 20) / (20 - 6) = 2.1 -> three steps, starts 0, 10, 20, 30 (a stride of
# 10 <= 14); each neighbouring pair overlaps by 10 and is cut in the middle of its overlap: at 15, 25 and 35.
LONG_WINDOWS = [(0, 20, 0, 15), (10, 30, 15, 25), (20, 40, 25, 35), (30, 50, 35, 50)]


def windows_model(pooling="mean", **kwargs):
    return tiny_model(pooling=pooling, max_residues=WINDOW, long_proteins="windows", window_overlap=OVERLAP, **kwargs)


def crop_model(pooling="mean", **kwargs):
    return tiny_model(pooling=pooling, max_residues=WINDOW, **kwargs)


def engine(model, **kwargs):
    return Engine(model, tokenizer_for(model.config), progress=False, **kwargs)


def hand_combined_states(model, sequence, windows):
    """The stitched token states of `sequence` worked out by hand: every window (`<cls>` window `<eos>`) through the
    stock `EsmModel.forward` on its own, each residue's state from the window that keeps it, `<cls>`/`<eos>` the
    mean of the windows' ones."""
    tokenizer = EsmLocTokenizer(max_residues=WINDOW)
    with torch.inference_mode():
        states = [model.esm(torch.tensor([tokenizer(sequence[start:end])["input_ids"]])).last_hidden_state[0]
                  for start, end, _, _ in windows]
    residues = torch.cat([state[1 + keep_start - start:1 + keep_end - start]
                          for state, (start, _, keep_start, keep_end) in zip(states, windows)])
    cls = torch.stack([state[0] for state in states]).mean(dim=0)
    eos = torch.stack([state[-1] for state in states]).mean(dim=0)
    return torch.cat([cls[None], residues, eos[None]])


# ------------------------------------------------------------------------------------------------------ the windows


def test_window_spans_worked_out_by_hand():
    assert window_spans(50, WINDOW, OVERLAP) == LONG_WINDOWS
    assert window_spans(WINDOW, WINDOW, OVERLAP) == [(0, WINDOW, 0, WINDOW)]  # a protein that fits is itself
    assert window_spans(3, WINDOW, OVERLAP) == [(0, 3, 0, 3)]
    # One residue too many: two windows, 19 residues shared, cut at (0 + 1 + 20) // 2 = 10.
    assert window_spans(21, WINDOW, OVERLAP) == [(0, 20, 0, 10), (1, 21, 10, 21)]
    # ESM-2's window and the default overlap, a quarter of it (255): (2000 - 1022) / 767 -> two steps of 489.
    assert window_spans(2000) == [(0, 1022, 0, 755), (489, 1511, 755, 1244), (978, 2000, 1244, 2000)]


@pytest.mark.parametrize("window,overlap", [(20, 6), (20, 0), (20, 19), (7, 3), (1022, 255)])
def test_windows_cover_the_protein_and_keep_each_residue_where_it_is_most_central(window, overlap):
    for residues in list(range(1, 4 * window)) + [40_000]:
        spans = window_spans(residues, window, overlap)
        starts = [start for start, _, _, _ in spans]
        assert spans[0][0] == 0 and spans[-1][1] == residues
        assert all(end - start == min(window, residues) for start, end, _, _ in spans)
        assert all(following - start <= window - overlap for start, following in zip(starts, starts[1:]))
        assert len(spans) == 1 + max(0, -(-(residues - window) // (window - overlap)))  # the fewest windows
        kept = [position for _, _, keep_start, keep_end in spans for position in range(keep_start, keep_end)]
        assert kept == list(range(residues))  # the kept ranges tile the protein
        for start, end, keep_start, keep_end in spans:
            assert start <= keep_start <= keep_end <= end
        if residues < 200:  # each residue's window is one of those it lies most central in (ties either way)
            for position in range(residues):
                distance = [abs(position - (start + end - 1) / 2) if start <= position < end else np.inf
                            for start, end, _, _ in spans]
                keeper = next(i for i, (_, _, a, b) in enumerate(spans) if a <= position < b)
                assert distance[keeper] == min(distance)


def test_the_overlap_must_leave_the_windows_a_stride():
    for overlap in (-1, WINDOW):
        with pytest.raises(ValueError, match="window_overlap must lie between 0 and max_residues - 1"):
            window_spans(50, WINDOW, overlap)
        with pytest.raises(ValueError, match="window_overlap"):
            EsmLocConfig(max_residues=WINDOW, long_proteins="windows", window_overlap=overlap)
        with pytest.raises(ValueError, match="window_overlap"):
            EsmLocTokenizer(max_residues=WINDOW, long_proteins="windows", window_overlap=overlap)
    with pytest.raises(ValueError, match="long_proteins must be one of"):
        EsmLocConfig(long_proteins="chunks")


def test_the_tokenizer_keeps_long_proteins_whole_for_windows():
    crop, windows = EsmLocTokenizer(max_residues=WINDOW), EsmLocTokenizer(max_residues=WINDOW, long_proteins="windows")
    assert len(crop(LONG)["input_ids"]) == WINDOW + 2
    assert windows(LONG.lower())["input_ids"] == crop(LONG)["input_ids"][:1] + \
        crop.convert_tokens_to_ids(list(LONG)) + crop(LONG)["input_ids"][-1:]
    assert windows.normalize_and_crop(" ".join(LONG)) == LONG
    assert windows.window_spans(50) == window_spans(50, WINDOW)  # the default overlap, a quarter of the window
    assert crop.window_spans(WINDOW) == [(0, WINDOW, 0, WINDOW)]


# ------------------------------------------------------------------------------------- short proteins: the crop path


def test_windows_of_proteins_that_fit_equal_the_crop_path_exactly():
    crop, windows = crop_model(), windows_model()
    assert crop.state_dict().keys() == windows.state_dict().keys()
    assert all(torch.equal(a, b) for a, b in zip(crop.state_dict().values(), windows.state_dict().values()))
    crop_tokenizer, windows_tokenizer = tokenizer_for(crop.config), tokenizer_for(windows.config)
    assert crop_tokenizer(SHORT)["input_ids"] == windows_tokenizer(SHORT)["input_ids"]
    for kind in ("mean", "cls"):
        assert np.array_equal(engine(crop).embed(SHORT, kind), engine(windows).embed(SHORT, kind))
    for a, b in zip(engine(crop).embed(SHORT, "residues"), engine(windows).embed(SHORT, "residues")):
        assert np.array_equal(a, b)
    assert np.array_equal(engine(crop).predict_probabilities(SHORT), engine(windows).predict_probabilities(SHORT))
    batch = crop_tokenizer(SHORT, return_tensors="pt", padding=True)
    with torch.inference_mode():
        assert torch.equal(crop(**batch).logits, windows(**batch).logits)


# ------------------------------------------------------------------------------ long proteins: the combined windows


@pytest.mark.parametrize("pooling", ["mean", "cls", "attention"])
def test_a_long_protein_is_the_hand_combination_of_its_windows(pooling):
    model = windows_model(pooling)
    expected = hand_combined_states(model, LONG, LONG_WINDOWS)
    assert expected.shape[0] == len(LONG) + 2
    inference = engine(model)
    np.testing.assert_allclose(inference.embed([LONG], "residues")[0], expected[1:-1].numpy(), atol=1e-5)
    np.testing.assert_allclose(inference.embed([LONG], "mean")[0], expected[1:-1].mean(dim=0).numpy(), atol=1e-5)
    np.testing.assert_allclose(inference.embed([LONG], "cls")[0], expected[0].numpy(), atol=1e-5)
    with torch.inference_mode():
        logits = model.classify(expected[None], torch.ones(1, len(expected), dtype=torch.long)).logits
        forward = model(**tokenizer_for(model.config)([LONG], return_tensors="pt")).logits
    np.testing.assert_allclose(inference.predict_probabilities([LONG]), torch.softmax(logits, -1).numpy(), atol=1e-5)
    np.testing.assert_allclose(forward.numpy(), logits.numpy(), atol=1e-5)  # the model's own forward windows alike


def test_a_windowed_protein_does_not_depend_on_its_batch_mates():
    model = windows_model("attention")
    others = SHORT + [LONG[::-1] + LONG, LONG[5:]]
    alone = engine(model).embed([LONG], "residues")[0]
    for options in ({}, {"max_tokens_per_batch": WINDOW + 2}, {"max_tokens_per_batch": 64, "workers": 2},
                    {"packed": False}):
        inference = engine(model, **options)
        together = inference.embed(others[:3] + [LONG] + others[3:], "residues")[3]
        np.testing.assert_allclose(together, alone, atol=1e-5, err_msg=str(options))
        probabilities = inference.predict_probabilities(others + [LONG])[-1]
        np.testing.assert_allclose(probabilities, engine(model).predict_probabilities([LONG])[0], atol=1e-5)
    tokenizer = tokenizer_for(model.config)
    with torch.inference_mode():
        single = model(**tokenizer([LONG], return_tensors="pt")).logits[0]
        batched = model(**tokenizer(others + [LONG], return_tensors="pt", padding=True)).logits[-1]
    np.testing.assert_allclose(batched.numpy(), single.numpy(), atol=1e-5)


def test_a_40000_residue_protein_runs_within_the_token_budget(monkeypatch):
    """Memory stays flat: the backbone never runs more than a budget's worth of tokens at once, and attention never
    spans more than one window (ESM-2's 1022 residues), whatever the protein's length."""
    model = tiny_model(long_proteins="windows")
    protein = "".join(random.Random(1).choice("ACDEFGHIKLMNPQRSTVWY") for _ in range(40_000))
    inference = engine(model, max_tokens_per_batch=2048)
    calls, backbone = [], inference._backbone

    def recording(ids, lengths):
        calls.append(list(lengths))
        return backbone(ids, lengths)

    monkeypatch.setattr(inference, "_backbone", recording)
    residues = inference.embed([protein, "MKV"], "residues")
    assert residues[0].shape == (40_000, model.config.hidden_size) and residues[1].shape[0] == 3
    assert sum(len(lengths) for lengths in calls) == len(window_spans(40_000)) + 1 == 53
    assert max(len(lengths) * max(lengths) for lengths in calls) <= 2048 and max(map(max, calls)) == 1024
    shapes = []
    model.esm.register_forward_pre_hook(lambda module, args, kwargs: shapes.append(tuple(args[0].shape)),
                                        with_kwargs=True)
    with torch.inference_mode():
        model(**tokenizer_for(model.config)([protein], return_tensors="pt"))
    assert max(shapes) == (8, 1024) and len(shapes) == 7  # 52 windows, 8 at a time (WINDOWS_PER_PASS)


# ---------------------------------------------------------------------------------------------- training through it


@pytest.mark.parametrize("mode", ["full", "lora"])
def test_full_and_lora_fine_tuning_train_through_the_windows(mode):
    """The model's forward windows a long protein with gradients: the loss reaches the backbone (full) or the LoRA
    adapters, through exactly the residue states each window keeps."""
    model = windows_model().train()
    esm, tokenizer = model.esm, tokenizer_for(model.config)
    batch = tokenizer([LONG, SHORT[0]], return_tensors="pt", padding=True)
    if mode == "lora":
        from peft import LoraConfig, get_peft_model

        model = get_peft_model(model, LoraConfig(r=4, target_modules=["query", "key", "value"],
                                                 modules_to_save=["pooler", "classifier"]))
        for name, parameter in model.named_parameters():  # LoRA's B starts at zero: give it some weight
            if "lora_B" in name:
                torch.nn.init.normal_(parameter, std=0.1)
    trained = {name: parameter for name, parameter in model.named_parameters() if parameter.requires_grad
               and ("lora_" in name if mode == "lora" else "esm.encoder" in name)}
    loss = model(**batch, labels=torch.tensor([1, 0])).loss
    loss.backward()
    assert trained and all(parameter.grad is not None and parameter.grad.abs().sum() > 0
                           for parameter in trained.values())
    # The encoder's output per window: the residues a window keeps get a gradient, those it leaves to a neighbour
    # (more central there) none: the stitched states are exactly the kept ones (mean pooling: <cls>/<eos> unused).
    outputs = []
    esm.register_forward_hook(lambda module, args, output: outputs.append(output.last_hidden_state))
    loss = model(**tokenizer([LONG], return_tensors="pt"), labels=torch.tensor([1])).loss
    outputs[-1].retain_grad()
    loss.backward()
    for gradient, (start, end, keep_start, keep_end) in zip(outputs[-1].grad, LONG_WINDOWS, strict=True):
        residues = gradient[1:-1].abs().sum(dim=-1)
        kept = torch.zeros(end - start, dtype=torch.bool)
        kept[keep_start - start:keep_end - start] = True
        assert (residues[kept] > 0).all() and (residues[~kept] == 0).all()


# --------------------------------------------------------------------------------------------- saved and cached


def test_saved_models_remember_the_rule(tmp_path, elsewhere):
    model = windows_model("attention")
    directory = save_model(model, tmp_path / "model")
    for name in ("config.json", "tokenizer_config.json"):
        saved = json.loads((directory / name).read_text())
        assert (saved["long_proteins"], saved["window_overlap"], saved["max_residues"]) == ("windows", OVERLAP, WINDOW)
    expected = engine(model).predict_probabilities([LONG, SHORT[0]])
    loaded = run_offline(f"""
import json, torch
from transformers import AutoModel, AutoTokenizer, pipeline
model = AutoModel.from_pretrained({str(directory)!r}, trust_remote_code=True).eval()
tokenizer = AutoTokenizer.from_pretrained({str(directory)!r}, trust_remote_code=True)
batch = tokenizer([{LONG!r}, {SHORT[0]!r}], return_tensors="pt", padding=True)
with torch.inference_mode():
    probabilities = torch.softmax(model(**batch).logits, -1).tolist()
classify = pipeline("text-classification", model={str(directory)!r}, trust_remote_code=True)
scores = {{entry["label"]: entry["score"] for entry in classify([{LONG!r}], top_k=None)[0]}}
print(json.dumps({{"rule": [model.config.long_proteins, model.config.window_overlap, tokenizer.long_proteins,
                            tokenizer.window_overlap], "tokens": len(batch["input_ids"][0]),
                   "probabilities": probabilities, "pipeline": scores}}))
""", elsewhere, tmp_path)
    assert loaded["rule"] == ["windows", OVERLAP, "windows", OVERLAP]
    assert loaded["tokens"] == len(LONG) + 2  # whole, not cropped
    np.testing.assert_allclose(loaded["probabilities"], expected, atol=1e-5)
    np.testing.assert_allclose([loaded["pipeline"]["Other"], loaded["pipeline"]["Mitochondrion"]], expected[0],
                               atol=1e-5)
    reloaded, tokenizer = load_model_dir(directory)
    assert (reloaded.config.long_proteins, tokenizer.long_proteins, tokenizer.window_overlap) == \
        ("windows", "windows", OVERLAP)
    settings = json.loads((directory / "tokenizer_config.json").read_text())
    (directory / "tokenizer_config.json").write_text(json.dumps({**settings, "long_proteins": "crop"}))
    with pytest.raises(InputError, match="long_proteins 'crop' in the tokenizer, 'windows' in the config"):
        load_model_dir(directory)


def test_a_cropping_model_refuses_what_it_would_have_to_window():
    model, tokenizer = crop_model(), EsmLocTokenizer(max_residues=WINDOW, long_proteins="windows")
    with pytest.raises(ValueError, match="long_proteins='windows'"):
        model(**tokenizer([LONG], return_tensors="pt"))


def test_the_feature_cache_keys_on_the_rule(tmp_path):
    crop, windows = crop_model(), windows_model()
    caches = {name: FeatureCache.for_engine(engine(model), "mean", root=tmp_path)
              for name, model in (("crop", crop), ("windows", windows))}
    caches["wider"] = FeatureCache.for_engine(engine(tiny_model(max_residues=WINDOW, long_proteins="windows",
                                                                window_overlap=OVERLAP + 1)), "mean", root=tmp_path)
    assert len({cache.path for cache in caches.values()}) == 3
    assert caches["crop"].path.name.endswith(f"-r{WINDOW}-middle-fp32")  # a cropping cache keeps its old name
    assert caches["windows"].path.name.endswith(f"-r{WINDOW}-windows{OVERLAP}-fp32")
    assert caches["windows"].meta["long_proteins"] == "windows" and caches["windows"].meta["window_overlap"] == OVERLAP
    crop_tokenizer, windows_tokenizer = tokenizer_for(crop.config), tokenizer_for(windows.config)
    assert sequence_key(SHORT[0], crop_tokenizer) == sequence_key(SHORT[0], windows_tokenizer)
    assert sequence_key(LONG, crop_tokenizer) != sequence_key(LONG, windows_tokenizer)
    inference = engine(windows)
    first = cached_features(inference, [LONG, SHORT[0]], "mean", cache_dir=tmp_path)
    again = cached_features(inference, [SHORT[0], LONG], "mean", cache_dir=tmp_path)  # from the cache
    np.testing.assert_array_equal(again[::-1], first)
    np.testing.assert_allclose(first, inference.embed([LONG, SHORT[0]], "mean"), atol=1e-6)


def test_the_note_says_long_proteins_are_windowed():
    assert crop_note(2, 5, 1022, "middle", "windows") == (
        "2 of 5 proteins are longer than the model's window of 1022 residues: each is embedded whole, in windows of "
        "1022 residues overlapping by at least 255 (a stride of at most 767), each residue's state from the window it "
        "is most central in")
    assert "cropped to 1022" in crop_note(2, 5, 1022, "middle")


def test_explanations_score_every_residue_of_a_windowed_protein():
    model = windows_model("attention")
    tokenizer = tokenizer_for(model.config)
    assert seen_positions(LONG, tokenizer).tolist() == list(range(len(LONG)))
    explanation = Explainer(model, tokenizer).explain(LONG, acc="long")
    assert not explanation.cropped and len(explanation.attributions) == len(explanation.pooling_weights) == len(LONG)
    probability = engine(model).predict_probabilities([LONG])[0, 1]
    assert explanation.log_odds == pytest.approx(np.log(probability / (1 - probability)), abs=1e-4)
    occluded = LONG[:38] + "X" * 5 + LONG[43:]  # the window centred on residue 40
    changed = engine(model).predict_probabilities([occluded])[0, 1]
    assert explanation.attributions[40] == pytest.approx(
        explanation.log_odds - np.log(changed / (1 - changed)), abs=1e-4)


# ------------------------------------------------------------------------------------------------------- the tools


def write_fasta(path, records):
    path.write_text("".join(f">{acc}\n{sequence}\n" for acc, sequence in records))
    return path


def test_esmloc_predict_honours_the_saved_rule_and_says_so(tmp_path, capsys):
    model = windows_model()
    directory = save_model(model, tmp_path / "model")
    fasta = write_fasta(tmp_path / "proteins.fasta", [("long", LONG), ("short", SHORT[0])])
    status, _, err = run_main(predict_main, [directory, fasta, "-o", tmp_path / "windows.csv"], capsys)
    assert status == 0 and "1 of 2 proteins are longer than the model's window of 20 residues: each is embedded " \
        "whole, in windows of 20 residues overlapping by at least 6" in err
    rows = list(csv.DictReader(open(tmp_path / "windows.csv")))
    got = np.array([[float(row["probability_Other"]), float(row["probability_Mitochondrion"])] for row in rows])
    np.testing.assert_allclose(got, engine(model).predict_probabilities([LONG, SHORT[0]]), atol=1e-5)
    # Asked to crop instead: it does, and warns that the model was trained and evaluated otherwise.
    status, _, err = run_main(predict_main, [directory, fasta, "-o", tmp_path / "crop.csv", "--long_proteins", "crop"],
                              capsys)
    assert status == 0 and "was trained and evaluated with long_proteins=windows" in err and "cropped to 20" in err
    rows = list(csv.DictReader(open(tmp_path / "crop.csv")))
    cropped = crop_model()
    np.testing.assert_allclose(float(rows[0]["probability_Mitochondrion"]),
                               engine(cropped).predict_probabilities([LONG])[0, 1], atol=1e-5)
    status, _, err = run_main(predict_main, [directory, fasta, "-o", tmp_path / "x.csv", "--long_proteins", "crop",
                                             "--window_overlap", "3"], capsys)
    assert status == 2 and "--window_overlap applies to windows only" in err and not (tmp_path / "x.csv").exists()


def test_esmloc_embed_windows_a_stock_checkpoint_on_request(tmp_path, capsys):
    model = tiny_model()  # max_residues 1022, crop: a protein of 1100 residues needs two windows
    model.esm.save_pretrained(tmp_path / "esm")
    protein = (LONG * 22)[:1100]
    fasta = write_fasta(tmp_path / "proteins.fasta", [("long", protein), ("short", SHORT[0])])
    status, _, err = run_main(embed_main, [tmp_path / "esm", fasta, "-o", tmp_path / "e.parquet", "--per_residue",
                                           tmp_path / "residues", "--per_residue_dtype", "float32", "--long_proteins",
                                           "windows", "--window_overlap", "100"], capsys)
    assert status == 0 and "embedded whole, in windows of 1022 residues overlapping by at least 100" in err
    table = pq.read_table(tmp_path / "e.parquet").to_pandas()
    windowed = tiny_model(long_proteins="windows", window_overlap=100)
    expected = engine(windowed).embed([protein, SHORT[0]], "mean")
    np.testing.assert_allclose(np.stack(table["embedding"].to_numpy()), expected, atol=1e-5)
    residues = read_residues(tmp_path / "residues", table["sequence_sha256"][0])
    assert residues.shape == (1100, model.config.hidden_size)
    np.testing.assert_allclose(residues, engine(windowed).embed([protein], "residues")[0], atol=1e-5)
    metadata = json.loads(pq.read_schema(tmp_path / "e.parquet").metadata[b"esmloc"])
    assert (metadata["long_proteins"], metadata["window_overlap"]) == ("windows", 100)


@pytest.mark.slow
def test_train_py_trains_on_windowed_cached_features_and_saves_the_rule(tmp_path):
    from esmloc.demo import write_demo_csv

    proteins = write_demo_csv(tmp_path / "proteins.csv", n_rows=160, seed=3)  # median 305 residues
    output, cache = tmp_path / "out", tmp_path / "cache"
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false"}
    result = subprocess.run([sys.executable, str(REPO / "train.py"), "--from_scratch", "tiny", "--train_file",
                             str(proteins), "--max_residues", "128", "--long_proteins", "windows", "--window_overlap",
                             "32", "--num_train_epochs", "1", "--feature_cache_dir", str(cache), "--output_dir",
                             str(output), "--num_examples_to_show", "0"], cwd=tmp_path, env=env, capture_output=True,
                            text=True, timeout=900)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "152 of 160 proteins are longer than the model's window of 128 residues: each is embedded whole, in " \
        "windows of 128 residues overlapping by at least 32" in result.stderr
    for name in ("config.json", "tokenizer_config.json"):
        saved = json.loads((output / name).read_text())
        assert (saved["long_proteins"], saved["window_overlap"]) == ("windows", 32)
    assert [path.name.split("-", 1)[1] for path in cache.iterdir()] == ["mean-r128-windows32-fp32"]
    assert "embedded whole, in windows of 128 residues overlapping by at least 32" in (output / "README.md").read_text()
    # The test predictions the run wrote (from cached windowed features) are the saved model's, windowed.
    sequences = {row["ACC"]: row["Sequence"] for row in csv.DictReader(open(proteins))}
    rows = list(csv.DictReader(open(output / "test_predictions.csv")))
    model, tokenizer = load_model_dir(output)
    expected = Engine(model, tokenizer, progress=False).predict_probabilities([sequences[row["ACC"]] for row in rows])
    np.testing.assert_allclose([float(row["probability_Mitochondrion"]) for row in rows], expected[:, 1], atol=1e-5)


@pytest.mark.slow
def test_the_one_protein_memory_benchmark_runs(tmp_path):
    result = subprocess.run([sys.executable, str(REPO / "bench" / "predict_memory.py"), "--one_protein", "--sizes",
                             "1100", "3000"], cwd=tmp_path, env={**os.environ, "HF_HUB_OFFLINE": "1"},
                            capture_output=True, text=True, timeout=900)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "peak RSS growth from 1,100 to 3,000 residues of one protein" in result.stdout
