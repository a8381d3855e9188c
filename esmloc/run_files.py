"""A train.py output directory, read: the names of what a finished run writes beside its model (esmloc.report),
and `RunRecord`, the run's own files as the model card (esmloc.card) and a push (esmloc.publish) read them."""

import json
import math
from pathlib import Path

from huggingface_hub.utils import HFValidationError, validate_repo_id

from configuration_esmloc import backbone_family
from esmloc import task


ADAPTER_DIR = "adapter"
ADAPTER_FILES = ("adapter_config.json", "adapter_model.safetensors")
RUN_INFO_FILE = "run_info.json"
PREDICTIONS_FILE = "test_predictions.csv"


def read_json(path: Path) -> dict:
    if not path.is_file():
        return {}
    with path.open(encoding="utf-8") as handle:
        return json.load(handle)


def is_number(value) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def fmt(value, spec: str = ".3f") -> str:
    """A number as the card shows it: integers with thousands separators, floats per `spec`."""
    if isinstance(value, bool) or not is_number(value):
        return str(value)
    if isinstance(value, int):
        return f"{value:,}"
    return format(value, spec)


def as_hub_model_id(name) -> str | None:
    """`name` if it is a hub model id `namespace/name` by huggingface_hub's own rules (`validate_repo_id`), else None
    (a local path, `random:...`, a bare name, nothing)."""
    if not isinstance(name, str) or name.count("/") != 1:
        return None
    try:
        validate_repo_id(name)
    except HFValidationError:
        return None
    return name


class RunRecord:
    """The files of one output directory that a card is made from."""

    def __init__(self, output_dir: Path):
        self.dir = output_dir
        self.config = read_json(output_dir / "config.json")
        self.info = read_json(output_dir / RUN_INFO_FILE)
        self.test = {k: v for k, v in read_json(output_dir / "test_results.json").items() if is_number(v)}
        all_results = read_json(output_dir / "all_results.json")
        self.train = read_json(output_dir / "train_results.json") or {
            key: value for key, value in all_results.items() if not key.startswith(("test_", "validation_"))
        }
        self.state = read_json(output_dir / "trainer_state.json")
        self.adapter_config = read_json(output_dir / ADAPTER_DIR / "adapter_config.json")
        self.model = self.info.get("model", {})
        self.data = self.info.get("data", {})
        self.training = self.info.get("training", {})

    @property
    def labels(self) -> list[str]:
        return task.label_names(self.config) if self.config.get("id2label") else list(task.BINARY_LABELS)

    @property
    def multi_label(self) -> bool:
        return task.is_multi_label(self.config)

    @property
    def base_model(self) -> str | None:
        return self.model.get("base_model") or self.config.get("esm_name_or_path")

    @property
    def backbone_family(self) -> str:
        """`"esm2"` or `"esmc"`, from config.json's backbone (`configuration_esmloc.backbone_family`)."""
        return backbone_family(self.config.get("esm_config") or {})

    @property
    def backbone_license(self) -> dict | None:
        """The licence the backbone checkpoint declared in its own metadata (config.json `backbone_license`), or
        None when none was recorded."""
        return self.config.get("backbone_license") or None

    @property
    def finetune(self) -> str | None:
        if self.model.get("finetune"):
            return self.model["finetune"]
        return "lora" if self.adapter_config else None

    @property
    def split_method(self) -> str | None:
        # How the splits were made, as the run recorded it (train.py writes the builder's own account).
        return self.data.get("split_method")
