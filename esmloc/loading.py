"""Where a model comes from, and opening it the way every esmloc tool does.

- `local_or_hub`: the one decision "is this name a local directory or a hub id?" (a name that looks like a path
  but is not a directory is refused, rather than sent to the hub); `from_hub` turns an unreachable hub into one
  message with the three ways around it (a mirror, a clone, offline weights).
- `check_model_dir` / `load_model_dir`: a model directory is checked first, so that one that is not an esmloc model
  (a stock ESM-2 save, a damaged weights file, a missing tokenizer) gets one message that names the directory,
  what is wrong and the fix, instead of a traceback from deep inside transformers or safetensors.
- `load_model_or_backbone`: an esmloc model directory, or a stock ESM-2 or ESM C checkpoint (directory or hub id)
  wrapped by `EsmForLocalization.from_esm` (esmloc-embed, the demo's hub models go through `resolve_model_dir`).
"""

import json
from pathlib import Path

from huggingface_hub import constants as hub_constants
from safetensors import SafetensorError, safe_open

from configuration_esmloc import BACKBONE_FAMILIES, FAMILY_NAMES, window_overlap_for
from esmloc.errors import EnvironmentProblem, InputError
from esmloc.saving import TOKENIZER_FILES, WEIGHTS_FILE, crop_mismatch, tokenizer_for
from modeling_esmloc import EsmForLocalization
from tokenization_esmloc import EsmLocTokenizer


def local_or_hub(name, option: str = "model") -> Path | str:
    """`name` as a local directory (a Path) or a hub id (a str). A name written as a path (starting with `.`, `/` or
    `~`, or with more than one `/`) that is not a directory is an InputError, never a hub request."""
    local = Path(name).expanduser()
    if local.is_dir():
        return local
    if local.exists():
        raise InputError(f"{option} {name}: is a file; give a model directory or a hub id (user/name)")
    if str(name).startswith((".", "/", "~")) or str(name).count("/") > 1 or not str(name).strip():
        raise InputError(f"{option} {name}: no such directory")
    return str(name)


def hub_unreachable_message(name: str, error: Exception, option: str = "--model_name_or_path") -> str:
    short = name.split("/")[-1]
    return (
        f"could not load {name!r} from {hub_constants.ENDPOINT} ({type(error).__name__}: "
        f"{str(error).splitlines()[0] if str(error) else 'no answer'}). Any of these works: use a mirror (export "
        f"HF_ENDPOINT=https://hf-mirror.com before starting); clone the model (git clone {hub_constants.ENDPOINT}/"
        f"{name}) and pass its path ({option} /path/to/{short}); or, offline, start from random weights "
        "(--from_scratch esm2_t6_8M)"
    )


def from_hub(load, name: str, option: str = "--model_name_or_path"):
    """`load(name)` for a hub id; an unreachable hub or a missing repository becomes an EnvironmentProblem saying
    what to do (`option`: how the user passes a local path instead)."""
    try:
        return load(name)
    except OSError as error:  # transformers' "not a valid model identifier", connection errors, offline mode
        raise EnvironmentProblem(hub_unreachable_message(name, error, option)) from None


def resolve_model_dir(name) -> Path:
    """A local model directory, or a hub repository id downloaded to the local cache (a Space's case)."""
    source = local_or_hub(name)
    if isinstance(source, Path):
        return source
    from huggingface_hub import snapshot_download

    return Path(from_hub(snapshot_download, source, option="MODEL_DIR:"))


STOCK_ESM_ADVICE = ("a stock {family} checkpoint ({architecture}), not an esmloc model: train from it with "
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


# The stock backbones a model directory may hold, by config.json's model_type, named as people know them.
STOCK_FAMILY_NAMES = {model_type: FAMILY_NAMES[family] for model_type, family in BACKBONE_FAMILIES.items()}


def model_kind(path) -> str:
    """`"esmloc"` for an esmloc model directory, `"esm"` / `"esmc"` for a stock ESM-2 / ESM C checkpoint (its config
    and weights checked); InputError for anything else."""
    config = read_config(path)
    model_type = config.get("model_type")
    if model_type != "esmloc" and model_type not in STOCK_FAMILY_NAMES:
        raise InputError(f"{path}: not an ESM-2, ESM C or esmloc model (config.json says model_type {model_type!r})")
    check_weights(path)
    return model_type


def check_model_dir(path, need_tokenizer: bool = True) -> None:
    """InputError unless `path` holds a complete esmloc model: config, whole weights and (by default) tokenizer."""
    kind = model_kind(path)
    if kind in STOCK_FAMILY_NAMES:
        architecture = ", ".join(read_config(path).get("architectures") or ["a backbone"])
        raise InputError(f"{path}: " + STOCK_ESM_ADVICE.format(family=STOCK_FAMILY_NAMES[kind],
                                                               architecture=architecture, path=str(path)))
    missing = [name for name in TOKENIZER_FILES if not (Path(path) / name).is_file()]
    if need_tokenizer and missing:
        raise InputError(f"{path}: the tokenizer is missing ({', '.join(missing)}); save the model with "
                         "esmloc.saving.save_model(model, directory), which writes it")


def load_model_or_backbone(name, device="cpu") -> tuple[EsmForLocalization, EsmLocTokenizer, str]:
    """(model, tokenizer, kind): an esmloc model directory as saved (`"esmloc"`), or a stock ESM-2 or ESM C checkpoint,
    a directory or a hub id (`"esm"`), wrapped by `EsmForLocalization.from_esm` (its head unused) with the tokenizer that
    crops as its config says."""
    source = local_or_hub(name)
    if isinstance(source, Path) and model_kind(source) == "esmloc":
        model, tokenizer = load_model_dir(source, device)
        return model, tokenizer, "esmloc"
    model = from_hub(EsmForLocalization.from_esm, str(source), option="MODEL:")
    return model.to(device).eval(), tokenizer_for(model.config), "esm"


def with_long_proteins(model, long_proteins: str | None = None, window_overlap: int | None = None
                       ) -> EsmLocTokenizer | None:
    """A command line's `--long_proteins` / `--window_overlap` applied to a loaded model: its config takes them (the
    config is what outputs and job fingerprints record) and the tokenizer that follows them is returned; None when
    neither is given (the model's own rule stands). InputError for an overlap the windows cannot have, or an overlap
    without windows."""
    if long_proteins is None and window_overlap is None:
        return None
    config = model.config
    rule = long_proteins or config.long_proteins
    if window_overlap is not None and rule != "windows":
        raise InputError("--window_overlap applies to windows only: add --long_proteins windows")
    try:
        window_overlap_for(config.max_residues, window_overlap if window_overlap is not None else config.window_overlap)
    except ValueError as error:
        raise InputError(f"--{error}") from None
    config.long_proteins = rule
    if window_overlap is not None:
        config.window_overlap = window_overlap
    return tokenizer_for(config)


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
