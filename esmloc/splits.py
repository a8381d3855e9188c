"""How the esmloc dataset is split, without leaks: every split rule the builder (esmloc.data) applies.

- `stratified_split`: a seeded train / validation / test split, stratified on the positive label, identical
  sequences kept together (ranked by a seeded hash of the sequence, not a shuffle: the same on every platform, and
  adding proteins does not reshuffle the others);
- `partition_split`: DeepLoc's homology partitions, chosen per split;
- `check_no_shared_sequences`: no sequence in two splits (the model would be tested on proteins it trained on).
"""

import hashlib
from collections.abc import Callable

from esmloc.errors import DataValidationError


SPLITS = ("train", "validation", "test")
MAX_REPORTED_PROBLEMS = 10


def rank(seed: int, sequence: str) -> bytes:
    # A hash, not a shuffled list: the order is the same on every platform and Python/NumPy version, does not
    # depend on the row order of the file, and adding proteins does not reshuffle the others.
    return hashlib.blake2b(f"{seed}:{sequence}".encode(), digest_size=8).digest()


def sequence_groups(examples: list[dict]) -> dict[str, list[dict]]:
    groups = {}
    for example in examples:
        groups.setdefault(example["Sequence"], []).append(example)
    return groups


def stratified_split(pool: list[dict], seed: int, validation_size: float, test_size: float,
                     is_positive: Callable[[dict], bool]) -> dict[str, list]:
    """Seeded 1 - v - t / v / t split of the proteins, stratified on `is_positive`, identical sequences kept together.

    Within each stratum (a group is positive if any of its proteins is), groups are ranked by a seeded hash of
    their sequence and dealt to test, then validation, until each holds its share of the stratum's proteins.
    """
    strata = {True: [], False: []}
    for sequence, group in sequence_groups(pool).items():
        strata[any(is_positive(example) for example in group)].append((rank(seed, sequence), group))
    assigned = {}
    for groups in strata.values():
        size = sum(len(group) for _, group in groups)
        quota = {"test": round(size * test_size), "validation": round(size * validation_size)}
        for _, group in sorted(groups, key=lambda ranked: ranked[0]):
            split = next((name for name, left in quota.items() if left > 0), "train")
            if split != "train":
                quota[split] -= len(group)
            for example in group:
                assigned[example["ACC"]] = split
    splits = {name: [example for example in pool if assigned[example["ACC"]] == name] for name in SPLITS}
    empty = [name for name, examples in splits.items() if not examples]
    if empty:
        raise ValueError(
            f"{len(pool)} proteins are too few for a {1 - validation_size - test_size:.0%}/{validation_size:.0%}/"
            f"{test_size:.0%} split: {', '.join(empty)} would be empty"
        )
    return splits


def partition_split(pool: list[dict], validation_partitions, test_partitions) -> dict[str, list]:
    present = {example["Partition"] for example in pool}
    absent = sorted((set(validation_partitions) | set(test_partitions)) - present)
    if absent:
        raise ValueError(f"partition(s) {absent} are not in the data, which has partitions {sorted(present)}")
    if present <= set(validation_partitions) | set(test_partitions):
        raise ValueError(f"no partition is left for train: the data has partitions {sorted(present)}")

    def split_of(partition):
        if partition in validation_partitions:
            return "validation"
        return "test" if partition in test_partitions else "train"

    return {name: [example for example in pool if split_of(example["Partition"]) == name] for name in SPLITS}


def check_no_shared_sequences(splits: dict[str, list]):
    """Raises when one sequence is in two splits: the model would be tested on proteins it was trained on."""
    home, problems = {}, []
    for split, examples in splits.items():
        for example in examples:
            first = home.setdefault(example["Sequence"], (split, example["ACC"]))
            if first[0] != split:
                problems.append(
                    f"ACC {example['ACC']!r} in {split!r} has the same sequence as ACC {first[1]!r} in {first[0]!r}"
                )
    if problems:
        raise DataValidationError(problems[:MAX_REPORTED_PROBLEMS], count=len(problems))
