"""Publishing: the model card of real train.py runs, the exact files a push sends, the push itself against a stand-in
for HfApi (the only stand-in: no hub is reachable from here), and a round trip through a real mirror server (olah)
and a plain git clone."""

import csv
import json
import os
import random
import re
import shutil
import subprocess
import sys
import threading
from http import server as http_server
from pathlib import Path

import pytest
import torch
from huggingface_hub.errors import HfHubHTTPError

from esmloc import publish
from esmloc.commands import push as push_command
from esmloc.data import LOCATIONS
from esmloc.demo import demo_rows
from modeling_esmloc import EsmForLocalization
from tokenization_esmloc import EsmLocTokenizer

from conftest import (
    FAKE_TOKEN, PROTEINS, REPO, GitWorkTreeHub, OlahMirror, assert_no_token, calls_named, clean_env,
    directory_digest, free_port, front_matter, run_main, run_offline,
)


try:  # the HTTP client of huggingface_hub: httpx2 from huggingface_hub 2 on, httpx before
    import httpx2 as http
except ImportError:  # pragma: no cover
    import httpx as http


REPO_ID = "alice/esmloc-mito"
MERGED_FILES = {
    "README.md", "all_results.json", "config.json", "configuration_esmloc.py", "confusion_matrix.png",
    "model.safetensors", "modeling_esmloc.py", "pr_curve.png", "roc_curve.png", "run_info.json",
    "test_predictions.csv", "test_results.json", "tokenization_esmloc.py", "tokenizer_config.json",
    "train_results.json", "trainer_state.json", "vocab.txt",
}
ADAPTER_FILES = MERGED_FILES - {"model.safetensors"} | {"adapter_config.json", "adapter_model.safetensors"}


# --- real runs (session fixtures: each train.py run takes seconds and is shared by all tests) ----------------------


def _write_csv(path: Path, rows: list[dict], fields: list[str]) -> Path:
    with path.open("w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=fields)
        writer.writeheader()
        writer.writerows(rows)
    return path


def _train(workdir: Path, output_dir: Path, *arguments: str) -> Path:
    """A real `python train.py` run (offline, tiny model, short proteins), then the card it ends with."""
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "HF_HOME": str(workdir / "hf_home"),
           "TOKENIZERS_PARALLELISM": "false", "PYTHONPATH": ""}
    command = [sys.executable, str(REPO / "train.py"), "--output_dir", str(output_dir), "--max_residues", "128",
               "--num_examples_to_show", "2", *arguments]
    result = subprocess.run(command, check=False, cwd=workdir, env=env, capture_output=True, text=True, timeout=900)
    if result.returncode != 0:
        pytest.fail(f"train.py failed ({result.returncode}):\n{result.stdout[-4000:]}\n{result.stderr[-4000:]}")
    publish.write_model_card(output_dir)  # what train.py does at the end of every run (idempotent)
    return output_dir


@pytest.fixture(scope="session")
def workdir(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("publish")


@pytest.fixture(scope="session")
def proteins_csv(workdir) -> Path:
    return _write_csv(workdir / "proteins.csv", demo_rows(80, seed=1), ["ACC", "Mitochondrion", "Sequence"])


@pytest.fixture(scope="session")
def frozen_run(workdir, proteins_csv) -> Path:
    return _train(workdir, workdir / "frozen", "--from_scratch", "tiny", "--train_file", str(proteins_csv),
                  "--num_train_epochs", "2")


@pytest.fixture(scope="session")
def esm_base(workdir) -> Path:
    """A stock-ESM-2-layout checkpoint (EsmForMaskedLM, tiny, random) standing in for facebook/esm2_*."""
    from transformers import EsmConfig, EsmForMaskedLM

    from configuration_esmloc import ESM2_ARCHITECTURES

    torch.manual_seed(0)
    path = workdir / "esm2_tiny_base"
    EsmForMaskedLM(EsmConfig(**ESM2_ARCHITECTURES["tiny"])).save_pretrained(path)
    return path


@pytest.fixture(scope="session")
def lora_run(workdir, proteins_csv, esm_base) -> Path:
    return _train(workdir, workdir / "lora", "--model_name_or_path", str(esm_base), "--finetune", "lora",
                  "--train_file", str(proteins_csv), "--num_train_epochs", "1")


@pytest.fixture(scope="session")
def multilabel_run(workdir) -> Path:
    """A DeepLoc-format (10 locations) run on generated proteins with frequent labels, so that every metric is
    defined on the small splits."""
    rng = random.Random(3)
    rows = []
    for index, row in enumerate(demo_rows(150, seed=2)):
        flags = [int(rng.random() < 0.35) for _ in LOCATIONS]
        if not any(flags):
            flags[rng.randrange(len(flags))] = 1
        rows.append({"ACC": row["ACC"], "Kingdom": "Metazoa", "Partition": index % 5, "Membrane": flags[3],
                     **dict(zip(LOCATIONS, flags, strict=True)), "Sequence": row["Sequence"]})
    path = _write_csv(workdir / "deeploc_format.csv", rows, ["ACC", "Kingdom", "Partition", "Membrane", *LOCATIONS,
                                                             "Sequence"])
    return _train(workdir, workdir / "multilabel", "--from_scratch", "tiny", "--dataset_config", "deeploc",
                  "--train_file", str(path), "--num_train_epochs", "1")


# --- helpers ---------------------------------------------------------------------------------------------------------


def read_json(path: Path) -> dict:
    return json.loads(path.read_text())


def copy_run(run: Path, destination: Path) -> Path:
    shutil.copytree(run, destination, ignore=shutil.ignore_patterns("checkpoint-*"))
    return destination


# --- the card ----------------------------------------------------------------------------------------------------


def test_card_metadata_and_model_index_are_the_runs_test_results(frozen_run):
    card = (frozen_run / "README.md").read_text()
    metadata, body = front_matter(card)
    assert metadata["library_name"] == "transformers"
    assert metadata["pipeline_tag"] == "text-classification"
    assert {"protein", "esm", "subcellular-localization", "mitochondrion"} <= set(metadata["tags"])
    assert metadata["license"] == publish.DEFAULT_LICENSE
    assert "base_model" not in metadata  # random initial weights: there is no base model to name
    assert "datasets" not in metadata  # a local CSV is no hub dataset

    results = read_json(frozen_run / "test_results.json")
    (index,) = metadata["model-index"]
    (entry,) = index["results"]
    assert entry["task"]["type"] == "text-classification"
    assert entry["dataset"]["split"] == "test" and entry["dataset"]["config"] == "mitochondrion"
    type_to_metric = {"accuracy": "accuracy", "precision": "precision", "recall": "recall", "f1": "f1",
                      "matthews_correlation": "mcc", "roc_auc": "roc_auc", "average_precision": "pr_auc"}
    seen = set()
    for metric in entry["metrics"]:
        key = f"test_{type_to_metric[metric['type']]}" + ("_tuned" if metric.get("config") == "tuned threshold" else "")
        assert metric["value"] == results[key], key
        seen.add(key)
    expected = {f"test_{m}{s}" for m in ("accuracy", "precision", "recall", "f1", "mcc") for s in ("", "_tuned")}
    assert seen == expected | {"test_roc_auc", "test_pr_auc"}

    # The evaluation table: both thresholds, and the validation MCC the threshold was chosen for.
    table = body[body.index("## Evaluation"):body.index("## Limitations")]
    assert f"| MCC | {results['test_mcc']:.3f} | {results['test_mcc_tuned']:.3f} | " \
           f"{results['validation_mcc_tuned']:.3f} |" in table
    assert f"| Threshold | 0.500 | {results['test_threshold_tuned']:.3f} |" in table
    assert f"| True positives | {results['test_tp']} | {results['test_tp_tuned']} |" in table


def test_card_body_has_every_section_and_the_runs_setup(frozen_run):
    _, body = front_matter((frozen_run / "README.md").read_text())
    for heading in ("## How to use", "### Through a mirror", "### From a local clone", "## Training", "### Data",
                    "## Evaluation", "### Plots", "## Limitations", "## Citation"):
        assert heading in body, heading
    assert 'AutoModel.from_pretrained("frozen", trust_remote_code=True)' in body
    assert "export HF_ENDPOINT=https://hf-mirror.com" in body and 'snapshot_download("frozen")' in body
    assert "git clone" in body
    info = read_json(frozen_run / "run_info.json")
    sizes = info["data"]["split_sizes"]
    assert f"train {sizes['train']}, validation {sizes['validation']}, test {sizes['test']}" in body
    assert f"| Seed | {info['training']['seed']} |" in body
    assert "`frozen`" in body and "stratified random split" in body
    assert "homologs of test proteins were probably seen in training" in body  # random split: leakage warned
    assert "class imbalance" in body.lower() and "cropped to 128 residues" in body
    assert "doi     = {10.1126/science.ade2574}" in body and "doi     = {10.1093/nar/gkac278}" in body
    assert info["data"]["train_file"] == "proteins.csv"  # recorded by name: run_info.json is pushed too
    assert str(frozen_run.parent) not in body and "`proteins.csv` (train)" in body  # the file name, no local path
    assert "LoRA settings" not in body and "lora_r" not in body


NUMBER = re.compile(r"(?<![\w.\-])-?\d[\d,]*(?:\.\d+)?(?![\w])")


def _numbers(text: str) -> list[str]:
    return [match.rstrip(",") for match in NUMBER.findall(text)]


def _json_leaves(value):
    """Every number, string, bool and null in a JSON document."""
    if isinstance(value, dict):
        value = list(value.values())
    if isinstance(value, list):
        for item in value:
            yield from _json_leaves(item)
    else:
        yield value


@pytest.mark.parametrize("run_name, what", [("frozen_run", "merged"), ("lora_run", "merged"), ("lora_run", "adapter"),
                                           ("multilabel_run", "merged")])
def test_every_number_in_the_card_comes_from_the_runs_files_or_the_template(run_name, what, request):
    run = request.getfixturevalue(run_name)
    card = str(publish.render_model_card(run, what=what, repo_id=REPO_ID))
    sources = [run / name for name in ("test_results.json", "train_results.json", "all_results.json",
                                       "run_info.json", "trainer_state.json", "config.json",
                                       "adapter/adapter_config.json")]
    documents = [read_json(path) for path in sources if path.is_file()]
    allowed = set(_numbers(publish.template_path().read_text()))
    for number in (n for document in documents for n in _json_leaves(document)
                   if isinstance(n, (int, float)) and not isinstance(n, bool)):
        forms = {str(number), format(number, "g"), format(number, ".3f"), format(number, ".1f")}
        if isinstance(number, int) or float(number).is_integer():
            forms |= {str(int(number)), f"{int(number):,}"}
        allowed |= forms
    metadata, body = front_matter(card)
    strings = {s for document in documents for s in _json_leaves(document)
               if isinstance(s, str) and re.search(r"\d", s)}
    for text in sorted(strings, key=len, reverse=True):
        body = body.replace(text, "")  # paths and names: the digits of a temp dir are no numbers of the card
    unexplained = sorted({number for number in _numbers(body) if number not in allowed})
    assert not unexplained, f"numbers in the card that no results file holds: {unexplained}"
    # The metadata's numbers are the results' own (full precision).
    results = read_json(run / "test_results.json")
    for metric in metadata["model-index"][0]["results"][0]["metrics"]:
        assert metric["value"] in results.values()


def test_plots_are_referenced_only_when_present(frozen_run, tmp_path):
    body = front_matter((frozen_run / "README.md").read_text())[1]
    for plot in ("roc_curve.png", "pr_curve.png", "confusion_matrix.png"):
        assert f"]({plot})" in body
    assert "mcc_per_location.png" not in body
    run = copy_run(frozen_run, tmp_path / "run")
    (run / "pr_curve.png").unlink()
    body = str(publish.render_model_card(run))
    assert "pr_curve.png" not in body and "](roc_curve.png)" in body
    for plot in ("roc_curve.png", "confusion_matrix.png"):
        (run / plot).unlink()
    assert "### Plots" not in str(publish.render_model_card(run))


def test_missing_results_are_left_out_not_made_up(frozen_run, tmp_path):
    run = copy_run(frozen_run, tmp_path / "run")
    results = read_json(run / "test_results.json")
    del results["test_pr_auc"], results["test_pr_auc_tuned"]
    results["validation_pr_auc_tuned"] = None  # what the metric module writes for an undefined value
    (run / "test_results.json").write_text(json.dumps(results))
    metadata, body = front_matter(str(publish.render_model_card(run)))
    assert "average_precision" not in {m["type"] for m in metadata["model-index"][0]["results"][0]["metrics"]}
    assert "| PR-AUC" not in body
    (run / "test_results.json").unlink()
    metadata, body = front_matter(str(publish.render_model_card(run)))
    assert "model-index" not in metadata and "no `test_results.json`" in body and "| MCC |" not in body


def test_lora_card_has_the_lora_settings_and_the_adapter_card_names_its_base(lora_run, esm_base):
    metadata, body = front_matter((lora_run / "README.md").read_text())
    info = read_json(lora_run / "run_info.json")["model"]
    settings = body[body.index("### LoRA settings"):body.index("### Data")]
    assert f"| Rank r | {info['lora_r']} |" in settings and f"| Alpha | {info['lora_alpha']} |" in settings
    assert f"| Dropout | {info['lora_dropout']} |" in settings
    assert all(f"`{module}`" in settings for module in info["lora_target_modules"])
    assert "base_model" not in metadata  # a local checkpoint is no hub id

    adapter_card = (lora_run / "adapter" / "README.md").read_text()  # write_model_card replaced PEFT's template
    assert publish.CARD_MARKER in adapter_card and "More Information Needed" not in adapter_card
    adapter_metadata, adapter_body = front_matter(adapter_card)
    assert adapter_metadata["library_name"] == "peft" and "lora" in adapter_metadata["tags"]
    assert f'EsmModel.from_pretrained("{esm_base.name}"' in adapter_body and str(esm_base) not in adapter_body
    assert "PeftModel.from_pretrained" in adapter_body


def test_hub_base_model_and_datasets_go_into_the_metadata(frozen_run, tmp_path):
    run = copy_run(frozen_run, tmp_path / "run")
    info = read_json(run / "run_info.json")
    info["model"]["base_model"] = "facebook/esm2_t6_8M_UR50D"  # as after --model_name_or_path facebook/...
    (run / "run_info.json").write_text(json.dumps(info))
    metadata, body = front_matter(str(publish.render_model_card(run, datasets=["alice/mito-proteins"],
                                                                license="mit")))
    assert metadata["base_model"] == "facebook/esm2_t6_8M_UR50D"
    assert metadata["datasets"] == ["alice/mito-proteins"] and metadata["license"] == "mit"
    assert metadata["model-index"][0]["results"][0]["dataset"]["type"] == "alice/mito-proteins"
    assert "[`facebook/esm2_t6_8M_UR50D`](https://huggingface.co/facebook/esm2_t6_8M_UR50D)" in body
    with pytest.raises(ValueError, match="hub model id"):
        publish.render_model_card(run, base_model="/home/alice/esm2")


def test_multilabel_card_reports_every_location(multilabel_run):
    metadata, body = front_matter((multilabel_run / "README.md").read_text())
    results = read_json(multilabel_run / "test_results.json")
    assert "multi-label" in metadata["tags"]
    metrics = metadata["model-index"][0]["results"][0]["metrics"]
    macro = {m.get("config"): m["value"] for m in metrics
             if m["type"] == "matthews_correlation" and m.get("args") == {"average": "macro"}}
    assert macro == {"threshold 0.5": results["test_macro_mcc"], "tuned threshold": results["test_macro_mcc_tuned"]}
    for location in LOCATIONS:
        key = re.sub(r"\W+", "_", location)
        assert f"| {location} | {results[f'test_mcc_{key}']:.3f} | {results[f'test_mcc_{key}_tuned']:.3f} | " \
               f"{results[f'test_threshold_{key}_tuned']:.3f} |" in body
    assert "](mcc_per_location.png)" in body and "confusion_matrix.png" not in body


def test_template_is_one_file_shipped_inside_the_package():
    shipped = Path(publish.__file__).with_name("model_card.md")
    assert publish.template_path() == shipped
    assert shipped.is_symlink() and shipped.resolve() == (REPO / "model_card.md").resolve()
    assert publish.CARD_MARKER in (REPO / "model_card.md").read_text()


# --- the files a push sends ------------------------------------------------------------------------------------------


def test_files_to_push_is_the_exact_allow_list(frozen_run, lora_run):
    assert any(frozen_run.glob("checkpoint-*/training_args.bin"))  # pickles exist locally...
    files = publish.files_to_push(frozen_run)
    assert set(files) == MERGED_FILES  # ...and are never pushed
    assert list(files) == sorted(files) and all(path.parent == frozen_run for path in files.values())
    assert set(publish.files_to_push(lora_run)) == MERGED_FILES  # adapter/ is no part of the merged push
    adapter = publish.files_to_push(lora_run, what="adapter")
    assert set(adapter) == ADAPTER_FILES
    assert adapter["adapter_model.safetensors"] == lora_run / "adapter" / "adapter_model.safetensors"
    assert adapter["README.md"] == lora_run / "adapter" / "README.md"


def test_files_to_push_ignores_pickles_and_strays_and_refuses_incomplete_models(frozen_run, tmp_path):
    run = copy_run(frozen_run, tmp_path / "run")
    for stray in ("training_args.bin", "optimizer.pt", "rng_state.pth", "scaler.pkl", "pytorch_model.bin",
                  "notes.txt", "eval_cache.npy"):
        (run / stray).write_bytes(b"\x80\x04pickle")
    (run / "checkpoint-99").mkdir()
    (run / "checkpoint-99" / "config.json").write_text("{}")
    assert set(publish.files_to_push(run)) == MERGED_FILES
    (run / "README.md").unlink()
    assert set(publish.files_to_push(run)) == MERGED_FILES - {"README.md"}  # the push renders it
    (run / "model.safetensors").unlink()
    with pytest.raises(publish.PublishError, match="no model.safetensors"):
        publish.files_to_push(run)
    with pytest.raises(publish.PublishError, match="only --finetune lora runs have an adapter"):
        publish.files_to_push(frozen_run, what="adapter")


# --- the push, against a stand-in for HfApi -------------------------------------------------------------------------


def test_push_sends_one_commit_with_exactly_the_allow_listed_files(frozen_run, hub, monkeypatch, capsys, caplog):
    monkeypatch.setenv("HF_ENDPOINT", "https://hub.example.test")
    before = directory_digest(frozen_run)
    assert push_command.main([str(frozen_run), "--hub_model_id", REPO_ID]) == 0  # the exit status of esmloc-push

    printed = capsys.readouterr()
    assert printed.out.strip().splitlines()[-1] == f"https://hub.example.test/{REPO_ID}"
    (init,) = calls_named(hub, "init")
    assert init == {"endpoint": "https://hub.example.test", "token": None}  # None: the standard login / HF_TOKEN
    (create,) = calls_named(hub, "create_repo")
    assert create == {"repo_id": REPO_ID, "repo_type": "model", "private": False, "exist_ok": True}
    assert not calls_named(hub, "repo_info")
    (commit,) = calls_named(hub, "create_commit")
    assert commit["repo_id"] == REPO_ID and set(commit["files"]) == MERGED_FILES
    local = publish.files_to_push(frozen_run)
    for name, content in commit["files"].items():
        if name != "README.md":
            assert content == local[name].read_bytes(), name
    readme = commit["files"]["README.md"].decode()
    assert f'AutoModel.from_pretrained("{REPO_ID}", trust_remote_code=True)' in readme
    assert f"git clone https://hub.example.test/{REPO_ID}" in readme
    assert front_matter(readme)[0]["model-index"][0]["name"] == "esmloc-mito"
    assert directory_digest(frozen_run) == before  # the local card keeps its folder-relative loading code
    captured = capsys.readouterr()
    assert_no_token(printed.out + captured.out, printed.err + captured.err, caplog.text, directories=[frozen_run])


def test_explicit_endpoint_wins_and_private_is_passed(frozen_run, hub, monkeypatch):
    monkeypatch.setenv("HF_ENDPOINT", "https://from-env.example.test")
    hub.existing_private = True
    assert push_command.main([str(frozen_run), "--hub_model_id", REPO_ID, "--hub_private_repo",
                         "--hub_endpoint", "https://explicit.example.test/"]) == 0
    assert calls_named(hub, "init")[0]["endpoint"] == "https://explicit.example.test"
    assert calls_named(hub, "create_repo")[0]["private"] is True
    assert calls_named(hub, "repo_info") == [{"repo_id": REPO_ID}]
    assert len(calls_named(hub, "create_commit")) == 1


def test_private_push_into_an_existing_public_repo_is_refused(frozen_run, hub, capsys):
    hub.existing_private = False
    status, _, err = run_main(push_command.main, [frozen_run, "--hub_model_id", REPO_ID, "--hub_private_repo"], capsys)
    assert status == 1 and "already exists and is public" in err
    assert not calls_named(hub, "create_commit")


def test_push_adapter_sends_the_adapter_with_its_own_card(lora_run, hub, esm_base):
    assert push_command.main([str(lora_run), "--hub_model_id", "alice/esmloc-mito-lora", "--push_adapter"]) == 0
    (commit,) = calls_named(hub, "create_commit")
    assert set(commit["files"]) == ADAPTER_FILES
    assert commit["files"]["adapter_model.safetensors"] == (lora_run / "adapter/adapter_model.safetensors").read_bytes()
    metadata, body = front_matter(commit["files"]["README.md"].decode())
    assert metadata["library_name"] == "peft"
    assert 'repo = "alice/esmloc-mito-lora"' in body and f'EsmModel.from_pretrained("{esm_base.name}"' in body


@pytest.mark.parametrize("repo_id", ["esmloc-mito", "alice/", "/tmp/x", "alice/esmloc mito"])
def test_push_needs_a_full_repository_id(frozen_run, hub, repo_id, capsys):
    status, _, err = run_main(push_command.main, [frozen_run, "--hub_model_id", repo_id], capsys)
    assert status == 2 and "user/name or org/name" in err
    assert not calls_named(hub, "init")


def test_push_adapter_replaces_pefts_blank_card(lora_run, hub, tmp_path):
    run = copy_run(lora_run, tmp_path / "run")
    peft_template = "---\nlibrary_name: peft\n---\n\n# Model Card for Model ID\n\n[More Information Needed]\n"
    (run / "adapter" / "README.md").write_text(peft_template)  # as left by a run that did not write its cards
    assert push_command.main([str(run), "--hub_model_id", "alice/esmloc-mito-lora", "--push_adapter"]) == 0
    readme = calls_named(hub, "create_commit")[0]["files"]["README.md"].decode()
    assert publish.CARD_MARKER in readme and "More Information Needed" not in readme
    assert (run / "adapter" / "README.md").read_text() == peft_template


def test_adapter_of_a_random_backbone_is_not_pushed(lora_run, hub, tmp_path, capsys):
    run = copy_run(lora_run, tmp_path / "run")
    info = read_json(run / "run_info.json")
    info["model"]["base_model"] = "random:tiny"  # as after --from_scratch tiny --finetune lora
    (run / "run_info.json").write_text(json.dumps(info))
    status, _, err = run_main(push_command.main, [run, "--hub_model_id", REPO_ID, "--push_adapter"], capsys)
    assert status == 1 and "push the merged model instead" in err
    assert not calls_named(hub, "init")


def _http_error(status: int) -> HfHubHTTPError:
    request = http.Request("POST", "https://hub.example.test/api/repos/create",
                           headers={"authorization": f"Bearer {FAKE_TOKEN}"})
    response = http.Response(status, request=request, json={"error": "nope"})
    return HfHubHTTPError(f"{status} Client Error for url {request.url}", response=response, server_message="nope")


@pytest.mark.parametrize("name, expected", [
    ("alice/esmloc-mito", "alice/esmloc-mito"),
    ("facebook/esm2_t6_8M_UR50D", "facebook/esm2_t6_8M_UR50D"),
    ("esmloc-mito", None),  # a bare name: the repository's namespace would be guessed
    ("random:tiny", None), ("./runs/mito", None), ("/home/alice/esm2", None), ("~/esm2", None), ("a/b/c", None),
    ("alice/esmloc--mito", None), ("alice/esmloc-mito.git", None), ("alice/" + "x" * 100, None),  # the hub's rules
    (None, None),
])
def test_hub_model_ids_follow_huggingface_hubs_rules(name, expected):
    assert publish.as_hub_model_id(name) == expected


@pytest.mark.parametrize(
    "fail_on, error, expected",
    [
        ("create_repo", _http_error(401), "hf auth login"),
        ("create_commit", _http_error(403), "read-only"),
        ("create_repo", _http_error(404), "mirrors such as hf-mirror.com are read-only"),
        ("create_commit", http.ConnectError("[Errno 111] Connection refused"), "could not be reached"),
        ("create_repo", OSError("network is unreachable"), "could not be reached"),
    ],
)
def test_failed_push_says_why_and_changes_nothing(frozen_run, hub, capsys, caplog, fail_on, error, expected):
    hub.fail_on, hub.error = fail_on, error
    before = directory_digest(frozen_run)
    status, out, message = run_main(push_command.main, [frozen_run, "--hub_model_id", REPO_ID, "--hub_endpoint",
                                                        "https://hub.example.test"], capsys)
    errors = [line for line in message.splitlines() if line.startswith("esmloc-push: error:")]
    assert status == 1 and len(errors) == 1 and "Traceback" not in message
    assert f"https://hub.example.test/{REPO_ID}" in message and expected in message
    assert "local output directory is unchanged" in message
    assert directory_digest(frozen_run) == before
    assert_no_token(message, out, caplog.text, directories=[frozen_run])


def test_push_to_an_unreachable_endpoint_with_the_real_client(frozen_run, tmp_path):
    """The real HfApi, in a fresh process, against a local port nobody listens on."""
    port = free_port()
    before = directory_digest(frozen_run)
    env = {**clean_env(tmp_path), "HF_TOKEN": FAKE_TOKEN}
    result = subprocess.run([sys.executable, "-m", "esmloc.commands.push", str(frozen_run), "--hub_model_id", REPO_ID,
                             "--hub_endpoint", f"http://127.0.0.1:{port}"],
                            check=False, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)
    assert result.returncode == 1, result.stdout + result.stderr
    assert f"pushing to http://127.0.0.1:{port}/{REPO_ID} failed" in result.stderr
    assert "could not be reached" in result.stderr and "Traceback" not in result.stderr
    assert directory_digest(frozen_run) == before
    assert_no_token(result.stdout, result.stderr, directories=[frozen_run])


class RefusingHub(http_server.BaseHTTPRequestHandler):
    """A hub endpoint that answers every request with the server's status and a JSON error, as the Hub does."""

    def answer(self):
        body = json.dumps({"error": "Invalid credentials in Authorization header"}).encode()
        self.send_response(self.server.status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    do_GET = do_POST = do_PUT = do_HEAD = answer

    def log_message(self, *args):
        pass


@pytest.mark.parametrize("status, expected, debug", [(401, "hf auth login", False), (500, "check the endpoint", True)])
def test_refused_push_with_the_real_client_never_shows_the_token(frozen_run, tmp_path, status, expected, debug):
    """The real HfApi, in a fresh process with a token (and with huggingface_hub's debug output, which prints every
    request, for one of them), against a local server that answers `status`: huggingface_hub's own errors and output
    carry no token, so esmloc-push has none to hide."""
    server = http_server.ThreadingHTTPServer(("127.0.0.1", 0), RefusingHub)
    server.status = status
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        env = {**clean_env(tmp_path), "HF_TOKEN": FAKE_TOKEN, **({"HF_DEBUG": "1"} if debug else {})}
        endpoint = f"http://127.0.0.1:{server.server_address[1]}"
        result = subprocess.run([sys.executable, "-m", "esmloc.commands.push", str(frozen_run), "--hub_model_id", REPO_ID,
                                 "--hub_endpoint", endpoint],
                                check=False, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)
    finally:
        server.shutdown()
        server.server_close()
    assert result.returncode == 1, result.stdout + result.stderr
    assert f"pushing to {endpoint}/{REPO_ID} failed (HTTP {status}: Invalid credentials" in result.stderr
    assert expected in result.stderr and (debug or "Traceback" not in result.stderr)
    assert_no_token(result.stdout, result.stderr, directories=[frozen_run])


class EchoingHub(http_server.BaseHTTPRequestHandler):
    """A hub endpoint that refuses every request with an error that echoes the request's headers, the Authorization
    header (the token) included: in its JSON body, in the X-Error-Message header the Hub uses for its messages, and
    in a plain-text body for requests whose path says so."""

    def answer(self):
        echoed = "; ".join(f"{name}: {value}" for name, value in self.headers.items())
        if "plain" in self.path:
            body, kind = f"request refused, it had {echoed}".encode(), "text/plain"
        else:
            body, kind = json.dumps({"error": f"request refused, it had {echoed}"}).encode(), "application/json"
        self.send_response(self.server.status)
        self.send_header("Content-Type", kind)
        self.send_header("X-Error-Message", f"refused: {self.headers.get('Authorization')}")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        if self.command != "HEAD":
            self.wfile.write(body)

    do_GET = do_POST = do_PUT = do_HEAD = answer

    def log_message(self, *args):
        pass


@pytest.fixture
def echoing_hub():
    """An EchoingHub on 127.0.0.1 (set its `status`); stopped at the end."""
    server = http_server.ThreadingHTTPServer(("127.0.0.1", 0), EchoingHub)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield server
    finally:
        server.shutdown()
        server.server_close()


def exported_dataset(folder: Path) -> Path:
    """The files esmloc-dataset push sends (a card and a Parquet split), enough for the push to start."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    (folder / "data" / "mitochondrion").mkdir(parents=True)
    pq.write_table(pa.table({"ACC": ["P1"], "Sequence": [PROTEINS[0]], "label": [1]}),
                   folder / "data" / "mitochondrion" / "train-00000-of-00001.parquet")
    (folder / "README.md").write_text("---\nlicense: apache-2.0\n---\n# proteins\n")
    return folder


@pytest.mark.parametrize("tool, status", [
    *[("esmloc-push, HF_TOKEN", status) for status in (400, 401, 403, 500)],
    ("esmloc-push, the token file", 401),
    ("esmloc-push, a plain-text answer", 500),
    ("esmloc-dataset push", 401),
    ("esmloc-dataset push", 500),
    ("train.py --push_to_hub --hub_token", 403),
])
def test_no_push_ever_shows_the_token_an_endpoint_echoes(frozen_run, proteins_csv, tmp_path, echoing_hub, tool,
                                                         status):
    """Whatever an endpoint answers, the token (from HF_TOKEN, the token file or an argument) is in no output of
    any push: the endpoint echoes the request's headers, Authorization included, in its error body and in
    X-Error-Message."""
    echoing_hub.status = status
    endpoint = f"http://127.0.0.1:{echoing_hub.server_address[1]}" + ("/plain" if "plain" in tool else "")
    env = clean_env(tmp_path)
    if tool == "esmloc-push, the token file":
        Path(env["HF_HOME"], "token").write_text(FAKE_TOKEN)
    elif "--hub_token" not in tool:
        env["HF_TOKEN"] = FAKE_TOKEN
    if tool.startswith("esmloc-push"):
        command = [sys.executable, "-m", "esmloc.commands.push", str(frozen_run), "--hub_model_id", REPO_ID]
        written = frozen_run
    elif tool == "esmloc-dataset push":
        written = exported_dataset(tmp_path / "dataset")
        command = [sys.executable, "-m", "esmloc.commands.dataset", "push", str(written), "--hub_dataset_id", REPO_ID]
    else:
        written = tmp_path / "run"
        command = [sys.executable, str(REPO / "train.py"), "--from_scratch", "tiny", "--train_file",
                   str(proteins_csv), "--output_dir", str(written), "--max_residues", "64", "--num_train_epochs",
                   "1", "--num_examples_to_show", "0", "--push_to_hub", "--hub_model_id", REPO_ID,
                   "--hub_token", FAKE_TOKEN]
    result = subprocess.run([*command, "--hub_endpoint", endpoint], check=False, cwd=tmp_path, env=env,
                            capture_output=True, text=True, timeout=600)
    output = result.stdout + result.stderr
    assert result.returncode != 0 and "Traceback" not in output, output[-3000:]
    assert f"pushing to {endpoint}/{REPO_ID} failed (HTTP {status}: " in output, output[-3000:]
    assert "request refused, it had" in output or "refused: " in output  # the endpoint's answer is shown...
    assert "<token hidden>" in output  # ... without the token it echoed
    assert_no_token(result.stdout, result.stderr, directories=[written])


# --- a real mirror server and a plain git clone ----------------------------------------------------------------------


def run_fresh(code: str, cwd: Path, env: dict, what: str, mirror: OlahMirror | None = None) -> dict:
    result = subprocess.run([sys.executable, "-c", code], check=False, cwd=cwd, env=env, capture_output=True,
                            text=True, timeout=600)
    if result.returncode != 0:
        server = f"\n--- olah log ---\n{mirror.log_tail()}" if mirror else ""
        raise AssertionError(f"{what} failed ({result.returncode}):\n{result.stdout[-3000:]}\n"
                             f"{result.stderr[-5000:]}{server}")
    return json.loads(result.stdout.strip().splitlines()[-1])


LOAD_AND_PREDICT = """
import json, os, torch
from transformers import AutoModel, AutoTokenizer, pipeline
path, proteins = {path}, {proteins!r}
model = AutoModel.from_pretrained(path, trust_remote_code=True).eval()
assert type(model).__module__.startswith("transformers_modules"), type(model).__module__
tokenizer = AutoTokenizer.from_pretrained(path, trust_remote_code=True)
with torch.no_grad():
    logits = model(**tokenizer(proteins, return_tensors="pt", padding=True)).logits.tolist()
classifier = pipeline("text-classification", model=path, trust_remote_code=True)
files = sorted(os.path.relpath(os.path.join(d, f), path) for d, _, fs in os.walk(path) for f in fs
               if ".git" not in d.split(os.sep) and ".cache" not in d.split(os.sep))
print(json.dumps({{"logits": logits, "pipeline": classifier(proteins, top_k=None), "files": files}}))
"""


def original_predictions(run: Path, proteins: list[str]) -> torch.Tensor:
    model = EsmForLocalization.from_pretrained(run).eval()
    tokenizer = EsmLocTokenizer.from_pretrained(run)
    with torch.no_grad():
        return model(**tokenizer(proteins, return_tensors="pt", padding=True)).logits


def assert_same_predictions(loaded: dict, expected_logits: torch.Tensor, reported: dict, proteins: list[str]):
    torch.testing.assert_close(torch.tensor(loaded["logits"]), expected_logits, atol=1e-5, rtol=1e-5)
    probabilities = torch.softmax(expected_logits, dim=-1)
    for protein, scores, expected in zip(proteins, loaded["pipeline"], probabilities, strict=True):
        by_label = {item["label"]: item["score"] for item in scores}
        assert by_label["Mitochondrion"] == pytest.approx(expected[1].item(), abs=1e-5)
        if protein in reported:  # the probability train.py reported for this test protein
            assert by_label["Mitochondrion"] == pytest.approx(reported[protein], abs=1e-4)


@pytest.mark.slow
def test_round_trip_through_a_mirror_server_and_a_git_clone(frozen_run, proteins_csv, mirror, tmp_path):
    # Push, with the commit landing in the git work tree the mirror serves.
    hub = GitWorkTreeHub(mirror.mirrors)
    url = publish.push_output_dir(frozen_run, REPO_ID, endpoint=mirror.url, api=hub)
    assert url == f"{mirror.url}/{REPO_ID}"
    assert hub.pushed[REPO_ID] == set(publish.files_to_push(frozen_run))

    sequences = {row["ACC"]: row["Sequence"] for row in csv.DictReader(proteins_csv.open())}
    reported = {sequences[row["ACC"]]: float(row["probability_Mitochondrion"])
                for row in csv.DictReader((frozen_run / "test_predictions.csv").open())}
    proteins = PROTEINS + sorted(reported)
    expected = original_predictions(frozen_run, proteins)

    # 1. Through the mirror: a fresh process, HF_ENDPOINT at the mirror, an empty cache, the network "on".
    code = ("from huggingface_hub import snapshot_download\n"
            f"path = snapshot_download({REPO_ID!r})\n"
            + LOAD_AND_PREDICT.format(path="path", proteins=proteins))
    via_mirror = run_fresh(code, tmp_path, clean_env(tmp_path, HF_ENDPOINT=mirror.url), "load through olah", mirror)
    assert set(via_mirror["files"]) == hub.pushed[REPO_ID]
    assert_same_predictions(via_mirror, expected, reported, proteins)

    # 2. From a plain git clone of that repository, fully offline.
    clone = tmp_path / "clone" / "esmloc-mito"
    subprocess.run(["git", "clone", "-q", str(mirror.mirrors / "models" / REPO_ID), str(clone)], check=True,
                   capture_output=True)
    code = LOAD_AND_PREDICT.format(path=repr(str(clone)), proteins=proteins)
    from_clone = run_fresh(code, tmp_path, clean_env(tmp_path, HF_HUB_OFFLINE="1"), "load from the clone")
    assert set(from_clone["files"]) == hub.pushed[REPO_ID]
    assert_same_predictions(from_clone, expected, reported, proteins)
    card = (clone / "README.md").read_text()
    assert f'snapshot_download("{REPO_ID}")' in card and front_matter(card)[0]["library_name"] == "transformers"


def test_a_card_edited_or_written_by_hand_is_pushed_as_it_is(frozen_run, hub, tmp_path):
    run = copy_run(frozen_run, tmp_path / "run")
    edited = (run / "README.md").read_text().replace("## Limitations", "## Notes from the author\n\nHand-written.\n\n"
                                                                        "## Limitations")
    (run / "README.md").write_text(edited)
    assert push_command.main([str(run), "--hub_model_id", REPO_ID]) == 0
    assert calls_named(hub, "create_commit")[0]["files"]["README.md"] == edited.encode()
    (run / "README.md").write_text("# my own card\n")
    assert push_command.main([str(run), "--hub_model_id", REPO_ID]) == 0
    assert calls_named(hub, "create_commit")[1]["files"]["README.md"] == b"# my own card\n"
    (run / "README.md").unlink()  # no card at all: the push renders one (and leaves the folder as it is)
    assert push_command.main([str(run), "--hub_model_id", REPO_ID]) == 0
    assert publish.CARD_MARKER.encode() in calls_named(hub, "create_commit")[2]["files"]["README.md"]
    assert not (run / "README.md").exists()


@pytest.mark.slow
def test_a_mirror_refuses_uploads_and_the_push_says_so(frozen_run, mirror, tmp_path):
    """The real HfApi against the real (read-only) mirror: the push fails with a clear message."""
    before = directory_digest(frozen_run)
    env = {**clean_env(tmp_path), "HF_TOKEN": FAKE_TOKEN, "HF_ENDPOINT": mirror.url}
    result = subprocess.run([sys.executable, "-m", "esmloc.commands.push", str(frozen_run), "--hub_model_id", REPO_ID],
                            check=False, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)
    assert result.returncode == 1, result.stdout + result.stderr
    assert f"pushing to {mirror.url}/{REPO_ID} failed (HTTP 405)" in result.stderr
    assert "push to https://huggingface.co" in result.stderr
    assert directory_digest(frozen_run) == before
    assert_no_token(result.stdout, result.stderr, mirror.log_tail(), directories=[frozen_run])


def test_adapter_card_code_rebuilds_the_merged_model(lora_run, esm_base, tmp_path):
    """The adapter card's own loading code, run in a fresh offline process on the pushed adapter files, gives the
    merged model's outputs."""
    hub = GitWorkTreeHub(tmp_path / "hub")
    publish.push_output_dir(lora_run, "alice/esmloc-mito-lora", what="adapter", api=hub)
    repo = tmp_path / "hub" / "models" / "alice" / "esmloc-mito-lora"
    card = (repo / "README.md").read_text()
    snippet = re.search(r"```python\n(.*?)```", card, re.DOTALL).group(1)
    assert 'repo = "alice/esmloc-mito-lora"' in snippet
    snippet = snippet.replace('repo = "alice/esmloc-mito-lora"', f"repo = {str(repo)!r}")
    code = snippet + (
        "import json, torch\n"
        f"batch = tokenizer({PROTEINS!r}, return_tensors='pt', padding=True)\n"
        "with torch.no_grad():\n"
        "    print(json.dumps(model(**batch).logits.tolist()))\n"
    )
    loaded = run_offline(code, cwd=esm_base.parent, tmp_path=tmp_path)  # the card names the base folder
    torch.testing.assert_close(torch.tensor(loaded), original_predictions(lora_run, PROTEINS), atol=1e-5, rtol=1e-5)
