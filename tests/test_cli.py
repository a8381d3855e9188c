"""The command layer: every tool fails the same way on bad input, and the commands stand on one floor.

The table below is a hostile user's session with each of the seven tools: bad arguments, bad files, outputs in the
wrong place. Every row must end with exit status 2 (1 for the environment), one `PROG: error: ...` line naming what
is wrong, no traceback, the inputs byte-identical and no output left behind.
"""

import ast
import hashlib
import json
import subprocess
import sys
from pathlib import Path

import pytest

from esmloc.commands import dataset, demo, embed, predict, pretrain, push, train
from esmloc.demo import write_demo_csv
from esmloc.saving import save_model

from conftest import REPO, tiny_model


TOOLS = {"train.py": train.main, "esmloc-predict": predict.main, "esmloc-embed": embed.main,
         "esmloc-pretrain": pretrain.main, "esmloc-dataset": dataset.main, "esmloc-push": push.main,
         "esmloc-demo": demo.main}
FASTA = ">P1 first\nMKTAYIAKQRQISFVKSHFSRQ\n>P2 second\nMLSRAVCGTSRQLAPVLGYLGSRQKHSLPD\n"


@pytest.fixture(scope="module")
def files(tmp_path_factory) -> Path:
    """The inputs of the hostile session, in one folder that no row may change."""
    folder = tmp_path_factory.mktemp("inputs")
    save_model(tiny_model(), folder / "model")
    write_demo_csv(folder / "proteins.csv", n_rows=120, seed=0)
    (folder / "proteins.fasta").write_text(FASTA)
    (folder / "fasta_named.csv").write_text(FASTA)
    (folder / "csv_named.fasta").write_text((folder / "proteins.csv").read_text())
    (folder / "binary.csv").write_bytes(b"ACC,Mitochondrion,Sequence\n\x00\x01\x02PK\x03\x04" * 10)
    (folder / "binary.fasta").write_bytes(bytes(range(256)) * 4)
    (folder / "latin1.csv").write_bytes("ACC,Mitochondrion,Sequence\nP1,0,MKTAY\u00e9\n".encode("latin-1"))
    (folder / "a_directory").mkdir()
    (folder / "a_file.txt").write_text("not a directory\n")
    (folder / "users_dir").mkdir()
    (folder / "users_dir" / "notes.txt").write_text("my own notes\n")
    (folder / "unknown_key.json").write_text(json.dumps({"from_scratch": "tiny", "learnig_rate": 0.1}))
    (folder / "wrong_type.json").write_text(json.dumps({"from_scratch": "tiny", "learning_rate": "fast"}))
    (folder / "bad_choice.json").write_text(json.dumps({"from_scratch": "tiny", "finetune": "everything"}))
    (folder / "not_yaml.yaml").write_text("from_scratch: [tiny\n")
    (folder / "list.json").write_text(json.dumps(["--from_scratch", "tiny"]))
    return folder


def tree_state(folder: Path) -> dict:
    """Every path under `folder` with the sha256 of its bytes (None for a directory)."""
    return {str(path.relative_to(folder)): None if path.is_dir() else hashlib.sha256(path.read_bytes()).hexdigest()
            for path in sorted(folder.rglob("*"))}


# (tool, arguments with {in} for the inputs folder and {out} for a fresh output folder, exit status, expected text)
BAD_INVOCATIONS = [
    # arguments
    ("train.py", ["--from_scratch", "tiny", "--learning_rate", "-1", "--output_dir", "{out}/run"], 2,
     "--learning_rate must be positive"),
    ("train.py", ["--from_scratch", "tiny", "--learning_rate", "0", "--output_dir", "{out}/run"], 2,
     "--learning_rate must be positive"),
    ("train.py", ["--from_scratch", "tiny", "--per_device_train_batch_size", "0", "--output_dir", "{out}/run"], 2,
     "--per_device_train_batch_size must be a positive integer"),
    ("train.py", ["--from_scratch", "tiny", "--num_train_epochs", "0", "--output_dir", "{out}/run"], 2,
     "nothing to train"),
    ("train.py", ["--from_scratch", "tiny", "--max_steps", "0", "--output_dir", "{out}/run"], 2, "nothing to train"),
    ("train.py", ["--from_scratch", "tiny", "--max_tokens_per_batch", "0", "--output_dir", "{out}/run"], 2,
     "--max_tokens_per_batch must be a positive integer"),
    ("train.py", ["--from_scratch", "tiny", "--finetune", "everything", "--output_dir", "{out}/run"], 2,
     "invalid choice: 'everything'"),
    ("train.py", ["--from_scratch", "tiny", "--classifier_dropout", "1.5", "--output_dir", "{out}/run"], 2,
     "--classifier_dropout must lie in [0, 1)"),
    ("train.py", ["--from_scratch", "tiny", "--validation_file", "{in}/proteins.csv", "--output_dir", "{out}/run"],
     2, "give --train_file alone"),
    ("train.py", ["{in}/unknown_key.json"], 2, "unknown_key.json: unknown argument(s) learnig_rate"),
    ("train.py", ["{in}/wrong_type.json"], 2, "invalid float value: 'fast'"),
    ("train.py", ["{in}/bad_choice.json"], 2, "bad_choice.json: argument --finetune: invalid choice"),
    ("train.py", ["{in}/not_yaml.yaml"], 2, "not_yaml.yaml: not valid YAML"),
    ("train.py", ["{in}/list.json"], 2, "list.json: must hold a mapping"),
    ("train.py", ["{in}/missing.json"], 2, "missing.json: no such arguments file"),
    # files
    ("train.py", ["--from_scratch", "tiny", "--train_file", "{in}/fasta_named.csv", "--output_dir", "{out}/run"], 2,
     "looks like FASTA"),
    ("train.py", ["--from_scratch", "tiny", "--train_file", "{in}/binary.csv", "--output_dir", "{out}/run"], 2,
     "binary data"),
    ("train.py", ["--from_scratch", "tiny", "--train_file", "{in}/latin1.csv", "--output_dir", "{out}/run"], 2,
     "not UTF-8"),
    ("train.py", ["--from_scratch", "tiny", "--train_file", "{in}/a_directory", "--output_dir", "{out}/run"], 2,
     "is a directory"),
    ("train.py", ["--from_scratch", "tiny", "--train_file", "{in}/nowhere.csv", "--output_dir", "{out}/run"], 2,
     "no such data file"),
    ("train.py", ["--model_name_or_path", "./no/such/esm", "--train_file", "{in}/proteins.csv", "--output_dir",
                  "{out}/run"], 2, "--model_name_or_path ./no/such/esm: no such directory"),
    # outputs
    ("train.py", ["--from_scratch", "tiny", "--output_dir", "{in}/users_dir"], 2, "holds files esmloc did not write"),
    ("train.py", ["--from_scratch", "tiny", "--output_dir", "{in}/users_dir", "--overwrite_output_dir"], 2,
     "holds files esmloc did not write"),
    ("train.py", ["--from_scratch", "tiny", "--output_dir", "{in}/a_file.txt"], 2, "is a file"),
    ("train.py", ["--from_scratch", "tiny", "--output_dir", "{in}/a_file.txt/run"], 2, "is a file, not a directory"),

    ("esmloc-predict", ["{in}/model", "{in}/proteins.fasta"], 2, "the following arguments are required: -o"),
    ("esmloc-predict", ["{in}/model", "{in}/proteins.fasta", "-o", "{out}/p.csv", "--threshold", "1.5"], 2,
     "--threshold: must lie between 0 and 1"),
    ("esmloc-predict", ["{in}/model", "{in}/proteins.fasta", "-o", "{out}/p.csv", "--threshold", "-0.1"], 2,
     "--threshold: must lie between 0 and 1"),
    ("esmloc-predict", ["{in}/model", "{in}/proteins.fasta", "-o", "{out}/p.csv", "--max_tokens_per_batch", "0"], 2,
     "--max_tokens_per_batch/--batch: must be a positive integer, got 0"),
    ("esmloc-predict", ["{in}/model", "{in}/proteins.fasta", "-o", "{out}/p.csv", "--chunk_size", "-3"], 2,
     "--chunk_size: must be a positive integer"),
    ("esmloc-predict", ["{in}/model", "{in}/proteins.fasta", "-o", "{out}/p.csv", "--device", "cuda:0"], 2,
     "no CUDA GPU is available here"),
    ("esmloc-predict", ["{in}/model", "{in}/a_directory", "-o", "{out}/p.csv"], 2, "is a directory"),
    ("esmloc-predict", ["{in}/model", "{in}/binary.fasta", "-o", "{out}/p.csv"], 2, "binary data"),
    ("esmloc-predict", ["{in}/model", "{in}/csv_named.fasta", "-o", "{out}/p.csv"], 2, "looks like CSV"),
    ("esmloc-predict", ["{in}/model", "{in}/fasta_named.csv", "-o", "{out}/p.csv"], 2, "looks like FASTA"),
    ("esmloc-predict", ["{in}/model", "{in}/latin1.csv", "-o", "{out}/p.csv"], 2, "not UTF-8"),
    ("esmloc-predict", ["{in}/model", "{in}/proteins.fasta", "-o", "{in}/a_directory"], 2, "is a directory"),
    ("esmloc-predict", ["{in}/model", "{in}/proteins.fasta", "-o", "{in}/proteins.fasta"], 2, "is the input file"),
    ("esmloc-predict", ["{in}/model", "{in}/proteins.fasta", "-o", "{in}/a_file.txt/p.csv"], 2, "is a file"),
    ("esmloc-predict", ["{in}/model", "{in}/proteins.fasta", "-o", "{out}/p.csv", "--explain", "{in}/a_file.txt"], 2,
     "--explain"),
    ("esmloc-predict", ["{in}/no_model", "{in}/proteins.fasta", "-o", "{out}/p.csv"], 2, "no such model directory"),
    ("esmloc-predict", ["{in}/a_directory", "{in}/proteins.fasta", "-o", "{out}/p.csv"], 2, "no config.json"),

    ("esmloc-embed", ["{in}/model", "{in}/proteins.fasta", "-o", "{in}/a_directory"], 2, "is a directory"),
    ("esmloc-embed", ["{in}/model", "{in}/binary.fasta", "-o", "{out}/e.parquet"], 2, "binary data"),
    ("esmloc-embed", ["{in}/model", "{in}/fasta_named.csv", "-o", "{out}/e.parquet"], 2, "looks like FASTA"),
    ("esmloc-embed", ["{in}/model", "{in}/proteins.fasta", "-o", "{out}/e.parquet", "--per_residue",
                      "{in}/a_file.txt"], 2, "--per_residue"),
    ("esmloc-embed", ["{in}/model", "{in}/proteins.fasta", "-o", "{out}/e.parquet", "--per_residue",
                      "{in}/users_dir"], 2, "refusing to replace it"),
    ("esmloc-embed", ["{in}/model", "{in}/proteins.fasta", "-o", "{out}/e.parquet", "--pooling", "attention"], 2,
     "needs an esmloc model trained with attention pooling"),
    ("esmloc-embed", ["./no/such/model", "{in}/proteins.fasta", "-o", "{out}/e.parquet"], 2, "no such directory"),
    ("esmloc-embed", ["{in}/model", "{in}/proteins.fasta", "-o", "{out}/e.parquet", "--max_tokens_per_batch", "-1"],
     2, "must be a positive integer"),

    ("esmloc-pretrain", ["--from_scratch", "tiny", "--output_dir", "{out}/mlm"], 2, "--train_files: give at least one"),
    ("esmloc-pretrain", ["--from_scratch", "tiny", "--train_files", "{in}/proteins.fasta", "--mlm_probability", "1.5",
                         "--output_dir", "{out}/mlm"], 2, "--mlm_probability must lie between 0 and 1"),
    ("esmloc-pretrain", ["--from_scratch", "tiny", "--train_files", "{in}/proteins.fasta", "--learning_rate", "-1",
                         "--output_dir", "{out}/mlm"], 2, "--learning_rate must be positive"),
    ("esmloc-pretrain", ["--from_scratch", "tiny", "--train_files", "{in}/binary.fasta", "--output_dir", "{out}/mlm"],
     2, "binary data"),
    ("esmloc-pretrain", ["--from_scratch", "tiny", "--train_files", "{in}/csv_named.fasta", "--output_dir",
                         "{out}/mlm"], 2, "looks like CSV"),
    ("esmloc-pretrain", ["--from_scratch", "tiny", "--train_files", "{in}/proteins.fasta", "--config_overrides",
                         "hidden_sise=64", "--output_dir", "{out}/mlm"], 2, "--config_overrides"),
    ("esmloc-pretrain", ["--from_scratch", "tiny", "--train_files", "{in}/proteins.fasta", "--output_dir",
                         "{in}/users_dir"], 2, "holds files esmloc did not write"),
    ("esmloc-pretrain", ["--from_scratch", "tiny", "--train_files", "{in}/proteins.fasta", "--num_train_epochs", "0",
                         "--output_dir", "{out}/mlm"], 2, "nothing to train"),

    ("esmloc-dataset", ["export", "{in}/proteins.csv"], 2, "the following arguments are required: --output_dir"),
    ("esmloc-dataset", ["export", "{in}/binary.csv", "--output_dir", "{out}/ds"], 2, "binary data"),
    ("esmloc-dataset", ["export", "{in}/fasta_named.csv", "--output_dir", "{out}/ds"], 2, "looks like FASTA"),
    ("esmloc-dataset", ["export", "{in}/proteins.csv", "--output_dir", "{in}/a_file.txt"], 2, "is a file"),
    ("esmloc-dataset", ["export", "{in}/proteins.csv", "--output_dir", "{in}/users_dir"], 2, "not an empty directory"),
    ("esmloc-dataset", ["export", "{in}/a_directory", "--output_dir", "{out}/ds"], 2, "is a directory"),
    ("esmloc-dataset", ["push", "{in}/a_directory", "--hub_dataset_id", "alice/x"], 2, "not an exported dataset"),
    ("esmloc-dataset", ["push", "{in}/a_directory", "--hub_dataset_id", "x"], 2, "full repository id"),
    ("esmloc-dataset", ["fetch"], 2, "invalid choice: 'fetch'"),

    ("esmloc-push", ["{in}/model"], 2, "the following arguments are required: --hub_model_id"),
    ("esmloc-push", ["{in}/model", "--hub_model_id", "no-namespace"], 2, "user/name or org/name"),
    ("esmloc-push", ["{in}/a_directory", "--hub_model_id", "alice/x"], 2, "no config.json"),
    ("esmloc-push", ["{in}/model", "--hub_model_id", "alice/x", "--push_adapter"], 2, "only --finetune lora runs"),

    ("esmloc-demo", ["{in}/no_model"], 2, "no_model: no such directory"),
    ("esmloc-demo", ["{in}/a_directory"], 2, "no config.json"),
    ("esmloc-demo", ["{in}/model", "--port", "70000"], 2, "not a port number"),
]


@pytest.mark.parametrize("tool, arguments, status, expected", BAD_INVOCATIONS,
                         ids=[f"{row[0]}:{'-'.join(row[1])[:60]}" for row in BAD_INVOCATIONS])
def test_a_bad_invocation_is_one_line_with_its_status_and_changes_nothing(files, tmp_path, capsys, monkeypatch, tool,
                                                                           arguments, status, expected):
    monkeypatch.chdir(tmp_path)  # a tool that wrote into the working directory would show here
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    out = tmp_path / "out"
    out.mkdir()
    before = tree_state(files)
    argv = [argument.replace("{in}", str(files)).replace("{out}", str(out)) for argument in arguments]
    code = TOOLS[tool](argv)
    err = capsys.readouterr().err
    errors = [line for line in err.splitlines() if line.startswith(f"{tool}: error:")]
    assert code == status, err
    assert len(errors) == 1 and expected in errors[0], err
    assert "Traceback" not in err
    assert tree_state(files) == before
    assert list(out.iterdir()) == [] and sorted(path.name for path in tmp_path.iterdir()) == ["out"]


def test_a_console_script_exits_with_the_status_and_one_line(files, tmp_path):
    """The installed console scripts (not only `main`): one line on stderr, the exit status, nothing on stdout."""
    result = subprocess.run([Path(sys.executable).parent / "esmloc-predict", str(files / "model"),
                             str(files / "binary.fasta"), "-o", str(tmp_path / "p.csv")],
                            capture_output=True, text=True, timeout=300, check=False)
    assert result.returncode == 2 and result.stdout == ""
    assert result.stderr.strip().splitlines()[-1].startswith("esmloc-predict: error: malformed input, nothing written: ")
    assert "binary data" in result.stderr and "Traceback" not in result.stderr


def test_an_unwritable_output_is_an_environment_problem_found_before_any_work(files, tmp_path, capsys):
    """/sys refuses new files, also to root (os.access says yes there: the check writes a real file)."""
    code = predict.main([str(files / "model"), str(files / "proteins.fasta"), "-o", "/sys/esmloc-predictions.csv"])
    err = capsys.readouterr().err
    assert code == 1 and "cannot write into /sys" in err and "Traceback" not in err
    assert "Predicting" not in err and "proteins (" not in err  # refused before reading the input


@pytest.mark.parametrize("tool", ["esmloc-predict", "esmloc-embed"])
def test_a_cropped_protein_is_said_once_per_run(files, tmp_path, capsys, tool):
    long_fasta = tmp_path / "long.fasta"
    long_fasta.write_text(">L1\n" + "M" * 1500 + "\n>L2\n" + "A" * 1100 + "\n>S1\nMKTAYIAK\n")
    assert TOOLS[tool]([str(files / "model"), str(long_fasta), "-o", str(tmp_path / "out")]) == 0
    err = capsys.readouterr().err
    notes = [line.split(": ", 1)[1] for line in err.splitlines() if "longer than the model's window" in line]
    assert notes == ["2 of 3 proteins are longer than the model's window of 1022 residues: each is cropped to 1022 "
                     "residues (middle crop: the N- and C-terminal halves are kept, the rest is not seen)"]


# --- the floor: no command imports another ----------------------------------------------------------------------------


def imported_modules(path: Path) -> set[str]:
    modules = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            modules.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module:
            modules.add(node.module)
            modules.update(f"{node.module}.{alias.name}" for alias in node.names)
    return modules


def test_commands_are_on_one_floor():
    """A command imports library modules only; nothing in the library imports a command."""
    commands = {path.stem for path in (REPO / "esmloc" / "commands").glob("*.py") if path.stem != "__init__"}
    assert commands == {"train", "predict", "embed", "pretrain", "dataset", "push", "demo"}
    for path in (REPO / "esmloc").rglob("*.py"):
        imported = imported_modules(path)
        crossing = sorted(name for name in imported if name.startswith("esmloc.commands.")
                          and name.split(".")[2] in commands)
        assert not crossing, f"{path.relative_to(REPO)} imports {crossing}"


def test_the_error_classes_import_nothing_heavy():
    imported = imported_modules(REPO / "esmloc" / "errors.py")
    assert imported <= set(sys.stdlib_module_names), imported


def test_every_tool_runs_through_the_one_wrapper():
    for path in (REPO / "esmloc" / "commands").glob("*.py"):
        if path.stem == "__init__":
            continue
        tree = ast.parse(path.read_text())
        main = next(node for node in tree.body if isinstance(node, ast.FunctionDef) and node.name == "main")
        (statement,) = main.body
        call = statement.value
        assert isinstance(statement, ast.Return) and ast.unparse(call.func) == "cli.run", path
    assert all(name in TOOLS for name in ("train.py", "esmloc-predict"))  # the table covers every tool
    assert set(TOOLS) == {row[0] for row in BAD_INVOCATIONS}
