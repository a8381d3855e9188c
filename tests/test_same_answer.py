"""Same model, same answer on every path (issue 22): a trained binary and a trained multi-label model label 200
proteins through the pipeline of the README's first example (remote code, a fresh offline process), the Auto classes
with `predict_labels` (likewise), esmloc-predict, the demo (`DemoModel.api_rows`) and the rule the model card states:
the same labels, probabilities within 1e-5. And what is not a protein is refused on every path that takes raw text,
with the normalisations esmloc-predict applies."""

import csv
import json
import os
import re
import string
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from configuration_esmloc import AUTO_MAP
from esmloc import engine, loading, task
from esmloc.card import write_model_card
from esmloc.demo import demo_rows, write_demo_csv
from esmloc.saving import save_model, tokenizer_for
from esmloc.sequences import SequenceError, validate_sequence
from esmloc.webapp import DEFAULT_LIMITS, DemoModel, parse_proteins
from tokenization_esmloc import EsmLocTokenizer

from conftest import REPO, run_offline, tiny_model, write_deeploc_layout_csv


README_PROTEIN = "MLRTSSLFTRRVQPSLFSRNILRLQSTAAIPKAGLEVSSGK"  # the README's first example
# A tiny frozen backbone: a high learning rate and a few epochs (cheap on cached features) spread the probabilities.
TRAIN = ["--from_scratch", "tiny", "--num_train_epochs", "4", "--learning_rate", "0.05",
         "--per_device_train_batch_size", "16", "--max_residues", "200", "--num_examples_to_show", "0"]


def messy(index: int, sequence: str) -> str:
    """The sequence as users write it, by index: lower case, whitespace inside, a trailing stop codon `*`."""
    if index % 5 == 1:
        sequence = sequence.lower()
    if index % 7 == 2:
        sequence = f"{sequence[:10]} \t{sequence[10:20]}  {sequence[20:]}"
    if index % 3 == 0:
        sequence += "*"
    return sequence


@pytest.fixture(scope="module")
def proteins() -> list[str]:
    """200 raw protein texts: the README's protein, then 199 synthetic ones (a few longer than the models' 200
    residues, so cropping is on the path too), many written messily."""
    sequences = [README_PROTEIN] + [row["Sequence"] for row in demo_rows(199, seed=7)]
    assert sum(len(sequence) > 200 for sequence in sequences) > 10
    return [messy(index, sequence) for index, sequence in enumerate(sequences)]


def train(arguments: list[str], workdir: Path) -> Path:
    output_dir = workdir / "model"
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "HF_HOME": str(workdir / "hf_home"),
           "PYTHONPATH": "", "OMP_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false"}
    env.pop("WORLD_SIZE", None)
    result = subprocess.run([sys.executable, str(REPO / "train.py"), *arguments, "--output_dir", str(output_dir),
                             *TRAIN], cwd=workdir, env=env, capture_output=True, text=True, timeout=900)
    assert result.returncode == 0, result.stderr[-3000:]
    return output_dir


def esmloc_predict(model_dir: Path, proteins: list[str], workdir: Path) -> tuple[list[dict], str]:
    """esmloc-predict's rows for the raw proteins (a CSV keeps every raw text as it is: case, spaces, `*`), and its
    log."""
    table, output = workdir / "proteins.csv", workdir / "predictions.csv"
    with table.open("w", newline="") as handle:
        csv.writer(handle).writerows([("ACC", "Sequence")] + [(f"P{i:03d}", p) for i, p in enumerate(proteins)])
    result = subprocess.run([sys.executable, "-m", "esmloc.commands.predict", str(model_dir), str(table), "-o", str(output),
                             "--no_progress"], cwd=workdir, capture_output=True, text=True, timeout=600,
                            env={**os.environ, "HF_HUB_OFFLINE": "1"})
    assert result.returncode == 0, result.stderr[-3000:]
    with output.open(newline="") as handle:
        return list(csv.DictReader(handle)), result.stderr


def probabilities_of(model_dir: Path, proteins: list[str]) -> np.ndarray:
    """The probabilities esmloc computes for the proteins (in-process, to place the thresholds)."""
    model, tokenizer = loading.load_model_dir(model_dir)
    return engine.predict_probabilities(model, tokenizer, [validate_sequence(p)[0] for p in proteins], progress=False)


def spread_thresholds(probabilities: np.ndarray, count: int = 15) -> list[float]:
    """Per label (column), a threshold with `count` or more proteins between it and 0.5, which therefore get another
    label from it than from argmax / 0.5. Each lies at the midpoint of the widest gap between neighbouring
    probabilities near there, so that differences of 1e-6 between the paths' arithmetic cannot flip a label."""
    thresholds = []
    for column in probabilities.T:
        ordered = np.sort(column)
        above = ordered[ordered >= 0.5]
        side = above if len(above) >= 3 * count else ordered[ordered < 0.5][::-1]  # moving away from 0.5
        gaps = np.abs(np.diff(side[count:3 * count]))
        best = count + int(np.argmax(gaps))
        assert gaps.max() > 1e-4, "the proteins' probabilities are too close together to place a threshold"
        thresholds.append(float((side[best] + side[best + 1]) / 2))
    return thresholds


def set_thresholds(model_dir: Path, thresholds, results_keys: list[str]) -> None:
    """Checks that train.py stored its tuned thresholds in config.json, then replaces them (and renders the card
    again) with thresholds that put many of the 200 proteins between them and 0.5."""
    config_path = model_dir / "config.json"
    config = json.loads(config_path.read_text())
    results = json.loads((model_dir / "test_results.json").read_text())
    tuned = [results[key] for key in results_keys]
    assert np.atleast_1d(config["decision_thresholds"]).tolist() == tuned
    config["decision_thresholds"] = thresholds
    config_path.write_text(json.dumps(config, indent=2))
    write_model_card(model_dir)


def readme_example() -> str:
    """The README's first code block, the pipeline example, with its last line's value kept as `readme_result`."""
    code = re.search(r"```python\n(.*?)```", (REPO / "README.md").read_text(), re.DOTALL).group(1)
    lines = code.strip().splitlines()
    call = lines[-1].split("#")[0].strip()
    assert call.startswith("print(classifier(") and 'model="esmloc_output"' in code  # the folder the README's start saves
    return "\n".join(lines[:-1] + ["readme_result = " + call.removeprefix("print(")[:-1]])


EVERY_REMOTE_PATH = """
import json, sys, torch
from transformers import AutoModelForSequenceClassification, AutoTokenizer
{readme}
proteins = json.load(open({proteins_file!r}))
model = AutoModelForSequenceClassification.from_pretrained({path!r}, trust_remote_code=True).eval()
tokenizer = AutoTokenizer.from_pretrained({path!r}, trust_remote_code=True)
with torch.no_grad():
    logits = model(**tokenizer(proteins, padding=True, return_tensors="pt")).logits
print(json.dumps({{
    "modules": [type(model).__module__, type(classifier).__module__, type(classifier).__name__],
    "readme": readme_result,
    "pipeline": classifier(proteins),
    "pipeline_scores": classifier(proteins, top_k=None),
    "predict_labels": model.predict_labels(logits),
    "probabilities": model.probabilities(logits).tolist(),
}}))
"""


def remote_paths(model_dir: Path, proteins: list[str], tmp_path: Path, elsewhere: Path) -> dict:
    """The README's pipeline and the Auto classes + `predict_labels`, in a fresh offline process that imports nothing
    of esmloc (only the model directory's own code runs)."""
    proteins_file = tmp_path / "proteins.json"
    proteins_file.write_text(json.dumps(proteins))
    readme = readme_example().replace('"esmloc_output"', repr(str(model_dir)))
    code = EVERY_REMOTE_PATH.format(readme=readme, proteins_file=str(proteins_file), path=str(model_dir))
    result = run_offline(code, cwd=elsewhere, tmp_path=tmp_path)
    assert all(module.startswith("transformers_modules") for module in result["modules"][:2]), result["modules"]
    assert result["modules"][2] == "EsmLocClassificationPipeline"
    return result


def demo_rows_of(model_dir: Path, proteins: list[str]) -> list[dict]:
    """The demo's API answer, pasted as raw sequences, one request of at most DEFAULT_LIMITS.max_sequences proteins at a time."""
    demo = DemoModel(model_dir)
    rows = []
    step = DEFAULT_LIMITS.max_sequences
    for start in range(0, len(proteins), step):
        rows += demo.api_rows(parse_proteins("\n".join(proteins[start:start + step])))
    return rows


def card_thresholds(model_dir: Path, names: list[str], multi_label: bool) -> list[float]:
    """The thresholds of the rule the model card states, read from the card's text."""
    card = (model_dir / "README.md").read_text()
    if multi_label:
        stated = dict(re.findall(r"`([^`]+)` ≥ `([0-9.e-]+)`", card))
        return [float(stated[name]) for name in names]
    return [float(re.search(rf"`{names[1]}` is predicted when its probability is at least `([0-9.e-]+)`",
                            card).group(1))]


def card_rule(probabilities: np.ndarray, names: list[str], thresholds: list[float], multi_label: bool) -> list[str]:
    """The card's words as code: at least the threshold."""
    if multi_label:
        return [";".join(name for name, p, t in zip(names, row, thresholds) if p >= t) for row in probabilities]
    return [names[1] if row[1] >= thresholds[0] else names[0] for row in probabilities]


def assert_every_path_agrees(model_dir: Path, proteins: list[str], tmp_path: Path, elsewhere: Path) -> dict:
    """Runs every path on the proteins and checks that labels are equal and probabilities within 1e-5; returns the
    agreement table (path -> proteins labelled as esmloc-predict does)."""
    config = json.loads((model_dir / "config.json").read_text())
    names, multi_label = task.label_names(config), task.is_multi_label(config)
    label_column = "predicted_labels" if multi_label else "predicted_label"
    rows, log = esmloc_predict(model_dir, proteins, tmp_path)
    reference = np.array([[float(row[f"probability_{name}"]) for name in names] for row in rows])
    expected = [row[label_column] for row in rows]
    remote = remote_paths(model_dir, proteins, tmp_path, elsewhere)
    demo = demo_rows_of(model_dir, proteins)

    stated = card_thresholds(model_dir, names, multi_label)
    assert stated == np.atleast_1d(config["decision_thresholds"]).tolist()  # every digit: rounded, some labels differ

    def joined(labels):
        return ";".join(labels) if multi_label else labels

    labels = {
        "pipeline": [joined([item["label"] for item in answer]) if multi_label else answer["label"]
                     for answer in remote["pipeline"]],
        "predict_labels": [joined(labels) for labels in remote["predict_labels"]],
        "esmloc-predict": expected,
        "demo": [row[label_column] for row in demo],
        "model card": card_rule(reference, names, stated, multi_label),
    }
    probabilities = {
        "pipeline, top_k=None": np.array([[{item["label"]: item["score"] for item in scores}[name] for name in names]
                                          for scores in remote["pipeline_scores"]]),
        "probabilities": np.array(remote["probabilities"]),
        "demo": np.array([[row[f"probability_{name}"] for name in names] for row in demo]),
    }
    table = {}
    for path, found in labels.items():
        table[path] = sum(a == b for a, b in zip(found, expected, strict=True))
        assert found == expected, f"{path}: {[(i, a, b) for i, (a, b) in enumerate(zip(found, expected)) if a != b]}"
    for path, found in probabilities.items():
        np.testing.assert_allclose(found, reference, atol=1e-5, err_msg=path)
    # The pipeline's score is the probability of each label it gives.
    for answer, row in zip(remote["pipeline"], reference):
        for item in answer if multi_label else [answer]:
            assert item["score"] == pytest.approx(row[names.index(item["label"])], abs=1e-5)
    assert "decision_thresholds of the model's config.json" in log  # esmloc-predict's threshold came from there
    # The test can fail: many proteins get another label from the stored thresholds than from 0.5 (argmax).
    at_half = task.predicted(reference, names, multi_label)
    table["labelled otherwise at 0.5"] = sum(a != b for a, b in zip(at_half, expected))
    assert table["labelled otherwise at 0.5"] >= 10
    return {"labels": table, "readme": remote["readme"], "rows": rows}


def test_a_binary_model_gives_the_same_answer_on_every_path(proteins, tmp_path_factory, tmp_path, elsewhere):
    workdir = tmp_path_factory.mktemp("binary")
    model_dir = train(["--train_file", str(write_demo_csv(workdir / "proteins.csv", n_rows=120, seed=3))], workdir)
    threshold = spread_thresholds(probabilities_of(model_dir, proteins)[:, 1:])[0]
    set_thresholds(model_dir, threshold, ["test_threshold_tuned"])

    answer = assert_every_path_agrees(model_dir, proteins, tmp_path, elsewhere)
    print("binary, proteins labelled as esmloc-predict does, of 200:", answer["labels"])
    assert {row["predicted_label"] for row in answer["rows"]} == {"Other", "Mitochondrion"}
    # The README's first example gives the label the model card promises for its protein (the first one).
    label = answer["rows"][0]["predicted_label"]
    probability = float(answer["rows"][0][f"probability_{label}"])
    assert answer["readme"] == [{"label": label, "score": pytest.approx(probability, abs=1e-5)}]


def test_a_multi_label_model_gives_the_same_answer_on_every_path(proteins, tmp_path_factory, tmp_path, elsewhere):
    from esmloc.data import LOCATIONS

    workdir = tmp_path_factory.mktemp("multi_label")
    data = write_deeploc_layout_csv(workdir / "deeploc.csv", n_rows=200, seed=5)
    model_dir = train(["--dataset_config", "deeploc", "--train_file", str(data), "--split_method", "partition",
                       "--validation_partitions", "3", "--test_partitions", "4"], workdir)
    set_thresholds(model_dir, spread_thresholds(probabilities_of(model_dir, proteins)),
                   task.tuned_threshold_keys(list(LOCATIONS), multi_label=True))

    answer = assert_every_path_agrees(model_dir, proteins, tmp_path, elsewhere)
    print("multi-label, proteins labelled as esmloc-predict does, of 200:", answer["labels"])
    assert len({row["predicted_labels"] for row in answer["rows"]}) > 5


# --- a model saved again, copied elsewhere ---------------------------------------------------------------------------

# What every saved config.json names as its pipeline: local code only (no "repo--" prefix that reaches the network).
CUSTOM_PIPELINES = {"text-classification": {"impl": "modeling_esmloc.EsmLocClassificationPipeline",
                                            "pt": ["AutoModelForSequenceClassification"], "type": "text"}}
RESAVE_AND_COPY = """
import json, shutil
from transformers import AutoModelForSequenceClassification, AutoTokenizer, pipeline
model = AutoModelForSequenceClassification.from_pretrained({saved!r}, trust_remote_code=True)
model.save_pretrained({resaved!r})
AutoTokenizer.from_pretrained({saved!r}, trust_remote_code=True).save_pretrained({resaved!r})
shutil.copytree({resaved!r}, {copied!r})
classifier = pipeline("text-classification", model={copied!r}, trust_remote_code=True)
print(json.dumps({{"config": json.load(open({copied!r} + "/config.json")), "answers": classifier({proteins!r})}}))
"""


def test_a_model_saved_again_and_copied_keeps_its_local_pipeline_and_threshold(tmp_path, elsewhere):
    proteins = [row["Sequence"] for row in demo_rows(40, seed=2)]
    model = tiny_model(max_residues=200)
    tokenizer = tokenizer_for(model.config)
    with torch.no_grad():
        mitochondrion = model(**tokenizer(proteins, padding=True, return_tensors="pt")).logits.softmax(-1)[:, 1:]
    threshold = spread_thresholds(mitochondrion.numpy(), count=4)[0]
    model.config.decision_thresholds = threshold
    expected = ["Mitochondrion" if p >= threshold else "Other" for p in mitochondrion[:, 0]]
    assert expected != ["Mitochondrion" if p >= 0.5 else "Other" for p in mitochondrion[:, 0]]
    # As after a load from a hub repo: transformers prefixes remote-code references with "repo--".
    model.config.auto_map = {key: f"someone/repo--{value}" for key, value in AUTO_MAP.items()}
    hub_pipeline = {**CUSTOM_PIPELINES["text-classification"],
                    "impl": "someone/repo--modeling_esmloc.EsmLocClassificationPipeline"}
    model.config.custom_pipelines = {"text-classification": hub_pipeline}
    saved = save_model(model, tmp_path / "saved")
    config = json.loads((saved / "config.json").read_text())
    assert (config["auto_map"], config["custom_pipelines"]) == (AUTO_MAP, CUSTOM_PIPELINES)

    code = RESAVE_AND_COPY.format(saved=str(saved), resaved=str(tmp_path / "resaved"), copied=str(tmp_path / "copied"),
                                  proteins=proteins)
    loaded = run_offline(code, cwd=elsewhere, tmp_path=tmp_path)  # a fresh offline process, the saved code only
    assert (loaded["config"]["auto_map"], loaded["config"]["custom_pipelines"]) == (AUTO_MAP, CUSTOM_PIPELINES)
    assert loaded["config"]["decision_thresholds"] == model.config.decision_thresholds
    assert [answer["label"] for answer in loaded["answers"]] == expected


# --- what is not a protein -------------------------------------------------------------------------------------------

NOT_PROTEINS = ["", " \n", "*", " * ", "MKT1A", "MK*TA", "MKTA**", "MK-TA", "MK.TA", "MKTJ", "<cls>MK", "MK<unk>A",
                "MK<eos>", "mk<MASK>ta"]


def test_the_tokenizer_refuses_and_normalises_exactly_as_esmloc_predict():
    tokenizer = EsmLocTokenizer()
    # Every printable character inside a protein and at its end, messy spellings and what is not a protein: the
    # tokenizer refuses what esmloc-predict's check refuses, with its message, and encodes what it accepts as the
    # sequence that check returns (never an <unk>).
    texts = [f"MK{c}TA" for c in string.printable] + [f"MKTA{c}" for c in string.printable] + NOT_PROTEINS + [
        " mk\tta y*\n", "MKTAY*", "mktay"]
    refused = 0
    for text in texts:
        try:
            sequence, _ = validate_sequence(text)
        except SequenceError as error:
            refused += 1
            with pytest.raises(ValueError, match=re.escape(str(error))):
                tokenizer(text)
        else:
            ids = tokenizer(text)["input_ids"]
            assert ids == tokenizer(sequence)["input_ids"] and tokenizer.unk_token_id not in ids, text
    assert refused > 60
    # <mask> stays usable as written, for masked-language-model inputs (esmloc-pretrain masks token ids).
    ids = tokenizer("mk<mask>ta*")["input_ids"]
    assert ids == tokenizer("MK")["input_ids"][:-1] + [tokenizer.mask_token_id] + tokenizer("TA")["input_ids"][1:]


REFUSALS = """
import json
from transformers import AutoTokenizer, pipeline
classifier = pipeline("text-classification", model={path!r}, trust_remote_code=True)
tokenizer = AutoTokenizer.from_pretrained({path!r}, trust_remote_code=True)
answers = {{}}
for text in {texts!r}:
    for name, call in (("pipeline", classifier), ("pipeline, a list", lambda text: classifier(["MKTAY", text])),
                       ("tokenizer", tokenizer)):
        try:
            call(text)
            answers[name + " " + repr(text)] = "accepted"
        except ValueError as error:
            answers[name + " " + repr(text)] = str(error)
messy, clean = classifier(" mkta y\\t*", top_k=None), classifier("MKTAY", top_k=None)
print(json.dumps({{"answers": answers, "normalised": messy == clean}}))
"""


def test_the_remote_pipeline_and_tokenizer_refuse_what_is_not_a_protein(tmp_path, elsewhere):
    saved = save_model(tiny_model(), tmp_path / "saved")
    loaded = run_offline(REFUSALS.format(path=str(saved), texts=NOT_PROTEINS), cwd=elsewhere, tmp_path=tmp_path)
    for text in NOT_PROTEINS:
        try:
            validate_sequence(text)
        except SequenceError as error:
            expected = str(error)
        for name in ("pipeline", "pipeline, a list", "tokenizer"):
            assert loaded["answers"][f"{name} {text!r}"] == expected
    assert loaded["normalised"]


def test_where_the_thresholds_come_from(tmp_path):
    """The saved config decides (null: 0.5); a model saved before config.json held thresholds falls back on the tuned
    ones of test_results.json; --threshold overrides both."""
    model = tiny_model()
    model.config.decision_thresholds = 0.7
    model_dir = save_model(model, tmp_path / "model")
    (model_dir / "test_results.json").write_text(json.dumps({"test_threshold_tuned": 0.25}))
    config_path = model_dir / "config.json"
    saved = json.loads(config_path.read_text())
    assert task.decision_thresholds(model_dir, model.config)[0].tolist() == [0.7]
    assert task.decision_thresholds(model_dir, model.config, override=0.1)[0].tolist() == [0.1]
    config_path.write_text(json.dumps({**saved, "decision_thresholds": None}))
    assert task.decision_thresholds(model_dir, model.config)[0].tolist() == [0.5]
    del saved["decision_thresholds"]  # as esmloc wrote configs before
    config_path.write_text(json.dumps(saved))
    thresholds, source = task.decision_thresholds(model_dir, model.config)
    assert thresholds.tolist() == [0.25] and "saved before" in source
    (model_dir / "test_results.json").unlink()
    assert task.decision_thresholds(model_dir, model.config)[0].tolist() == [0.5]
