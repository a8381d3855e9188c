"""Saving a model directory that loads anywhere: weights, config, remote code and a matching tokenizer."""

from pathlib import Path

from tokenization_esmloc import EsmLocTokenizer


# What a saved esmloc model is made of (`save_model` writes it, esmloc.loading checks it, esmloc.publish pushes it).
WEIGHTS_FILE = "model.safetensors"
MODEL_FILES = ("config.json", WEIGHTS_FILE)
REMOTE_CODE_FILES = ("configuration_esmloc.py", "modeling_esmloc.py", "tokenization_esmloc.py")
TOKENIZER_FILES = ("tokenizer_config.json", "vocab.txt")  # what `EsmLocTokenizer.save_pretrained` writes
OPTIONAL_TOKENIZER_FILES = ("special_tokens_map.json",)


def tokenizer_for(config) -> EsmLocTokenizer:
    """The tokenizer that crops (or keeps long proteins whole for windows) exactly as `config` says (the shipped ESM-2
    vocabulary)."""
    return EsmLocTokenizer(**{name: getattr(config, name) for name in EsmLocTokenizer.INPUT_SETTINGS})


def crop_mismatch(tokenizer: EsmLocTokenizer, config) -> str | None:
    """Why `tokenizer` would feed the model of `config` inputs it was not trained on (it crops or windows
    differently: `EsmLocTokenizer.INPUT_SETTINGS`), or None."""
    names = EsmLocTokenizer.INPUT_SETTINGS
    ours, theirs = ({name: getattr(source, name, None) for name in names} for source in (tokenizer, config))
    if ours == theirs:
        return None
    differ = [name for name in names if ours[name] != theirs[name]]
    return ("the tokenizer crops (or windows) long proteins otherwise than the model config says: "
            + ", ".join(f"{name} {ours[name]!r} in the tokenizer, {theirs[name]!r} in the config" for name in differ))


def save_model(model, output_dir, tokenizer: EsmLocTokenizer | None = None) -> Path:
    """Saves `model` (safetensors, config with a local `auto_map`, the three `.py` files) and its tokenizer.

    A tokenizer that would crop (or window) differently from the model's config is refused: the model would then see
    inputs it was not trained on.
    """
    tokenizer = tokenizer if tokenizer is not None else tokenizer_for(model.config)
    mismatch = crop_mismatch(tokenizer, model.config)
    if mismatch:
        raise ValueError(mismatch)
    output_dir = Path(output_dir)
    model.save_pretrained(output_dir)
    tokenizer.save_pretrained(output_dir)
    return output_dir
