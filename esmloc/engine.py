"""Batched inference: proteins sorted by length, batches bounded by a token budget, results in input order."""

from collections.abc import Callable, Sequence

import numpy as np
import torch
from tqdm.auto import tqdm


def length_batches(lengths: Sequence[int], max_tokens_per_batch: int) -> list[np.ndarray]:
    """Indices grouped into batches of similar length whose padded size (batch x longest) stays within the
    budget; a protein longer than the budget gets a batch of its own. Longest first, so that a batch too big
    for the device fails at once rather than at the end."""
    order = np.argsort(-np.asarray(lengths), kind="stable")
    batches, current = [], []
    for index in order:
        # Sorted longest first: a batch's first protein sets its padded length.
        if current and (len(current) + 1) * lengths[current[0]] > max_tokens_per_batch:
            batches.append(np.asarray(current))
            current = []
        current.append(index)
    if current:
        batches.append(np.asarray(current))
    return batches


def run_batched(
    model,
    tokenizer,
    sequences: Sequence[str],
    compute: Callable[[object, dict], torch.Tensor],
    max_tokens_per_batch: int = 16384,
    device: torch.device | str | None = None,
    progress: bool = True,
    desc: str = "Predicting",
) -> np.ndarray:
    """Runs `compute(model, batch)` over all sequences (tokenised and cropped by `tokenizer`) and returns the
    per-protein results stacked in input order."""
    device = torch.device(device) if device is not None else next(model.parameters()).device
    encoded = tokenizer(list(sequences))["input_ids"]
    batches = length_batches([len(ids) for ids in encoded], max_tokens_per_batch)
    results: list[np.ndarray | None] = [None] * len(sequences)
    was_training = model.training
    model.eval()
    with torch.inference_mode(), tqdm(total=len(sequences), desc=desc, unit="protein", disable=not progress) as bar:
        for batch_indices in batches:
            batch = tokenizer.pad({"input_ids": [encoded[i] for i in batch_indices]}, return_tensors="pt")
            output = compute(model, {key: value.to(device) for key, value in batch.items()})
            for index, row in zip(batch_indices, output.float().cpu().numpy(), strict=True):
                results[index] = row
            bar.update(len(batch_indices))
    model.train(was_training)
    return np.stack(results) if results else np.zeros((0,))


def probabilities(model, batch) -> torch.Tensor:
    """Class probabilities: sigmoid per label for multi-label models, softmax otherwise."""
    logits = model(**batch).logits
    if model.config.problem_type == "multi_label_classification":
        return torch.sigmoid(logits)
    return torch.softmax(logits, dim=-1)


def predict_probabilities(model, tokenizer, sequences, **kwargs) -> np.ndarray:
    """Class probabilities for each protein, shape (n, num_labels), in input order."""
    return run_batched(model, tokenizer, sequences, probabilities, **kwargs)
