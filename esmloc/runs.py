"""A training run's identity, so that an output directory is only ever resumed by the run that started it.

train.py and esmloc-pretrain (each with its own idea of what defines a run: `identity`) write `esmloc_run.json`
into `--output_dir` before training and into every checkpoint they save. It holds the run's fingerprint: a sha256
over what defines the trained model (train.py's: `run_identity`):

- the data: the content (sha256) of every data file, the dataset name/config, the split settings and sample limits;
- the model: where the backbone comes from (hub id, or the resolved local directory), the fine-tuning mode and
  every setting of the head, the crop, the class weights and LoRA;
- the seed.

Not part of it: settings that change how long or how fast a run trains, not what it trains on (epochs, steps,
batch sizes, learning rate, logging, devices), so that a run can be resumed on another machine or extended.

`plan_resume` decides, before anything is loaded: a new directory starts afresh; a directory of the same run resumes
from its last checkpoint (or, when that run has finished with the same training length, is left alone); a
directory of another run, or one with no record, is refused with `InputError`, unless `--overwrite_output_dir`
asks to delete its checkpoints first.
"""

import dataclasses
import hashlib
import json
import logging
import shutil
from dataclasses import dataclass, field
from pathlib import Path

from transformers import TrainerCallback
from transformers.trainer_utils import PREFIX_CHECKPOINT_DIR

from esmloc.digests import file_digest
from esmloc.errors import InputError
from esmloc.files import atomic_file

logger = logging.getLogger(__name__)

RUN_RECORD = "esmloc_run.json"
FINISHED = "finished"
# Arguments that do not change what a run trains (where it is published, how features are cached, batch sizes of
# inference): left out of the fingerprint.
_NOT_IDENTITY = {"hub_endpoint", "push_adapter", "feature_cache", "feature_cache_dir", "max_tokens_per_batch",
                 "attn_implementation", "num_examples_to_show"}
_DATA_FILE_FIELDS = ("train_file", "validation_file", "test_file")
# Files a finished run leaves in its output directory: a directory holding any of them holds a run.
_RUN_OUTPUTS = ("model.safetensors", "test_results.json", "trainer_state.json")


@dataclass
class RunArguments:
    """What the training commands add to their TrainingArguments (mixed in before it): the --overwrite_output_dir flag
    (transformers 5 dropped the field; esmloc keeps the name for what it always meant) and the checks of a run's
    length and batch sizes, which TrainingArguments leaves to fail later (a run of zero steps "finishes" having trained
    nothing)."""

    overwrite_output_dir: bool = field(
        default=False,
        metadata={"help": "Start afresh in an --output_dir that holds another esmloc run: its checkpoints are deleted. "
                  "Without it, such a directory is refused, and one holding this same run is resumed. A directory "
                  "holding files esmloc did not write is always refused."},
    )

    def __post_init__(self):
        for name in ("per_device_train_batch_size", "per_device_eval_batch_size", "gradient_accumulation_steps"):
            value = getattr(self, name)
            if value < 1:
                raise ValueError(f"--{name} must be a positive integer, got {value}")
        if self.max_steps == 0 or (self.max_steps < 0 and self.num_train_epochs <= 0):
            raise ValueError(f"nothing to train: --num_train_epochs {self.num_train_epochs:g} and --max_steps "
                             f"{self.max_steps}; give a positive number of epochs (or --max_steps)")
        super().__post_init__()


def identity(components: dict) -> dict:
    """A run's identity: `components` (JSON-able: what defines the run, as each tool decides) with their sha256 under
    "fingerprint"."""
    fingerprint = hashlib.sha256(json.dumps(components, sort_keys=True, default=str).encode()).hexdigest()
    return {"fingerprint": fingerprint, **components}


def run_identity(model_args, data_args, seed: int) -> dict:
    """What defines a train.py run (see the module docstring), with its fingerprint under "fingerprint"."""
    data = {key: value for key, value in dataclasses.asdict(data_args).items() if key not in _NOT_IDENTITY}
    for key in _DATA_FILE_FIELDS:
        if data.get(key):
            data[key] = {"name": Path(data[key]).name, "sha256": file_digest(data[key])}
    model = {key: value for key, value in dataclasses.asdict(model_args).items() if key not in _NOT_IDENTITY}
    source = model.get("model_name_or_path")
    if source and Path(source).expanduser().is_dir():
        model["model_name_or_path"] = str(Path(source).expanduser().resolve())
    return identity({"data": data, "model": model, "seed": seed})


def training_length(training_args) -> dict:
    return {"num_train_epochs": training_args.num_train_epochs, "max_steps": training_args.max_steps}


def read_record(directory) -> dict | None:
    path = Path(directory) / RUN_RECORD
    return json.loads(path.read_text()) if path.is_file() else None


def write_record(directory, identity: dict, **state) -> None:
    path = Path(directory) / RUN_RECORD
    path.parent.mkdir(parents=True, exist_ok=True)
    with atomic_file(path, "w") as handle:  # other processes of the run read it
        handle.write(json.dumps({**identity, **state}, indent=2, default=str))


def _settings(identity: dict, prefix: str = ""):
    """(dotted key, value) of every setting of an identity; a data file is one setting, shown by name and digest."""
    for key, value in identity.items():
        if key in ("fingerprint", FINISHED, "training_length"):
            continue
        if isinstance(value, dict) and {"name", "sha256"} <= value.keys():
            yield f"{prefix}{key}", f"{value['name']} (content sha256 {value['sha256'][:12]})"
        elif isinstance(value, dict):
            yield from _settings(value, f"{prefix}{key}.")
        else:
            yield f"{prefix}{key}", value


def differences(old: dict, new: dict) -> list[str]:
    """The settings in which two identities differ, as `section.key: old -> new`."""
    old, new = dict(_settings(old)), dict(_settings(new))
    return [f"{key}: {old.get(key)!r} -> {new.get(key)!r}" for key in sorted(old.keys() | new.keys())
            if old.get(key) != new.get(key)]


def _refusal(where, reason: str, output_dir) -> InputError:
    return InputError(
        f"{where} {reason}. Nothing was changed there. To train this run, choose another --output_dir, or pass "
        f"--overwrite_output_dir to delete the checkpoints in {output_dir} and start afresh."
    )


def plan_resume(output_dir, identity: dict, length: dict, resume_from_checkpoint=None, overwrite: bool = False):
    """The checkpoint to resume from (a path), None to start afresh, or `FINISHED` when this very run has already
    finished in `output_dir`. Raises InputError when `output_dir` (or the checkpoint asked for) belongs to another
    run. With `overwrite`, the checkpoints and run record in `output_dir` are deleted first (nothing else)."""
    output_dir = Path(output_dir)
    if resume_from_checkpoint:
        checkpoint = Path(resume_from_checkpoint)
        record = read_record(checkpoint) or read_record(checkpoint.parent)
        if record is None:
            raise _refusal(f"--resume_from_checkpoint {checkpoint}", "has no esmloc run record, so it cannot be "
                           "checked to belong to this run", output_dir)
        if record["fingerprint"] != identity["fingerprint"]:
            changed = "; ".join(differences(record, identity))
            raise _refusal(f"--resume_from_checkpoint {checkpoint}", f"belongs to another run ({changed})", output_dir)
        return str(checkpoint)
    if not output_dir.is_dir():
        return None
    checkpoints = [path for path in output_dir.glob(f"{PREFIX_CHECKPOINT_DIR}-*") if path.is_dir()]
    record = read_record(output_dir)
    run_files = checkpoints or any((output_dir / name).exists() for name in _RUN_OUTPUTS)
    if record is None and not run_files:
        others = sorted(path.name for path in output_dir.iterdir())
        if others:  # the user's own files: never written over, never deleted, not even with --overwrite_output_dir
            shown = ", ".join(others[:3]) + (f" and {len(others) - 3} more" if len(others) > 3 else "")
            raise InputError(f"--output_dir {output_dir} holds files esmloc did not write ({shown}); nothing was "
                             "changed there. Choose a new or empty directory.")
        return None
    if overwrite:  # deletes the checkpoints and the record only: what else the directory holds is overwritten or kept
        for path in checkpoints:
            shutil.rmtree(path)
        (output_dir / RUN_RECORD).unlink(missing_ok=True)
        return None
    if record is None:
        raise _refusal(f"--output_dir {output_dir}", "holds a training run without an esmloc run record "
                       f"({RUN_RECORD}; written by another tool or an older esmloc)", output_dir)
    if not record.get(FINISHED) and not checkpoints:
        # A run that stopped before its first checkpoint (a failure, an interruption): nothing to resume or protect.
        (output_dir / RUN_RECORD).unlink()
        return None
    if record["fingerprint"] != identity["fingerprint"]:
        changed = "; ".join(differences(record, identity))
        raise _refusal(f"--output_dir {output_dir}", f"holds another run, which differs in: {changed}", output_dir)
    if record.get(FINISHED) and record.get("training_length") == length:
        damage = saved_model_problem(output_dir)
        if damage:
            raise InputError(f"--output_dir {output_dir}: the run record says this run finished, but {damage}; "
                             "pass --overwrite_output_dir to train it again")
        return FINISHED
    return last_complete_checkpoint(checkpoints)


def _step(checkpoint: Path) -> int:
    suffix = checkpoint.name[len(PREFIX_CHECKPOINT_DIR) + 1:]
    return int(suffix) if suffix.isdigit() else -1


def last_complete_checkpoint(checkpoints: list[Path]) -> str | None:
    """The checkpoint of the highest step that was saved whole, or None. A run killed while saving leaves a
    checkpoint directory without its weights or state: the Trainer writes the weights, optimizer and RNG states, and
    trainer_state.json last, so a readable trainer_state.json says a checkpoint is whole. The partial ones of this
    run cannot be resumed from and would be counted by --save_total_limit's rotation, so they are deleted, and said."""
    for checkpoint in sorted(checkpoints, key=_step, reverse=True):
        try:
            json.loads((checkpoint / "trainer_state.json").read_text())
            return str(checkpoint)
        except (OSError, ValueError):
            pass
        logger.warning("%s was not saved whole (the run was stopped while saving it): deleted; resuming from the "
                       "checkpoint before it, if any", checkpoint)
        shutil.rmtree(checkpoint)
    return None


def saved_model_problem(output_dir) -> str | None:
    """Why the model a finished run saved in `output_dir` cannot be used (config or weights missing or damaged), or
    None."""
    from esmloc.loading import check_weights, read_config

    try:
        read_config(output_dir)
        check_weights(output_dir)
    except InputError as error:
        return str(error)
    return None


class RunRecordCallback(TrainerCallback):
    """Writes the run record into every checkpoint the Trainer saves, so that an explicit
    --resume_from_checkpoint is checked against the run that saved it."""

    def __init__(self, identity: dict):
        self.identity = identity

    def on_save(self, args, state, control, **kwargs):
        checkpoint = Path(args.output_dir) / f"{PREFIX_CHECKPOINT_DIR}-{state.global_step}"
        if args.should_save and checkpoint.is_dir():
            write_record(checkpoint, self.identity)
