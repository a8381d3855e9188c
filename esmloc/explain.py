"""Per-residue explanations of a prediction: which residues of a protein made the model say what it said.

Two scores per residue, each mapped back onto the protein as it was given (before the tokenizer's crop):

- **Occlusion** (Zeiler & Fergus 2014), for every pooling (mean, cls, attention) and any model: how much the explained
  label's log-odds drop when a window of residues is replaced by `X` (an unknown residue). Positive: the residues
  support the label; negative: they speak against it; in log-odds units. Model-agnostic and exact at every window it
  measures (no gradients, no approximation); the occluded variants run through `esmloc.engine.Engine`, the batched,
  padding-free inference of esmloc-predict.
- **Attention-pooling weights**, for `pooling="attention"` models only: the weight of each residue in the pooled
  protein vector (they sum to 1), as the model returns them with `output_pooling_weights=True`.

Resolution and cost. A protein of n residues (as the model sees them) costs one forward pass of the protein per
window occluded, plus one unoccluded. Windows are centred every `stride` residues (spread evenly from the first
residue to the last), each `window` residues wide, or `2 * stride - 1` when that is wider: so every residue lies
inside both windows next to it, and its score is interpolated linearly between their two measured drops (at a
window's centre it is that window's drop). At stride 1 every residue is the centre of its own window: one pass per
residue, the method as it was first written. The stride is chosen per protein as the finest whose variants fit
`token_budget` tokens (`stride=` fixes it): with the default, proteins up to 220 residues get stride 1, 500 residues
stride 6 (windows of 11) and 1,022 residues stride 23 (windows of 45: 47 passes instead of 1,023); what that costs at
ESM-2 8M, 35M and 150M beside the per-residue method: bench/explain_cost.py. Each `Explanation` carries the
`window` and `stride` it was measured with (and the CSV says them per row). A motif narrower than the window is
found, but placed only to within the window. tests/test_explain.py checks at strides 1, 8 and 16 that a trained
model's evidence sits on the targeting peptides of the demo data and random models' does not.

Limits for a server (`Explainer(..., max_residues_explained=..., time_budget_s=...)`): a protein with more residues
than `max_residues_explained` (after the tokenizer's crop) is refused before any pass runs, and an explanation still
running after `time_budget_s` seconds is stopped at the next batch (at most one batch per worker runs on); both raise
`ExplanationLimitError`, whose message says what was exceeded and by how much; nothing partial is returned. The
budget bounds what one explanation takes from the machine; a server should still run explanations one at a time, in
a queue of their own, so that predictions never wait behind them.

Why not integrated gradients (e.g. Captum's `LayerIntegratedGradients` on the input embeddings, which installs
cleanly here): on models trained on the demo data, their completeness check failed by up to several times the
protein's own log-odds at 16 to 512 steps, from `<pad>` (a zero vector: ESM-2 normalises every layer's input, so the
whole change happens next to zero) and from all-`X` baselines alike (a transition too steep for the quadrature;
finite differences confirmed the gradients). An attribution whose own check fails cannot be trusted; occlusion
has no such check to fail and needs no extra dependency: coarser windows buy its speed instead.

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
import math
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from esmloc import task
from esmloc.engine import Engine
from esmloc.files import atomic_file
from tokenization_esmloc import crop_sequence, normalize_sequence


CSV_NAME = "explanations.csv"
OCCLUDING_RESIDUE = "X"  # an unknown residue: what a window is replaced by
DEFAULT_WINDOW = 5  # residues occluded at once at stride 1 (odd, centred): wide enough for a motif, narrow enough
# to place it
# Tokens the occluded variants of one protein may total, which decides its stride: 48 passes of a 1,022-residue
# protein (1,024 tokens each). Chosen so that the ESM-2 8M architecture explains a 1,022-residue protein within
# about 10 s on 2 CPU cores (bench/explain_cost.py).
DEFAULT_TOKEN_BUDGET = 48 * 1024
DEFAULT_PLOTS = 10


class ExplanationLimitError(RuntimeError):
    """An explanation refused (`limit="max_residues_explained"`) or stopped (`limit="time_budget_s"`) by a limit of
    its `Explainer`; the message names the limit and says by how much it was exceeded."""

    def __init__(self, message: str, limit: str):
        super().__init__(message)
        self.limit = limit


def occlusion_centres(residues: int, stride: int) -> np.ndarray:
    """The 0-based residues that windows are centred on: the first and the last residue and evenly in between, at
    most `stride` apart (every residue at stride 1)."""
    if residues <= 1:
        return np.arange(residues)
    count = math.ceil((residues - 1) / stride) + 1
    # Integer rounding of k * (residues - 1) / (count - 1): gaps of at most `stride`, never two equal centres.
    return (np.arange(count) * (residues - 1) * 2 + count - 1) // (2 * (count - 1))


def stride_for(residues: int, token_budget: int) -> int:
    """The finest stride whose occluded variants (one per centre, `residues + 2` tokens each, plus the unoccluded
    protein) fit in `token_budget` tokens; the coarsest (the first and the last residue only) when none does."""
    for stride in range(1, max(residues, 1)):
        if (len(occlusion_centres(residues, stride)) + 1) * (residues + 2) <= token_budget:
            return stride
    return max(residues - 1, 1)


def window_for(stride: int, window: int = DEFAULT_WINDOW) -> int:
    """The occlusion window at `stride`: `window`, or `2 * stride - 1` when wider, so that a residue's interpolated
    score comes only from windows that hide it."""
    return max(window, 2 * stride - 1)


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
    window: int = DEFAULT_WINDOW  # residues hidden by each occlusion window
    stride: int = 1  # residues between window centres (1: every residue measured; else interpolated in between)

    @property
    def method(self) -> str:
        """How the scores were measured, in words (for a page or a plot)."""
        if self.stride == 1:
            return f"occlusion of {self.window} residues centred on each residue"
        return (f"occlusion of {self.window}-residue windows centred every {self.stride} residues, interpolated "
                "in between")

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
        model saw it, the explained label, its attribution, the occlusion window and stride it was measured with,
        and (attention pooling) its pooling weight; attribution and pooling weight are empty for residues cropped
        away."""
        attribution = dict(zip(self.positions.tolist(), self.attributions.tolist()))
        weight = dict(zip(self.positions.tolist(), self.pooling_weights.tolist())) \
            if self.pooling_weights is not None else None
        for index, residue in enumerate(self.sequence):
            seen = index in attribution
            row = [self.acc, index + 1, residue, int(seen), self.label,
                   f"{attribution[index]:.6g}" if seen else "", self.window, self.stride]
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
    batched inference of esmloc-predict; engine options such as `device`, `precision` or `max_tokens_per_batch` pass
    through).

    Args:
        window: residues hidden by each occlusion window at stride 1 (odd, centred); coarser strides widen it to
            `2 * stride - 1` (`window_for`).
        stride: residues between window centres for every protein; None (default): per protein, the finest that
            fits `token_budget` (`stride_for`).
        token_budget: tokens the occluded variants of one protein may total, when `stride` is None.
        max_residues_explained: refuse (`ExplanationLimitError`) proteins with more residues than this as the model
            sees them (after its crop); None: no limit.
        time_budget_s: stop (`ExplanationLimitError`) an explanation still running after this many seconds, at the
            next batch; None: no limit.
    """

    def __init__(self, model, tokenizer, window: int = DEFAULT_WINDOW, stride: int | None = None,
                 token_budget: int = DEFAULT_TOKEN_BUDGET, max_residues_explained: int | None = None,
                 time_budget_s: float | None = None, **engine_options):
        if window < 1 or window % 2 == 0:
            raise ValueError(f"the occlusion window must be a positive odd number of residues, got {window}")
        for name, value in (("stride", stride), ("max_residues_explained", max_residues_explained),
                            ("token_budget", token_budget)):
            if value is not None and (not isinstance(value, int) or value < 1):
                raise ValueError(f"{name} must be a positive whole number, got {value!r}")
        if time_budget_s is not None and not time_budget_s > 0:
            raise ValueError(f"time_budget_s must be positive, got {time_budget_s!r}")
        engine_options.setdefault("progress", False)
        self.engine = Engine(model, tokenizer, **engine_options)
        self.model = self.engine.base_model
        self.tokenizer = tokenizer
        self.window, self.stride, self.token_budget = window, stride, token_budget
        self.max_residues_explained, self.time_budget_s = max_residues_explained, time_budget_s
        config = self.model.config
        self.names = task.label_names(config)
        self.multi_label, self.binary = task.is_multi_label(config), task.is_binary(config)
        self.attention_pooling = config.pooling == "attention"
        self.occluding_id = tokenizer.convert_tokens_to_ids(OCCLUDING_RESIDUE)

    def _logits(self, encoded, acc: str, started: float) -> np.ndarray:
        """The logits of every variant, run through the engine one batch per worker at a time, so that the time
        budget is checked between batches."""
        logits = np.zeros((len(encoded), len(self.names)), dtype=np.float64)

        def batch_logits(lengths, hidden):
            return self.engine.logits_from_hidden(hidden, lengths).double().cpu().numpy()

        step = max(1, self.engine.max_tokens_per_batch * self.engine.workers // len(encoded[0]))
        for start in range(0, len(encoded), step):
            elapsed = time.perf_counter() - started
            if start and self.time_budget_s is not None and elapsed > self.time_budget_s:
                raise ExplanationLimitError(
                    f"{acc}: explanation stopped at its time budget of {self.time_budget_s:g} s (time_budget_s): "
                    f"{start} of {len(encoded)} forward passes done in {elapsed:.1f} s, the whole would take about "
                    f"{elapsed * len(encoded) / start:.0f} s",
                    "time_budget_s")
            chunk = encoded[start:start + step]
            for indices, rows in self.engine.map_batches(chunk, batch_logits, desc="Occluding"):
                logits[start + indices] = rows
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

    def stride_for(self, residues: int) -> int:
        """The stride a protein of `residues` residues (as the model sees them) is explained at."""
        return self.stride if self.stride is not None else stride_for(residues, self.token_budget)

    def occluded(self, ids: list[int], centres=None, window: int | None = None) -> list[list[int]]:
        """The protein's token ids (`<cls>` residues `<eos>`) followed by one copy per centre (default: every
        residue) with the `window` (default: the explainer's) centred there (clipped at the ends) replaced by
        `OCCLUDING_RESIDUE`."""
        residues = len(ids) - 2
        half = (window or self.window) // 2
        variants = [list(ids)]
        for centre in range(residues) if centres is None else centres:
            first, end = max(0, centre - half), min(residues, centre + half + 1)
            variant = list(ids)
            variant[1 + first:1 + end] = [self.occluding_id] * (end - first)
            variants.append(variant)
        return variants

    def pooling_weights(self, ids: list[int]) -> np.ndarray:
        """The attention-pooling weight of each residue, from the model's own forward pass."""
        device = self.engine.device
        with torch.inference_mode():
            output = self.model(input_ids=torch.tensor([ids], device=device), output_pooling_weights=True)
        return output.pooling_weights[0, 1:-1].float().cpu().numpy()

    def explain(self, sequence: str, acc: str = "protein", label: str | None = None) -> Explanation:
        """The explanation of one protein (raises `ExplanationLimitError` past `max_residues_explained` or
        `time_budget_s`)."""
        started = time.perf_counter()
        sequence = normalize_sequence(sequence)
        positions = seen_positions(sequence, self.tokenizer)
        residues = len(positions)
        if self.max_residues_explained is not None and residues > self.max_residues_explained:
            raise ExplanationLimitError(
                f"{acc}: {residues} residues{' (after the crop)' if residues < len(sequence) else ''} are more than "
                f"the {self.max_residues_explained} residues explanations are limited to (max_residues_explained)",
                "max_residues_explained")
        ids = self.engine.encode([sequence])[0]
        if len(ids) - 2 != residues:
            raise AssertionError(f"{acc}: {len(ids) - 2} tokens for {residues} residues")
        stride = self.stride_for(residues)
        window = window_for(stride, self.window)
        centres = occlusion_centres(residues, stride)
        logits = self._logits(self.occluded(ids, centres, window), acc, started)
        target = self._target(logits[0], label)
        log_odds = self._log_odds(logits, target)
        drops = log_odds[0] - log_odds[1:]
        attributions = np.interp(np.arange(residues), centres, drops) if residues else drops
        return Explanation(acc=acc, sequence=sequence, positions=positions, attributions=attributions,
                           label=self.names[target], log_odds=float(log_odds[0]),
                           pooling_weights=self.pooling_weights(ids) if self.attention_pooling else None,
                           window=window, stride=stride)

    def explain_many(self, records, label: str | None = None):
        """Yields the explanation of every `(acc, sequence, ...)` record (e.g. `esmloc.data.read_sequences(path)`)."""
        for record in records:
            yield self.explain(record[1], acc=record[0], label=label)


def csv_header(attention_pooling: bool) -> list[str]:
    header = ["ACC", "position", "residue", "in_model_input", "explained_label", "attribution", "occlusion_window",
              "occlusion_stride"]
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
                                            else "") + f"; {explanation.method}", fontsize=8)
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
                    stride: int | None = None, token_budget: int = DEFAULT_TOKEN_BUDGET, progress: bool = True,
                    total: int | None = None, **engine_options) -> Path:
    """Explains every `(acc, sequence, ...)` record (e.g. `esmloc.data.read_sequences(path)`) into `directory`:
    `explanations.csv` and a PNG for each of the first `plots` proteins (`window`, `stride`, `token_budget`: see
    `Explainer`). Returns the CSV path."""
    from tqdm.auto import tqdm

    explainer = Explainer(model, tokenizer, window=window, stride=stride, token_budget=token_budget, **engine_options)
    records = tqdm(records, total=total, unit="protein", desc="Explaining", disable=not progress)
    return write_explanations(explainer.explain_many(records), directory, explainer.attention_pooling, plots=plots)
