"""Per-residue explanations (esmloc.explain): occlusion scores, pooling weights, the crop mapping, the files of
`esmloc-predict --explain`, and, on the synthetic demo data, a trained model's evidence at the targeting peptide."""

import csv
import os
import subprocess
import sys

import numpy as np
import pytest
import torch

from esmloc.demo import demo_rows
from esmloc.explain import CSV_NAME, Explainer, seen_positions
from esmloc.saving import save_model, tokenizer_for
from modeling_esmloc import EsmForLocalization
from tokenization_esmloc import EsmLocTokenizer

from conftest import PROTEINS, tiny_config, tiny_model


# The measure, stated once (README "Explanations"): the demo's targeting peptides are 20-40 residues long and start
# at residue 1, so the first 40 residues hold every one of them. For a positive protein, the share of the evidence
# for Mitochondrion (the sum of the positive occlusion scores) on its first 40 residues; the model sees 128 residues
# (crop n_terminal), so those are 31% of its input. Passes when that share is above one half for at least two thirds
# of the held-out positives.
PRESEQUENCE_REGION = 40
EVIDENCE_SHARE = 0.5
POSITIVES_REQUIRED = 2 / 3


def log_odds_by_forward(model, tokenizer, sequence):
    """The positive label's log-odds from the model's own forward pass on one protein (no engine)."""
    with torch.inference_mode():
        logits = model(**tokenizer([sequence], return_tensors="pt")).logits[0].double()
    return float(logits[1] - logits[0])


@pytest.mark.parametrize("crop", ["middle", "n_terminal"])
def test_seen_positions_follow_the_tokenizers_crop(crop):
    tokenizer = EsmLocTokenizer(max_residues=7, crop=crop)
    sequence = "ABCDEFGHIJKL"
    positions = seen_positions(sequence, tokenizer)
    assert positions.tolist() == ([0, 1, 2, 3, 9, 10, 11] if crop == "middle" else [0, 1, 2, 3, 4, 5, 6])
    assert seen_positions("ABC", tokenizer).tolist() == [0, 1, 2]


def test_occlusion_scores_are_the_drop_in_log_odds_when_the_window_is_hidden():
    model = tiny_model(max_residues=30, crop="middle")
    tokenizer = tokenizer_for(model.config)
    sequence = PROTEINS[0]  # 41 residues: cropped to 15 + 15
    explanation = Explainer(model, tokenizer, window=3).explain(sequence, acc="P1")
    assert explanation.cropped and explanation.label == "Mitochondrion"
    assert explanation.positions.tolist() == list(range(15)) + list(range(26, 41))
    assert explanation.log_odds == pytest.approx(log_odds_by_forward(model, tokenizer, sequence), abs=1e-4)
    seen = "".join(sequence[i] for i in explanation.positions)
    for index in (0, 7, 14, 15, 29):  # the ends of the crop, the seam, the middle of a half
        hidden = list(seen)
        hidden[max(0, index - 1):index + 2] = "X" * len(hidden[max(0, index - 1):index + 2])
        expected = explanation.log_odds - log_odds_by_forward(model, tokenizer, "".join(hidden))
        assert explanation.attributions[index] == pytest.approx(expected, abs=1e-4), index
    rows = list(explanation.rows())
    assert len(rows) == len(sequence) and [row[1] for row in rows] == list(range(1, len(sequence) + 1))
    assert "".join(row[2] for row in rows) == sequence
    assert [row[3] for row in rows] == [1] * 15 + [0] * 11 + [1] * 15  # the crop, said per residue
    assert all(row[5] == "" for row in rows[15:26]) and rows[26][5] == f"{explanation.attributions[15]:.6g}"


def test_attention_models_also_give_their_pooling_weights():
    model = tiny_model(pooling="attention", max_residues=30)
    tokenizer = tokenizer_for(model.config)
    explanation = Explainer(model, tokenizer).explain(PROTEINS[3], acc="P4")
    with torch.inference_mode():
        output = model(**tokenizer([PROTEINS[3]], return_tensors="pt"), output_pooling_weights=True)
    np.testing.assert_allclose(explanation.pooling_weights, output.pooling_weights[0, 1:-1].numpy(), atol=1e-7)
    assert explanation.pooling_weights.sum() == pytest.approx(1, abs=1e-5)
    assert len(explanation.pooling_weights) == len(explanation.positions) == 30


def test_multi_class_models_explain_the_most_probable_label_or_the_one_asked_for():
    model = tiny_model(num_labels=3, id2label={0: "A", 1: "B", 2: "C"}, label2id={"A": 0, "B": 1, "C": 2})
    tokenizer = tokenizer_for(model.config)
    explainer = Explainer(model, tokenizer)
    with torch.inference_mode():
        predicted = model.config.id2label[int(model(**tokenizer([PROTEINS[0]], return_tensors="pt")).logits.argmax())]
    assert explainer.explain(PROTEINS[0]).label == predicted
    assert explainer.explain(PROTEINS[0], label="C").label == "C"
    with pytest.raises(ValueError, match="unknown label 'Z'"):
        explainer.explain(PROTEINS[0], label="Z")


def train_on_demo_data(rows, epochs: int = 10, seed: int = 0) -> EsmForLocalization:
    """A tiny model trained from scratch (all weights, AdamW) on demo proteins cropped to their first 128 residues:
    about 15 s on one core."""
    torch.manual_seed(seed)
    model = EsmForLocalization(tiny_config(max_residues=128, crop="n_terminal"))
    tokenizer = tokenizer_for(model.config)
    labels = torch.tensor([row["Mitochondrion"] for row in rows])
    model.config.class_weights = [1.0, float((labels == 0).sum() / (labels == 1).sum())]
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # small batches: one thread is as fast, and kinder to a shared machine
    try:
        model.train()
        for _ in range(epochs):
            order = torch.randperm(len(rows))
            for start in range(0, len(rows), 16):
                batch = order[start:start + 16]
                inputs = tokenizer([rows[i]["Sequence"] for i in batch], return_tensors="pt", padding=True)
                loss = model(**inputs, labels=labels[batch]).loss
                optimizer.zero_grad()
                loss.backward()
                optimizer.step()
    finally:
        torch.set_num_threads(threads)
    return model.eval()


@pytest.mark.slow
def test_a_trained_models_evidence_sits_on_the_targeting_peptide():
    rows = demo_rows(400, seed=0)
    model = train_on_demo_data(rows[:300])
    tokenizer = tokenizer_for(model.config)
    explainer = Explainer(model, tokenizer)
    positives = [row for row in rows[300:] if row["Mitochondrion"]]
    shares = np.array([explainer.explain(row["Sequence"], row["ACC"]).region_share(PRESEQUENCE_REGION)
                       for row in positives])
    print(f"evidence share on the first {PRESEQUENCE_REGION} residues, {len(shares)} held-out positives: median "
          f"{np.median(shares):.2f}, above {EVIDENCE_SHARE}: {np.mean(shares > EVIDENCE_SHARE):.0%}")
    assert len(positives) >= 10
    assert np.mean(shares > EVIDENCE_SHARE) >= POSITIVES_REQUIRED, np.round(shares, 2)


@pytest.mark.slow
def test_predict_explain_writes_one_long_csv_and_pictures(tmp_path):
    model = tiny_model(pooling="attention", max_residues=300)
    model_dir = save_model(model, tmp_path / "model")
    records = [("P1", PROTEINS[0]), ("P2", "M" + "A" * 320), ("P3", PROTEINS[3])]  # P2: cropped
    fasta = tmp_path / "proteins.fasta"
    fasta.write_text("".join(f">{acc}\n{sequence}\n" for acc, sequence in records))
    plain, explained = tmp_path / "plain.csv", tmp_path / "explained.csv"
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    for output, extra in ((plain, []), (explained, ["--explain", str(tmp_path / "why"), "--explain_plots", "2"])):
        result = subprocess.run([sys.executable, "-m", "esmloc.commands.predict", str(model_dir), str(fasta), "-o",
                                 str(output), "--no_progress", *extra], env=env, capture_output=True, text=True,
                                timeout=300)
        assert result.returncode == 0, result.stderr
    assert plain.read_bytes() == explained.read_bytes()  # the predictions do not change
    with open(tmp_path / "why" / CSV_NAME, newline="") as handle:
        rows = list(csv.DictReader(handle))
    assert list(rows[0]) == ["ACC", "position", "residue", "in_model_input", "explained_label", "attribution",
                             "pooling_weight"]
    for acc, sequence in records:
        mine = [row for row in rows if row["ACC"] == acc]
        assert "".join(row["residue"] for row in mine) == sequence
        kept = seen_positions(sequence, tokenizer_for(model.config)) + 1
        assert [int(row["position"]) for row in mine if row["in_model_input"] == "1"] == kept.tolist()
        assert all(row["attribution"] == row["pooling_weight"] == "" for row in mine if row["in_model_input"] == "0")
        assert sum(float(row["pooling_weight"]) for row in mine if row["pooling_weight"]) == pytest.approx(1, 1e-4)
    assert sum(row["in_model_input"] == "0" for row in rows) == 21
    assert sorted(path.name for path in (tmp_path / "why").glob("*.png")) == ["P1.png", "P2.png"]
    assert "explanations" in result.stderr
