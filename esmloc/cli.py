"""How esmloc's command-line tools speak: one message per error, the right exit status, logs a person can read.

- `InputError`: the user's input (a data file, a model directory, an argument, an output directory holding another
  run) cannot be used. The tool prints one message naming what is wrong and where, and exits with status 2.
- `EnvironmentProblem`: something outside the input failed (the hub cannot be reached, a push failed); one message,
  exit status 1.
- Anything else is a bug and keeps its traceback.

`run(prog, function, argv)` applies that rule to a tool's `main`; `setup_logging` configures logging once for
esmloc, transformers and datasets, and turns progress bars off when stderr is not a terminal (a log file would
otherwise fill with one line per update).
"""

import logging
import os
import sys

import torch

import transformers

from esmloc.sequences import DataValidationError


class InputError(Exception):
    """Input that cannot be used; the message says what and where (file, line, ACC), and how to fix it."""

    exit_code = 2


class EnvironmentProblem(Exception):
    """A failure outside the user's input (network, hub); the message says what to do."""

    exit_code = 1


def cpu_ddp_backend() -> str | None:
    """"gloo" when two or more processes (torchrun / accelerate launch) run on a machine without GPUs, else None
    (torch's own choice: nccl for GPUs, nothing for one process)."""
    several = int(os.environ.get("WORLD_SIZE", "1")) > 1
    return "gloo" if several and not torch.cuda.is_available() else None


def progress_bars_wanted() -> bool:
    """Progress bars only on a terminal: piped into a log, every update would become a line of its own."""
    return sys.stderr.isatty()


def setup_logging(level: int = logging.INFO) -> None:
    """Logging for esmloc (to stderr, with time and source) and the libraries it drives, set once per process.

    transformers and datasets log warnings and above; their progress bars follow `progress_bars_wanted`."""
    logging.basicConfig(format="%(asctime)s %(levelname)s %(name)s: %(message)s", level=logging.WARNING,
                        stream=sys.stderr, force=True)
    logging.getLogger("esmloc").setLevel(level)
    transformers.utils.logging.set_verbosity(max(level, logging.WARNING))
    datasets = sys.modules.get("datasets")  # configured only where it is used: esmloc-predict never imports it
    if datasets is not None:
        datasets.utils.logging.set_verbosity(max(level, logging.WARNING))
    if progress_bars_wanted():
        transformers.utils.logging.enable_progress_bar()
        if datasets is not None:
            datasets.enable_progress_bars()
    else:
        transformers.utils.logging.disable_progress_bar()
        if datasets is not None:
            datasets.disable_progress_bars()


def run(prog: str, function, argv=None) -> int:
    """Calls `function(argv)`; input and environment errors become one line on stderr and an exit status."""
    try:
        return function(argv) or 0
    except DataValidationError as error:
        print(f"{prog}: error: malformed input, nothing written: {error}", file=sys.stderr)
        return InputError.exit_code
    except (InputError, EnvironmentProblem) as error:
        print(f"{prog}: error: {error}", file=sys.stderr)
        return error.exit_code


def end_processes(trainer=None) -> None:
    """Ends a multi-process run (torchrun / accelerate launch) on every process, in an order that lets each of them
    exit; in a single process it only lets go of the trainer's wrapped model. Train, pretrain and the large jobs
    end with it.

    1. The trainer's DDP-wrapped model is let go and collected while the process group still exists. Freed after the
       group was destroyed (when `train()` returned), its reducer held the group's last reference and destroyed gloo's
       process group itself, holding the GIL: that destructor joins gloo's worker threads, and a worker still
       releasing a finished collective's tensors waits for the GIL, so the process hung (gdb shows both; torch issue
       56297). Under load, about 1 two-process run in 130 hung there after saving everything; bench/ddp_teardown.py
       counts them.
    2. Every process waits for the others: none destroys its side of the group while another still talks to it.
    3. The process group is destroyed (before the interpreter's exit, where gloo may otherwise abort a process).
    """
    if trainer is not None:
        trainer.model_wrapped = trainer.model
        trainer.accelerator.free_memory()  # its own references to the wrapped model, then gc.collect()
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        torch.distributed.barrier()
        torch.distributed.destroy_process_group()
