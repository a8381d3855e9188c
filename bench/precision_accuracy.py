"""What low precision costs on trained models: probabilities, labels and test MCC at fp32, bf16 and int8.

    python bench/precision_accuracy.py            # both models below, DeepLoc 2.0 Mitochondrion, ~10 min on 2 cores
    python bench/precision_accuracy.py --smoke    # tiny models, a few proteins: checks that the script runs

Random weights say little about low precision: trained weights and activations have other ranges (and outliers).
No pretrained ESM-2 can be downloaded where this was written, so two models are trained here, on DeepLoc 2.0
(training: partitions 0-2, test: partition 4, proteins cropped to --max_residues):

- head: a random ESM-2 backbone (--architecture, default 35M) with its head (mean pooling) trained on the fp32
  engine's features of the training proteins;
- scratch: the whole model (--scratch_architecture, default 8M) trained from scratch, every weight, for
  --scratch_steps steps (AdamW, class-weighted cross-entropy, padded batches through the model's own forward).

Each model then predicts the test proteins through `esmloc.engine.Engine` at every precision; the table gives, against
fp32, the largest probability difference, the share of changed labels (argmax) and the test MCC. A precision
qualifies for `precision="auto"` when it stays within `esmloc.engine.AUTO_LIMITS` on every model; the script says
which precision `auto` should pick on this device (the fastest qualifying one, by bench/embedding_throughput.py).
"""

import argparse
import csv
import sys
import time
from pathlib import Path

import numpy as np
import torch
from sklearn.metrics import matthews_corrcoef

import common


def parse_arguments(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--architecture", default="esm2_t12_35M", help="backbone of the trained-head model")
    parser.add_argument("--scratch_architecture", default="esm2_t6_8M", help="the model trained from scratch")
    parser.add_argument("--n_train", type=int, default=400)
    parser.add_argument("--n_test", type=int, default=300)
    parser.add_argument("--max_residues", type=int, default=256)
    parser.add_argument("--scratch_steps", type=int, default=120)
    parser.add_argument("--precisions", type=lambda text: text.split(","), default=["fp32", "bf16", "int8"])
    parser.add_argument("--data", type=Path, default=common.DEEPLOC_CSV)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--smoke", action="store_true", help="tiny models, a few proteins, a few steps")
    args = parser.parse_args(argv)
    if args.smoke:
        args.architecture = args.scratch_architecture = "tiny"
        args.n_train, args.n_test, args.scratch_steps, args.max_residues = 24, 16, 3, 64
    if args.precisions[0] != "fp32":
        parser.error("--precisions must start with fp32 (the reference)")
    return args


def load_split(path: Path, n_train: int, n_test: int, seed: int, smoke: bool):
    """(sequences, labels) for training (partitions 0-2) and test (partition 4), a random sample of each."""
    if not path.is_file():
        rows, _ = common.load_proteins(path, n_train + n_test, smoke)  # synthetic in smoke mode, else exits
        train, test = rows[:n_train], rows[n_train:]
    else:
        with open(path, newline="") as handle:
            rows = list(csv.DictReader(handle))
        rng = np.random.default_rng(seed)
        pick = lambda pool, n: [pool[i] for i in rng.permutation(len(pool))[:n]]  # noqa: E731
        train = pick([row for row in rows if row["Partition"] in ("0", "1", "2")], n_train)
        test = pick([row for row in rows if row["Partition"] == "4"], n_test)
    return [([row["Sequence"] for row in split], np.array([int(row["Mitochondrion"]) for row in split]))
            for split in (train, test)]


def class_weights(labels: np.ndarray) -> torch.Tensor:
    counts = np.bincount(labels, minlength=2).clip(min=1)
    return torch.tensor(len(labels) / (2 * counts), dtype=torch.float32)


def train_head(model, engine, sequences, labels, steps: int = 300):
    """The model's head (pooler + classifier, through `classify_pooled`) on the fp32 engine's features."""
    features = torch.as_tensor(engine.embed(sequences, model.config.pooling))
    targets = torch.as_tensor(labels)
    head = [p for name, p in model.named_parameters() if not name.startswith("esm.")]
    optimiser = torch.optim.AdamW(head, lr=1e-3, weight_decay=0.01)
    loss_function = torch.nn.CrossEntropyLoss(weight=class_weights(labels))
    model.train()
    for _ in range(steps):
        optimiser.zero_grad()
        loss = loss_function(model.classify_pooled(features).logits, targets)
        loss.backward()
        optimiser.step()
    model.eval()
    return float(loss)


def train_from_scratch(model, tokenizer, sequences, labels, steps: int, batch_size: int = 16, seed: int = 0):
    """Every weight trained: padded batches through the model's own forward."""
    optimiser = torch.optim.AdamW(model.parameters(), lr=5e-4, weight_decay=0.01)
    loss_function = torch.nn.CrossEntropyLoss(weight=class_weights(labels))
    rng = np.random.default_rng(seed)
    model.train()
    loss = float("nan")
    for step in range(steps):
        batch = rng.choice(len(sequences), size=min(batch_size, len(sequences)), replace=False)
        inputs = tokenizer([sequences[i] for i in batch], padding=True, return_tensors="pt")
        optimiser.zero_grad()
        logits = model(input_ids=inputs["input_ids"], attention_mask=inputs["attention_mask"]).logits
        loss = loss_function(logits, torch.as_tensor(labels[batch]))
        loss.backward()
        optimiser.step()
        if (step + 1) % 50 == 0:
            print(f"  scratch training step {step + 1}/{steps}: loss {float(loss):.3f}", file=sys.stderr)
    model.eval()
    return float(loss)


def evaluate_precisions(model, tokenizer, sequences, labels, precisions):
    """Per precision: probabilities through the engine, compared with fp32's."""
    from esmloc.engine import Engine

    results, reference = {}, None
    for precision in precisions:
        start = time.perf_counter()
        probabilities = Engine(model, tokenizer, progress=False, precision=precision).predict_probabilities(sequences)
        seconds = time.perf_counter() - start
        predicted = probabilities.argmax(axis=1)
        if reference is None:
            reference = (probabilities, predicted)
        results[precision] = {
            "max_probability_difference": float(np.abs(probabilities - reference[0]).max()),
            "changed_labels": float((predicted != reference[1]).mean()),
            "mcc": float(matthews_corrcoef(labels, predicted)),
            "seconds": seconds,
        }
        results[precision]["mcc_drop"] = results[precisions[0]]["mcc"] - results[precision]["mcc"]
    return results


def main(argv=None):
    args = parse_arguments(argv)
    from configuration_esmloc import ESM2_ARCHITECTURES, EsmLocConfig
    from esmloc.engine import AUTO_LIMITS
    from esmloc.saving import tokenizer_for
    from modeling_esmloc import EsmForLocalization

    (train_x, train_y), (test_x, test_y) = load_split(args.data, args.n_train, args.n_test, args.seed, args.smoke)
    load_before = common.load_average()
    models = {}
    torch.manual_seed(args.seed)
    head_model = EsmForLocalization(EsmLocConfig(esm_config=dict(ESM2_ARCHITECTURES[args.architecture]),
                                                 max_residues=args.max_residues, pooling="mean")).eval()
    head_tokenizer = tokenizer_for(head_model.config)
    from esmloc.engine import Engine

    print(f"training the head of a random {args.architecture} backbone on {len(train_x)} proteins", file=sys.stderr)
    train_head(head_model, Engine(head_model, head_tokenizer, progress=False), train_x, train_y)
    models[f"random {args.architecture} backbone, trained head"] = (head_model, head_tokenizer)

    torch.manual_seed(args.seed)
    scratch = EsmForLocalization(EsmLocConfig(esm_config=dict(ESM2_ARCHITECTURES[args.scratch_architecture]),
                                              max_residues=args.max_residues, pooling="mean"))
    scratch_tokenizer = tokenizer_for(scratch.config)
    print(f"training {args.scratch_architecture} from scratch, {args.scratch_steps} steps", file=sys.stderr)
    train_from_scratch(scratch, scratch_tokenizer, train_x, train_y, args.scratch_steps, seed=args.seed)
    models[f"{args.scratch_architecture} trained from scratch ({args.scratch_steps} steps)"] = (scratch,
                                                                                               scratch_tokenizer)

    rows, qualifies = [], {precision: True for precision in args.precisions}
    for label, (model, tokenizer) in models.items():
        results = evaluate_precisions(model, tokenizer, test_x, test_y, args.precisions)
        for precision, result in results.items():
            within = (result["max_probability_difference"] <= AUTO_LIMITS["max_probability_difference"]
                      and result["mcc_drop"] <= AUTO_LIMITS["max_mcc_drop"])
            qualifies[precision] &= within
            rows.append([label, precision, f"{result['max_probability_difference']:.4f}",
                         f"{100 * result['changed_labels']:.2f}%", f"{result['mcc']:.4f}", f"{result['mcc'] - results[args.precisions[0]]['mcc']:+.4f}",
                         "yes" if within else "no"])
    title = (f"Precision cost on trained models: DeepLoc 2.0 Mitochondrion, {len(train_x)} training proteins "
             f"(partitions 0-2), {len(test_x)} test proteins (partition 4), cropped to {args.max_residues} residues")
    limits = (f"limits for precision=\"auto\" (esmloc.engine.AUTO_LIMITS): probabilities within "
              f"{AUTO_LIMITS['max_probability_difference']} of fp32, MCC at most {AUTO_LIMITS['max_mcc_drop']} lower")
    result = common.table(["model", "precision", "max abs probability difference vs fp32", "changed labels",
                           "test MCC", "MCC vs fp32", "within limits"], rows)
    verdict = "qualifying on every model: " + ", ".join(p for p, ok in qualifies.items() if ok)
    print()
    print(title)
    print(f"command: {common.command_line()}")
    print(f"machine: {common.machine_description()}; load average before {load_before}, "
          f"after {common.load_average()}")
    print(limits)
    print()
    print(result)
    print()
    print(verdict)
    common.write_table("precision_accuracy", title, f"{limits}\n\n{result}\n\n{verdict}", smoke=args.smoke,
                       other_load=f"load average before {load_before}")
    return qualifies


if __name__ == "__main__":
    main()
