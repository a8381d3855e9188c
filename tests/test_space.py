"""The demo Space (esmloc/space.py): its files come from the one app template, its card points at the model, the
vendored code runs the app, and `esmloc-push --space` pushes model and Space (against a stand-in for HfApi), the
model card linking the Space."""

import os
import subprocess
import sys

import pytest
import yaml

from esmloc import publish
from esmloc.commands import push as push_command
from esmloc.saving import save_model
from esmloc.space import MODEL_LINE, app_source, space_files, write_space

from conftest import REPO, calls_named, front_matter, run_main, tiny_model


MODEL_ID, SPACE_ID = "alice/esmloc-mito", "alice/esmloc-mito-demo"


def test_app_is_the_top_level_template_with_the_model_filled_in():
    template = (REPO / "app.py").read_text()
    generated = app_source(MODEL_ID)
    changed = [(old, new) for old, new in zip(template.splitlines(), generated.splitlines()) if old != new]
    assert len(template.splitlines()) == len(generated.splitlines())
    assert changed == [(MODEL_LINE.search(template).group(), f'MODEL = os.environ.get("ESMLOC_MODEL", "{MODEL_ID}")')]


def test_space_files_card_requirements_and_code():
    files = space_files(MODEL_ID, SPACE_ID)
    card = files["README.md"].decode()
    meta, _ = front_matter(card)
    assert meta["sdk"] == "gradio" and meta["app_file"] == "app.py" and meta["models"] == [MODEL_ID]
    assert meta["sdk_version"].split(".")[0] == "6"
    assert f"https://huggingface.co/{MODEL_ID}" in card
    requirements = files["requirements.txt"].decode().splitlines()
    assert any(line.startswith("gradio") for line in requirements)
    assert any(line.startswith("transformers") for line in requirements)
    assert not any("selenium" in line or "pytest" in line for line in requirements)  # the test extra stays out
    for name in ("esmloc/webapp.py", "esmloc/loading.py", "esmloc/engine.py", "esmloc/explain.py",
                 "modeling_esmloc.py", "configuration_esmloc.py", "tokenization_esmloc.py"):
        assert files[name] == (REPO / name).read_bytes(), name
    assert "esmloc/space_app.py" not in files and not any("__pycache__" in name for name in files)
    assert not any(name.startswith("esmloc/commands/") for name in files)  # the app needs no command


def test_the_written_space_runs_its_app_from_its_own_files(tmp_path):
    """app.py imports the Space's vendored esmloc (the folder comes first on the path) and builds the app around a
    local model (ESMLOC_MODEL), without starting a server."""
    pytest.importorskip("gradio", reason="the demo needs the demo extra: pip install -e '.[demo]'")
    model_dir = save_model(tiny_model(max_residues=64), tmp_path / "model")
    space = write_space(MODEL_ID, tmp_path / "space", SPACE_ID)
    code = ("import app, esmloc, json; print(json.dumps([esmloc.__file__, type(app.demo).__name__, "
            "sorted(app.demo.fns and [f.api_name for f in app.demo.fns.values() if f.api_name])]))")
    env = {**os.environ, "ESMLOC_MODEL": str(model_dir), "HF_HUB_OFFLINE": "1", "PYTHONPATH": ""}
    result = subprocess.run([sys.executable, "-c", code], cwd=space, env=env, capture_output=True, text=True,
                            timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    module, kind, endpoints = yaml.safe_load(result.stdout.strip().splitlines()[-1])
    assert module == str(space / "esmloc" / "__init__.py") and kind == "Blocks" and "predict" in endpoints


def test_push_with_space_pushes_the_model_then_its_space_and_the_card_links_it(tmp_path, hub, capsys):
    output_dir = save_model(tiny_model(), tmp_path / "run")
    publish.write_model_card(output_dir)
    assert push_command.main([str(output_dir), "--hub_model_id", MODEL_ID, "--space", SPACE_ID]) == 0

    creates = calls_named(hub, "create_repo")
    assert [(call["repo_id"], call["repo_type"]) for call in creates] == [(MODEL_ID, "model"), (SPACE_ID, "space")]
    assert creates[1]["space_sdk"] == "gradio" and creates[1]["exist_ok"] is True
    model_commit, space_commit = calls_named(hub, "create_commit")
    assert model_commit["repo_id"] == MODEL_ID
    assert f"https://huggingface.co/spaces/{SPACE_ID}" in model_commit["files"]["README.md"].decode()
    assert space_commit["repo_id"] == SPACE_ID and space_commit["repo_type"] == "space"
    assert space_commit["files"] == space_files(MODEL_ID, SPACE_ID)
    printed = capsys.readouterr().out
    assert f"https://huggingface.co/{MODEL_ID}" in printed and f"https://huggingface.co/spaces/{SPACE_ID}" in printed
    assert "spaces/" not in (output_dir / "README.md").read_text()  # the local card is left as it was


def test_a_bad_space_id_is_refused_before_anything_is_pushed(tmp_path, hub, capsys):
    output_dir = save_model(tiny_model(), tmp_path / "run")
    status, _, err = run_main(push_command.main, [output_dir, "--hub_model_id", MODEL_ID, "--space", "no-namespace"],
                              capsys)
    assert status == 2 and "--space must be a full Space id" in err
    assert hub.calls == []
