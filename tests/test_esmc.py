"""ESM C backbones (issue 26): every esmloc path on a tiny random ESM C saved to disk here (no hub), as on ESM-2.

One module-scoped ESM C checkpoint (an `EsmcForMaskedLM`, with a README.md declaring a licence) and one trained on it
per fine-tuning mode serve the tests; what each test proves is in its name and first line."""

import csv
import json
import random
import re
import subprocess
import sys
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch
from transformers import AutoConfig, EsmcConfig, EsmcForMaskedLM, EsmcModel, EsmcTokenizer, EsmConfig

from configuration_esmloc import ESMC_ARCHITECTURES, EsmLocConfig, backbone_config, backbone_family
from esmloc import finetuning, varlen_attention, varlen_esm
from esmloc.card import UNKNOWN_LICENSE, render_model_card
from esmloc.demo import write_demo_csv
from esmloc.engine import Engine
from esmloc.errors import InputError
from esmloc.saving import save_model, tokenizer_for
from modeling_esmloc import EsmForLocalization
from tokenization_esmloc import RESIDUES, EsmLocTokenizer

from conftest import (PROTEINS, REPO, assert_same_predictions, distributed_failure, run_offline, run_train, train_env,
                      two_processes, write_proteins)


LICENSE = {"license": "other", "license_name": "test-esmc-licence", "license_link": "https://example.org/licence"}
PROTEINS_UPPER = [p.upper() for p in PROTEINS]


def esmc_config() -> EsmcConfig:
    return backbone_config("esmc_tiny")


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory) -> Path:
    """A stock ESM C masked-language model (random weights) as a hub repository holds one, with a README.md whose
    metadata declares a licence."""
    path = tmp_path_factory.mktemp("esmc_checkpoint")
    torch.manual_seed(0)
    EsmcForMaskedLM(esmc_config()).save_pretrained(path)
    EsmcTokenizer().save_pretrained(path)
    front = "\n".join(f"{key}: {value}" for key, value in LICENSE.items())
    (path / "README.md").write_text(f"---\n{front}\n---\n\n# a tiny random ESM C\n")
    return path


@pytest.fixture(scope="module")
def trained(tmp_path_factory, checkpoint) -> dict[str, Path]:
    """train.py --model_name_or_path CHECKPOINT once per fine-tuning mode (frozen with cached features, LoRA, full)."""
    root = tmp_path_factory.mktemp("esmc_runs")
    data = write_demo_csv(root / "demo.csv", n_rows=160)
    out = {}
    for mode, pooling in (("frozen", "mean"), ("lora", "attention"), ("full", "cls")):
        out[mode] = root / mode
        run_train(["--model_name_or_path", str(checkpoint), "--train_file", str(data), "--finetune", mode,
                   "--pooling", pooling, "--max_residues", "64", "--num_train_epochs", "1",
                   "--per_device_train_batch_size", "16", "--num_examples_to_show", "0", "--output_dir",
                   str(out[mode])], cwd=root, env=train_env(HF_HOME=str(root / "hf_home")))
    return out


def test_backbone_family_is_decided_from_the_model_type_in_one_place():
    assert backbone_family(esmc_config()) == backbone_family({"model_type": "esmc"}) == "esmc"
    assert backbone_family(EsmConfig(vocab_size=33)) == backbone_family({}) == "esm2"
    assert backbone_family(EsmLocConfig(esm_config="esmc_tiny")) == "esmc"
    assert type(EsmLocConfig(esm_config=esmc_config().to_dict()).esm_config) is EsmcConfig
    with pytest.raises(ValueError, match="not model_type 'bert'"):
        backbone_family({"model_type": "bert"})


def test_from_esm_loads_the_esmc_checkpoint_weights_and_its_declared_licence(checkpoint, tmp_path):
    """The bug on main: from_esm on an ESM C checkpoint built a random ESM-2."""
    model = EsmForLocalization.from_esm(str(checkpoint))
    assert isinstance(model.esm, EsmcModel)
    stock = EsmcForMaskedLM.from_pretrained(checkpoint).esmc.state_dict()
    ours = model.esm.state_dict()
    assert ours.keys() == stock.keys()
    assert all(torch.equal(ours[key], stock[key]) for key in stock)
    assert model.config.backbone_license == LICENSE
    bare = tmp_path / "bare"
    EsmcModel(esmc_config()).save_pretrained(bare)  # no README: nothing declared, nothing guessed
    assert EsmForLocalization.from_esm(str(bare)).config.backbone_license is None


def test_the_esmloc_tokenizer_gives_esmc_tokenizer_ids_after_normalising_and_cropping():
    stock = EsmcTokenizer()
    ours = EsmLocTokenizer(backbone_family="esmc", max_residues=150)
    rng = random.Random(0)
    rare = "XBUZO"
    sequences = ["".join(rng.choice(RESIDUES + rare * 3) for _ in range(rng.randint(1, 400))) for _ in range(300)]
    sequences += [rare, "mktayiak", " MKT AYI*"]
    expected = stock([ours.normalize_and_crop(s) for s in sequences])["input_ids"]
    assert ours(sequences)["input_ids"] == expected
    assert max(len(ids) for ids in expected) == 152  # cropped to max_residues (+ <cls>, <eos>)
    assert ours.convert_tokens_to_ids("<mask>") == stock.mask_token_id
    with pytest.raises(ValueError, match="not a residue"):
        ours("MK|TA")  # ESM C's chain break is not a residue


@pytest.mark.parametrize("pooling", ["cls", "mean", "attention"])
def test_a_saved_esmc_model_loads_offline_with_automodel_and_the_pipeline(checkpoint, tmp_path, pooling):
    torch.manual_seed(1)
    model = EsmForLocalization.from_esm(str(checkpoint), pooling=pooling).eval()
    for parameter in model.classifier.parameters():
        torch.nn.init.normal_(parameter, std=0.5)
    save_model(model, tmp_path / "model")
    tokenizer = tokenizer_for(model.config)
    with torch.no_grad():
        logits = model(**tokenizer(PROTEINS, padding=True, return_tensors="pt")).logits
    result = run_offline(f"""
import json, torch
from transformers import AutoModel, AutoTokenizer, pipeline
path = {str(tmp_path / "model")!r}
model = AutoModel.from_pretrained(path, trust_remote_code=True).eval()
tokenizer = AutoTokenizer.from_pretrained(path, trust_remote_code=True)
with torch.no_grad():
    logits = model(**tokenizer({PROTEINS!r}, padding=True, return_tensors="pt")).logits
scores = pipeline("text-classification", model=path, trust_remote_code=True)({PROTEINS!r}, top_k=None)
print(json.dumps({{"logits": logits.tolist(), "backbone": type(model.esm).__name__,
                   "family": tokenizer.backbone_family, "scores": scores}}))
""", cwd=tmp_path, tmp_path=tmp_path)
    assert result["backbone"] == "EsmcModel" and result["family"] == "esmc"
    np.testing.assert_allclose(result["logits"], logits.numpy(), atol=1e-5)
    probabilities = torch.softmax(logits, -1).numpy()
    for row, scores in zip(probabilities, result["scores"], strict=True):
        assert {s["label"]: s["score"] for s in scores} == pytest.approx(dict(zip(("Other", "Mitochondrion"), row)),
                                                                         abs=1e-5)


def esmc_model(pooling="mean", seed=0, max_residues=300) -> EsmForLocalization:
    torch.manual_seed(seed)
    return EsmForLocalization(EsmLocConfig(esm_config="esmc_tiny", pooling=pooling, max_residues=max_residues)).eval()


def test_the_engine_runs_esmc_padding_free_as_its_own_padded_forward():
    model = esmc_model()
    tokenizer = tokenizer_for(model.config)
    rng = random.Random(1)
    sequences = PROTEINS_UPPER + ["".join(rng.choice(RESIDUES) for _ in range(rng.randint(3, 300))) for _ in range(30)]
    engine = Engine(model, tokenizer, progress=False)
    assert engine.packed is not None and engine.attention_mode() == "grouped"  # padding-free, not the fallback
    residues = engine.embed(sequences, "residues")
    with torch.no_grad():
        for sequence, states in zip(sequences, residues, strict=True):
            ids = tokenizer([sequence], return_tensors="pt")
            reference = model.esm(**ids).last_hidden_state[0, 1:-1]  # one protein alone: positions from 0
            np.testing.assert_allclose(states, reference.numpy(), atol=1e-5)
        batch = tokenizer(sequences, padding=True, return_tensors="pt")
        probabilities = torch.softmax(model(**batch).logits, -1).numpy()
    np.testing.assert_allclose(engine.predict_probabilities(sequences), probabilities, atol=1e-5)
    fp32 = engine.embed(sequences, "mean")
    for precision, tolerance in (("bf16", 0.1), ("int8", 0.2)):
        lower = Engine(model, tokenizer, progress=False, precision=precision).embed(sequences, "mean")
        assert 0 < np.abs(lower - fp32).max() < tolerance, precision


def test_the_esmc_parity_check_fails_when_proteins_of_a_flattened_batch_see_each_other(monkeypatch):
    """The self-check can fail: attention over the whole flattened row (proteins attending to each other, what a
    transformers release that dropped esmloc's attention keyword would give) makes the engine fall back to the padded
    forward. (Positions running on across proteins would not: rotary attention within a protein depends on position
    differences only, so restarting them matters for the padded fallback's equality, not for the result.)"""
    def whole_row(self, query, key, value, scaling):
        return torch.nn.functional.scaled_dot_product_attention(query, key, value, scale=scaling).transpose(1, 2)

    monkeypatch.setattr(varlen_esm, "_PARITY_OK", None)
    monkeypatch.setattr(varlen_attention.VarlenPlan, "attend", whole_row)
    with pytest.warns(RuntimeWarning, match="padding-free esmc path differs from EsmcModel.forward"):
        assert not varlen_esm.parity_check("esmc")
    model = esmc_model()
    assert Engine(model, tokenizer_for(model.config), progress=False).packed is None
    monkeypatch.undo()
    monkeypatch.setattr(varlen_esm, "_PARITY_OK", None)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert varlen_esm.parity_check("esmc")


def test_lora_targets_esmc_projections_and_refuses_names_it_lacks():
    model = esmc_model()

    class Args:
        finetune, lora_r, lora_alpha, lora_dropout, lora_target_modules = "lora", 4, 8, 0.0, None

    wrapped = finetuning.prepare_finetuning(model, Args)
    assert Args.lora_target_modules == finetuning.LORA_TARGET_MODULES["esmc"]
    adapted = {name.split(".lora_A")[0].split(".")[-1] for name, _ in wrapped.named_parameters() if "lora_A" in name}
    assert adapted == {"q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"}
    Args.lora_target_modules = ["query", "key", "value", "dense"]  # ESM-2's names
    with pytest.raises(InputError, match="no such module in this esmc backbone"):
        finetuning.prepare_finetuning(esmc_model(), Args)


def test_train_on_an_esmc_checkpoint_frozen_lora_and_full(trained, checkpoint):
    stock = EsmcForMaskedLM.from_pretrained(checkpoint).esmc.state_dict()
    for mode, path in trained.items():
        config = json.loads((path / "config.json").read_text())
        assert config["esm_config"]["model_type"] == "esmc" and config["backbone_license"] == LICENSE
        assert json.loads((path / "tokenizer_config.json").read_text())["backbone_family"] == "esmc"
        assert "test_mcc" in json.loads((path / "test_results.json").read_text())
        backbone = EsmForLocalization.from_pretrained(path).esm.state_dict()
        changed = any(not torch.equal(backbone[key], stock[key]) for key in stock)
        assert changed == (mode != "frozen"), mode  # LoRA merged into the weights, full trained them
    run_info = json.loads((trained["lora"] / "run_info.json").read_text())
    assert run_info["model"]["lora_target_modules"] == finetuning.LORA_TARGET_MODULES["esmc"]
    adapter = json.loads((trained["lora"] / "adapter" / "adapter_config.json").read_text())
    assert set(adapter["target_modules"]) == set(finetuning.LORA_TARGET_MODULES["esmc"])


def test_the_card_names_esmc_and_the_licence_its_checkpoint_declares(trained, checkpoint, tmp_path):
    card = (trained["frozen"] / "README.md").read_text()
    assert "| Backbone | ESM C; licence: [test-esmc-licence](https://example.org/licence)" in card
    assert "license: other\n" in card and "license_name: test-esmc-licence" in card and "- esmc\n" in card
    assert "ESM-2 encoder" not in card and "ESM C encoder" in card
    model = EsmForLocalization.from_esm(str(checkpoint))
    model.config.backbone_license = None  # a checkpoint that declares nothing
    save_model(model, tmp_path / "undeclared")
    text = str(render_model_card(tmp_path / "undeclared"))
    assert f"ESM C; licence: {UNKNOWN_LICENSE}" in text and "license: other" in text
    assert "license: apache-2.0" in str(render_model_card(tmp_path / "undeclared", license="apache-2.0"))


def run_cli(*argv, cwd) -> subprocess.CompletedProcess:
    result = subprocess.run([sys.executable, "-m", *argv], cwd=cwd, env=train_env(), capture_output=True, text=True,
                            timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    return result


def test_predict_explain_embed_and_the_demo_on_esmc(trained, checkpoint, tmp_path):
    from esmloc.webapp import DemoModel

    fasta = tmp_path / "p.fasta"
    fasta.write_text("".join(f">P{i}\n{sequence}\n" for i, sequence in enumerate(PROTEINS)))
    model_dir = trained["lora"]
    run_cli("esmloc.commands.predict", str(model_dir), str(fasta), "-o", str(tmp_path / "pred.csv"), "--explain",
            str(tmp_path / "explained"), "--no_progress", cwd=tmp_path)
    with open(tmp_path / "pred.csv") as handle:
        predicted = np.array([float(row["probability_Mitochondrion"]) for row in csv.DictReader(handle)])
    model = EsmForLocalization.from_pretrained(model_dir).eval()
    tokenizer = EsmLocTokenizer.from_pretrained(model_dir)
    with torch.no_grad():
        logits = model(**tokenizer(PROTEINS, padding=True, return_tensors="pt")).logits
    np.testing.assert_allclose(predicted, torch.softmax(logits, -1)[:, 1].numpy(), atol=1e-5)
    with open(tmp_path / "explained" / "explanations.csv") as handle:
        assert {row["ACC"] for row in csv.DictReader(handle)} == {f"P{i}" for i in range(len(PROTEINS))}
    demo_probabilities, _ = DemoModel(model_dir).predict([(f"P{i}", s) for i, s in enumerate(PROTEINS)])
    np.testing.assert_allclose(np.asarray(demo_probabilities)[:, 1], predicted, atol=1e-5)
    # esmloc-embed on the stock checkpoint (the large-job path): EsmcModel's own mean over residues.
    import pandas

    run_cli("esmloc.commands.embed", str(checkpoint), str(fasta), "-o", str(tmp_path / "e.parquet"), cwd=tmp_path)
    embeddings = np.stack(pandas.read_parquet(tmp_path / "e.parquet")["embedding"].to_numpy())
    stock = EsmcModel.from_pretrained(checkpoint).eval()
    ids = EsmcTokenizer()([p.upper() for p in PROTEINS], padding=True, return_tensors="pt")
    with torch.no_grad():
        hidden = stock(**ids).last_hidden_state
    for row, (states, mask) in enumerate(zip(hidden, ids["attention_mask"], strict=True)):
        np.testing.assert_allclose(embeddings[row], states[1:int(mask.sum()) - 1].mean(0).numpy(), atol=1e-5)


@pytest.mark.slow
def test_two_processes_predict_with_an_esmc_model_what_one_process_predicts(trained, tmp_path):
    """The large-job path (torchrun, parts dealt out by tokens, merged in input order) on an ESM C LoRA model."""
    proteins = write_proteins(tmp_path / "proteins.fasta", n=60, seed=3)
    one, two = tmp_path / "one.csv", tmp_path / "two.csv"
    run_cli("esmloc.commands.predict", str(trained["lora"]), str(proteins), "-o", str(one), "--no_progress",
            cwd=tmp_path)
    result = two_processes("torchrun", "esmloc.commands.predict", [trained["lora"], proteins, "-o", two,
                                                                  "--no_progress", "--chunk_size", "8"], cwd=tmp_path)
    assert result.returncode == 0, distributed_failure(result)
    shares = [int(parts) for parts in re.findall(r"process \d: (\d+) parts", result.stdout + result.stderr)]
    assert len(shares) == 2 and min(shares) >= 1  # both processes worked
    assert_same_predictions(two, one)


def test_pretrain_esmc_from_scratch_and_continued_then_train_on_it(tmp_path):
    fasta = tmp_path / "p.fasta"
    rng = random.Random(2)
    fasta.write_text("".join(f">S{i}\n{''.join(rng.choice(RESIDUES[:20]) for _ in range(60))}\n" for i in range(40)))
    common = ["--train_files", str(fasta), "--max_residues", "64", "--max_steps", "2", "--per_device_train_batch_size",
              "8"]
    run_cli("esmloc.commands.pretrain", "--from_scratch", "esmc_tiny", "--output_dir", str(tmp_path / "scratch"),
            *common, cwd=tmp_path)
    assert AutoConfig.from_pretrained(tmp_path / "scratch").architectures == ["EsmcForMaskedLM"]
    run_cli("esmloc.commands.pretrain", "--model_name_or_path", str(tmp_path / "scratch"), "--output_dir",
            str(tmp_path / "continued"), *common, cwd=tmp_path)
    before = EsmcForMaskedLM.from_pretrained(tmp_path / "scratch").state_dict()
    after = EsmcForMaskedLM.from_pretrained(tmp_path / "continued").state_dict()
    assert any(not torch.equal(before[key], after[key]) for key in before)  # it trained on
    assert isinstance(EsmForLocalization.from_esm(str(tmp_path / "continued")).esm, EsmcModel)


def test_esmc_architectures_build_and_the_readme_names_them():
    assert set(ESMC_ARCHITECTURES) == {"esmc_tiny", "esmc_300m", "esmc_600m"}
    with torch.device("meta"):  # sizes only, no memory
        sizes = {name: sum(p.numel() for p in EsmcModel(backbone_config(name)).parameters())
                 for name in ("esmc_300m", "esmc_600m")}
    assert 2.5e8 < sizes["esmc_300m"] < 3.6e8 and 5.0e8 < sizes["esmc_600m"] < 6.5e8
    readme = (REPO / "README.md").read_text()
    assert "## Backbones" in readme and "esmc_300m" in readme and "esmc_600m" in readme
