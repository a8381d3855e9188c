"""EsmLoc tokenizer: the ESM-2 (or ESM C) tokenizer with protein normalisation and the long-protein rule (crop, or whole
proteins for windows) on every path."""

import re
import tempfile
from pathlib import Path

from transformers import EsmTokenizer
from transformers.models.esm.configuration_esm import get_default_vocab_list


try:  # relative as remote code (transformers collects it; it ignores imports inside `try`), absolute as a module
    from .configuration_esmloc import (
        CROP_STRATEGIES, DEFAULT_CROP, DEFAULT_LONG_PROTEINS, DEFAULT_MAX_RESIDUES,
        LONG_PROTEIN_RULES, window_overlap_for,
    )
except ImportError:
    from configuration_esmloc import (
        CROP_STRATEGIES, DEFAULT_CROP, DEFAULT_LONG_PROTEINS, DEFAULT_MAX_RESIDUES,
        LONG_PROTEIN_RULES, window_overlap_for,
    )

try:  # ESM C's vocabulary, from transformers >= 5.25 (its EsmcTokenizer builds itself from this list)
    from transformers.models.esmc import tokenization_esmc
except ImportError:
    tokenization_esmc = None


# The ESM-2 vocabulary (fair-esm's `Alphabet("ESM-1b")`, as in facebook/esm2_* `vocab.txt`), from transformers, so
# that a tokenizer exists with no download.
ESM2_VOCAB = tuple(get_default_vocab_list())
# ESM C's vocabulary (transformers' `EsmcTokenizer`): ESM-2's, except that id 31 is the chain break `|` instead of
# `<null_1>`. Residues get the same ids in both; `|` is not a residue, so normalisation refuses it.
ESMC_VOCAB = tuple(tokenization_esmc.SEQUENCE_VOCAB) if tokenization_esmc is not None else None
VOCABULARIES = {"esm2": ESM2_VOCAB, "esmc": ESMC_VOCAB}
# The residue letters of the vocabulary: the 20 amino acids and X, B, U, Z, O. `.` and `-` are alignment gaps, not
# residues; `*` is a stop codon, stripped once at the end of a sequence.
RESIDUES = "".join(token for token in ESM2_VOCAB if len(token) == 1 and token.isalpha())
STOP_CODON = "*"
_RESIDUE_RUN = re.compile(f"[{RESIDUES}]+")
_NOT_A_RESIDUE = re.compile(f"[^{RESIDUES}]")
_WHITESPACE = re.compile(r"\s+")


class InvalidSequenceError(ValueError):
    """A text that is not a protein sequence. `position`: the 1-based position (counted without whitespace) of the
    first character that is not a residue; None for an empty sequence."""

    def __init__(self, message: str, position: int | None = None):
        super().__init__(message)
        self.position = position


def crop_sequence(sequence: str, max_residues: int = DEFAULT_MAX_RESIDUES, crop: str = DEFAULT_CROP) -> str:
    """Crops a protein to at most `max_residues` residues.

    `"middle"` keeps the N-terminal ceil(max/2) and the C-terminal floor(max/2) residues (DeepLoc 2.0's
    clipping), `"n_terminal"` keeps the first `max_residues`.
    """
    if len(sequence) <= max_residues:
        return sequence
    if crop == "n_terminal":
        return sequence[:max_residues]
    if crop == "middle":
        head = (max_residues + 1) // 2
        tail = max_residues - head
        return sequence[:head] + (sequence[-tail:] if tail else "")
    raise ValueError(f"crop must be one of {CROP_STRATEGIES}, got {crop!r}")


def window_spans(residues: int, max_residues: int = DEFAULT_MAX_RESIDUES, window_overlap: int | None = None
                 ) -> list[tuple[int, int, int, int]]:
    """The windows of a protein of `residues` residues under `long_proteins="windows"`, as `(start, end, keep_start,
    keep_end)` residue positions (0-based, end exclusive): the window `[start, end)` is embedded (as `<cls>` window
    `<eos>`) and supplies the states of the residues `[keep_start, keep_end)`; the kept ranges tile the protein.

    A protein of at most `max_residues` residues is one window, itself. A longer one gets the fewest windows of exactly
    `max_residues` residues whose neighbours overlap by at least `window_overlap` residues (default a quarter of
    `max_residues`: `window_overlap_for`), the first at the N-terminus, the last at the C-terminus, the others evenly
    spaced between them (a stride of at most `max_residues - window_overlap`). Each residue keeps the state of the
    window in which it lies most central: neighbouring windows are cut at the middle of their overlap.
    """
    overlap = window_overlap_for(max_residues, window_overlap)
    if residues <= max_residues:
        return [(0, residues, 0, residues)]
    steps = -(-(residues - max_residues) // (max_residues - overlap))  # ceil: gaps between the first and last start
    starts = [step * (residues - max_residues) // steps for step in range(steps + 1)]
    cuts = [0] + [(start + following + max_residues) // 2 for start, following in zip(starts, starts[1:])] + [residues]
    return [(start, start + max_residues, cuts[i], cuts[i + 1]) for i, start in enumerate(starts)]


def normalize_sequence(text: str, keep: tuple[str, ...] = ()) -> str:
    """The one sequence rule, for every path from raw text to the model (the tokenizer, esmloc-predict, the data
    builder, the demo): all whitespace removed, residues upper-cased, one trailing `*` (a stop codon) removed; then
    the sequence must be non-empty and every character a residue of ESM-2 (`RESIDUES`), else
    `InvalidSequenceError` (a `ValueError`) names the first bad character and its position.

    `keep`: tokens allowed as written, e.g. the tokenizer's `("<mask>",)` for masked-language-model inputs.
    """
    if _RESIDUE_RUN.fullmatch(text):  # the common case: nothing to do
        return text
    text = _WHITESPACE.sub("", text)
    parts = re.split("(" + "|".join(map(re.escape, keep)) + ")", text) if keep else [text]
    parts[::2] = [part.upper() for part in parts[::2]]  # residues, between the kept tokens
    if parts[-1].endswith(STOP_CODON):
        parts[-1] = parts[-1][:-1]
    if not any(parts):
        raise InvalidSequenceError("empty sequence")
    offset = 0
    for index, part in enumerate(parts):
        bad = _NOT_A_RESIDUE.search(part) if index % 2 == 0 else None
        if bad:
            position = offset + bad.start() + 1
            raise InvalidSequenceError(
                f"character {bad.group()!r} at position {position} is not a residue of the ESM-2 alphabet "
                f"({RESIDUES})", position=position)
        offset += len(part)
    return "".join(parts)


class EsmLocTokenizer(EsmTokenizer):
    """
    An ESM-2 tokenizer that checks and normalises each protein by the one sequence rule (`normalize_sequence`:
    whitespace removed, residues upper-cased, a trailing `*` stop codon removed; an empty sequence or a character
    that is not a residue raises `InvalidSequenceError`, a `ValueError`, where the stock `EsmTokenizer` would turn it
    into `<unk>` and let the model score it), then applies the long-protein rule before tokenising: with
    `long_proteins="crop"` it crops a protein to `max_residues` residues per `crop` (see `crop_sequence`); with
    `"windows"` it keeps the whole protein, which the model embeds in windows (`window_spans`, with `window_overlap`;
    `EsmForLocalization` and esmloc's engine both window any protein longer than `max_residues`). So the pipeline,
    the Trainer, esmloc-predict and a user's own call all feed the model the same input. The mask token (`<mask>`)
    may be written as it is, for masked-language-model use; no other token may. `normalize_and_crop` is that rule,
    public for whoever must know what the model sees (the feature cache keys on it). `vocab_file=None` uses
    transformers' vocabulary of `backbone_family`: `"esm2"` (ESM-2's) or `"esmc"` (ESM C's, which gives the ids of
    transformers' own `EsmcTokenizer`). `INPUT_SETTINGS` name the settings a model's config and its tokenizer must
    share.
    """

    INPUT_SETTINGS = ("max_residues", "crop", "long_proteins", "window_overlap", "backbone_family")

    def __init__(
        self,
        vocab_file=None,
        max_residues=DEFAULT_MAX_RESIDUES,
        crop=DEFAULT_CROP,
        long_proteins=DEFAULT_LONG_PROTEINS,
        window_overlap=None,
        backbone_family="esm2",
        unk_token="<unk>",
        cls_token="<cls>",
        pad_token="<pad>",
        mask_token="<mask>",
        eos_token="<eos>",
        **kwargs,
    ):
        if crop not in CROP_STRATEGIES:
            raise ValueError(f"crop must be one of {CROP_STRATEGIES}, got {crop!r}")
        if long_proteins not in LONG_PROTEIN_RULES:
            raise ValueError(f"long_proteins must be one of {LONG_PROTEIN_RULES}, got {long_proteins!r}")
        window_overlap_for(max_residues, window_overlap)  # raises for an overlap the windows cannot have
        if backbone_family not in VOCABULARIES:
            raise ValueError(f"backbone_family must be one of {tuple(VOCABULARIES)}, got {backbone_family!r}")
        if vocab_file is None and VOCABULARIES[backbone_family] is None:
            raise ImportError("the ESM C vocabulary needs transformers >= 5.25 (transformers.models.esmc)")
        self.backbone_family = backbone_family
        self.max_residues = max_residues
        self.crop = crop
        self.long_proteins = long_proteins
        self.window_overlap = window_overlap
        # With windows the model takes proteins of any length: no limit for transformers to warn about.
        kwargs.setdefault("model_max_length", max_residues + 2 if long_proteins == "crop" else int(1e30))
        with tempfile.TemporaryDirectory() as folder:
            if vocab_file is None:  # EsmTokenizer reads its vocabulary from a file (as transformers' convert_esm.py)
                vocab_file = Path(folder, "vocab.txt")
                vocab_file.write_text("\n".join(VOCABULARIES[backbone_family]), encoding="utf-8")
            super().__init__(
                vocab_file,
                unk_token=unk_token,
                cls_token=cls_token,
                pad_token=pad_token,
                mask_token=mask_token,
                eos_token=eos_token,
                max_residues=max_residues,
                crop=crop,
                long_proteins=long_proteins,
                window_overlap=window_overlap,
                backbone_family=backbone_family,
                **kwargs,
            )

    def normalize_and_crop(self, text: str) -> str:
        """The residues the model sees of `text`: checked and normalised (`normalize_sequence`; `InvalidSequenceError`
        for what is not a protein), cropped to `max_residues` per `crop` (`crop_sequence`); with
        `long_proteins="windows"` the whole protein (the model embeds it in `window_spans`). Text with `<mask>` is
        not cropped; it raises `ValueError` when it is longer than `max_residues`."""
        text = normalize_sequence(text, keep=(self.mask_token,))
        if self.long_proteins == "windows":
            return text
        residues = text.split(self.mask_token)
        if len(residues) == 1:
            return crop_sequence(text, self.max_residues, self.crop)
        if sum(map(len, residues)) + len(residues) - 1 > self.max_residues:  # a <mask> is one residue
            raise ValueError(
                f"cannot crop a sequence that contains {self.mask_token} to {self.max_residues} residues; "
                "crop it before masking"
            )
        return text

    def window_spans(self, residues: int) -> list[tuple[int, int, int, int]]:
        """The windows a protein of `residues` residues (as `normalize_and_crop` returns it) is embedded in:
        `window_spans` with this tokenizer's settings; one window, the protein itself, under `long_proteins="crop"`
        (the protein is cropped already)."""
        if self.long_proteins == "crop":
            return [(0, residues, 0, residues)]
        return window_spans(residues, self.max_residues, self.window_overlap)

    def prepare_for_tokenization(self, text, is_split_into_words=False, **kwargs):
        return self.normalize_and_crop(text), kwargs

    def _residue_fast_path(self):
        """(pattern, token -> id) for the fast path, or None when added tokens could split a plain residue string
        differently from one character per token. Rebuilt when the added tokens change."""
        key = tuple(self._added_tokens_encoder.items())
        cached = getattr(self, "_fast_path_cache", None)
        if cached is not None and cached[0] == key:
            return cached[1]
        characters = [token for token in self.all_tokens if len(token) == 1 and not token.isspace()]
        known = set(self.all_tokens) | set(self._added_tokens_encoder) | set(self.unique_no_split_tokens)
        fast = None
        # A longer token made only of residue characters could match inside a plain residue string.
        if characters and not any(len(token) > 1 and set(token) <= set(characters) for token in known):
            lookup = {token: self._convert_token_to_id_with_added_voc(token) for token in known}
            fast = (re.compile("[" + re.escape("".join(characters)) + "]+"), lookup)
        self._fast_path_cache = (key, fast)
        return fast

    def tokenize(self, text, **kwargs):
        # Fast path for the common case, a plain residue string: after normalising and cropping, every character is
        # a one-character vocabulary token, so the trie split of the generic path yields exactly the characters.
        # Any option switched on (e.g. split_special_tokens=True) takes the generic path.
        if isinstance(text, str) and not any(kwargs.values()) and not self.split_special_tokens:
            fast = self._residue_fast_path()
            if fast is not None:
                residues, _ = self.prepare_for_tokenization(text)
                if fast[0].fullmatch(residues):
                    return list(residues)
        return super().tokenize(text, **kwargs)

    def convert_tokens_to_ids(self, tokens):
        if not isinstance(tokens, str):
            fast = self._residue_fast_path()
            if fast is not None:
                lookup = fast[1]
                try:
                    return [lookup[token] for token in tokens]
                except KeyError:
                    pass
        return super().convert_tokens_to_ids(tokens)


EsmLocTokenizer.register_for_auto_class("AutoTokenizer")


__all__ = ["EsmLocTokenizer", "InvalidSequenceError", "crop_sequence", "normalize_sequence", "window_spans", "ESM2_VOCAB",
           "ESMC_VOCAB", "RESIDUES"]
