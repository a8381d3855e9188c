"""Real-data accuracy benchmark: DeepLoc 2.0 SwissProt, homology-partition split, one table row per setup.

    python bench/accuracy.py                      # the full run (< 60 min on 2 CPU cores): Mitochondrion, test
                                                  # partition 4, validation 3, training 0-2
    python bench/accuracy.py --all_folds          # all five folds (test t, validation t-1 mod 5): ~5x the time
    python bench/accuracy.py --multi_label        # adds DeepLoc's 10-location multi-label table (~2x the time)
    python bench/accuracy.py --tasks deeploc      # the multi-label table alone
    python bench/accuracy.py --smoke              # a few hundred proteins, tiny models, 1 epoch: seconds
    python bench/accuracy.py --pretrained facebook/esm2_t6_8M_UR50D   # also run the pretrained rows (needs the
                                                  # weights: hub access, a mirror via HF_ENDPOINT, or a local clone)
    python bench/accuracy.py --pretrain           # also pretrain a backbone here (esmloc-pretrain, masked language
                                                  # model on the training partitions only) and run the frozen and
                                                  # full rows from it
    python bench/accuracy.py --long_proteins crop,windows --max_residues 1022 --setups scratch_frozen \
        --share_feature_cache --multi_label       # long proteins cropped vs embedded whole in windows, side by side

Setups (rows):

- baseline: logistic regression (scikit-learn, class_weight="balanced", standardised features, C chosen on
  validation) on the amino-acid and dipeptide composition of the N-terminal 50 residues (where mitochondrial
  targeting peptides sit) plus the whole protein's amino-acid composition; a second row adds physico-chemical
  features of the N-terminus (net charge, Arg/Lys/Asp/Glu content, Kyte-Doolittle hydrophobicity, the largest
  hydrophobic moment of an 18-residue alpha-helix window).
- esmloc, random ESM-2 backbone trained from scratch here (`train.py --from_scratch`; no pretrained weights can be
  downloaded on the machine this was written on), frozen (the head on fixed random features: a sanity floor, not a
  method) and full fine-tuning (everything trained from scratch on the training partitions: what esmloc can do here).
  LoRA is not run on random weights: low-rank updates of a random backbone only restrict full training; LoRA is
  meant to adapt pretrained weights.
- esmloc from the pretrained `facebook/esm2_t6_8M_UR50D`, frozen and LoRA: the same command lines with
  `--model_name_or_path`; printed, not run, unless `--pretrained` is given.
- With `--pretrain`: esmloc from a backbone pretrained here (`python -m esmloc.commands.pretrain`, ESM-2's masked-language-model
  recipe, `--pretrain_*` budget) on the proteins of the fold's training partitions only, frozen and full, with the
  frozen and full rows' recipes. Before pretraining, the pretraining file is read back and checked against every
  protein of the validation and test partitions (`check_no_held_out`): one shared sequence stops the benchmark.
  Held-out perplexity before and after pretraining is reported under the table.

Every esmloc setup is a real `python train.py ...` subprocess (its command is printed); its metrics are read from
the `test_results.json` it writes. The baseline's threshold is tuned for MCC on validation and its metrics come
from `esmloc.evaluation`, the same code train.py uses. Wall time is measured per setup (for train.py: the whole
process, including start-up, dataset loading, tokenisation, training, prediction and plots).

Proteins are cropped to their N-terminal `--max_residues` (default 128) for the esmloc setups, to fit the CPU
budget; the baseline sees the N-terminal 50 residues and the whole protein's composition.

Long proteins, crop vs windows (`--long_proteins crop,windows`): every esmloc setup runs twice, once cropping the
proteins longer than `--max_residues` (the rows above) and once embedding them whole in windows (`train.py
--long_proteins windows`, rows "..., long proteins in windows"). A table under each task compares them: the test
metrics of all proteins and of the proteins longer than the window (at the thresholds tuned on validation over all
proteins, from each run's test_predictions.csv), the seconds the backbone spent embedding (read from each run's log;
frozen rows) and the tokens the backbone runs under each rule (counted, all splits). With `--share_feature_cache` the
frozen rows of one setup and rule share a feature cache across tasks (the backbone is the same), so only the first
task embeds: its runs carry the embedding time, the later tasks' none.

Results go to `--output_dir` (default bench/results/accuracy/, git-ignored): accuracy.md (the tables),
accuracy.json (every metric of every run), runs/<setup>/fold<t>/ (each train.py output directory).
"""

import argparse
import json
import math
import os
import platform
import re
import shutil
import statistics
import subprocess
import sys
import time
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path

import numpy as np


REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:  # run as a script from anywhere: the repository's modules come first
    sys.path.insert(0, str(REPO))
if str(REPO / "bench") not in sys.path:  # imported by the tests from its file: bench/common.py beside it
    sys.path.insert(0, str(REPO / "bench"))

import common  # noqa: E402

DEFAULT_DATA = REPO.parent / "shared" / "data" / "deeploc2_swissprot.csv"
DEFAULT_OUTPUT = REPO / "bench" / "results" / "accuracy"
PUBLISHED_PRETRAINED = "facebook/esm2_t6_8M_UR50D"
N_PARTITIONS = 5
TASKS = ("mitochondrion", "deeploc")

# Published DeepLoc 2.0 figures (Thumuluri et al., Nucleic Acids Research 2022, doi:10.1093/nar/gkac278).
PUBLISHED = [
    ("DeepLoc 2.0 (ProtT5), SwissProt 5-fold CV", 0.77),
    ("DeepLoc 2.0 (ProtT5), independent HPA test set", 0.56),
]

AMINO_ACIDS = "ACDEFGHIKLMNPQRSTVWY"
_INDEX = np.full(256, -1, dtype=np.int64)
_INDEX[np.frombuffer(AMINO_ACIDS.encode(), dtype=np.uint8)] = np.arange(20)
# Kyte & Doolittle 1982 hydropathy; Eisenberg et al. 1984 consensus scale for the hydrophobic moment.
_KYTE_DOOLITTLE = dict(zip(AMINO_ACIDS, (1.8, 2.5, -3.5, -3.5, 2.8, -0.4, -3.2, 4.5, -3.9, 3.8, 1.9, -3.5, -1.6, -3.5,
                                         -4.5, -0.8, -0.7, 4.2, -0.9, -1.3)))
_EISENBERG = dict(zip(AMINO_ACIDS, (0.62, 0.29, -0.90, -0.74, 1.19, 0.48, -0.40, 1.38, -1.50, 1.06, 0.64, -0.78, 0.12,
                                    -0.85, -2.53, -0.18, -0.05, 1.08, 0.81, 0.26)))
_KD = np.array([_KYTE_DOOLITTLE[a] for a in AMINO_ACIDS])
_EIS = np.array([_EISENBERG[a] for a in AMINO_ACIDS])
N_TERMINAL_WINDOW = 50
HELIX_WINDOW = 18


# ----------------------------------------------------------------------------------------------------------------
# Baseline features
# ----------------------------------------------------------------------------------------------------------------


def residue_indices(sequence: str) -> np.ndarray:
    """0..19 for the 20 standard amino acids, -1 for anything else (U, X, B, Z, O)."""
    return _INDEX[np.frombuffer(sequence.encode("ascii"), dtype=np.uint8)]


def _composition(indices: np.ndarray) -> np.ndarray:
    valid = indices[indices >= 0]
    return np.bincount(valid, minlength=20) / max(len(valid), 1)


def _dipeptides(indices: np.ndarray) -> np.ndarray:
    pairs = indices[:-1] * 20 + indices[1:]
    pairs = pairs[(indices[:-1] >= 0) & (indices[1:] >= 0)]
    return np.bincount(pairs, minlength=400) / max(len(pairs), 1)


def _max_hydrophobic_moment(indices: np.ndarray, window: int = HELIX_WINDOW) -> float:
    """The largest Eisenberg hydrophobic moment (per residue) of an ideal alpha helix (100 degrees per residue)
    over all `window`-residue stretches: amphipathic helices are the hallmark of mitochondrial presequences."""
    values = np.where(indices >= 0, _EIS[np.clip(indices, 0, None)], 0.0)
    if len(values) == 0:
        return 0.0
    window = min(window, len(values))
    angles = np.deg2rad(100.0) * np.arange(len(values))
    cos, sin = np.cumsum(np.r_[0, values * np.cos(angles)]), np.cumsum(np.r_[0, values * np.sin(angles)])
    sums_cos, sums_sin = cos[window:] - cos[:-window], sin[window:] - sin[:-window]
    return float(np.max(np.hypot(sums_cos, sums_sin)) / window)


def _physicochemical(indices: np.ndarray) -> list[float]:
    """N-terminal physico-chemistry in the first 20 and 50 residues."""
    features = []
    for length in (20, N_TERMINAL_WINDOW):
        window = indices[:length]
        valid = window[window >= 0]
        n = max(len(valid), 1)
        count = {a: float(np.sum(valid == AMINO_ACIDS.index(a))) for a in "RKDEH"}
        features += [
            (count["R"] + count["K"] - count["D"] - count["E"]) / n,  # net charge per residue
            count["R"] / n,
            count["K"] / n,
            (count["D"] + count["E"]) / n,
            float(np.mean(_KD[valid])) if len(valid) else 0.0,  # mean hydropathy
            _max_hydrophobic_moment(window),
        ]
    features.append(math.log(len(indices)))
    return features


def baseline_features(sequences, physicochemical: bool = False) -> np.ndarray:
    """Per protein: amino-acid (20) and dipeptide (400) composition of the N-terminal 50 residues, amino-acid
    composition of the whole protein (20) and, with `physicochemical`, 13 N-terminal descriptors."""
    rows = []
    for sequence in sequences:
        indices = residue_indices(sequence)
        n_terminus = indices[:N_TERMINAL_WINDOW]
        row = [_composition(n_terminus), _dipeptides(n_terminus), _composition(indices)]
        if physicochemical:
            row.append(np.asarray(_physicochemical(indices)))
        rows.append(np.concatenate(row))
    return np.asarray(rows, dtype=np.float64)


def run_baseline(dataset, multi_label: bool, physicochemical: bool, seed: int,
                 c_grid=(1e-5, 1e-4, 1e-3, 1e-2, 1e-1, 1.0)) -> tuple[dict, dict]:
    """Logistic regression on the baseline features; C (one for all labels) chosen for validation MCC at the tuned
    threshold, as train.py chooses its best checkpoint. Returns (the evaluation report, details)."""
    from sklearn.linear_model import LogisticRegression
    from sklearn.multiclass import OneVsRestClassifier
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler

    from esmloc import evaluation
    from esmloc.data import LOCATIONS
    from esmloc.task import targets

    num_labels = len(LOCATIONS) if multi_label else 2
    x = {name: baseline_features(dataset[name]["Sequence"], physicochemical)
         for name in ("train", "validation", "test")}
    y = {name: targets(dataset[name]["label"], num_labels, multi_label) for name in x}
    label_names = list(LOCATIONS) if multi_label else None

    def probabilities(model, split):
        p = model.predict_proba(x[split])
        return p if multi_label else p[:, 1]

    best = None
    for c in c_grid:
        classifier = LogisticRegression(C=c, class_weight="balanced", max_iter=2000, random_state=seed)
        if multi_label:
            classifier = OneVsRestClassifier(classifier)
        model = make_pipeline(StandardScaler(), classifier).fit(x["train"], y["train"].astype(np.int64))
        validation = probabilities(model, "validation")
        threshold = evaluation.tuned_threshold(validation, y["validation"])
        scores = evaluation.classification_metrics(validation, y["validation"], threshold, label_names)
        score = scores["macro_mcc"] if multi_label else scores["mcc"]
        if best is None or score > best[0]:
            best = (score, c, model, validation)
    _, c, model, validation = best
    report = evaluation.evaluation_report(validation, y["validation"], probabilities(model, "test"), y["test"],
                                          label_names=label_names)
    return report, {"C": c, "n_features": x["train"].shape[1]}


# ----------------------------------------------------------------------------------------------------------------
# Setups
# ----------------------------------------------------------------------------------------------------------------


@dataclass
class Setup:
    key: str
    name: str
    kind: str  # "baseline" | "esmloc"
    args: list[str] = field(default_factory=list)  # train.py model arguments (esmloc)
    physicochemical: bool = False  # baseline
    run: bool = True  # False: documented, not run here
    note: str = ""


@dataclass
class Budget:
    """What the esmloc setups train on: architecture, crop, epochs, batch sizes, learning rate, CPU threads."""

    architecture: str = "tiny"
    max_residues: int = 128
    crop: str = "n_terminal"  # the binary task: where mitochondrial targeting peptides sit
    multi_label_crop: str = "middle"  # 10 locations: both ends (signal peptides, PTS1, KDEL), as DeepLoc does
    pooling: str = "mean"
    epochs: float = 30.0
    frozen_epochs: float = 10.0
    pretrained_epochs: float = 5.0  # LoRA from pretrained weights (documented rows)
    batch_size: int = 32
    eval_batch_size: int = 64
    learning_rate_full: float = 3e-3
    learning_rate_frozen: float = 1e-3
    warmup: float = 0.06
    seed: int = 42
    # OMP_NUM_THREADS of every train.py run. One thread: a small model gains little from a second one, and on a
    # shared machine two OpenMP threads wait for each other at every operation whenever another process holds a
    # core (measured here: 100 training steps of `tiny` took 6 s with one thread, 109 s with two, while another
    # process kept one core busy).
    threads: int = 1
    # The long-protein rules each esmloc setup runs with (comma-separated: crop, windows; see "Long proteins" above).
    long_proteins: str = "crop"
    # --pretrain: the masked-language-model pretraining of the backbone (esmloc.commands.pretrain); it stops at
    # pretrain_max_steps or after pretrain_minutes of training, whichever comes first.
    pretrain_architecture: str = "tiny"
    pretrain_config_overrides: str = ""
    pretrain_max_steps: int = 15000
    pretrain_minutes: float = 20.0
    pretrain_batch_size: int = 32
    pretrain_learning_rate: float = 1e-3
    pretrain_eval_steps: int = 1000
    pretrain_eval_proteins: int = 500


SMOKE_BUDGET = Budget(architecture="tiny", max_residues=64, epochs=1, frozen_epochs=1, pretrained_epochs=1,
                      batch_size=16, pretrain_max_steps=20, pretrain_minutes=5.0, pretrain_batch_size=16,
                      pretrain_eval_steps=10, pretrain_eval_proteins=20)
# Stands for the fold's pretrained backbone directory in the command lines of the --pretrain rows.
PRETRAINED_HERE = "<pretrained-backbone>"


class LeakageError(RuntimeError):
    """A protein of a held-out (validation or test) partition is in the pretraining set."""


def _num(value: float) -> str:
    return f"{value:g}"


def long_protein_rules(budget: Budget) -> list[str]:
    from configuration_esmloc import LONG_PROTEIN_RULES

    rules = budget.long_proteins.split(",")
    if not rules or set(rules) - set(LONG_PROTEIN_RULES) or len(set(rules)) < len(rules):
        raise SystemExit(f"--long_proteins: a comma-separated subset of {', '.join(LONG_PROTEIN_RULES)}, got "
                         f"{budget.long_proteins!r}")
    return rules


WINDOWS_SUFFIX = "_windows"


def with_long_protein_rules(setups: list[Setup], rules: list[str]) -> list[Setup]:
    """Each esmloc setup once per rule: the crop rows as they are, the windows rows keyed `<key>_windows` and run
    with `--long_proteins windows` (baselines once)."""
    out = []
    for setup in setups:
        if setup.kind != "esmloc":
            out.append(setup)
            continue
        if "crop" in rules:
            out.append(setup)
        if "windows" in rules:
            out.append(Setup(setup.key + WINDOWS_SUFFIX, setup.name + ", long proteins in windows", setup.kind,
                             setup.args + ["--long_proteins", "windows"], run=setup.run, note=setup.note))
    return out


def make_setups(budget: Budget, pretrained: str | None, pretrain: bool = False) -> list[Setup]:
    scratch = ["--from_scratch", budget.architecture, "--pooling", budget.pooling]
    here = ["--model_name_or_path", PRETRAINED_HERE, "--pooling", budget.pooling]
    backbone = budget.pretrain_architecture + (f" with {budget.pretrain_config_overrides}"
                                               if budget.pretrain_config_overrides else "")
    pretrained_here = [
        Setup("pretrain_frozen", f"esmloc, ESM-2 `{backbone}` pretrained here (MLM on the training "
              "partitions), frozen", "esmloc",
              here + ["--finetune", "frozen", "--num_train_epochs", _num(budget.frozen_epochs),
                      "--learning_rate", _num(budget.learning_rate_frozen)]),
        Setup("pretrain_full", f"esmloc, ESM-2 `{backbone}` pretrained here (MLM on the training "
              "partitions), full", "esmloc",
              here + ["--finetune", "full", "--num_train_epochs", _num(budget.epochs),
                      "--learning_rate", _num(budget.learning_rate_full)]),
    ] if pretrain else []
    return with_long_protein_rules([
        Setup("baseline_composition", "Baseline: logistic regression, N-terminal AA + dipeptide composition",
              "baseline"),
        Setup("baseline_physchem", "Baseline: the same + N-terminal charge, hydropathy, hydrophobic moment",
              "baseline", physicochemical=True),
        Setup("scratch_frozen", f"esmloc, random ESM-2 `{budget.architecture}`, frozen (random features: a floor)",
              "esmloc", scratch + ["--finetune", "frozen", "--num_train_epochs", _num(budget.frozen_epochs),
                                   "--learning_rate", _num(budget.learning_rate_frozen)]),
        Setup("scratch_full", f"esmloc, ESM-2 `{budget.architecture}` trained from scratch (full)",
              "esmloc", scratch + ["--finetune", "full", "--num_train_epochs", _num(budget.epochs),
                                   "--learning_rate", _num(budget.learning_rate_full)]),
        Setup("pretrained_frozen", f"esmloc, pretrained `{pretrained or PUBLISHED_PRETRAINED}`, frozen", "esmloc",
              ["--model_name_or_path", pretrained or PUBLISHED_PRETRAINED, "--pooling", budget.pooling,
               "--finetune", "frozen", "--num_train_epochs", _num(budget.frozen_epochs)],
              run=pretrained is not None, note="not run here: no pretrained weights offline"),
        Setup("pretrained_lora", f"esmloc, pretrained `{pretrained or PUBLISHED_PRETRAINED}`, LoRA", "esmloc",
              ["--model_name_or_path", pretrained or PUBLISHED_PRETRAINED, "--pooling", budget.pooling,
               "--finetune", "lora", "--num_train_epochs", _num(budget.pretrained_epochs)],
              run=pretrained is not None, note="not run here: no pretrained weights offline"),
        *pretrained_here,
    ], long_protein_rules(budget))


def folds(all_folds: bool, test_partition: int) -> list[tuple[int, int]]:
    """(validation partition, test partition) pairs; training takes the other three."""
    tests = range(N_PARTITIONS) if all_folds else [test_partition]
    return [((t - 1) % N_PARTITIONS, t) for t in tests]


def train_command(setup: Setup, budget: Budget, data_file: Path, validation: int, test: int, output_dir: Path,
                  multi_label: bool, feature_cache: Path | None = None) -> list[str]:
    # Frozen runs embed every split once and cache the features: a fresh cache per run (unless `feature_cache` names
    # a shared one), so that the wall time includes the embedding (a random backbone built from the same seed would
    # otherwise hit an earlier run's cache).
    cache = ["--feature_cache_dir", str(feature_cache or output_dir / "feature_cache")] if "frozen" in setup.args \
        else []
    return [
        sys.executable, str(REPO / "train.py"), *setup.args,
        "--dataset_config", "deeploc" if multi_label else "mitochondrion",
        "--train_file", str(data_file), "--split_method", "partition",
        "--validation_partitions", str(validation), "--test_partitions", str(test),
        "--max_residues", str(budget.max_residues), "--crop", budget.multi_label_crop if multi_label else budget.crop,
        "--warmup_steps", _num(budget.warmup),
        "--per_device_train_batch_size", str(budget.batch_size),
        "--per_device_eval_batch_size", str(budget.eval_batch_size),
        "--seed", str(budget.seed), "--save_total_limit", "1", "--disable_tqdm", "true",
        *cache, "--output_dir", str(output_dir),
    ]


def shell_line(command: list[str]) -> str:
    """The command as a user would type it (train.py relative to the repository)."""
    parts = ["python", "train.py"] + command[2:] if command[1].endswith("train.py") else ["python"] + command[1:]
    return " ".join(part if part and all(c.isalnum() or c in "-_./=:," for c in part) else repr(part)
                    for part in parts)


def run_fresh(command: list[str], output_dir: Path, threads: int) -> float:
    """Runs `command` (train.py or esmloc.commands.pretrain) into a fresh output directory, its log beside it; returns the wall
    seconds."""
    if output_dir.exists():  # train.py and esmloc.commands.pretrain would resume from a checkpoint left there
        shutil.rmtree(output_dir)
    output_dir.mkdir(parents=True)
    env = {**os.environ, "HF_HUB_OFFLINE": os.environ.get("HF_HUB_OFFLINE", "1"), "TOKENIZERS_PARALLELISM": "false",
           "PYTHONUNBUFFERED": "1", "OMP_NUM_THREADS": str(threads), "MKL_NUM_THREADS": str(threads)}
    env.pop("WORLD_SIZE", None)
    log = output_dir.parent / f"{output_dir.name}.log"
    start = time.perf_counter()
    with open(log, "w") as handle:
        result = subprocess.run(command, cwd=REPO, env=env, stdout=handle, stderr=subprocess.STDOUT)
    wall = time.perf_counter() - start
    if result.returncode != 0:
        tail = log.read_text()[-4000:]
        raise RuntimeError(f"{shell_line(command)[:80]}... failed ({result.returncode}); log {log}:\n{tail}")
    return wall


def run_train(command: list[str], output_dir: Path, threads: int) -> tuple[dict, float]:
    """Runs train.py in a fresh output directory; returns (test_results.json, wall seconds)."""
    wall = run_fresh(command, output_dir, threads)
    return json.loads((output_dir / "test_results.json").read_text()), wall


# ----------------------------------------------------------------------------------------------------------------
# Pretraining (--pretrain)
# ----------------------------------------------------------------------------------------------------------------


def held_out_sequences(data_file: Path, partitions) -> dict[str, str]:
    """{sequence: ACC} of every protein of `partitions` in the DeepLoc file, read from the file itself (not from the
    split the dataset builder made), normalised as esmloc reads sequences."""
    import pandas as pd

    from esmloc.data import validate_sequence

    frame = pd.read_csv(data_file, usecols=["ACC", "Partition", "Sequence"])
    rows = frame[frame["Partition"].isin(list(partitions))]
    return {validate_sequence(sequence)[0]: acc for acc, sequence in zip(rows["ACC"], rows["Sequence"])}


def check_no_held_out(pretraining_file: Path, held_out: dict[str, str], partitions) -> int:
    """Reads the pretraining file back and raises `LeakageError` if any of its proteins has the sequence of a
    held-out protein; returns the number of proteins checked."""
    from esmloc.data import read_sequences

    checked, leaked = 0, []
    for record in read_sequences(pretraining_file):
        checked += 1
        if record.sequence in held_out:
            leaked.append(f"{record.acc} (the sequence of {held_out[record.sequence]})")
    if leaked:
        raise LeakageError(f"{pretraining_file}: {len(leaked)} protein(s) of the held-out partitions "
                           f"{sorted(partitions)} would be pretrained on, e.g. {', '.join(leaked[:5])}")
    return checked


def pretrain_command(budget: Budget, pretraining_file: Path, output_dir: Path) -> list[str]:
    overrides = ["--config_overrides", budget.pretrain_config_overrides] if budget.pretrain_config_overrides else []
    return [
        sys.executable, "-m", "esmloc.commands.pretrain", "--from_scratch", budget.pretrain_architecture, *overrides,
        "--train_files", str(pretraining_file), "--validation_fraction", "0.05",
        "--max_eval_proteins", str(budget.pretrain_eval_proteins), "--max_residues", str(budget.max_residues),
        "--max_steps", str(budget.pretrain_max_steps), "--max_train_minutes", _num(budget.pretrain_minutes),
        "--per_device_train_batch_size", str(budget.pretrain_batch_size),
        "--learning_rate", _num(budget.pretrain_learning_rate), "--eval_steps", str(budget.pretrain_eval_steps),
        "--save_steps", str(budget.pretrain_eval_steps), "--logging_steps", str(max(budget.pretrain_eval_steps // 10, 1)),
        "--seed", str(budget.seed), "--disable_tqdm", "true", "--output_dir", str(output_dir),
    ]


def pretrain_backbone(data_file: Path, training_split, validation: int, test: int, budget: Budget,
                      directory: Path) -> dict:
    """Pretrains a backbone on the proteins of `training_split` (the fold's training partitions) after checking the
    written file against every protein of the validation and test partitions; returns what was done and measured."""
    import csv

    directory.mkdir(parents=True, exist_ok=True)
    pretraining_file = directory / "pretraining_proteins.csv"
    with open(pretraining_file, "w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(["ACC", "Sequence"])
        writer.writerows(zip(training_split["ACC"], training_split["Sequence"]))
    held_out_partitions = [validation, test]
    checked = check_no_held_out(pretraining_file, held_out_sequences(data_file, held_out_partitions),
                                held_out_partitions)
    print(f"- pretraining set: {checked} proteins of the training partitions, none of partitions "
          f"{held_out_partitions} (checked)")
    output_dir = directory / "backbone"
    command = pretrain_command(budget, pretraining_file, output_dir)
    print(f"- pretraining the backbone:\n    {shell_line(command)}", flush=True)
    wall = run_fresh(command, output_dir, budget.threads)

    def read(name):
        path = output_dir / name
        return json.loads(path.read_text()) if path.is_file() else {}

    before, after, train = read("initial_eval_results.json"), read("eval_results.json"), read("train_results.json")
    info = {
        "backbone": str(output_dir), "command": shell_line(command), "wall_s": wall, "proteins": checked,
        "held_out_partitions": held_out_partitions, "steps": train.get("global_step"),
        "train_minutes": train.get("train_runtime", 0) / 60,
        "perplexity_before": before.get("initial_eval_perplexity"), "perplexity_after": after.get("eval_perplexity"),
        "masked_accuracy_before": before.get("initial_eval_masked_accuracy"),
        "masked_accuracy_after": after.get("eval_masked_accuracy"),
        "curve": str(output_dir / "perplexity_curve.png"),
    }
    print(f"    {wall / 60:.1f} min, {info['steps']} steps; held-out perplexity {_summary([info['perplexity_before']])} "
          f"-> {_summary([info['perplexity_after']])}", flush=True)
    return info


def pretraining_table(infos: dict[str, dict]) -> str:
    lines = ["| fold | proteins | steps | training time | held-out perplexity before → after | masked-residue "
             "accuracy before → after |", "| --- | --- | --- | --- | --- | --- |"]
    for fold, info in infos.items():
        lines.append(f"| {fold} | {info['proteins']} | {info['steps']} | {info['train_minutes']:.1f} min | "
                     f"{_summary([info['perplexity_before']])} → {_summary([info['perplexity_after']])} | "
                     f"{_summary([info['masked_accuracy_before']])} → {_summary([info['masked_accuracy_after']])} |")
    return "\n".join(lines)


# ----------------------------------------------------------------------------------------------------------------
# Long proteins: crop vs windows
# ----------------------------------------------------------------------------------------------------------------

SHARED_CACHE = "feature_cache"  # under --output_dir, with --share_feature_cache
_EMBEDDED = re.compile(r"(\d+) embedded now in ([0-9.]+) s")  # esmloc.cache.cached_features' log line


def embedding_seconds(log: Path) -> float | None:
    """The seconds a train.py run spent embedding proteins into its feature cache (the sum over the splits it
    embedded, from its log: 0 when everything came from the cache); None for a run without a feature cache."""
    found = _EMBEDDED.findall(log.read_text()) if log.is_file() else []
    return sum(float(seconds) for count, seconds in found if int(count)) if found else None


def long_protein_metrics(run_dir: Path, test_split, multi_label: bool, window: int) -> dict:
    """A run's test metrics on the proteins longer than `window` residues, at the run's thresholds tuned on
    validation (over all proteins): `long_<metric>_tuned` for the metrics of the decisions (MCC, F1, ...; not the
    AUCs), and `long_proteins` (how many there are). The decisions are read from the run's test_predictions.csv,
    where they were taken on the unrounded probabilities, and scored by the same metric module as the run's own."""
    import pandas as pd

    from esmloc import evaluation, task
    from esmloc.data import LOCATIONS

    predictions = pd.read_csv(run_dir / "test_predictions.csv", keep_default_na=False, dtype=str)
    if predictions["ACC"].tolist() != list(test_split["ACC"]):
        raise RuntimeError(f"{run_dir / 'test_predictions.csv'}: not the test split's proteins in order")
    long = np.array([len(sequence) > window for sequence in test_split["Sequence"]])

    def chosen(column, names):  # 1 where a protein's cell names the label (a ";"-joined list for multi-label)
        return np.array([[name in cell.split(task.LABEL_SEPARATOR) for name in names]
                         for cell in predictions[column]], dtype=np.int64)

    if multi_label:
        names = list(LOCATIONS)
        decided, truth = chosen("predicted_labels", names), chosen("true_labels", names)
        metrics = evaluation.classification_metrics(decided[long], truth[long], [0.5] * len(names), names)
    else:
        decided, truth = chosen("predicted_label", [task.POSITIVE_LABEL])[:, 0], chosen("true_label",
                                                                                       [task.POSITIVE_LABEL])[:, 0]
        metrics = evaluation.classification_metrics(decided[long], truth[long], 0.5)
    return {"long_proteins": int(long.sum()),
            **{f"long_{key}_tuned": value for key, value in metrics.items()
               if isinstance(value, (int, float)) and "auc" not in key and "threshold" not in key}}


def backbone_tokens(sequences, window: int, rule: str) -> int:
    """The tokens the backbone runs for `sequences` under a long-protein rule: each window's residues + 2."""
    from tokenization_esmloc import window_spans

    if rule == "crop":
        return sum(min(len(sequence), window) + 2 for sequence in sequences)
    return sum(end - start + 2 for sequence in sequences for start, end, _, _ in window_spans(len(sequence), window))


def long_proteins_section(rows: list[dict], multi_label: bool, window: int, dataset) -> str:
    """The crop-vs-windows table of one task: each esmloc setup's crop and windows rows side by side."""
    columns = ([("macro MCC", "macro_mcc_tuned"), ("Mito MCC", "mcc_Mitochondrion_tuned")] if multi_label
               else [("Mito MCC", "mcc_tuned")])
    header = ["Setup", "long proteins"] + [f"{name}, {part}" for name, _ in columns
                                           for part in ("all", f"> {window} residues")] + ["embedding time"]
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join(" --- " for _ in header) + "|"]
    long_count = None
    for row in rows:
        if not row["runs"] or not row["key"].startswith(("scratch", "pretrain")):
            continue
        rule = "windows" if row["key"].endswith(WINDOWS_SUFFIX) else "crop"
        cells = []
        for _, key in columns:
            cells += [_summary([run["metrics"].get(f"test_{key}") for run in row["runs"]]),
                      _summary([run["metrics"].get(f"long_{key}") for run in row["runs"]])]
        seconds = [run["metrics"].get("embedding_s") for run in row["runs"]]
        cells.append(_wall(seconds) if all(value is not None for value in seconds) else "— (no feature cache)")
        long_count = row["runs"][0]["metrics"].get("long_proteins", long_count)
        name = row["name"].removesuffix(", long proteins in windows")
        lines.append("| " + " | ".join([name, rule, *cells]) + " |")
    sequences = [sequence for split in dataset.values() for sequence in split["Sequence"]]
    crop, windows = (backbone_tokens(sequences, window, rule) for rule in ("crop", "windows"))
    return (f"Long proteins, crop vs windows ({long_count} of {len(dataset['test'])} test proteins are longer than "
            f"the {window}-residue window; their metrics use the thresholds tuned on all validation proteins):\n\n"
            + "\n".join(lines) + f"\n\nTokens the backbone runs over all {len(sequences)} proteins: crop "
            f"{crop:,}, windows {windows:,} ({windows / crop:.2f}x).")


# ----------------------------------------------------------------------------------------------------------------
# Tables
# ----------------------------------------------------------------------------------------------------------------

BINARY_COLUMNS = [("Mito MCC (tuned)", "test_mcc_tuned"), ("ROC-AUC", "test_roc_auc"), ("PR-AUC", "test_pr_auc"),
                  ("F1 (tuned)", "test_f1_tuned")]
MULTI_COLUMNS = [("macro MCC (tuned)", "test_macro_mcc_tuned"), ("Mito MCC (tuned)", "test_mcc_Mitochondrion_tuned"),
                 ("micro F1", "test_micro_f1_tuned"), ("macro F1", "test_macro_f1_tuned"),
                 ("subset acc.", "test_subset_accuracy_tuned"), ("Jaccard", "test_jaccard_tuned")]


def _summary(values: list) -> str:
    values = [v for v in values if v is not None]
    if not values:
        return "n/a"
    if len(values) == 1:
        return f"{values[0]:.3f}"
    return f"{statistics.mean(values):.3f} ± {statistics.stdev(values):.3f}"


def _wall(seconds: list[float]) -> str:
    total = sum(seconds)
    text = f"{total / 60:.1f} min" if total >= 60 else f"{total:.0f} s" if total >= 10 else f"{total:.1f} s"
    return text + (f" ({len(seconds)} folds)" if len(seconds) > 1 else "")


def describe(budget: Budget, tasks: list[str]) -> str:
    """What the rows ran, in words, for the report under the tables."""
    from configuration_esmloc import ESM2_ARCHITECTURES, window_overlap_for

    architecture = ESM2_ARCHITECTURES[budget.architecture]
    crops = " and ".join(f"{budget.multi_label_crop if task == 'deeploc' else budget.crop} crop for {task}"
                         for task in tasks)
    return (
        f"esmloc rows: `train.py`, ESM-2 `{budget.architecture}` architecture ({architecture['num_hidden_layers']} "
        f"layers, hidden size {architecture['hidden_size']}) with random initial weights, proteins cropped to "
        f"{budget.max_residues} residues ({crops})"
        + (f" or, in the rows 'long proteins in windows', embedded whole in windows of {budget.max_residues} residues "
           f"overlapping by at least {window_overlap_for(budget.max_residues)} (train.py --long_proteins windows)"
           if "windows" in long_protein_rules(budget) else "")
        + f", {budget.pooling} pooling, batch {budget.batch_size}, "
        f"warmup {_num(budget.warmup)}, seed {budget.seed}, OMP_NUM_THREADS={budget.threads}; full: "
        f"{_num(budget.epochs)} epochs at learning rate {_num(budget.learning_rate_full)}; frozen: "
        f"{_num(budget.frozen_epochs)} epochs at {_num(budget.learning_rate_frozen)}; the checkpoint with the best "
        f"validation MCC is kept, thresholds are tuned for MCC on validation. Baselines: scikit-learn logistic "
        f"regression (class_weight=balanced, standardised features, C chosen on validation), features of the "
        f"N-terminal {N_TERMINAL_WINDOW} residues and the whole protein; their wall time covers features, the C "
        f"search and evaluation."
    )


def markdown_table(rows: list[dict], columns, published: bool) -> str:
    header = ["Setup", *[name for name, _ in columns], "wall time"]
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join(" --- " for _ in header) + "|"]
    for row in rows:
        if row["runs"]:
            cells = [_summary([run["metrics"].get(key) for run in row["runs"]]) for _, key in columns]
            cells.append(_wall([run["wall_s"] for run in row["runs"]]))
        else:
            cells = ["—"] * len(columns) + [row["note"]]
        lines.append("| " + " | ".join([row["name"], *cells]) + " |")
    if published:
        for name, mcc in PUBLISHED:
            cells = [f"{mcc:.2f}"] + ["—"] * (len(columns) - 1) + ["published, not run here"]
            lines.append("| " + " | ".join([name, *cells]) + " |")
    return "\n".join(lines)


# ----------------------------------------------------------------------------------------------------------------
# Main
# ----------------------------------------------------------------------------------------------------------------


def smoke_data(source: Path, destination: Path, rows_per_partition: int, seed: int) -> Path:
    """A few proteins of every partition of `source`, with every column, for the smoke mode."""
    import pandas as pd

    frame = pd.read_csv(source)
    rng = np.random.default_rng(seed)
    picked = [rng.choice(np.flatnonzero(frame["Partition"].to_numpy() == partition),
                         size=min(rows_per_partition, int((frame["Partition"] == partition).sum())), replace=False)
              for partition in sorted(frame["Partition"].unique())]
    destination.parent.mkdir(parents=True, exist_ok=True)
    frame.iloc[np.sort(np.concatenate(picked))].to_csv(destination, index=False)
    return destination


def parse_arguments(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], epilog=__doc__.split("\n\n", 1)[1],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", type=Path, default=DEFAULT_DATA,
                        help="DeepLoc 2.0 SwissProt CSV (ACC, Kingdom, Partition, Membrane, 10 locations, Sequence)")
    parser.add_argument("--output_dir", type=Path, default=DEFAULT_OUTPUT)
    parser.add_argument("--test_partition", type=int, default=4, help="the test partition (validation: the one "
                        "before it, mod 5; training: the other three)")
    parser.add_argument("--all_folds", action="store_true", help="all five (validation, test) folds")
    parser.add_argument("--tasks", default="mitochondrion",
                        help="comma-separated: mitochondrion (binary, the default), deeploc (10 locations, "
                        "multi-label)")
    parser.add_argument("--multi_label", action="store_true", help="both tasks: --tasks mitochondrion,deeploc")
    parser.add_argument("--setups", default=None,
                        help="comma-separated subset of: baseline_composition, baseline_physchem, scratch_frozen, "
                        "scratch_full, pretrained_frozen, pretrained_lora (and with --pretrain: pretrain_frozen, "
                        "pretrain_full)")
    parser.add_argument("--pretrain", action="store_true",
                        help="also pretrain a backbone here on the training partitions (esmloc.commands.pretrain, the "
                        "--pretrain_* budget) and run the frozen and full rows from it")
    parser.add_argument("--pretrained", default=None, metavar="ID_OR_PATH",
                        help=f"run the pretrained rows from this ESM-2 checkpoint (e.g. {PUBLISHED_PRETRAINED})")
    parser.add_argument("--share_feature_cache", action="store_true",
                        help="frozen rows share one feature cache per setup across tasks (emptied at the start), so "
                        "only the first task embeds (see Long proteins)")
    parser.add_argument("--smoke", action="store_true",
                        help="a few hundred proteins (sampled per partition), tiny models, 1 epoch, 64 residues")
    parser.add_argument("--smoke_rows_per_partition", type=int, default=60)
    budget = Budget()
    for name, default in vars(budget).items():
        parser.add_argument(f"--{name}", type=type(default), default=None, help=f"default {default}")
    return parser.parse_args(argv)


def main(argv=None) -> dict:
    args = parse_arguments(argv)
    budget = Budget(**vars(SMOKE_BUDGET if args.smoke else Budget()))
    for name in vars(budget):
        if getattr(args, name) is not None:
            setattr(budget, name, getattr(args, name))
    if not args.data.is_file():
        raise SystemExit(f"{args.data}: no such file (the DeepLoc 2.0 SwissProt CSV; see --data)")
    output_dir = args.output_dir.resolve()
    output_dir.mkdir(parents=True, exist_ok=True)
    data_file = args.data.resolve()
    if args.smoke:
        data_file = smoke_data(data_file, output_dir / "smoke_data.csv", args.smoke_rows_per_partition, budget.seed)

    if args.share_feature_cache and (output_dir / SHARED_CACHE).exists():
        shutil.rmtree(output_dir / SHARED_CACHE)  # fresh: the first task's runs embed, and carry the embedding time
    setups = make_setups(budget, args.pretrained, pretrain=args.pretrain)
    if args.setups:
        chosen = args.setups.split(",")
        unknown = set(chosen) - {setup.key for setup in setups}
        if unknown:
            raise SystemExit(f"--setups: unknown {sorted(unknown)}")
        # A setup's windows row comes with it (see with_long_protein_rules).
        setups = [setup for setup in setups if setup.key.removesuffix(WINDOWS_SUFFIX) in chosen or setup.key in chosen]

    started = time.perf_counter()
    tasks = ["mitochondrion", "deeploc"] if args.multi_label else args.tasks.split(",")
    if set(tasks) - set(TASKS):
        raise SystemExit(f"--tasks: unknown {sorted(set(tasks) - set(TASKS))}; choose from {', '.join(TASKS)}")
    info = {
        "date": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "command": " ".join(["python", "bench/accuracy.py", *(sys.argv[1:] if argv is None else argv)]),
        "data": str(args.data), "smoke": args.smoke, "budget": vars(budget),
        "host": {"python": platform.python_version(), "cpus": os.cpu_count(),
                 "load_average_at_start": os.getloadavg()},
    }
    print(f"# esmloc accuracy benchmark ({info['date']})\n\ncommand: {info['command']}\ndata: {data_file}")
    print(f"esmloc budget: {json.dumps(vars(budget))}\nload average at start: "
          + ", ".join(f"{x:.2f}" for x in os.getloadavg()))

    results = {"info": info, "tasks": {}}
    sections = []
    for task in tasks:
        sections.append(run_task(task, setups, budget, args, data_file, output_dir, results))
        # Written after every task, so that an interrupted run keeps the tables it finished.
        report = write_report(sections, budget, tasks, info, results, output_dir, started)
    print("\n" + report)
    print(f"Written: {output_dir / 'accuracy.md'}, {output_dir / 'accuracy.json'}")
    # One table per kind of run: the crop-vs-windows comparison does not replace the main table.
    name = "accuracy" + ("-pretrain" if args.pretrain else "") + ("-long_proteins" if "windows" in budget.long_proteins
                                                                 else "")
    common.write_table(name,
                       f"Accuracy on DeepLoc 2.0 ({data_file.name}), homology partitions", report, smoke=args.smoke,
                       other_load="load average at start "
                       + ", ".join(f"{x:.2f}" for x in info["host"]["load_average_at_start"]))
    return results


def run_task(task: str, setups: list[Setup], budget: Budget, args, data_file: Path, output_dir: Path,
             results: dict) -> str:
    """Every setup on every fold of one task; returns the task's Markdown section (and fills `results`)."""
    from esmloc import data

    multi_label = task == "deeploc"
    rows = [{"key": s.key, "name": s.name, "note": s.note, "runs": [], "commands": []} for s in setups]
    split_sizes = {}
    results["tasks"][task] = {"split_sizes": split_sizes, "rows": rows}
    # One pretrained backbone per fold, shared by the tasks (their training partitions are the same proteins).
    pretraining = results.setdefault("pretraining", {})
    needs_backbone = any(setup.run and PRETRAINED_HERE in setup.args for setup in setups)
    for validation, test in folds(args.all_folds, args.test_partition):
        dataset = data.load_dataset(str(data_file), task, split_method="partition",
                                    validation_partitions=[validation], test_partitions=[test])
        split_sizes[f"test{test}"] = {name: len(split) for name, split in dataset.items()}
        print(f"\n## {task}, fold: validation partition {validation}, test partition {test}, training the other "
              "three")
        for name, counts in data.dataset_summary(dataset)["splits"].items():
            print(f"  {name:<10} N={counts['proteins']:>6}  Mitochondrion={counts['Mitochondrion']}")
        fold = f"test{test}"
        if needs_backbone and fold not in pretraining:
            pretraining[fold] = pretrain_backbone(data_file, dataset["train"], validation, test, budget,
                                                  output_dir / "pretraining" / f"fold{test}")
        for setup, row in zip(setups, rows):
            run_dir = output_dir / "runs" / task / setup.key / f"fold{test}"
            if setup.kind == "baseline":
                start = time.perf_counter()
                report, details = run_baseline(dataset, multi_label, setup.physicochemical, budget.seed)
                wall = time.perf_counter() - start
                row["commands"].append(f"(in-process) {details}")
                print(f"- {setup.name}: {wall:.0f} s, C={details['C']}, {details['n_features']} features")
            else:
                shared_cache = (output_dir / SHARED_CACHE / setup.key / f"fold{test}") if args.share_feature_cache \
                    else None
                command = train_command(setup, budget, data_file, validation, test, run_dir, multi_label,
                                        shared_cache)
                if fold in pretraining:
                    command = [pretraining[fold]["backbone"] if part == PRETRAINED_HERE else part for part in command]
                line = shell_line(command)
                row["commands"].append(line)
                if not setup.run:
                    print(f"- {setup.name}: {setup.note}\n    {line}")
                    continue
                print(f"- {setup.name}:\n    {line}", flush=True)
                report, wall = run_train(command, run_dir, budget.threads)
                report = {**report, **long_protein_metrics(run_dir, dataset["test"], multi_label, budget.max_residues),
                          "embedding_s": embedding_seconds(run_dir.parent / f"{run_dir.name}.log")}
                print(f"    {wall:.0f} s", flush=True)
            metrics = {key: value for key, value in report.items() if isinstance(value, (int, float)) or value is None}
            row["runs"].append({"test_partition": test, "validation_partition": validation, "wall_s": wall,
                                "metrics": metrics})
            shown = MULTI_COLUMNS if multi_label else BINARY_COLUMNS
            print("    " + ", ".join(f"{name} {_summary([metrics.get(key)])}" for name, key in shown), flush=True)
    title = ("Multi-label, DeepLoc's 10 locations (thresholds tuned per location on validation)" if multi_label
             else "Mitochondrion vs rest (threshold tuned for MCC on validation)")
    fold_text = "all 5 folds, mean ± sd" if args.all_folds else f"test partition {args.test_partition}"
    sizes = next(iter(split_sizes.values()))
    table = markdown_table(rows, MULTI_COLUMNS if multi_label else BINARY_COLUMNS, published=not multi_label)
    if "windows" in long_protein_rules(budget):
        table += "\n\n" + long_proteins_section(rows, multi_label, budget.max_residues, dataset)
    if needs_backbone:
        table += (f"\n\nThe pretrained-here backbone: ESM-2 `{budget.pretrain_architecture}`"
                  + (f" ({budget.pretrain_config_overrides})" if budget.pretrain_config_overrides else "")
                  + f" from random weights, masked language model on the training partitions only, batch "
                  f"{budget.pretrain_batch_size}, learning rate {_num(budget.pretrain_learning_rate)}, at most "
                  f"{budget.pretrain_max_steps} steps or {_num(budget.pretrain_minutes)} min of training, random "
                  f"{budget.max_residues}-residue windows; perplexity on 5% of those proteins (at most "
                  f"{budget.pretrain_eval_proteins}) held out from pretraining, cropped and masked once:\n\n"
                  + pretraining_table(pretraining))
    return (f"### {title}\n\n{fold_text}; N train/validation/test = {sizes['train']}/{sizes['validation']}/"
            f"{sizes['test']}\n\n{table}")


def write_report(sections: list[str], budget: Budget, tasks: list[str], info: dict, results: dict,
                 output_dir: Path, started: float) -> str:
    """accuracy.md (the tables, what ran, time and load) and accuracy.json (every metric); returns the Markdown."""
    info["total_wall_s"] = time.perf_counter() - started
    info["load_average_at_end"] = os.getloadavg()
    footer = (f"Total wall time {info['total_wall_s'] / 60:.1f} min on {os.cpu_count()} CPUs (load average at start "
              f"{info['host']['load_average_at_start'][0]:.2f}, at end {info['load_average_at_end'][0]:.2f}); "
              f"{info['date']}; `{info['command']}`")
    report = "\n\n".join(sections) + "\n\n" + describe(budget, tasks) + "\n\n" + footer + "\n"
    (output_dir / "accuracy.md").write_text(report)
    (output_dir / "accuracy.json").write_text(json.dumps(results, indent=2))
    return report


if __name__ == "__main__":
    main()
