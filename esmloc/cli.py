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
import re
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


# --- secrets ---------------------------------------------------------------------------------------------------

HIDDEN = "<token hidden>"
_CREDENTIALS = (  # what a token looks like in an echoed request: a Bearer/Basic credential, a bare header, hf_...
    (re.compile(r"(?i)\b(bearer|basic)\s+[^\s;,'\"]+"), rf"\1 {HIDDEN}"),
    (re.compile(r"(?i)\b(authorization\s*[:=]\s*)(?!bearer\b|basic\b)[^\s;,'\"]+"), rf"\1{HIDDEN}"),
    (re.compile(r"\bhf_[A-Za-z0-9]{8,}"), HIDDEN),
)


def redact_secrets(text: str, *tokens: str | None) -> str:
    """`text` with every hub token in it replaced by `<token hidden>`: the `tokens` given (an argument), the one
    huggingface_hub would send (HF_TOKEN, else the token file), and anything shaped like one (`hf_...`, a Bearer or
    Basic credential, an Authorization header's value). An endpoint may echo a request's headers in its error text:
    every push's messages go through here."""
    from huggingface_hub import get_token

    known = {token for token in (*tokens, get_token()) if token}
    for token in sorted(known, key=len, reverse=True):
        text = text.replace(token, HIDDEN)
    for pattern, replacement in _CREDENTIALS:
        text = pattern.sub(replacement, text)
    return text
