"""The suite's rules (tests/conftest.py): in CI (ESMLOC_STRICT_SKIPS=1) only the allow-listed reasons may skip a
test, any other skip fails it; every run ends with a summary of its skips; shared helpers live in conftest.py."""

import ast
import os
import subprocess
import sys

from conftest import NO_GPU, OTHER_DATASETS_MAJOR, REPO


SKIPPING = f"""
import pytest

def test_without_a_gpu():
    pytest.skip({NO_GPU!r})

@pytest.mark.skipif(True, reason={OTHER_DATASETS_MAJOR!r} + ": datasets 5 runs no loading scripts")
def test_for_the_other_datasets_major():
    pass

def test_without_chromium():
    pytest.skip("no Chromium here")

def test_that_runs():
    pass
"""


def run_pytest(tmp_path, strict: bool) -> subprocess.CompletedProcess:
    (tmp_path / "test_skipping.py").write_text(SKIPPING)
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(REPO / "tests"), str(REPO)])}
    env.pop("ESMLOC_STRICT_SKIPS", None)
    if strict:
        env["ESMLOC_STRICT_SKIPS"] = "1"
    return subprocess.run([sys.executable, "-m", "pytest", "-p", "conftest", "-q", "-p", "no:cacheprovider",
                           "--rootdir", str(tmp_path), str(tmp_path / "test_skipping.py")], cwd=tmp_path, env=env,
                          capture_output=True, text=True, timeout=300)


def test_in_ci_a_skip_for_a_reason_not_on_the_allow_list_fails(tmp_path):
    result = run_pytest(tmp_path, strict=True)
    assert result.returncode == 1, result.stdout[-3000:] + result.stderr[-3000:]
    assert "1 failed, 1 passed, 2 skipped" in result.stdout
    assert "FAILED test_skipping.py::test_without_chromium" in result.stdout
    assert "skipped for a reason CI does not allow (ESMLOC_STRICT_SKIPS=1): no Chromium here" in result.stdout
    summary = result.stdout[result.stdout.index("skip summary: 2 skipped, only the allowed reasons"):]
    assert f"1  allowed            {NO_GPU}" in summary
    assert f"1  allowed            {OTHER_DATASETS_MAJOR}: datasets 5 runs no loading scripts" in summary


def test_elsewhere_every_skip_is_allowed_and_summed_up(tmp_path):
    result = run_pytest(tmp_path, strict=False)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    assert "1 passed, 3 skipped" in result.stdout
    summary = result.stdout[result.stdout.index("skip summary: 3 skipped, any reason (ESMLOC_STRICT_SKIPS unset)"):]
    assert "1  not allowed in CI  no Chromium here" in summary


def test_no_test_file_imports_another():
    """Helpers two test files share live in conftest.py: importing a test module from another runs its module-level
    code twice and ties the files together."""
    offenders = []
    for path in sorted((REPO / "tests").glob("*.py")):
        for node in ast.walk(ast.parse(path.read_text())):
            names = [alias.name for alias in node.names] if isinstance(node, ast.Import) else \
                [node.module or ""] if isinstance(node, ast.ImportFrom) else []
            offenders += [f"{path.name}: {name}" for name in names if name.split(".")[0].startswith("test_")]
    assert offenders == []
