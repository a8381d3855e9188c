"""The batched inference engine: ESM-2 / ESM C hidden states, pooled features and class probabilities for many proteins.

One engine serves everything that runs the backbone without gradients: cached-feature training (`esmloc.cache`),
the final evaluation in `train.py` and `esmloc-predict`.

    engine = Engine(model, tokenizer)                  # an EsmForLocalization and its EsmLocTokenizer
    probabilities = engine.predict_probabilities(sequences)   # (n, num_labels), input order
    features = engine.embed(sequences, kind="mean")   # (n, hidden) float32; "cls" likewise; "residues": a list

What makes it fast:

- Proteins are tokenised once (EsmLocTokenizer's fast path) and grouped into batches bounded by a token budget,
  `max_tokens_per_batch`, rather than by a protein count: many short proteins or a few long ones per batch. Where
  attention runs without padding the budget counts the proteins' tokens and the batches are even, as many as a
  multiple of the workers (`balanced_batches`); otherwise (the `padded` attention, or no padding-free path) proteins
  are sorted by length and the budget counts the padded size, proteins x longest (`length_batches`): almost no
  padding. `Engine.batches` decides which.
- The backbone runs *padding-free* (`esmloc.varlen_esm.UnpaddedEsm`): the proteins of a batch are flattened into one
  row that goes through transformers' own `EsmModel.forward`, with per-protein rotary positions (`position_ids`) and
  an attention function registered with transformers (`varlen_sdpa`: on CPU `scaled_dot_product_attention` once per
  run of equal-length proteins, without a mask; on CUDA one of torch's variable-length kernels, chosen by
  `varlen_attention.choose_attention`), so the linear layers never see padding. It computes what `EsmModel.forward`
  computes on padded batches (equal within 1e-5 in fp32, tests/test_engine.py); a backbone it cannot run flattened
  (absolute positions, a decoder) runs padded.
- precision="int8" (CPU): the backbone's linear layers with dynamic int8 quantisation through oneDNN
  (`int8.Int8Linear`, on a view of the backbone; the model is not changed); the other operations stay fp32.
  What it and bf16 cost in accuracy and gain in speed: README, "Speed".
- On CPU, `workers` batches run at once in threads, each with its share of torch's intra-op threads (by default one
  batch per core on up to 4 cores): per-core batches scale better than splitting every small operation across the
  cores, and far better on a shared machine, where split operations wait for each other.
- `torch.inference_mode`; on CUDA bf16 autocast (fp16 where bf16 is unsupported); fp32 on CPU, where bf16 and int8
  are faster but not accurate enough to be the default: on a trained head over a random ESM-2 35M backbone
  (bench/precision_accuracy.py) bf16 moved test probabilities by up to 0.027 and int8 by 0.172 (no label changed),
  against the limits in AUTO_LIMITS; `precision="bf16"` / `"int8"` ask for them.
- No work on the contact head, which inference never needs.
- Long proteins under `long_proteins="windows"` (the tokenizer then leaves them whole): each protein's windows
  (`EsmLocTokenizer.window_spans`) run like proteins of their own, padding-free and within the token budget, and
  their states are stitched back into the whole protein's (`modeling_esmloc.stitch_windows`, the model's own rule)
  before pooling, so a batch's `function` sees whole proteins. A protein is batched by the tokens of its windows;
  one whose windows exceed the budget gets a batch of its own that runs them a budget's worth at a time, so memory
  grows with its length, never with its square (attention stays within a window).

Results always come back in input order, whatever order the batches ran in.
"""

import heapq
import math
from collections import deque
from collections.abc import Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from contextlib import nullcontext
from itertools import islice

import numpy as np
import torch
from tqdm.auto import tqdm

from configuration_esmloc import backbone_family
from esmloc import task
from esmloc.varlen_esm import UnpaddedEsm, unpadded_forward_trusted, unsupported_reason
from modeling_esmloc import stitch_windows


FEATURE_KINDS = ("mean", "cls", "residues")
PRECISIONS = ("auto", "fp32", "bf16", "fp16", "int8")
# What `precision="auto"` runs per device type: the fastest precision whose cost, measured on trained models by
# bench/precision_accuracy.py, stays within AUTO_LIMITS. On CPU neither bf16 (probabilities up to 0.027 from fp32)
# nor int8 (0.172) did (README, "Speed"), so fp32. CUDA (not measured here): bf16/fp16 autocast, as before.
AUTO_LIMITS = {"max_probability_difference": 0.01, "max_mcc_drop": 0.005}
AUTO_PRECISION = {"cpu": "fp32"}
# Token budgets per batch (see `Engine.batches`). CPU: measured with even batches, bench/embedding_throughput.py
# --budgets on 2 cores (README, "Prediction and speed"): at 8M, 35M and 150M 1024-4096 within 5% of each other, 8192
# 4-13% slower; batches whose activations stay in the caches beat big ones. A GPU wants large batches (not measured
# here).
DEFAULT_MAX_TOKENS_PER_BATCH = {"cpu": 2048, "cuda": 65536}


def default_max_tokens_per_batch(device) -> int:
    return DEFAULT_MAX_TOKENS_PER_BATCH.get(torch.device(device).type, DEFAULT_MAX_TOKENS_PER_BATCH["cpu"])


def length_batches(lengths: Sequence[int], max_tokens_per_batch: int) -> list[np.ndarray]:
    """Indices grouped into batches of similar length whose padded size (batch x longest) stays within the
    budget; a protein longer than the budget gets a batch of its own. Longest first, so that a batch too big
    for the device fails at once rather than at the end."""
    lengths = np.asarray(lengths)
    order = np.argsort(-lengths, kind="stable")
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


def balanced_batches(lengths: Sequence[int], max_tokens_per_batch: int, parts: int = 1) -> list[np.ndarray]:
    """For the padding-free path, where a batch costs its tokens, not proteins x longest: indices grouped into
    batches of at most `max_tokens_per_batch` tokens that are as even as possible, as many as a multiple of `parts`
    (the workers running batches at once), so that no worker waits idle for another's last, bigger batch (8 proteins
    of ESM-2 650M in batches of 1654 and 528 tokens kept one of two cores idle for two thirds of the run). Longest
    first: each batch is filled longest first (proteins go, longest first, to the batch with the fewest tokens) and
    the batches are ordered by their longest protein. A protein longer than the budget gets a batch of its own."""
    lengths = np.asarray(lengths)
    order = np.argsort(-lengths, kind="stable")
    alone = [np.asarray([index]) for index in order if lengths[index] > max_tokens_per_batch]
    shared = [index for index in order if lengths[index] <= max_tokens_per_batch]
    count = parts * max(1, math.ceil(int(lengths[shared].sum()) / (parts * max_tokens_per_batch)))
    while True:  # more batches until every protein fits: 1% more a pass (a multiple of `parts`), so few passes
        loads, bins = [(0, b) for b in range(count)], [[] for _ in range(count)]
        for index in shared:
            load, b = heapq.heappop(loads)
            if load + lengths[index] > max_tokens_per_batch:
                break
            bins[b].append(index)
            heapq.heappush(loads, (load + int(lengths[index]), b))
        else:
            break
        count += parts * math.ceil(count / (100 * parts))
    return alone + sorted((np.asarray(b) for b in bins if b), key=lambda batch: -lengths[batch[0]])


def resolve_precision(device, precision: str = "auto") -> str:
    """The precision that runs on `device` for `precision`: fp32, bf16, fp16 or int8 (`auto` per AUTO_PRECISION;
    on CUDA bf16 autocast, or fp16 where bf16 is unsupported)."""
    if precision not in PRECISIONS:
        raise ValueError(f"precision must be one of {PRECISIONS}, got {precision!r}")
    device = torch.device(device)
    if precision == "auto":
        if device.type == "cuda":
            return "bf16" if torch.cuda.is_bf16_supported() else "fp16"
        return AUTO_PRECISION.get(device.type, "fp32")
    return precision


def autocast_dtype(device, precision: str = "auto") -> torch.dtype | None:
    """The autocast dtype for `precision` on `device`; None means no autocast (fp32, or int8 linear layers with
    fp32 everything else)."""
    return {"fp32": None, "int8": None, "bf16": torch.bfloat16, "fp16": torch.float16}[
        resolve_precision(device, precision)]


class Engine:
    """Batched, token-budgeted inference with one `EsmForLocalization` (or any model with an `esm`
    backbone) and its tokenizer.

    Args:
        model: the model; its backbone is `model.esm` (a PEFT-wrapped model is looked through).
        tokenizer: an `EsmLocTokenizer` (crops, or windows long proteins, exactly as the model's config says).
        max_tokens_per_batch: tokens per batch (see `batches`: the proteins' tokens where attention runs without
            padding, else proteins x longest); default per device type.
        device: where to run; default the model's device.
        precision: `auto` (per device: `AUTO_PRECISION`, fp32 on CPU; bf16 or fp16 autocast on CUDA), `fp32`,
            `bf16` or `fp16` (autocast), or `int8` (CPU, padding-free path only: the backbone's linear layers with
            dynamic int8 quantisation through oneDNN, inputs per token, so a protein's result does not depend on
            the other proteins of its batch; everything else fp32).
        progress: show a progress bar.
        packed: run padding-free (`UnpaddedEsm`) when the backbone allows it (False: always `EsmModel.forward` on
            padded batches).
        attention: the padding-free attention (`esmloc.varlen_attention.ATTENTION_MODES`): `auto` (per device, dtype and
            head size: `varlen_attention.choose_attention`), `grouped` (per run of equal lengths, no mask; CPU's),
            `padded` (one masked call per batch), or one of torch's variable-length kernels: `varlen`, `nested`,
            `flex`.
        workers: batches run at once (see `map_batches`); default on CPU: torch's intra-op threads, at most 4;
            on CUDA 1.
    """

    def __init__(self, model, tokenizer, max_tokens_per_batch: int | None = None, device=None,
                 precision: str = "auto", progress: bool = True, packed: bool = True, attention: str = "auto",
                 workers: int | None = None):
        self.model = model
        self.tokenizer = tokenizer
        self.device = torch.device(device) if device is not None else next(model.parameters()).device
        self.max_tokens_per_batch = max_tokens_per_batch or default_max_tokens_per_batch(self.device)
        self.precision = precision
        self.precision_name = resolve_precision(self.device, precision)  # part of a feature cache's key
        self.autocast_dtype = autocast_dtype(self.device, precision)
        self.progress = progress
        base = model.get_base_model() if hasattr(model, "get_base_model") else model
        self.base_model = base
        self.esm = base.esm
        if workers is None:
            workers = min(torch.get_num_threads(), 4) if self.device.type == "cpu" else 1
        self.workers = max(1, workers)
        self.packed = None
        int8 = self.precision_name == "int8"
        reason = unsupported_reason(self.esm) if packed else "packed=False"
        if not reason and not unpadded_forward_trusted(backbone_family(self.esm.config)):
            reason = "the padding-free path failed its parity self-check (warned)"
        if int8 and (reason or self.device.type != "cpu"):
            raise ValueError("precision int8 runs on CPU through the padding-free path only, here: "
                             f"{reason or self.device.type}")
        if not reason:
            self.packed = UnpaddedEsm(self.esm, attention=attention, int8=int8)
            self.attention_mode()  # an attention asked for that cannot run here fails now, not at the first batch

    def attention_mode(self) -> str:
        """The padding-free path's attention on this engine's device and precision (`UnpaddedEsm.attention_mode`)."""
        dtype = self.autocast_dtype or next(self.esm.parameters()).dtype
        return self.packed.attention_mode(self.device, dtype)

    def encode(self, sequences: Sequence[str]) -> list[list[int]]:
        """Token ids (`<cls>` residues `<eos>`, normalised and cropped by the tokenizer; whole under
        `long_proteins="windows"`) of each protein."""
        return self.tokenizer(list(sequences))["input_ids"] if len(sequences) else []

    def _autocast(self):
        if self.autocast_dtype is None:
            return nullcontext()
        return torch.autocast(self.device.type, dtype=self.autocast_dtype)

    def batches(self, lengths: Sequence[int]) -> list[np.ndarray]:
        """How proteins of these token counts are grouped into batches, in the order they run: where attention
        runs without padding (every padding-free mode but `padded`), even batches of tokens for the workers
        (`balanced_batches`); otherwise batches sorted by length under a padded budget (`length_batches`)."""
        if self.packed is not None and self.attention_mode() != "padded":
            return balanced_batches(lengths, self.max_tokens_per_batch, self.workers)
        return length_batches(lengths, self.max_tokens_per_batch)

    def map_batches(self, encoded: Sequence[Sequence[int]], function, desc: str = "Embedding", bar=None
                    ) -> Iterator[tuple[np.ndarray, object]]:
        """Runs the backbone on every batch and `function(lengths, hidden)` on its packed hidden states (a
        (sum of lengths, hidden) tensor, proteins in the order of the batch's indices); yields `(indices, result)`
        in batch order. Eval mode, `torch.inference_mode`, autocast per `precision`.

        On CPU with the packed backbone the batches run in `workers` threads at once, each with an equal share of
        torch's intra-op threads (default: one thread per worker on up to 4 cores): one batch per core scales
        better than every small operation split across the cores (and much better on a machine shared with other
        work, where split operations wait for each other)."""
        spans = [self.tokenizer.window_spans(len(ids) - 2) for ids in encoded]
        batches = self.batches([sum(end - start + 2 for start, end, _, _ in windows) for windows in spans])
        workers = min(self.workers, len(batches)) if self.packed is not None else 1

        def run(batch_indices):
            ids = [encoded[i] for i in batch_indices]
            lengths = [len(x) for x in ids]
            with torch.inference_mode(), self._autocast():
                hidden = self._windowed_backbone(ids, [spans[i] for i in batch_indices])
                return batch_indices, function(lengths, hidden)

        was_training = self.model.training
        self.model.eval()
        try:
            if bar is None:
                bar = tqdm(total=len(encoded), desc=desc, unit="protein", disable=not self.progress)
            else:
                bar = nullcontext(bar)  # the caller's: advanced here, closed by the caller
            with bar as bar:
                if workers <= 1:
                    for batch_indices in batches:
                        result = run(batch_indices)
                        yield result
                        bar.update(len(batch_indices))
                    return
                threads = torch.get_num_threads()
                per_worker = max(1, threads // workers)
                torch.set_num_threads(per_worker)  # new threads start with the process-wide setting
                try:
                    with ThreadPoolExecutor(workers, initializer=torch.set_num_threads,
                                            initargs=(per_worker,)) as pool:
                        pending, remaining = deque(), iter(batches)
                        for batch_indices in islice(remaining, 2 * workers):  # a bounded number in flight
                            pending.append(pool.submit(run, batch_indices))
                        while pending:
                            result = pending.popleft().result()
                            following = next(remaining, None)
                            if following is not None:
                                pending.append(pool.submit(run, following))
                            yield result
                            bar.update(len(result[0]))
                finally:
                    torch.set_num_threads(threads)
        finally:
            self.model.train(was_training)

    def hidden_state_batches(self, encoded: Sequence[Sequence[int]], desc: str = "Embedding"
                             ) -> Iterator[tuple[np.ndarray, list[int], torch.Tensor]]:
        """Yields `(indices, lengths, hidden)` per batch: the positions (in `encoded`) of the batch's proteins, their
        token counts and their last hidden states packed into one (sum of lengths, hidden) tensor, in the order of
        `indices`."""
        for indices, (lengths, hidden) in self.map_batches(encoded, lambda lengths, hidden: (lengths, hidden), desc):
            yield indices, lengths, hidden

    def _windowed_backbone(self, ids, spans) -> torch.Tensor:
        """The packed last hidden states of whole proteins (`ids`), those with several windows (`spans`, per
        protein) run window by window: the windows in order, in runs within the token budget (counted as
        windows x longest, right for both attention paths), stitched back per protein (`stitch_windows`)."""
        if all(len(windows) == 1 for windows in spans):
            return self._backbone(ids, [len(x) for x in ids])
        pieces = [x[:1] + x[1 + start:1 + end] + x[-1:] for x, windows in zip(ids, spans, strict=True)
                  for start, end, _, _ in windows]
        states, first = [], 0
        while first < len(pieces):
            last, longest = first + 1, len(pieces[first])
            while last < len(pieces) and (last + 1 - first) * max(longest, len(pieces[last])) <= \
                    self.max_tokens_per_batch:
                longest = max(longest, len(pieces[last]))
                last += 1
            lengths = [len(piece) for piece in pieces[first:last]]
            states += torch.split(self._backbone(pieces[first:last], lengths), lengths)
            first = last
        proteins, first = [], 0
        for windows in spans:
            proteins.append(stitch_windows(states[first:first + len(windows)], windows))
            first += len(windows)
        return torch.cat(proteins)

    def _backbone(self, ids, lengths) -> torch.Tensor:
        if self.packed is not None:
            flat = torch.tensor([token for x in ids for token in x], dtype=torch.long, device=self.device)
            return self.packed(flat, lengths)
        padded = self.tokenizer.pad({"input_ids": ids}, return_tensors="pt")
        attention_mask = padded["attention_mask"].to(self.device)
        hidden = self.esm(padded["input_ids"].to(self.device), attention_mask=attention_mask).last_hidden_state
        return hidden[attention_mask.bool()]

    @staticmethod
    def pool(hidden: torch.Tensor, lengths: Sequence[int], kind: str) -> torch.Tensor:
        """Per-protein vectors from packed hidden states: `mean` over residues (without `<cls>`/`<eos>`, as
        `EsmLocPooler` does) or the `<cls>` state."""
        starts = np.concatenate([[0], np.cumsum(lengths)[:-1]]).astype(np.int64)
        if kind == "cls":
            return hidden[torch.as_tensor(starts, device=hidden.device)]
        if kind != "mean":
            raise ValueError(f"pool kind must be mean or cls, got {kind!r}")
        # One reduction per protein: torch's blocked sums are as accurate as the pooler's padded sum.
        rows = [hidden[start + 1:start + length - 1].float().sum(dim=0) / max(length - 2, 1)
                for start, length in zip(starts.tolist(), lengths)]
        return torch.stack(rows)

    @staticmethod
    def residues(hidden: torch.Tensor, lengths: Sequence[int]) -> list[torch.Tensor]:
        """Each protein's residue states (without `<cls>`/`<eos>`)."""
        out, start = [], 0
        for length in lengths:
            out.append(hidden[start + 1:start + length - 1])
            start += length
        return out

    def embed(self, sequences: Sequence[str], kind: str = "mean", desc: str = "Embedding"):
        """Features per protein in input order: `mean`/`cls` give a float32 array (n, hidden); `residues` gives a
        list of float32 arrays (residues, hidden)."""
        return self.embed_encoded(self.encode(sequences), kind, desc)

    def embed_encoded(self, encoded, kind: str = "mean", desc: str = "Embedding", on_batch=None, keep: bool = True):
        """`embed` for token ids already encoded. `on_batch(indices, rows)` is called after each batch with the
        positions and features of its proteins (the feature cache writes its shards from there); with
        `keep=False` nothing is collected and None is returned."""
        if kind not in FEATURE_KINDS:
            raise ValueError(f"kind must be one of {FEATURE_KINDS}, got {kind!r}")
        results = None
        if keep:
            if kind == "residues":
                results = [None] * len(encoded)
            else:
                results = np.zeros((len(encoded), self.esm.config.hidden_size), dtype=np.float32)
        def features(lengths, hidden):
            if kind == "residues":
                return [x.float().cpu().numpy() for x in self.residues(hidden, lengths)]
            return self.pool(hidden, lengths, kind).float().cpu().numpy()

        for indices, rows in self.map_batches(encoded, features, desc=desc):
            if keep:
                for index, row in zip(indices, rows, strict=True):
                    results[index] = row
            if on_batch is not None:
                on_batch(indices, rows)
        return results

    def logits_from_hidden(self, hidden: torch.Tensor, lengths: Sequence[int]) -> torch.Tensor:
        """The model's head (`classify`) on packed hidden states, through a padded view with an attention mask,
        so that every pooling mode runs exactly the model's own code."""
        return self.base_model.classify(*self.padded(hidden, lengths)).logits

    @staticmethod
    def padded(hidden: torch.Tensor, lengths: Sequence[int]) -> tuple[torch.Tensor, torch.Tensor]:
        """Packed hidden states as a padded float32 (proteins, longest, hidden) batch and its attention mask (long),
        the inputs of the model's own head and pooler."""
        count, longest = len(lengths), max(lengths)
        padded = hidden.new_zeros(count, longest, hidden.shape[-1], dtype=torch.float32)
        mask = torch.arange(longest, device=hidden.device)[None, :] < torch.as_tensor(
            np.asarray(lengths), device=hidden.device)[:, None]
        padded[mask] = hidden.float()
        return padded, mask.long()

    def probabilities_from_logits(self, logits: torch.Tensor) -> torch.Tensor:
        return task.probabilities(logits, task.is_multi_label(self.base_model.config))

    def predict_probabilities(self, sequences: Sequence[str], desc: str = "Predicting", bar=None) -> np.ndarray:
        """Class probabilities (n, num_labels) in input order: sigmoid per label for multi-label models, softmax
        otherwise (`esmloc.task.probabilities`). `bar`: see `map_batches`."""
        encoded = self.encode(sequences)
        results = np.zeros((len(encoded), self.base_model.config.num_labels), dtype=np.float32)
        def probabilities(lengths, hidden):
            return self.probabilities_from_logits(self.logits_from_hidden(hidden, lengths)).cpu().numpy()

        for indices, rows in self.map_batches(encoded, probabilities, desc=desc, bar=bar):
            results[indices] = rows
        return results

    def probabilities_from_features(self, features, kind: str) -> np.ndarray:
        """Class probabilities from pooled (`mean`/`cls`) features, in chunks, with the model's own head."""
        if kind not in ("mean", "cls"):
            raise ValueError("probabilities_from_features takes pooled (mean or cls) features")
        head = self.base_model
        was_training = head.training
        head.eval()
        out = []
        try:
            with torch.inference_mode():
                for start in range(0, len(features), 4096):
                    pooled = torch.as_tensor(np.asarray(features[start:start + 4096]), device=self.device)
                    out.append(self.probabilities_from_logits(head.classify_pooled(pooled).logits).cpu().numpy())
        finally:
            head.train(was_training)
        num_labels = head.config.num_labels
        return np.concatenate(out) if out else np.zeros((0, num_labels), dtype=np.float32)


def predict_probabilities(model, tokenizer, sequences, max_tokens_per_batch: int | None = None, device=None,
                          progress: bool = True, desc: str = "Predicting", precision: str = "auto",
                          feature_cache=None) -> np.ndarray:
    """Class probabilities for each protein, shape (n, num_labels), in input order.

    With `feature_cache` (an `esmloc.cache.FeatureCache` root) and mean or `<cls>` pooling, the pooled features
    come from (and go to) that cache, keyed by the backbone weights, so a protein the same backbone has already
    embedded is not run again; the head then runs on the cached float32 vectors, which gives the same
    probabilities as running the backbone again."""
    engine = Engine(model, tokenizer, max_tokens_per_batch=max_tokens_per_batch, device=device,
                    precision=precision, progress=progress)
    pooling = engine.base_model.config.pooling
    if feature_cache is not None and pooling in ("mean", "cls"):
        from esmloc.cache import cached_features

        features = cached_features(engine, sequences, kind=pooling, cache_dir=feature_cache, desc=desc)
        return engine.probabilities_from_features(features, pooling)
    return engine.predict_probabilities(sequences, desc=desc)
