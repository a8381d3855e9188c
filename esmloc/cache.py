"""Cached-feature training: embed each protein once with a frozen backbone, keep the features on disk, train the
head on them.

With a frozen backbone every epoch of a plain `Trainer` runs the whole ESM-2 forward pass again. DeepLoc 2.0 instead
computes the embeddings once; so does `train.py --finetune frozen` (unless `--no_feature_cache`): it embeds every
split with `esmloc.engine.Engine`, stores the features here, and trains the head (`EsmLocHead`: the model's own
pooler and classifier modules, shared) with `transformers.Trainer` on them. The saved model is the ordinary
`EsmForLocalization`.

What is cached depends on the pooling: `mean` and `cls` cache one float32 vector per protein (the pooled vector the
head sees); `attention` caches every residue's last hidden state in float16 (half the disk of float32; memory-mapped,
so a split larger than memory still trains), and the attention pooler runs on them at every step.

Cache layout (`FeatureCache`):

    <cache_dir>/                      default: $HF_HOME/esmloc/features (HF_HOME: ~/.cache/huggingface)
      <fingerprint[:16]>-<kind>-r<max_residues>-<rule>-<precision>/   rule: the crop (middle, n_terminal), or
                                      windows<overlap> (long proteins embedded whole, in windows)
        meta.json                     the full backbone fingerprint, kind, long-protein settings, precision, hidden size
        <shard>.npy                   features of a group of proteins: float32 (proteins, hidden) for mean / cls,
                                      float16 (residues of all proteins, hidden) for residues
        <shard>.index.json            sha256 of each protein's normalised (cropped) sequence -> its rows in <shard>.npy

- The directory name keys everything that changes a feature except the sequence: the backbone fingerprint
  (`backbone_fingerprint`: sha256 over the forward's version (`esmloc.varlen_esm.forward_fingerprint`: the
  padding-free path's FORWARD_VERSION and the transformers version whose modules it runs), the architecture and
  every tensor of the backbone's state dict, the contact head excepted; about 0.1 s per 100 MB of weights), the feature
  kind, the long-protein rule (`long_protein_rule`: `max_residues` and the crop, or the windows and their overlap),
  and the precision the backbone ran in. A changed weight or setting therefore means a new directory, never stale features. Within a
  directory a protein is found by the sha256 of the sequence the backbone actually sees (normalised and cropped,
  `sequence_key`), so a changed sequence is a miss and identical proteins share one entry.
- Writes are atomic: a shard's data and then its index are written to temporary files and renamed into place; a
  shard exists only once its index does. An interrupted run leaves every finished shard usable, and the next run
  embeds only the proteins that are still missing. Shards are flushed every `shard_bytes`, `shard_rows` or
  `shard_seconds`, whichever comes first, which bounds the work an interruption can lose. Several processes may
  fill one directory at once (shard names are unique; a protein written twice is harmless).
- Nothing is ever evicted: delete a directory (or the whole cache) to reclaim the space.
"""

import hashlib
import json
import logging
import os
import time
import uuid
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch
from huggingface_hub import constants as hub_constants
from torch import nn
from torch.nn.utils.rnn import pad_sequence
from transformers import Trainer
from transformers.trainer_pt_utils import LengthGroupedSampler

from esmloc.files import TEMPORARY_PREFIX, atomic_file
from esmloc.digests import update_with_tensors
from configuration_esmloc import window_overlap_for
from esmloc.varlen_esm import forward_fingerprint


logger = logging.getLogger(__name__)

# Part of every fingerprint: a change in how features are computed or stored must invalidate old caches.
FORMAT_VERSION = "esmloc-features-1"
POOLED_KINDS = ("mean", "cls")
_ARCHITECTURE_KEYS = (
    "vocab_size", "hidden_size", "num_hidden_layers", "num_attention_heads", "intermediate_size", "hidden_act",
    "layer_norm_eps", "position_embedding_type", "token_dropout", "emb_layer_norm_before", "mask_token_id",
    "pad_token_id", "max_position_embeddings", "rope_theta",
)


def default_cache_dir() -> Path:
    """`$HF_HOME/esmloc/features` (HF_HOME defaults to ~/.cache/huggingface)."""
    return Path(hub_constants.HF_HOME) / "esmloc" / "features"


def feature_kind(pooling: str) -> str:
    """What a model with this pooling trains on: its pooled vector (mean, cls) or per-residue states (attention)."""
    return "residues" if pooling == "attention" else pooling


def backbone_fingerprint(esm) -> str:
    """sha256 (hex) over the backbone's architecture and the bytes of every tensor of its state dict (names, dtypes
    and shapes included), without the contact head, which no feature depends on."""
    digest = hashlib.sha256(FORMAT_VERSION.encode())
    # The code that computes features: esmloc's padding-free path (its version) and the transformers it runs.
    digest.update(forward_fingerprint().encode())
    config = esm.config.to_dict()
    digest.update(json.dumps({key: config.get(key) for key in _ARCHITECTURE_KEYS}, sort_keys=True,
                             default=str).encode())
    update_with_tensors(digest, ((name, tensor) for name, tensor in sorted(esm.state_dict().items())
                                 if not name.startswith("contact_head.")))
    return digest.hexdigest()


def sequence_key(sequence: str, tokenizer) -> str:
    """sha256 (hex) of the sequence the backbone sees: `tokenizer.normalize_and_crop(sequence)` (an EsmLocTokenizer's
    own rule, so a key can never drift from the tokenizer's input; the whole protein under windows)."""
    return hashlib.sha256(tokenizer.normalize_and_crop(sequence).encode()).hexdigest()


def long_protein_rule(tokenizer) -> dict:
    """What `tokenizer` (an `EsmLocTokenizer`) turns a long protein into, as the feature cache keys it: `max_residues`,
    `long_proteins`, and the crop strategy (crop) or the windows' resolved overlap (windows)."""
    rule = {"max_residues": tokenizer.max_residues, "long_proteins": tokenizer.long_proteins}
    if tokenizer.long_proteins == "windows":
        return {**rule, "window_overlap": window_overlap_for(tokenizer.max_residues, tokenizer.window_overlap)}
    return {**rule, "crop": tokenizer.crop}


class FeatureCache:
    """One cache directory: the features of one backbone (by fingerprint), kind, long-protein rule (the
    `tokenizer`'s, an `EsmLocTokenizer`: `long_protein_rule`) and precision."""

    def __init__(self, root, fingerprint: str, kind: str, tokenizer, precision: str, hidden_size: int):
        if kind not in POOLED_KINDS + ("residues",):
            raise ValueError(f"unknown feature kind {kind!r}")
        self.root = Path(root).expanduser()
        self.fingerprint, self.kind, self.tokenizer = fingerprint, kind, tokenizer
        rule = long_protein_rule(tokenizer)
        self.precision, self.hidden_size = precision, hidden_size
        self.dtype = np.float16 if kind == "residues" else np.float32
        # A cropping cache keeps the directory name it had before windows existed; windows name their overlap.
        long_proteins = rule["crop"] if "crop" in rule else f"windows{rule['window_overlap']}"
        self.path = self.root / f"{fingerprint[:16]}-{kind}-r{rule['max_residues']}-{long_proteins}-{precision}"
        self.meta = {"format": FORMAT_VERSION, "forward": forward_fingerprint(), "fingerprint": fingerprint,
                     "kind": kind, **rule, "precision": precision, "hidden_size": hidden_size,
                     "dtype": np.dtype(self.dtype).name}
        self._index: dict[str, tuple[str, int, int]] = {}
        self._seen_shards: set[str] = set()
        self._arrays: dict[str, np.ndarray] = {}

    @classmethod
    def for_engine(cls, engine, kind: str, root=None, fingerprint: str | None = None) -> "FeatureCache":
        return cls(root if root is not None else default_cache_dir(),
                   fingerprint or backbone_fingerprint(engine.esm), kind, engine.tokenizer, engine.precision_name,
                   engine.esm.config.hidden_size)

    def key(self, sequence: str) -> str:
        return sequence_key(sequence, self.tokenizer)

    def refresh(self) -> dict[str, tuple[str, int, int]]:
        """Reads the indexes of shards written since the last call (by this or another process)."""
        if not self.path.is_dir():
            return self._index
        meta_path = self.path / "meta.json"
        if meta_path.exists():
            meta = json.loads(meta_path.read_text())
            if meta.get("fingerprint") != self.fingerprint or meta.get("dtype") != self.meta["dtype"]:
                raise RuntimeError(f"{self.path} belongs to another backbone or format ({meta}); delete it")
        for index_path in sorted(self.path.glob("*.index.json")):
            shard = index_path.name.removesuffix(".index.json")
            if shard in self._seen_shards or shard.startswith(TEMPORARY_PREFIX):  # pathlib's glob matches dot files too
                continue
            entries = json.loads(index_path.read_text())
            for key, offset, rows in zip(entries["keys"], entries["offsets"], entries["rows"], strict=True):
                self._index.setdefault(key, (shard, offset, rows))
            self._seen_shards.add(shard)
        return self._index

    def __contains__(self, key: str) -> bool:
        return key in self._index

    def __len__(self) -> int:
        return len(self._index)

    def _array(self, shard: str) -> np.ndarray:
        if shard not in self._arrays:
            self._arrays[shard] = np.load(self.path / f"{shard}.npy", mmap_mode="r")
        return self._arrays[shard]

    def get(self, key: str) -> np.ndarray:
        """A protein's features: a (hidden,) float32 vector, or a memory-mapped (residues, hidden) float16 view."""
        shard, offset, rows = self._index[key]
        array = self._array(shard)
        return array[offset] if self.kind in POOLED_KINDS else array[offset:offset + rows]

    def write_shard(self, keys: Sequence[str], features: Sequence[np.ndarray]) -> str:
        """Stores the features of `keys` as one new shard (atomically); returns its name."""
        self.path.mkdir(parents=True, exist_ok=True)
        meta_path = self.path / "meta.json"
        if not meta_path.exists():
            with atomic_file(meta_path) as handle:
                handle.write(json.dumps(self.meta, indent=2).encode())
        if self.kind in POOLED_KINDS:
            data = np.asarray(np.stack(features), dtype=self.dtype)
            offsets, rows = list(range(len(keys))), [1] * len(keys)
        else:
            rows = [int(len(feature)) for feature in features]
            offsets = np.concatenate([[0], np.cumsum(rows)[:-1]]).astype(int).tolist() if rows else []
            data = np.concatenate(features).astype(self.dtype) if rows else np.zeros((0, self.hidden_size),
                                                                                      self.dtype)
        shard = f"{time.strftime('%Y%m%d%H%M%S')}-{os.getpid()}-{uuid.uuid4().hex[:12]}"
        with atomic_file(self.path / f"{shard}.npy") as handle:
            np.save(handle, data)
        index = {"keys": list(keys), "offsets": offsets, "rows": rows}
        with atomic_file(self.path / f"{shard}.index.json") as handle:
            handle.write(json.dumps(index).encode())
        return shard

    def ensure(self, engine, sequences: Sequence[str], desc: str = "Embedding", shard_rows: int = 4096,
               shard_bytes: int = 256 * 2**20, shard_seconds: float = 120.0) -> dict:
        """Embeds (with `engine`) every protein of `sequences` that is not cached yet and stores it in shards.
        Returns counts: proteins, unique (distinct sequences seen by the backbone), hits, computed."""
        keys = [self.key(sequence) for sequence in sequences]
        self.refresh()
        self._remove_stale_temporaries()
        missing: dict[str, str] = {}
        for key, sequence in zip(keys, sequences, strict=True):
            if key not in self._index and key not in missing:
                missing[key] = sequence
        unique = len(set(keys))
        stats = {"proteins": len(keys), "unique": unique, "hits": unique - len(missing), "computed": len(missing)}
        if not missing:
            return stats
        missing_keys = list(missing)
        encoded = engine.encode(list(missing.values()))
        buffer_keys, buffer_rows, state = [], [], {"bytes": 0, "since": time.monotonic()}

        def flush():
            if buffer_keys:
                self.write_shard(buffer_keys, buffer_rows)
                buffer_keys.clear()
                buffer_rows.clear()
            state["bytes"], state["since"] = 0, time.monotonic()

        def on_batch(indices, rows):
            for index, row in zip(indices, rows, strict=True):
                buffer_keys.append(missing_keys[index])
                buffer_rows.append(np.asarray(row, dtype=self.dtype))
                state["bytes"] += buffer_rows[-1].nbytes
            if (len(buffer_keys) >= shard_rows or state["bytes"] >= shard_bytes
                    or time.monotonic() - state["since"] >= shard_seconds):
                flush()

        engine.embed_encoded(encoded, self.kind, desc=desc, on_batch=on_batch, keep=False)
        flush()
        self.refresh()
        return stats

    def _remove_stale_temporaries(self, age_seconds: float = 86400.0) -> None:
        """Temporary files of runs killed mid-write (a day old: never those of a process still writing)."""
        if self.path.is_dir():
            for path in self.path.glob(f"{TEMPORARY_PREFIX}*"):
                try:
                    if time.time() - path.stat().st_mtime > age_seconds:
                        path.unlink()
                except OSError:
                    pass

    def load(self, sequences: Sequence[str]):
        """Features of `sequences` in order: a float32 (n, hidden) array for pooled kinds, else a list of
        memory-mapped float16 (residues, hidden) arrays."""
        self.refresh()
        keys = [self.key(sequence) for sequence in sequences]
        absent = [key for key in keys if key not in self._index]
        if absent:
            raise KeyError(f"{len(absent)} of {len(keys)} proteins are not in the feature cache {self.path}")
        if self.kind in POOLED_KINDS:
            if not keys:
                return np.zeros((0, self.hidden_size), dtype=np.float32)
            return np.stack([self.get(key) for key in keys]).astype(np.float32)
        return [self.get(key) for key in keys]


def cached_features(engine, sequences: Sequence[str], kind: str, cache_dir=None, desc: str = "Embedding",
                    fingerprint: str | None = None, **shard_options):
    """Features of `sequences` (see `FeatureCache.load`), embedding with `engine` only what the cache lacks."""
    cache = FeatureCache.for_engine(engine, kind, root=cache_dir, fingerprint=fingerprint)
    started = time.perf_counter()
    stats = cache.ensure(engine, sequences, desc=desc, **shard_options)
    # bench/accuracy.py reads the seconds from this line (the embedding time of a run).
    logger.info("%s: %d proteins, %d cached, %d embedded now in %.1f s (%s)", desc, stats["proteins"], stats["hits"],
                stats["computed"], time.perf_counter() - started, cache.path)
    return cache.load(sequences)


# --- training the head on cached features ----------------------------------------------------------------------


class FeatureDataset(torch.utils.data.Dataset):
    """Cached features with their labels; `lengths` (tokens per protein, as the tokenizer counts them) serve the
    length-grouped sampler exactly as the token ids do on the ordinary path."""

    def __init__(self, features, labels, lengths: Sequence[int]):
        if not len(features) == len(labels) == len(lengths):
            raise ValueError("features, labels and lengths differ in length")
        self.features, self.labels, self.lengths = features, labels, [int(length) for length in lengths]

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, index) -> dict:
        features = torch.from_numpy(np.asarray(self.features[index], dtype=np.float32))
        return {"features": features, "labels": torch.as_tensor(self.labels[index])}


def collate_features(items: list[dict]) -> dict:
    """Stacks pooled vectors; pads per-residue states to the longest protein and adds `residue_mask`."""
    labels = torch.stack([item["labels"] for item in items])
    features = [item["features"] for item in items]
    if features[0].dim() == 1:
        return {"features": torch.stack(features), "labels": labels}
    padded = pad_sequence(features, batch_first=True)
    lengths = torch.tensor([len(feature) for feature in features])
    mask = torch.arange(padded.shape[1]) < lengths[:, None]
    return {"features": padded, "residue_mask": mask, "labels": labels}


class EsmLocHead(nn.Module):
    """The trainable part of a frozen-backbone `EsmForLocalization`, on cached features: the model's own `pooler`
    and `classifier` modules (shared, not copied, so training it trains the model) and its `classify_pooled`
    (loss, class weights). Pooled features go straight to the classifier; per-residue features go through the
    attention pooler first."""

    # As on EsmForLocalization: Trainer would otherwise pass `num_items_in_batch` and rescale the logged loss.
    accepts_loss_kwargs = False

    def __init__(self, model):
        super().__init__()
        self.pooler = model.pooler
        self.classifier = model.classifier
        self._classify_pooled = model.classify_pooled  # a bound method: the backbone is not a submodule here

    def forward(self, features, labels=None, residue_mask=None):
        if residue_mask is not None:
            features, _ = self.pooler.pool_residues(features, residue_mask)
        return self._classify_pooled(features, labels)


class FeatureTrainer(Trainer):
    """`Trainer` for `EsmLocHead` on `FeatureDataset`s. The only change: with `group_by_length` the length-grouped
    samplers get the proteins' token counts (which a feature tensor does not carry), so that batches are drawn in
    exactly the order the ordinary path draws them."""

    def _get_train_sampler(self, train_dataset=None):
        dataset = train_dataset if train_dataset is not None else self.train_dataset
        if self.args.train_sampling_strategy == "group_by_length" and isinstance(dataset, FeatureDataset):
            return LengthGroupedSampler(self.args.train_batch_size * self.args.gradient_accumulation_steps,
                                        lengths=dataset.lengths)
        return super()._get_train_sampler(train_dataset)

    def _get_eval_sampler(self, eval_dataset):
        if self.args.train_sampling_strategy == "group_by_length" and isinstance(eval_dataset, FeatureDataset):
            seed = self.args.data_seed if self.args.data_seed is not None else self.args.seed
            return LengthGroupedSampler(self.args.eval_batch_size, lengths=eval_dataset.lengths,
                                        generator=torch.Generator().manual_seed(seed))
        return super()._get_eval_sampler(eval_dataset)


def feature_trainer(model, tokenizer, dataset, training_args, targets: dict, cache_dir=None,
                    max_tokens_per_batch: int | None = None, precision: str = "auto", **trainer_kwargs):
    """The cached-feature path of a frozen backbone: the train and validation splits (`dataset[split]["Sequence"]`,
    `targets[split]`) are embedded once by the engine (or read from the feature cache in `cache_dir`), and a
    `FeatureTrainer` trains the model's head (`EsmLocHead`, sharing the model's pooler and classifier) on the
    features with `training_args`, the same sampler, loss and metrics as the ordinary path. The main process embeds
    first; the other processes of a distributed run then find everything in the cache."""
    from esmloc.engine import Engine

    model.to(training_args.device)
    inference = Engine(model, tokenizer, max_tokens_per_batch=max_tokens_per_batch, device=training_args.device,
                       progress=not training_args.disable_tqdm, precision=precision)
    kind = feature_kind(model.config.pooling)
    fingerprint = backbone_fingerprint(model.esm)
    splits = {}
    with training_args.main_process_first(desc="embedding"):
        for name in ("train", "validation"):
            sequences = dataset[name]["Sequence"]
            features = cached_features(inference, sequences, kind, cache_dir, desc=f"Embedding {name}",
                                       fingerprint=fingerprint)
            lengths = [len(ids) for ids in inference.encode(sequences)]
            splits[name] = FeatureDataset(features, targets[name], lengths)
    return FeatureTrainer(model=EsmLocHead(model), args=training_args, train_dataset=splits["train"],
                          eval_dataset=splits["validation"], data_collator=collate_features, **trainer_kwargs)
