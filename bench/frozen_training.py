"""Frozen-backbone training, 3 epochs: train.py's cached-feature path vs the plain Trainer path (--no_feature_cache).

    python bench/frozen_training.py                 # N=256 DeepLoc proteins, ESM-2 8M architecture, 3 repeats
    python bench/frozen_training.py --n 512 --repeats 5
    python bench/frozen_training.py --smoke         # tiny model, 120 proteins: checks that the script runs

Each repeat runs `train.py --finetune frozen` twice in fresh processes on the same CSV (the first N rows of the DeepLoc
2.0 CSV: ACC, Mitochondrion, Sequence; split 70/10/20 as train.py does): once on the cached-feature path with an
empty feature cache (so embedding every split is part of the time) and once with --no_feature_cache (a plain
`Trainer` running the frozen backbone in every step and every evaluation). Everything else is train.py's defaults
(batch 8, group_by_length, evaluation and a checkpoint every epoch, best model by validation MCC, final evaluation
with the engine, plots).

Reported per path (medians over repeats; ratios are medians of per-repeat ratios):
- training: from the built model to the end of `trainer.train()` (tokenising or embedding the splits, the Trainer,
  3 epochs with their evaluations, checkpoints);
- end to end: `train.main` from start to finish (data, model, training, saving, final evaluation, plots; imports
  excluded, they cost both paths the same);
- process peak RSS: the peak resident set size of the training process (each run is a process of its own);
- the largest difference between the test-set probabilities of the two paths (test_predictions.csv).
With --warm, the cached path also runs a third time on the filled cache (what a second run with the same backbone,
e.g. another head or learning rate, costs).
"""

import argparse
import csv
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

import common


CHILD = r"""
import json, resource, sys, time
import transformers
import esmloc.commands.train as train
import esmloc.finetuning as finetuning

marks = {"start": time.perf_counter()}
build_model = finetuning.build_model
def timed_build_model(*args, **kwargs):
    model = build_model(*args, **kwargs)
    marks["model_built"] = time.perf_counter()
    return model
finetuning.build_model = timed_build_model
trainer_train = transformers.Trainer.train
def timed_train(self, *args, **kwargs):
    marks["train_start"] = time.perf_counter()
    result = trainer_train(self, *args, **kwargs)
    marks["train_end"] = time.perf_counter()
    return result
transformers.Trainer.train = timed_train
train.main(sys.argv[1:])
marks["end"] = time.perf_counter()
print("BENCH_JSON " + json.dumps({
    "training_s": marks["train_end"] - marks["model_built"],
    "prepare_s": marks["train_start"] - marks["model_built"],
    "epochs_s": marks["train_end"] - marks["train_start"],
    "end_to_end_s": marks["end"] - marks["start"],
    "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
}))
"""


def parse_arguments(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--n", type=int, default=256, help="number of proteins (default 256)")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--epochs", type=int, default=3)
    parser.add_argument("--architecture", default="esm2_t6_8M")
    parser.add_argument("--warm", action="store_true", help="also time the cached path on a filled cache")
    common.add_quiet_machine_arguments(parser, max_wait=False)
    parser.add_argument("--data", type=Path, default=common.DEEPLOC_CSV)
    parser.add_argument("--work_dir", type=Path, default=None, help="where runs write (default: a temporary dir)")
    parser.add_argument("--smoke", action="store_true", help="tiny model, 120 proteins (enough for a validation positive), 2 epochs, 1 repeat")
    args = parser.parse_args(argv)
    if args.smoke:
        args.n, args.repeats, args.architecture, args.epochs = min(args.n, 120), 1, "tiny", 2
    return args


def run_train(csv_path, output_dir, extra, env) -> dict:
    command = [sys.executable, "-c", CHILD, "--from_scratch", ARCHITECTURE, "--finetune", "frozen",
               "--train_file", str(csv_path), "--output_dir", str(output_dir), "--num_train_epochs", str(EPOCHS),
               "--num_examples_to_show", "0", "--disable_tqdm", "true", *extra]
    result = subprocess.run(command, cwd=common.REPO, env=env, capture_output=True, text=True)
    if result.returncode != 0:
        raise SystemExit(f"train.py failed ({result.returncode}): {' '.join(command[3:])}\n"
                         f"{result.stdout[-3000:]}\n{result.stderr[-3000:]}")
    line = [line for line in result.stdout.splitlines() if line.startswith("BENCH_JSON ")][-1]
    return json.loads(line.removeprefix("BENCH_JSON "))


def test_probabilities(output_dir) -> dict:
    with open(Path(output_dir) / "test_predictions.csv", newline="") as handle:
        return {row["ACC"]: float(row["probability_Mitochondrion"]) for row in csv.DictReader(handle)}


ARCHITECTURE, EPOCHS = "esm2_t6_8M", 3


def main(argv=None):
    global ARCHITECTURE, EPOCHS
    args = parse_arguments(argv)
    ARCHITECTURE, EPOCHS = args.architecture, args.epochs
    rows, source = common.load_proteins(args.data, args.n, args.smoke)
    work = Path(args.work_dir or tempfile.mkdtemp(prefix="esmloc-bench-"))
    work.mkdir(parents=True, exist_ok=True)
    csv_path = work / "proteins.csv"
    with open(csv_path, "w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=["ACC", "Mitochondrion", "Sequence"])
        writer.writeheader()
        writer.writerows(rows)
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false",
           "HF_DATASETS_CACHE": str(work / "datasets_cache")}
    env.pop("WORLD_SIZE", None)
    # Build the dataset once (datasets caches it), so that no path pays for it in its first run.
    subprocess.run([sys.executable, "-c", f"from esmloc import data; data.load_dataset({str(csv_path)!r}, seed=42)"],
                   cwd=common.REPO, env=env, check=True, capture_output=True)

    load_before = common.load_average()
    runs = {"cached": [], "plain": [], "warm": []}
    differences, contamination = [], []
    repeat, attempts = 0, 0
    while repeat < args.repeats:
        if not args.smoke:
            common.wait_until_quiet(args.max_other_load)
        attempts += 1
        tag = f"{repeat}-{attempts}"
        cache_dir = work / f"features-{tag}"
        paths = [("cached", ["--feature_cache_dir", str(cache_dir)]), ("plain", ["--no_feature_cache"])]
        if args.warm:
            paths.append(("warm", ["--feature_cache_dir", str(cache_dir)]))  # after "cached" filled the cache
        measured, others = {}, []
        for name, extra in paths if repeat % 2 == 0 else [paths[1], paths[0], *paths[2:]]:
            with common.OtherLoad() as load:
                measured[name] = run_train(csv_path, work / f"{name}-{tag}", extra, env)
            others.append(load.fraction)
        worst = max((fraction for fraction in others if fraction is not None), default=0.0)
        cached, plain = test_probabilities(work / f"cached-{tag}"), test_probabilities(work / f"plain-{tag}")
        assert cached.keys() == plain.keys()
        difference = max(abs(cached[acc] - plain[acc]) for acc in cached)
        summary = (f"training cached {measured['cached']['training_s']:.1f} s, plain "
                   f"{measured['plain']['training_s']:.1f} s; max |dp| {difference:.1e}; other processes used up to "
                   f"{100 * worst:.0f}% of the CPUs")
        if not common.repeat_is_kept(args, worst, repeat, attempts, summary):
            continue
        for name, result in measured.items():
            runs[name].append(result)
        differences.append(difference)
        contamination.append(worst)
        repeat += 1

    def row(name, label):
        measured = runs[name]
        plain = runs["plain"]
        return [
            label,
            f"{common.median([m['training_s'] for m in measured]):.1f}",
            f"{common.median([p['training_s'] / m['training_s'] for m, p in zip(measured, plain)]):.2f}x",
            f"{common.median([m['end_to_end_s'] for m in measured]):.1f}",
            f"{common.median([p['end_to_end_s'] / m['end_to_end_s'] for m, p in zip(measured, plain)]):.2f}x",
            f"{common.median([m['peak_rss_mb'] for m in measured]):.0f}",
        ]

    header = ["path", "training (s)", "speed-up", "end to end (s)", "speed-up", "process peak RSS (MiB)"]
    rows_out = [row("plain", "plain Trainer (--no_feature_cache)"), row("cached", "cached features, empty cache")]
    if runs["warm"]:
        rows_out.append(row("warm", "cached features, filled cache"))
    title = (f"Frozen-backbone training, {EPOCHS} epochs: {source}, ESM-2 {ARCHITECTURE} architecture (random "
             f"weights), train.py defaults; median of {args.repeats} repeat(s)")
    other_load = (f"other processes' share of the CPUs during the kept repeats: at most "
                  f"{100 * max(contamination):.0f}% ({attempts - args.repeats} repeat(s) discarded)")
    agreement = (f"test-set probabilities, cached vs plain: max abs difference {max(differences):.1e} "
                 f"(per repeat: {', '.join(f'{d:.1e}' for d in differences)})")
    common.report("frozen_training", title, common.table(header, rows_out), [agreement], smoke=args.smoke,
                  load_before=load_before, other_load=other_load)
    print(f"\n(runs kept in {work})")


if __name__ == "__main__":
    main()
