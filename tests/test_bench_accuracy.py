"""bench/accuracy.py: the baseline's features on hand-made proteins, and the smoke mode end to end (a synthetic
DeepLoc-layout file always; the real DeepLoc 2.0 file when it is present)."""

import importlib.util
import json
import os
import re
import subprocess
import sys

import pytest

from conftest import DEEPLOC_CSV, REPO, write_deeploc_layout_csv


SCRIPT = REPO / "bench" / "accuracy.py"
SETUP_ROWS = [
    "Baseline: logistic regression, N-terminal AA + dipeptide composition",
    "Baseline: the same + N-terminal charge, hydropathy, hydrophobic moment",
    "esmloc, random ESM-2 `tiny`, frozen (random features: a floor)",
    "esmloc, ESM-2 `tiny` trained from scratch (full)",
]
NOT_RUN_ROWS = [
    "esmloc, pretrained `facebook/esm2_t6_8M_UR50D`, frozen",
    "esmloc, pretrained `facebook/esm2_t6_8M_UR50D`, LoRA",
]
PUBLISHED_ROWS = ["DeepLoc 2.0 (ProtT5), SwissProt 5-fold CV", "DeepLoc 2.0 (ProtT5), independent HPA test set"]


@pytest.fixture(scope="module")
def accuracy():
    spec = importlib.util.spec_from_file_location("bench_accuracy", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def deeploc_layout_csv(tmp_path_factory):
    """300 synthetic proteins in the DeepLoc 2.0 layout, five homology partitions."""
    return write_deeploc_layout_csv(tmp_path_factory.mktemp("deeploc") / "deeploc_layout.csv", n_rows=300, seed=11)


# ------------------------------------------------------------------------------------------------ features


def test_composition_features_on_a_hand_made_protein(accuracy):
    sequence = "MRRAX" + "L" * 60  # X (unknown) is ignored
    features = accuracy.baseline_features([sequence])[0]
    assert features.shape == (440,)
    aa = accuracy.AMINO_ACIDS
    n_terminal, dipeptides, whole = features[:20], features[20:420], features[420:440]
    # N-terminal 50 residues: M R R A X + 45 L -> 49 standard residues
    assert n_terminal[aa.index("R")] == pytest.approx(2 / 49)
    assert n_terminal[aa.index("L")] == pytest.approx(45 / 49)
    # dipeptides of the window, pairs with X dropped: MR RR RA (AX, XL dropped) + 44 LL = 47 pairs
    assert dipeptides[aa.index("M") * 20 + aa.index("R")] == pytest.approx(1 / 47)
    assert dipeptides[aa.index("L") * 20 + aa.index("L")] == pytest.approx(44 / 47)
    assert whole[aa.index("L")] == pytest.approx(60 / 64)
    for block in (n_terminal, dipeptides, whole):
        assert block.sum() == pytest.approx(1.0)


def test_physicochemical_features_see_a_presequence(accuracy):
    presequence = "MLRAALRSLLRAALRSLLRAALRS" + "A" * 60  # amphipathic, Arg-rich, no acidic residues
    acidic = "MDEADEIDEADEIDEADEIDEADE" + "A" * 60
    with_physchem = accuracy.baseline_features([presequence, acidic], physicochemical=True)
    assert with_physchem.shape == (2, 453)
    extra = with_physchem[:, 440:]
    net_charge_20, arg_20 = extra[:, 0], extra[:, 1]
    assert net_charge_20[0] > 0 > net_charge_20[1]
    assert arg_20[0] == pytest.approx(5 / 20) and arg_20[1] == 0
    # hydrophobic moment: an ideal amphipathic helix beats a uniform stretch
    helix = "LKKLLKLLKKLLKLLKKL"
    assert accuracy._max_hydrophobic_moment(accuracy.residue_indices(helix)) > \
        accuracy._max_hydrophobic_moment(accuracy.residue_indices("L" * 18)) == pytest.approx(0, abs=1e-9)


def test_folds_cover_every_partition_once(accuracy):
    assert accuracy.folds(False, 4) == [(3, 4)]
    pairs = accuracy.folds(True, 4)
    assert sorted(test for _, test in pairs) == [0, 1, 2, 3, 4]
    assert all(validation != test for validation, test in pairs)


def test_pretrained_rows_are_documented_with_the_same_command_line(accuracy, tmp_path):
    budget = accuracy.Budget()
    setups = {setup.key: setup for setup in accuracy.make_setups(budget, pretrained=None)}
    assert not setups["pretrained_frozen"].run and not setups["pretrained_lora"].run
    scratch = accuracy.train_command(setups["scratch_full"], budget, tmp_path / "d.csv", 3, 4, tmp_path / "o", False)
    lora = accuracy.train_command(setups["pretrained_lora"], budget, tmp_path / "d.csv", 3, 4, tmp_path / "o", False)
    assert ["--model_name_or_path", "facebook/esm2_t6_8M_UR50D"] == lora[2:4] and "--from_scratch" not in lora
    assert lora[lora.index("--dataset_config"):] == scratch[scratch.index("--dataset_config"):]
    assert "--finetune lora" in accuracy.shell_line(lora)


# ------------------------------------------------------------------------------------------------ smoke runs


NUMBER = r"-?\d+\.\d{3}"


def table_rows(stdout: str, title: str) -> dict[str, list[str]]:
    """The Markdown table under the heading `title`: {setup: cells}."""
    section = stdout.split(f"### {title}", 1)[1].split("###", 1)[0]
    rows = {}
    for line in section.splitlines():
        if line.startswith("| ") and not line.startswith(("| Setup", "| ---")):
            cells = [cell.strip() for cell in line.strip().strip("|").split("|")]
            rows[cells[0]] = cells[1:]
    return rows


def run_smoke(data_file, output_dir, *extra) -> subprocess.CompletedProcess:
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false"}
    result = subprocess.run([sys.executable, str(SCRIPT), "--smoke", "--data", str(data_file), "--output_dir",
                             str(output_dir), *extra], cwd=output_dir.parent, env=env, capture_output=True, text=True,
                            timeout=900)
    if result.returncode != 0:
        raise AssertionError(f"bench/accuracy.py failed ({result.returncode}):\n{result.stdout[-4000:]}\n"
                             f"{result.stderr[-4000:]}")
    return result


def check_numbers(cells: list[str], n_metrics: int):
    for cell in cells[:n_metrics]:
        value = float(re.fullmatch(NUMBER, cell).group())
        assert -1.0 <= value <= 1.0, cells
    assert re.fullmatch(r"\d+(\.\d)? s|\d+\.\d min", cells[n_metrics]), cells


@pytest.mark.slow
def test_smoke_mode_prints_the_tables(deeploc_layout_csv, tmp_path):
    output_dir = tmp_path / "results"
    stdout = run_smoke(deeploc_layout_csv, output_dir, "--multi_label").stdout

    assert "command: python bench/accuracy.py --smoke" in stdout
    assert re.search(r"train\s+N=\s*180", stdout) and re.search(r"test\s+N=\s*60", stdout)  # partitions 0-2 / 3 / 4
    assert "python train.py --from_scratch tiny" in stdout  # the command of every esmloc run is printed

    binary = table_rows(stdout, "Mitochondrion vs rest")
    assert list(binary) == SETUP_ROWS + NOT_RUN_ROWS + PUBLISHED_ROWS
    for name in SETUP_ROWS:
        check_numbers(binary[name], 4)
    for name in NOT_RUN_ROWS:
        assert binary[name] == ["—"] * 4 + ["not run here: no pretrained weights offline"]
    assert binary[PUBLISHED_ROWS[0]][0] == "0.77" and binary[PUBLISHED_ROWS[1]][0] == "0.56"
    assert all(cells[-1] == "published, not run here" for name, cells in binary.items() if name in PUBLISHED_ROWS)

    multi = table_rows(stdout, "Multi-label")
    assert list(multi) == SETUP_ROWS + NOT_RUN_ROWS
    for name in SETUP_ROWS:
        check_numbers(multi[name], 6)

    # the same tables on disk, and every metric of every run
    assert (output_dir / "accuracy.md").read_text() in stdout
    results = json.loads((output_dir / "accuracy.json").read_text())
    rows = {row["key"]: row for row in results["tasks"]["mitochondrion"]["rows"]}
    full = rows["scratch_full"]["runs"][0]
    assert full["metrics"]["test_mcc_tuned"] == pytest.approx(float(binary[SETUP_ROWS[3]][0]), abs=5e-4)
    assert full["wall_s"] > 0 and (output_dir / "runs" / "mitochondrion" / "scratch_full" / "fold4" /
                                   "test_results.json").is_file()
    multi_rows = {row["key"]: row for row in results["tasks"]["deeploc"]["rows"]}
    assert "test_mcc_Peroxisome_tuned" in multi_rows["baseline_composition"]["runs"][0]["metrics"]
    assert results["tasks"]["mitochondrion"]["split_sizes"] == {"test4": {"train": 180, "validation": 60, "test": 60}}


@pytest.mark.slow
def test_smoke_mode_compares_crop_and_windows(deeploc_layout_csv, tmp_path):
    output_dir = tmp_path / "results"
    stdout = run_smoke(deeploc_layout_csv, output_dir, "--setups", "scratch_frozen", "--long_proteins", "crop,windows",
                       "--share_feature_cache").stdout
    frozen = SETUP_ROWS[2]
    assert "--long_proteins windows" in stdout and "in windows of 64 residues overlapping by at least 16" in stdout
    main_table, section = stdout.split("Long proteins, crop vs windows (", 1)
    binary = table_rows(main_table, "Mitochondrion vs rest")
    assert list(binary) == [frozen, frozen + ", long proteins in windows"] + PUBLISHED_ROWS
    section = section.split("\n\n", 3)
    assert section[0].startswith("60 of 60 test proteins are longer than the 64-residue window")
    rows = [[cell.strip() for cell in line.strip("|").split("|")] for line in section[1].splitlines()[2:]]
    assert [row[:2] for row in rows] == [[frozen, "crop"], [frozen, "windows"]]
    for row, name in zip(rows, binary):
        # Every test protein is longer than the window: the long proteins' MCC is the whole test split's.
        assert row[2] == row[3] == binary[name][0] and re.fullmatch(NUMBER, row[2])
        assert re.fullmatch(r"\d+(\.\d)? s|\d+\.\d min", row[4])  # the embedding time, from the run's log
    crop_tokens, windows_tokens = re.search(r"over all 300 proteins: crop ([\d,]+), windows ([\d,]+)",
                                            section[2]).groups()
    assert int(windows_tokens.replace(",", "")) > int(crop_tokens.replace(",", "")) == 300 * 66
    results = json.loads((output_dir / "accuracy.json").read_text())
    runs = {row["key"]: row["runs"][0]["metrics"] for row in results["tasks"]["mitochondrion"]["rows"]}
    assert runs["scratch_frozen_windows"]["long_proteins"] == 60 and runs["scratch_frozen"]["embedding_s"] > 0
    for key, rule in (("scratch_frozen", "-r64-n_terminal-"), ("scratch_frozen_windows", "-r64-windows16-")):
        assert [rule in path.name for path in (output_dir / "feature_cache" / key / "fold4").iterdir()] == [True]


@pytest.mark.slow
@pytest.mark.skipif(not DEEPLOC_CSV.is_file(), reason=f"the DeepLoc 2.0 file is not at {DEEPLOC_CSV}")
def test_smoke_mode_on_the_real_deeploc_file(tmp_path):
    output_dir = tmp_path / "results"
    stdout = run_smoke(DEEPLOC_CSV, output_dir, "--setups", "baseline_composition,scratch_full").stdout
    binary = table_rows(stdout, "Mitochondrion vs rest")
    assert list(binary) == [SETUP_ROWS[0], SETUP_ROWS[3]] + PUBLISHED_ROWS
    for name in (SETUP_ROWS[0], SETUP_ROWS[3]):
        check_numbers(binary[name], 4)
    # the smoke sample: 60 proteins of each partition
    assert json.loads((output_dir / "accuracy.json").read_text())["tasks"]["mitochondrion"]["split_sizes"] == {
        "test4": {"train": 180, "validation": 60, "test": 60}}


def test_missing_data_file_is_named(tmp_path):
    result = subprocess.run([sys.executable, str(SCRIPT), "--smoke", "--data", str(tmp_path / "absent.csv"),
                             "--output_dir", str(tmp_path / "out")], capture_output=True, text=True, timeout=120)
    assert result.returncode != 0 and "absent.csv: no such file" in result.stderr
