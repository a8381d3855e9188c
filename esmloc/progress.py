"""What a training run shows while it runs: progress a person reads at a glance, the numbers in a log file.

Trainer prints every logged dict to the console (`PrinterCallback` in a log, `ProgressCallback`'s bar on a terminal
writes them under the bar): ~700 characters per evaluation. `quiet_console(trainer, log_file)` replaces both: the bar
stays on a terminal, each evaluation becomes one line on the esmloc logger ("epoch 2/5: validation mcc_tuned 0.612,
loss 0.183; training loss 0.241"), and every dict goes, whole, to `log_file` (JSON lines), beside trainer_state.json.
"""

import json
import logging
from pathlib import Path

from transformers import PrinterCallback, ProgressCallback, TrainerCallback


logger = logging.getLogger("esmloc.progress")

LOG_FILE = "training_log.jsonl"


class QuietProgress(ProgressCallback):
    """Trainer's progress bars without the logged dicts written under them."""

    def on_log(self, args, state, control, logs=None, **kwargs):
        pass


class TrainingLog(TrainerCallback):
    """Every logged dict into a JSON-lines file (main process); one line per evaluation on the esmloc logger."""

    def __init__(self, path: Path, watched: str | None = None):
        self.path, self.watched, self.training_loss = Path(path), watched, None

    def on_log(self, args, state, control, logs=None, **kwargs):
        if not state.is_world_process_zero or not logs:
            return
        self.path.parent.mkdir(parents=True, exist_ok=True)
        with open(self.path, "a", encoding="utf-8") as handle:
            handle.write(json.dumps({"step": state.global_step, **logs}, default=str) + "\n")
        if "loss" in logs:
            self.training_loss = logs["loss"]

    def on_evaluate(self, args, state, control, metrics=None, **kwargs):
        if not state.is_world_process_zero or not metrics:
            return
        watched = self.watched or args.metric_for_best_model or "loss"
        key = watched if watched.startswith("eval_") else f"eval_{watched}"
        parts = [f"validation {watched.removeprefix('eval_')} {metrics[key]:.3f}" if isinstance(metrics.get(key), float)
                 else None, f"loss {metrics['eval_loss']:.3f}" if "eval_loss" in metrics else None]
        where = (f"epoch {state.epoch:.3g}/{args.num_train_epochs:g}" if args.max_steps <= 0
                 else f"step {state.global_step}/{state.max_steps}")
        training = f"; training loss {self.training_loss:.3f}" if isinstance(self.training_loss, float) else ""
        logger.info("%s: %s%s", where, ", ".join(part for part in parts if part), training)


def quiet_console(trainer, log_file: Path, watched: str | None = None) -> None:
    """Replaces Trainer's console printing of logged dicts with `QuietProgress` (on a terminal) and `TrainingLog`."""
    trainer.remove_callback(PrinterCallback)
    trainer.remove_callback(ProgressCallback)
    if not trainer.args.disable_tqdm:
        trainer.add_callback(QuietProgress)
    trainer.add_callback(TrainingLog(log_file, watched))
