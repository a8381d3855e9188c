"""The HF-native model: config, model, tokenizer, and saved directories that load anywhere, offline."""

import json

import pytest
import torch
from transformers import EsmConfig, EsmForMaskedLM
from transformers.models.esm.configuration_esm import get_default_vocab_list

from configuration_esmloc import DEFAULT_CROP, DEFAULT_MAX_RESIDUES, ESM2_ARCHITECTURES, EsmLocConfig
from esmloc.saving import save_model, tokenizer_for
from modeling_esmloc import EsmForLocalization
from tokenization_esmloc import ESM2_VOCAB, EsmLocTokenizer, crop_sequence

from conftest import PROTEINS, run_offline, tiny_config, tiny_model


def logits_of(model, tokenizer, sequences):
    with torch.no_grad():
        return model(**tokenizer(sequences, return_tensors="pt", padding=True)).logits


# --- configuration -------------------------------------------------------------------------------------------


def test_config_defaults_are_the_binary_mitochondrion_task():
    config = EsmLocConfig()
    assert config.model_type == "esmloc"
    assert config.id2label == {0: "Other", 1: "Mitochondrion"}
    assert config.label2id == {"Other": 0, "Mitochondrion": 1}
    assert (config.pooling, config.max_residues, config.crop) == ("mean", 1022, "middle")
    assert isinstance(config.esm_config, EsmConfig)
    assert config.esm_config.hidden_size == 320  # ESM-2 8M


def test_config_round_trips_through_dict_with_nested_esm_config():
    config = tiny_config(pooling="attention", crop="n_terminal", max_residues=100, class_weights=[1.0, 3.0])
    again = EsmLocConfig(**config.to_dict())
    assert isinstance(again.esm_config, EsmConfig)
    assert again.esm_config.to_dict() == config.esm_config.to_dict()
    assert (again.pooling, again.crop, again.max_residues, again.class_weights) == (
        "attention", "n_terminal", 100, [1.0, 3.0]
    )


@pytest.mark.parametrize(
    "kwargs, message",
    [
        ({"pooling": "max"}, "pooling"),
        ({"crop": "c_terminal"}, "crop"),
        ({"max_residues": 2000}, "max_residues"),
        ({"class_weights": [1.0, 2.0, 3.0]}, "class_weights"),
    ],
)
def test_config_rejects_invalid_options(kwargs, message):
    with pytest.raises(ValueError, match=message):
        tiny_config(**kwargs)


def test_multi_label_config_keeps_its_labels():
    names = ["Cytoplasm", "Nucleus", "Mitochondrion"]
    config = tiny_config(id2label=dict(enumerate(names)), problem_type="multi_label_classification")
    assert config.num_labels == 3 and config.label2id["Mitochondrion"] == 2


# --- tokenizer -------------------------------------------------------------------------------------------------


def test_shipped_vocabulary_is_the_esm2_vocabulary():
    assert list(ESM2_VOCAB) == list(get_default_vocab_list())
    tokenizer = EsmLocTokenizer()
    assert tokenizer.convert_ids_to_tokens(list(range(33))) == list(ESM2_VOCAB)
    assert tokenizer.get_vocab() == {token: index for index, token in enumerate(get_default_vocab_list())}


def test_crop_defaults_are_the_configs():
    from esmloc.commands.train import ModelArguments

    config, tokenizer = EsmLocConfig(), EsmLocTokenizer()
    arguments = ModelArguments(from_scratch="tiny")
    assert (config.max_residues, config.crop) == (DEFAULT_MAX_RESIDUES, DEFAULT_CROP) == (1022, "middle")
    assert (tokenizer.max_residues, tokenizer.crop) == (arguments.max_residues, arguments.crop) == (1022, "middle")


def test_normalize_and_crop_is_what_the_tokenizer_encodes():
    tokenizer = EsmLocTokenizer(max_residues=10, crop="middle")
    raw = " mlrtss\tLFTRRVQPSLFSRN\n"
    assert tokenizer.normalize_and_crop(raw) == "MLRTSLFSRN"
    assert tokenizer(raw)["input_ids"] == tokenizer(tokenizer.normalize_and_crop(raw))["input_ids"]
    assert tokenizer.normalize_and_crop("mk<mask>t") == "MK<mask>T"
    with pytest.raises(ValueError, match="contains <mask>"):
        tokenizer.normalize_and_crop("M" * 10 + "<mask>")


def test_tokenizer_normalises_case_and_whitespace():
    tokenizer = EsmLocTokenizer()
    expected = tokenizer("MKTAYIAK")["input_ids"]
    assert tokenizer(" mktay\tiak\n")["input_ids"] == expected
    assert tokenizer.unk_token_id not in expected
    assert len(expected) == 8 + 2


@pytest.mark.parametrize("crop", ["middle", "n_terminal"])
def test_tokenizer_crops_every_call(crop):
    tokenizer = EsmLocTokenizer(max_residues=10, crop=crop)
    protein = "MLRTSSLFTRRVQPSLFSRN"
    cropped = crop_sequence(protein, 10, crop)
    assert cropped == ("MLRTSLFSRN" if crop == "middle" else "MLRTSSLFTR")
    assert tokenizer(protein)["input_ids"] == tokenizer(cropped)["input_ids"]
    assert tokenizer([protein, "MK"], padding=True)["input_ids"][0] == tokenizer(cropped)["input_ids"]
    assert tokenizer.decode(tokenizer(protein.lower())["input_ids"], skip_special_tokens=True).replace(" ", "") == cropped


def test_crop_sequence_keeps_both_termini_in_middle_mode():
    protein = "N" * 600 + "X" * 3000 + "C" * 600
    cropped = crop_sequence(protein, 1022, "middle")
    assert cropped == "N" * 511 + "C" * 511
    assert crop_sequence(protein, 1022, "n_terminal") == "N" * 600 + "X" * 422
    assert crop_sequence("MKT", 1022, "middle") == "MKT"


# --- model -----------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("pooling", ["mean", "cls", "attention"])
def test_padding_never_leaks_into_pooling(pooling):
    model, tokenizer = tiny_model(pooling=pooling), EsmLocTokenizer()
    short = PROTEINS[3]
    alone = logits_of(model, tokenizer, [short])
    padded = logits_of(model, tokenizer, [short, PROTEINS[1]])  # padded to the long protein's length
    assert tokenizer([short, PROTEINS[1]], padding=True)["attention_mask"][0].count(0) > 200
    torch.testing.assert_close(alone[0], padded[0], atol=1e-5, rtol=1e-5)
    assert not torch.allclose(padded[0], padded[1], atol=1e-3)  # the head does tell proteins apart


def test_attention_pooling_weights_cover_residues_only():
    model, tokenizer = tiny_model(pooling="attention"), EsmLocTokenizer()
    batch = tokenizer([PROTEINS[3], PROTEINS[2]], return_tensors="pt", padding=True)
    with torch.no_grad():
        output = model(**batch, output_pooling_weights=True)
    weights = output.pooling_weights
    assert weights.shape == batch["input_ids"].shape
    torch.testing.assert_close(weights.sum(dim=1), torch.ones(2))
    special = (batch["input_ids"] == tokenizer.cls_token_id) | (batch["input_ids"] == tokenizer.eos_token_id)
    assert weights[special | (batch["attention_mask"] == 0)].abs().max() == 0
    assert (weights[1] > 0).sum() == 3  # "MSE": three residues
    assert model(**batch).pooling_weights is None


@pytest.mark.parametrize("crop", ["middle", "n_terminal"])
def test_long_protein_is_predicted_as_its_cropped_form(crop):
    model = tiny_model(max_residues=64, crop=crop)
    tokenizer = tokenizer_for(model.config)
    long_protein = (PROTEINS[1] * 20)[:4000]
    cropped = crop_sequence(long_protein, 64, crop)
    assert len(cropped) == 64
    torch.testing.assert_close(logits_of(model, tokenizer, [long_protein]), logits_of(model, tokenizer, [cropped]))


def test_model_refuses_uncropped_input():
    model = tiny_model(max_residues=64)
    too_long = torch.full((1, 64 + 3), 5)
    with pytest.raises(ValueError, match="max_residues"):
        model(input_ids=too_long)


def test_multi_label_loss_is_bce_with_pos_weight():
    model = tiny_model(
        id2label={0: "Cytoplasm", 1: "Nucleus", 2: "Mitochondrion"},
        problem_type="multi_label_classification",
        class_weights=[1.0, 2.0, 5.0],
    )
    batch = EsmLocTokenizer()(PROTEINS[2:4], return_tensors="pt", padding=True)
    labels = torch.tensor([[1, 0, 1], [0, 0, 0]])
    with torch.no_grad():
        output = model(**batch, labels=labels)
    logits = output.logits
    assert logits.shape == (2, 3)
    p = torch.sigmoid(logits)
    pos_weight = torch.tensor([1.0, 2.0, 5.0])
    by_hand = -(pos_weight * labels * torch.log(p) + (1 - labels) * torch.log(1 - p)).mean()
    torch.testing.assert_close(output.loss, by_hand)


def test_single_label_loss_uses_class_weights():
    model = tiny_model(class_weights=[1.0, 9.0])
    batch = EsmLocTokenizer()(PROTEINS[2:4], return_tensors="pt", padding=True)
    labels = torch.tensor([1, 0])
    with torch.no_grad():
        output = model(**batch, labels=labels)
    log_p = torch.log_softmax(output.logits, dim=-1)
    by_hand = -(9.0 * log_p[0, 1] + 1.0 * log_p[1, 0]) / (9.0 + 1.0)
    torch.testing.assert_close(output.loss, by_hand)


def test_multi_class_single_label_head():
    model = tiny_model(id2label={0: "Cytoplasm", 1: "Nucleus", 2: "Mitochondrion"})
    batch = EsmLocTokenizer()(PROTEINS[2:4], return_tensors="pt", padding=True)
    output = model(**batch, labels=torch.tensor([2, 0]))
    assert output.logits.shape == (2, 3) and output.loss.ndim == 0


@pytest.mark.parametrize("pooling", ["mean", "attention"])
def test_gradient_checkpointing_with_a_frozen_backbone(pooling):
    model = tiny_model(pooling=pooling).train()
    model.esm.requires_grad_(False)
    # A LoRA-like case: embeddings frozen, one layer inside the checkpointed encoder trainable.
    query = model.esm.encoder.layer[1].attention.self.query
    query.requires_grad_(True)
    model.activation_checkpointing_enable()
    assert model.is_activation_checkpointing
    batch = EsmLocTokenizer()(PROTEINS[2:4], return_tensors="pt", padding=True)
    model(**batch, labels=torch.tensor([1, 0])).loss.backward()
    assert model.classifier.out_proj.weight.grad.abs().sum() > 0
    assert query.weight.grad.abs().sum() > 0
    assert model.esm.encoder.layer[0].attention.self.key.weight.grad is None


def test_from_esm_reproduces_a_stock_checkpoint(tmp_path):
    torch.manual_seed(1)
    stock = EsmForMaskedLM(EsmConfig(**ESM2_ARCHITECTURES["tiny"])).eval()
    stock.save_pretrained(tmp_path / "esm2_mlm")
    stock.esm.save_pretrained(tmp_path / "esm2_base")  # the EsmModel layout
    batch = EsmLocTokenizer()(PROTEINS[:2], return_tensors="pt", padding=True)
    with torch.no_grad():
        expected = stock(**batch, output_hidden_states=True).hidden_states
    for layout in ("esm2_mlm", "esm2_base"):
        model = EsmForLocalization.from_esm(tmp_path / layout, pooling="cls").eval()
        assert model.config.pooling == "cls"
        assert model.config.esm_name_or_path == str(tmp_path / layout)
        with torch.no_grad():
            hidden = model(**batch, output_hidden_states=True).hidden_states
        for ours, theirs in zip(hidden, expected, strict=True):
            torch.testing.assert_close(ours, theirs)


# --- saved models load anywhere, offline ------------------------------------------------------------------------

LOAD_EVERY_WAY = """
import json, sys, torch
from transformers import AutoConfig, AutoModel, AutoModelForSequenceClassification, AutoTokenizer, pipeline
path, proteins = sys.argv[1] if len(sys.argv) > 1 else {path!r}, {proteins!r}
config = AutoConfig.from_pretrained(path, trust_remote_code=True)
tokenizer = AutoTokenizer.from_pretrained(path, trust_remote_code=True)
results = {{"config": type(config).__name__, "tokenizer": type(tokenizer).__name__,
           "max_residues": tokenizer.max_residues, "crop": tokenizer.crop}}
batch = tokenizer(proteins, return_tensors="pt", padding=True)
for auto in (AutoModel, AutoModelForSequenceClassification):
    model = auto.from_pretrained(path, trust_remote_code=True).eval()
    assert type(model).__module__.startswith("transformers_modules"), type(model).__module__
    with torch.no_grad():
        results[auto.__name__] = model(**batch).logits.tolist()
results["model"] = type(model).__name__
classifier = pipeline("text-classification", model=path, trust_remote_code=True)
results["pipeline"] = classifier(proteins, top_k=None)
if {resave!r}:
    model.save_pretrained({resave!r})
    results["resaved_auto_map"] = json.load(open({resave!r} + "/config.json"))["auto_map"]
print(json.dumps(results))
"""


def load_every_way(path, tmp_path, cwd, resave=None):
    code = LOAD_EVERY_WAY.format(path=str(path), proteins=PROTEINS, resave=str(resave) if resave else None)
    return run_offline(code, cwd=cwd, tmp_path=tmp_path)


def test_saved_model_loads_offline_through_every_auto_class(tmp_path, elsewhere):
    model = tiny_model(pooling="attention", max_residues=200, crop="n_terminal")
    saved = save_model(model, tmp_path / "saved")
    expected = logits_of(model, tokenizer_for(model.config), PROTEINS)

    files = sorted(p.name for p in saved.iterdir())
    for name in ("config.json", "model.safetensors", "configuration_esmloc.py", "modeling_esmloc.py",
                 "tokenization_esmloc.py", "tokenizer_config.json", "vocab.txt"):
        assert name in files
    assert not [name for name in files if name.endswith((".bin", ".pt", ".pth", ".pkl", ".ckpt"))]
    assert json.loads((saved / "config.json").read_text())["auto_map"] == {
        "AutoConfig": "configuration_esmloc.EsmLocConfig",
        "AutoModel": "modeling_esmloc.EsmForLocalization",
        "AutoModelForSequenceClassification": "modeling_esmloc.EsmForLocalization",
    }

    loaded = load_every_way(saved, tmp_path, cwd=elsewhere)
    assert (loaded["config"], loaded["tokenizer"], loaded["model"]) == (
        "EsmLocConfig", "EsmLocTokenizer", "EsmForLocalization"
    )
    assert (loaded["max_residues"], loaded["crop"]) == (200, "n_terminal")
    for auto in ("AutoModel", "AutoModelForSequenceClassification"):
        torch.testing.assert_close(torch.tensor(loaded[auto]), expected)
    probabilities = torch.softmax(expected, dim=-1)
    for scores, expected_probabilities in zip(loaded["pipeline"], probabilities, strict=True):
        by_label = {item["label"]: item["score"] for item in scores}
        assert by_label["Mitochondrion"] == pytest.approx(expected_probabilities[1].item(), abs=1e-5)
        assert by_label["Other"] == pytest.approx(expected_probabilities[0].item(), abs=1e-5)


def test_resaved_model_keeps_local_auto_map_and_loads_offline(tmp_path, elsewhere):
    model = tiny_model()
    # As after a load from a hub repo: transformers prefixes auto_map entries with "repo--".
    model.config.auto_map = {key: f"someone/repo--{value}" for key, value in model.config.auto_map.items()}
    saved = save_model(model, tmp_path / "saved")
    assert "--" not in json.dumps(json.loads((saved / "config.json").read_text())["auto_map"])

    first = load_every_way(saved, tmp_path, cwd=elsewhere, resave=tmp_path / "resaved")
    assert "--" not in json.dumps(first["resaved_auto_map"])
    resaved = tmp_path / "resaved"
    save_model(EsmForLocalization.from_pretrained(resaved), resaved)  # tokenizer files as before
    second = load_every_way(resaved, tmp_path, cwd=elsewhere)
    assert second["AutoModel"] == first["AutoModel"]


# The tokenizer files as esmloc 0.1.0 wrote them (before the tokenizer took its vocabulary from transformers).
PREVIOUS_TOKENIZER_CONFIG = {
    "added_tokens_decoder": {
        str(index): {"content": token, "lstrip": False, "normalized": False, "rstrip": False, "single_word": False,
                     "special": True}
        for index, token in ((0, "<cls>"), (1, "<pad>"), (2, "<eos>"), (3, "<unk>"), (32, "<mask>"))
    },
    "auto_map": {"AutoTokenizer": ["tokenization_esmloc.EsmLocTokenizer", None]},
    "backend": "custom",
    "cls_token": "<cls>",
    "crop": "n_terminal",
    "eos_token": "<eos>",
    "mask_token": "<mask>",
    "max_residues": 200,
    "model_max_length": 202,
    "pad_token": "<pad>",
    "tokenizer_class": "EsmLocTokenizer",
    "unk_token": "<unk>",
}
PREVIOUS_VOCAB = ("<cls>\n<pad>\n<eos>\n<unk>\nL\nA\nG\nV\nS\nE\nR\nT\nI\nD\nP\nK\nQ\nN\nF\nY\nM\nH\nW\nC\nX\nB\nU\nZ\n"
                  "O\n.\n-\n<null_1>\n<mask>")


def test_model_saved_in_the_previous_layout_loads(tmp_path, elsewhere):
    model = tiny_model(max_residues=200, crop="n_terminal")
    saved = save_model(model, tmp_path / "saved")
    (saved / "tokenizer_config.json").write_text(json.dumps(PREVIOUS_TOKENIZER_CONFIG, indent=2))
    (saved / "vocab.txt").write_text(PREVIOUS_VOCAB)
    expected = logits_of(model, tokenizer_for(model.config), PROTEINS)

    tokenizer = EsmLocTokenizer.from_pretrained(saved)
    assert (tokenizer.max_residues, tokenizer.crop) == (200, "n_terminal")
    assert tokenizer(PROTEINS)["input_ids"] == tokenizer_for(model.config)(PROTEINS)["input_ids"]
    loaded = load_every_way(saved, tmp_path, cwd=elsewhere)  # a fresh process, offline, through trust_remote_code
    assert (loaded["tokenizer"], loaded["max_residues"], loaded["crop"]) == ("EsmLocTokenizer", 200, "n_terminal")
    torch.testing.assert_close(torch.tensor(loaded["AutoModel"]), expected)


def test_esmloc_export_is_a_deprecated_alias_of_esmloc_saving(monkeypatch):
    import importlib
    import sys

    from esmloc import saving

    monkeypatch.delitem(sys.modules, "esmloc.export", raising=False)
    with pytest.warns(DeprecationWarning, match="esmloc.saving"):
        export = importlib.import_module("esmloc.export")
    assert (export.save_model, export.tokenizer_for, export.crop_mismatch) == (
        saving.save_model, saving.tokenizer_for, saving.crop_mismatch)


def test_save_model_refuses_a_tokenizer_that_crops_differently(tmp_path):
    model = tiny_model(max_residues=100)
    with pytest.raises(ValueError, match="crops"):
        save_model(model, tmp_path / "saved", tokenizer=EsmLocTokenizer(max_residues=1022))
    assert not (tmp_path / "saved").exists()


def test_init_and_local_loading_never_touch_the_network(tmp_path, monkeypatch):
    import socket

    def no_network(*args, **kwargs):
        raise AssertionError("network access attempted")

    saved = save_model(tiny_model(), tmp_path / "saved")
    monkeypatch.setattr(socket.socket, "connect", no_network)
    monkeypatch.setattr(socket, "create_connection", no_network)
    EsmForLocalization(EsmLocConfig())
    EsmForLocalization.from_pretrained(saved)
