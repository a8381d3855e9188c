"""Opening a model directory the way every esmloc tool does: checked first, so that a directory that is not an
esmloc model (a stock ESM-2 save, a damaged weights file, a missing tokenizer) gets one message that names the
directory, what is wrong and the fix, instead of a traceback from deep inside transformers or safetensors."""

import json
from pathlib import Path

from safetensors import SafetensorError, safe_open

from esmloc.cli import InputError
from esmloc.saving import crop_mismatch
from modeling_esmloc import EsmForLocalization
from tokenization_esmloc import EsmLocTokenizer


WEIGHTS_FILE = "model.safetensors"
TOKENIZER_FILES = ("tokenizer_config.json", "vocab.txt")
STOCK_ESM_ADVICE = ("a stock ESM-2 checkpoint ({architecture}), not an esmloc model: train from it with "
                    "train.py --model_name_or_path {path}, or build one with EsmForLocalization.from_esm({path!r})")


def read_config(path) -> dict:
    """The directory's config.json as a dict; InputError when there is none or it is not JSON."""
    config_path = Path(path) / "config.json"
    if not Path(path).is_dir():
        raise InputError(f"{path}: no such model directory")
    if not config_path.is_file():
        raise InputError(f"{path}: not a model directory (no config.json)")
    try:
        return json.loads(config_path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as error:
        raise InputError(f"{config_path}: not valid JSON ({error}); the model directory is damaged") from None


def check_weights(path) -> None:
    """InputError unless the directory's model.safetensors is present and whole (header and every tensor's bytes:
    a download or copy cut short is caught here, before any weight is loaded)."""
    weights = Path(path) / WEIGHTS_FILE
    if not weights.is_file():
        found = sorted(p.name for p in Path(path).glob("*.bin")) or "nothing"
        raise InputError(f"{path}: no {WEIGHTS_FILE} (found {found}); esmloc loads safetensors weights only")
    try:
        with safe_open(weights, "pt") as handle:
            handle.keys()
    except SafetensorError as error:
        raise InputError(f"{weights}: damaged or truncated weights file ({error}); copy or download it again") from None


def model_kind(path) -> str:
    """`"esmloc"` for an esmloc model directory, `"esm"` for a stock ESM-2 checkpoint (its config and weights
    checked); InputError for anything else."""
    config = read_config(path)
    model_type = config.get("model_type")
    if model_type not in ("esmloc", "esm"):
        raise InputError(f"{path}: not an ESM-2 or esmloc model (config.json says model_type {model_type!r})")
    check_weights(path)
    return model_type


def check_model_dir(path, need_tokenizer: bool = True) -> None:
    """InputError unless `path` holds a complete esmloc model: config, whole weights and (by default) tokenizer."""
    if model_kind(path) == "esm":
        architecture = ", ".join(read_config(path).get("architectures") or ["EsmModel"])
        raise InputError(f"{path}: " + STOCK_ESM_ADVICE.format(architecture=architecture, path=str(path)))
    missing = [name for name in TOKENIZER_FILES if not (Path(path) / name).is_file()]
    if need_tokenizer and missing:
        raise InputError(f"{path}: the tokenizer is missing ({', '.join(missing)}); save the model with "
                         "esmloc.saving.save_model(model, directory), which writes it")


def load_model_dir(path, device="cpu") -> tuple[EsmForLocalization, EsmLocTokenizer]:
    """The model (eval mode, on `device`) and tokenizer of a checked esmloc model directory; the installed esmloc
    classes are used, so no remote code runs."""
    check_model_dir(path)
    model = EsmForLocalization.from_pretrained(path).to(device).eval()
    tokenizer = EsmLocTokenizer.from_pretrained(path)
    mismatch = crop_mismatch(tokenizer, model.config)
    if mismatch:
        raise InputError(f"{path}: {mismatch}")
    return model, tokenizer
