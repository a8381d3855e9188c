"""EsmLoc tokenizer: the ESM-2 tokenizer with protein normalisation and cropping on every path."""

import re

from transformers import EsmTokenizer, PreTrainedTokenizer
from transformers.models.esm.tokenization_esm import load_vocab_file


# The ESM-2 vocabulary (fair-esm's `Alphabet("ESM-1b")`, as in facebook/esm2_* `vocab.txt`), shipped here so
# that a tokenizer exists with no download.
ESM2_VOCAB = (
    "<cls>", "<pad>", "<eos>", "<unk>",
    "L", "A", "G", "V", "S", "E", "R", "T", "I", "D", "P", "K", "Q", "N", "F", "Y", "M", "H", "W", "C",
    "X", "B", "U", "Z", "O", ".", "-", "<null_1>", "<mask>",
)
CROP_STRATEGIES = ("middle", "n_terminal")
_SPECIAL_TOKEN = re.compile(r"(<[^<>\s]+>)")
_WHITESPACE = re.compile(r"\s+")


def crop_sequence(sequence: str, max_residues: int, crop: str = "middle") -> str:
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


def normalize_sequence(text: str) -> str:
    """Removes all whitespace and upper-cases residues; special tokens such as `<mask>` are kept as written."""
    parts = _SPECIAL_TOKEN.split(_WHITESPACE.sub("", text))
    return "".join(part if _SPECIAL_TOKEN.fullmatch(part) else part.upper() for part in parts)


class EsmLocTokenizer(EsmTokenizer):
    """
    An ESM-2 tokenizer that normalises each protein (whitespace removed, residues upper-cased; the stock
    `EsmTokenizer` turns `"mktayiak"` into a single `<unk>`) and crops it to `max_residues` residues per `crop`
    (see `crop_sequence`) before tokenising, so that the pipeline, the Trainer and a user's own call all feed the
    model the same input. `vocab_file=None` uses the ESM-2 vocabulary shipped with this file.
    """

    def __init__(
        self,
        vocab_file=None,
        max_residues=1022,
        crop="middle",
        unk_token="<unk>",
        cls_token="<cls>",
        pad_token="<pad>",
        mask_token="<mask>",
        eos_token="<eos>",
        **kwargs,
    ):
        if crop not in CROP_STRATEGIES:
            raise ValueError(f"crop must be one of {CROP_STRATEGIES}, got {crop!r}")
        self.max_residues = max_residues
        self.crop = crop
        kwargs.setdefault("model_max_length", max_residues + 2)
        # EsmTokenizer.__init__ insists on a vocabulary file; this one also takes the shipped vocabulary.
        self.all_tokens = load_vocab_file(vocab_file) if vocab_file is not None else list(ESM2_VOCAB)
        self._id_to_token = dict(enumerate(self.all_tokens))
        self._token_to_id = {token: index for index, token in enumerate(self.all_tokens)}
        PreTrainedTokenizer.__init__(
            self,
            max_residues=max_residues,
            crop=crop,
            unk_token=unk_token,
            cls_token=cls_token,
            pad_token=pad_token,
            mask_token=mask_token,
            eos_token=eos_token,
            **kwargs,
        )
        self.unique_no_split_tokens = self.all_tokens
        self._update_trie(self.unique_no_split_tokens)

    def prepare_for_tokenization(self, text, is_split_into_words=False, **kwargs):
        text = normalize_sequence(text)
        residues = _SPECIAL_TOKEN.split(text)
        if len(residues) == 1:
            text = crop_sequence(text, self.max_residues, self.crop)
        elif sum(len(part) for part in residues[::2]) + len(residues) // 2 > self.max_residues:
            raise ValueError(
                f"cannot crop a sequence that contains special tokens to {self.max_residues} residues; "
                "crop it before adding special tokens"
            )
        return text, kwargs

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


__all__ = ["EsmLocTokenizer", "crop_sequence", "normalize_sequence", "ESM2_VOCAB"]
