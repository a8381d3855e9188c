"""Per-residue explanations of a prediction: which residues of a protein made the model say what it said.

Two scores per residue, each mapped back onto the protein as it was given (before the tokenizer's crop):

- **Occlusion** (Zeiler & Fergus 2014), for every pooling (mean, cls, attention) and any model: the score of a
  residue is how much the explained label's log-odds drop when a window of `window` residues centred on it (clipped
  at the ends) is replaced by `X` (an unknown residue). Positive: the residue supports the label; negative: it
  speaks against it; in log-odds units. Model-agnostic and exact (no gradients, no approximation), and the occluded
  variants (one per residue, all of the protein's length) run through `esmloc.engine.Engine`, the batched inference
  of esmloc-predict. Cost: one forward pass of the protein per residue it has.
- **Attention-pooling weights**, for `pooling="attention"` models only: the weight of each residue in the pooled
  protein vector (they sum to 1), as the model returns them with `output_pooling_weights=True`.

Why not integrated gradients (e.g. Captum's `LayerIntegratedGradients` on the input embeddings, which installs
cleanly here): on models trained on the demo data, their completeness check failed by up to several times the
protein's own log-odds at 16 to 512 steps, from `<pad>` (a zero vector: ESM-2 normalises every layer's input, so the
whole change happens next to zero) and from all-`X` baselines alike (a transition too steep for the quadrature;
finite differences confirmed the gradients). An attribution whose own check fails cannot be trusted; occlusion
has no such check to fail and needs no extra dependency.

The explained label: the positive label (label 1, e.g. Mitochondrion) for a binary model; otherwise the most probable
label of each protein (`label=` chooses one). Log-odds: logit(label) - logsumexp(other logits) for single-label
models (logit 1 - logit 0 for a binary one), the label's logit for multi-label models.

Cropping: the model sees at most `max_residues` residues, cropped by its tokenizer; the scores belong to those
residues, and `Explanation.positions` says where each sits in the original sequence (residues cropped away have
no score). A model with `long_proteins="windows"` sees, and scores, every residue: the engine runs each occluded
variant window by window, as it predicts, so a protein of n windows costs about n times what a cropped one does per
residue (its length times n window passes in all).

    explainer = Explainer(model, tokenizer)
    explanation = explainer.explain("MLRTSSLF...", acc="P12345")
    explanation.region_share(40)   # share of the positive evidence on the first 40 residues
    write_explanations(explainer.explain_many(records), "explanations/", explainer.attention_pooling, plots=10)
"""

import csv
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from esmloc.engine import Engine
from esmloc.files import atomic_file
from tokenization_esmloc import crop_sequence, normalize_sequence


CSV_NAME = "explanations.csv"
OCCLUDING_RESIDUE = "X"  # an unknown residue: what a window is replaced by
DEFAULT_WINDOW = 5  # residues occluded at once (odd, centred): wide enough for a motif, narrow enough to place it
DEFAULT_PLOTS = 10


@dataclass
class Explanation:
    """The per-residue scores of one protein."""

    acc: str
    sequence: str  # as given (normalised: no whitespace, upper case)
    positions: np.ndarray  # 0-based index in `sequence` of every residue the model saw, in order
    attributions: np.ndarray  # occlusion score per seen residue: the drop in log-odds (signed)
    label: str  # the label explained
    log_odds: float  # the model's log-odds of `label` for this protein
    pooling_weights: np.ndarray | None = None  # attention pooling only; per seen residue, sums to 1

    @property
    def cropped(self) -> bool:
        return len(self.positions) < len(self.sequence)

    def region_share(self, first: int) -> float:
        """The share of the evidence for the label (the sum of the positive scores) that sits on the first `first`
        residues of the protein (0 when nothing speaks for the label)."""
        evidence = np.clip(self.attributions, 0, None)
        total = evidence.sum()
        return float(evidence[self.positions < first].sum() / total) if total > 0 else 0.0

    def rows(self):
        """Long-format rows, one per residue of the original sequence: ACC, 1-based position, residue, whether the
        model saw it, the explained label, its attribution and (attention pooling) its pooling weight; the last two
        are empty for residues cropped away."""
        attribution = dict(zip(self.positions.tolist(), self.attributions.tolist()))
        weight = dict(zip(self.positions.tolist(), self.pooling_weights.tolist())) \
            if self.pooling_weights is not None else None
        for index, residue in enumerate(self.sequence):
            seen = index in attribution
            row = [self.acc, index + 1, residue, int(seen), self.label,
                   f"{attribution[index]:.6g}" if seen else ""]
            if weight is not None:
                row.append(f"{weight[index]:.6g}" if seen else "")
            yield row


def seen_positions(sequence: str, tokenizer) -> np.ndarray:
    """The 0-based positions in `sequence` of the residues `tokenizer` keeps: its own crop applied to the indices;
    every position when long proteins are embedded whole, in windows."""
    if tokenizer.long_proteins == "windows":
        return np.arange(len(sequence), dtype=np.int64)
    kept = crop_sequence(list(range(len(sequence))), tokenizer.max_residues, tokenizer.crop)
    if "".join(sequence[i] for i in kept) != crop_sequence(sequence, tokenizer.max_residues, tokenizer.crop):
        raise AssertionError("the crop of the positions differs from the crop of the sequence")  # a broken crop
    return np.asarray(kept, dtype=np.int64)


class Explainer:
    """Explains the predictions of an `EsmForLocalization` with its tokenizer: `explain(sequence)` for one protein,
    `explain_many(records)` for many. The occluded variants of a protein run through `esmloc.engine.Engine` (the
    batched inference of esmloc-predict; engine options such as `device` or `max_tokens_per_batch` pass through)."""

    def __init__(self, model, tokenizer, window: int = DEFAULT_WINDOW, **engine_options):
        if window < 1 or window % 2 == 0:
            raise ValueError(f"the occlusion window must be a positive odd number of residues, got {window}")
        engine_options.setdefault("progress", False)
        self.engine = Engine(model, tokenizer, **engine_options)
        self.model = self.engine.base_model
        self.tokenizer = tokenizer
        self.window = window
        config = self.model.config
        self.names = [config.id2label[i] for i in range(config.num_labels)]
        self.multi_label = config.problem_type == "multi_label_classification"
        self.binary = not self.multi_label and config.num_labels == 2
        self.attention_pooling = config.pooling == "attention"
        self.occluding_id = tokenizer.convert_tokens_to_ids(OCCLUDING_RESIDUE)

    def _logits(self, encoded) -> np.ndarray:
        logits = np.zeros((len(encoded), len(self.names)), dtype=np.float64)

        def batch_logits(lengths, hidden):
            return self.engine.logits_from_hidden(hidden, lengths).double().cpu().numpy()

        for indices, rows in self.engine.map_batches(encoded, batch_logits, desc="Occluding"):
            logits[indices] = rows
        return logits

    def _log_odds(self, logits: np.ndarray, target: int) -> np.ndarray:
        if self.multi_label:
            return logits[:, target]
        others = np.delete(logits, target, axis=1)
        return logits[:, target] - np.logaddexp.reduce(others, axis=1)

    def _target(self, logits: np.ndarray, label: str | None) -> int:
        if label is not None:
            if label not in self.names:
                raise ValueError(f"unknown label {label!r}; the model's labels are {self.names}")
            return self.names.index(label)
        return 1 if self.binary else int(np.argmax(logits))

    def occluded(self, ids: list[int]) -> list[list[int]]:
        """The protein's token ids (`<cls>` residues `<eos>`) followed by one copy per residue with the window
        centred on that residue (clipped at the ends) replaced by `OCCLUDING_RESIDUE`."""
        half, residues = self.window // 2, len(ids) - 2
        variants = [list(ids)]
        for centre in range(residues):
            variant = list(ids)
            variant[1 + max(0, centre - half):1 + min(residues, centre + half + 1)] = \
                [self.occluding_id] * (min(residues, centre + half + 1) - max(0, centre - half))
            variants.append(variant)
        return variants

    def pooling_weights(self, ids: list[int]) -> np.ndarray:
        """The attention-pooling weight of each residue, from the model's own forward pass."""
        device = self.engine.device
        with torch.inference_mode():
            output = self.model(input_ids=torch.tensor([ids], device=device), output_pooling_weights=True)
        return output.pooling_weights[0, 1:-1].float().cpu().numpy()

    def explain(self, sequence: str, acc: str = "protein", label: str | None = None) -> Explanation:
        sequence = normalize_sequence(sequence)
        positions = seen_positions(sequence, self.tokenizer)
        ids = self.engine.encode([sequence])[0]
        if len(ids) - 2 != len(positions):
            raise AssertionError(f"{acc}: {len(ids) - 2} tokens for {len(positions)} residues")
        logits = self._logits(self.occluded(ids))
        target = self._target(logits[0], label)
        log_odds = self._log_odds(logits, target)
        return Explanation(acc=acc, sequence=sequence, positions=positions, attributions=log_odds[0] - log_odds[1:],
                           label=self.names[target], log_odds=float(log_odds[0]),
                           pooling_weights=self.pooling_weights(ids) if self.attention_pooling else None)

    def explain_many(self, records, label: str | None = None):
        """Yields the explanation of every `(acc, sequence, ...)` record (e.g. `esmloc.data.read_sequences(path)`)."""
        for record in records:
            yield self.explain(record[1], acc=record[0], label=label)


def csv_header(attention_pooling: bool) -> list[str]:
    header = ["ACC", "position", "residue", "in_model_input", "explained_label", "attribution"]
    return header + ["pooling_weight"] if attention_pooling else header


def plot_explanation(explanation: Explanation, path=None, max_letters: int = 120):
    """A figure of the scores along the protein (original positions; the cropped-away part shaded); saved as a PNG
    when `path` is given. Residue letters are written under the axis for proteins up to `max_letters` residues."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    length = len(explanation.sequence)
    rows = 2 if explanation.pooling_weights is not None else 1
    figure, axes = plt.subplots(rows, 1, figsize=(min(14, 4 + length / 40), 2.4 * rows + 0.6), sharex=True,
                                squeeze=False)
    positions = explanation.positions + 1
    colours = np.where(explanation.attributions >= 0, "#c0392b", "#2c7fb8")
    axes[0, 0].bar(positions, explanation.attributions, width=1.0, color=colours)
    axes[0, 0].axhline(0, color="black", linewidth=0.5)
    axes[0, 0].set_ylabel(f"occlusion score\n(drop in log-odds of\n{explanation.label})", fontsize=8)
    if explanation.pooling_weights is not None:
        axes[1, 0].plot(positions, explanation.pooling_weights, color="#7b3294", linewidth=1)
        axes[1, 0].set_ylabel("attention-pooling\nweight")
    for axis in axes[:, 0]:
        axis.set_xlim(0.5, length + 0.5)
        if explanation.cropped:
            gaps = np.flatnonzero(~np.isin(np.arange(length), explanation.positions))
            axis.axvspan(gaps[0] + 0.5, gaps[-1] + 1.5, color="grey", alpha=0.2, linewidth=0)
    bottom = axes[-1, 0]
    if length <= max_letters:
        bottom.set_xticks(np.arange(1, length + 1), list(explanation.sequence), fontsize=6, fontfamily="monospace")
    bottom.set_xlabel("residue position" + (" (grey: cropped away, not seen by the model)" if explanation.cropped
                                            else ""))
    figure.suptitle(f"{explanation.acc}: why {explanation.label} (log-odds {explanation.log_odds:+.2f})",
                    fontsize=10)
    figure.tight_layout()
    if path is not None:
        figure.savefig(path, dpi=100)
        plt.close(figure)
    return figure


def _file_name(acc: str) -> str:
    return "".join(character if character.isalnum() or character in "-_." else "_" for character in acc) + ".png"


def write_explanations(explanations, directory, attention_pooling: bool, plots: int = DEFAULT_PLOTS) -> Path:
    """Writes `directory/explanations.csv` (long format, see `Explanation.rows`; atomically) from an iterable of
    explanations, and a PNG for each of the first `plots`; returns the CSV path."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    path = directory / CSV_NAME
    with atomic_file(path, "w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(csv_header(attention_pooling))
        for count, explanation in enumerate(explanations):
            writer.writerows(explanation.rows())
            if count < plots:
                plot_explanation(explanation, directory / _file_name(explanation.acc))
    return path


def explain_records(model, tokenizer, records, directory, plots: int = DEFAULT_PLOTS, window: int = DEFAULT_WINDOW,
                    progress: bool = True, total: int | None = None, **engine_options) -> Path:
    """Explains every `(acc, sequence, ...)` record (e.g. `esmloc.data.read_sequences(path)`) into `directory`:
    `explanations.csv` and a PNG for each of the first `plots` proteins. Returns the CSV path."""
    from tqdm.auto import tqdm

    explainer = Explainer(model, tokenizer, window=window, **engine_options)
    records = tqdm(records, total=total, unit="protein", desc="Explaining", disable=not progress)
    return write_explanations(explainer.explain_many(records), directory, explainer.attention_pooling, plots=plots)
