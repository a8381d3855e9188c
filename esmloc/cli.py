"""The command layer every esmloc tool stands on: one entry wrapper, one way to parse, check and fail, one logging set-up.

- `run(prog, function, argv)`: every tool's `main`. Logging is configured once; an `InputError` (bad input: a file, a
  record, an argument, an output path) becomes one line `PROG: error: ...` and exit status 2, an
  `EnvironmentProblem` (network, disk, permissions) one line and status 1; anything else is a bug and keeps its
  traceback.
- `ArgumentParser` / `DataclassParser`: argparse and `HfArgumentParser` whose errors are `InputError`s (one line,
  no usage dump). `DataclassParser.parse` also reads one `.json` / `.yaml` arguments file, with the command line's
  own checks: unknown keys, wrong types and invalid choices are refused, naming the file.
- `file_job_parser` / `add_engine_options`: the command line of the file tools (esmloc-predict, esmloc-embed).
- `check_output_file` / `check_output_dir`: an output path is refused before any work when it cannot be written as
  meant (a directory where a file goes, a file where a directory goes, an input file, an unwritable place).
- `choose_device`, `progress_bars_wanted`, `cpu_ddp_backend`: where and how a tool runs.
"""

import argparse
import errno
import json
import logging
import os
import re
import sys
import tempfile
from pathlib import Path

import torch
import transformers
from transformers import HfArgumentParser

from esmloc.errors import DataValidationError, EnvironmentProblem, InputError


logger = logging.getLogger("esmloc")

# OSError numbers that mean the machine, not the input or esmloc, is in the way.
_ENVIRONMENT_ERRNOS = {errno.ENOSPC, errno.EDQUOT, errno.EROFS, errno.EACCES, errno.EPERM, errno.ENOMEM}


# --- running a tool ------------------------------------------------------------------------------------------------


def is_main_process() -> bool:
    """Whether this is the process that speaks for a run (rank 0 under torchrun / accelerate launch, or alone)."""
    return int(os.environ.get("RANK", "0")) == 0


def run(prog: str, function, argv=None) -> int:
    """Runs one tool: `function(argv)` with logging set up; input and environment errors become one line on stderr
    and an exit status (2 and 1), Ctrl-C status 130; bugs keep their traceback."""
    setup_logging(logging.INFO if is_main_process() else logging.WARNING)
    try:
        return function(argv) or 0
    except DataValidationError as error:
        return _fail(prog, f"malformed input, nothing written: {error}", error.exit_code)
    except (InputError, EnvironmentProblem) as error:
        return _fail(prog, str(error), error.exit_code)
    except KeyboardInterrupt:
        return _fail(prog, "interrupted", 130)
    except OSError as error:
        if error.errno not in _ENVIRONMENT_ERRNOS:
            raise
        where = f"{error.filename}: " if error.filename else ""
        return _fail(prog, f"{where}{error.strerror or error}", EnvironmentProblem.exit_code)


def _fail(prog: str, message: str, status: int) -> int:
    print(f"{prog}: error: {message}", file=sys.stderr)
    return status


def progress_bars_wanted() -> bool:
    """Progress bars only on a terminal: piped into a log, every update would become a line of its own."""
    return sys.stderr.isatty()


def setup_logging(level: int = logging.INFO) -> None:
    """Logging for esmloc (to stderr, with time and source) and the libraries it drives, set once per process.

    transformers and datasets log warnings and above; their progress bars follow `progress_bars_wanted`; HTTP
    clients log no request lines."""
    logging.basicConfig(format="%(asctime)s %(levelname)s %(name)s: %(message)s", level=logging.WARNING,
                        stream=sys.stderr, force=True)
    logging.getLogger("esmloc").setLevel(level)
    for name in ("httpx", "httpx2", "httpcore", "httpcore2", "urllib3"):
        logging.getLogger(name).setLevel(logging.WARNING)
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


# --- parsing -------------------------------------------------------------------------------------------------------


class _OneLineErrors:
    """argparse reports errors by printing the usage and exiting; esmloc's tools raise `InputError` instead, which
    `run` prints as one line."""

    def error(self, message):
        raise InputError(f"{message} (see {self.prog} --help)")


class ArgumentParser(_OneLineErrors, argparse.ArgumentParser):
    pass


class DataclassParser(_OneLineErrors, HfArgumentParser):
    """`HfArgumentParser` whose every failure is an `InputError` naming the argument (or the arguments file)."""

    def parse(self, argv=None) -> tuple:
        """The command line, or one `.json` / `.yaml` file holding the same arguments, into the dataclasses.

        Checks done by a dataclass (`__post_init__` raising ValueError, as TrainingArguments does) become
        `InputError`s too."""
        argv = sys.argv[1:] if argv is None else list(argv)
        source = None
        if len(argv) == 1 and argv[0].endswith((".json", ".yaml", ".yml")):
            source = argv[0]
            argv = self._file_arguments(source)
        try:
            return self.parse_args_into_dataclasses(args=argv)
        except InputError as error:
            raise InputError(f"{source}: {error}") if source else error from None
        except (ValueError, TypeError) as error:
            raise InputError(f"{source + ': ' if source else ''}{error}") from None

    def _file_arguments(self, path: str) -> list[str]:
        """The arguments of a JSON/YAML file as a command line, so that they get the command line's type, choice and
        requirement checks (`parse_dict` would take any value as it is)."""
        text = _read_text(path, what="arguments file")
        try:
            if path.endswith(".json"):
                values = json.loads(text)
            else:
                import yaml

                values = yaml.safe_load(text)
        except ValueError as error:  # json.JSONDecodeError and yaml.YAMLError's parse errors
            raise InputError(f"{path}: not valid {'JSON' if path.endswith('.json') else 'YAML'} ({error})") from None
        except Exception as error:  # yaml.YAMLError is not a ValueError
            raise InputError(f"{path}: not valid YAML ({str(error).splitlines()[0]})") from None
        if not isinstance(values, dict):
            raise InputError(f"{path}: must hold a mapping of argument names to values, found "
                             f"{type(values).__name__}")
        known = {action.dest for action in self._actions}
        unknown = sorted(set(values) - known)
        if unknown:
            raise InputError(f"{path}: unknown argument(s) {', '.join(unknown)} (see {self.prog} --help)")
        argv = []
        for key, value in values.items():
            if value is None:
                continue
            if isinstance(value, bool):
                argv += [f"--{key}", str(value).lower()]
            elif isinstance(value, list):
                argv += [f"--{key}", *(json.dumps(v) if isinstance(v, (dict, list)) else str(v) for v in value)]
            elif isinstance(value, dict):
                argv += [f"--{key}", json.dumps(value)]
            else:
                argv += [f"--{key}", str(value)]
        return argv


def _read_text(path, what: str) -> str:
    file = Path(path)
    if not file.exists():
        raise InputError(f"{path}: no such {what}")
    if file.is_dir():
        raise InputError(f"{path}: is a directory, not an {what}")
    try:
        return file.read_text(encoding="utf-8")
    except UnicodeDecodeError:
        raise InputError(f"{path}: not UTF-8 text; an {what} is JSON or YAML") from None


def positive_int(text: str) -> int:
    """argparse `type` for counts that must be at least 1."""
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be a positive integer, got {text}")
    return value


def non_negative_int(text: str) -> int:
    """argparse `type` for counts that may be 0."""
    value = int(text)
    if value < 0:
        raise argparse.ArgumentTypeError(f"must not be negative, got {text}")
    return value


def probability(text: str) -> float:
    """argparse `type` for a decision threshold: a number in [0, 1]."""
    value = float(text)
    if not 0 <= value <= 1:
        raise argparse.ArgumentTypeError(f"must lie between 0 and 1, got {text}")
    return value


def require(condition: bool, message: str) -> None:
    """An argument check in a dataclass's `__post_init__`: `DataclassParser.parse` reports it as one line."""
    if not condition:
        raise ValueError(message)


def file_job_parser(prog: str, description: str, model: str, model_help: str, writes: str) -> ArgumentParser:
    """The command line both file tools share: MODEL INPUT -o OUTPUT (esmloc-predict, esmloc-embed)."""
    parser = ArgumentParser(prog=prog, description=description)
    parser.add_argument(model, help=model_help)
    parser.add_argument("input", help="FASTA (.fasta/.fa/.faa/.fas/.fsa[.gz]) or CSV/TSV with ACC and Sequence")
    parser.add_argument("-o", "--output", required=True, help=f"the {writes} to write")
    return parser


def add_engine_options(parser: argparse.ArgumentParser, done: str) -> None:
    """The options of how the engine and large jobs run (esmloc-predict, esmloc-embed)."""
    from configuration_esmloc import LONG_PROTEIN_RULES
    from esmloc.engine import PRECISIONS

    parser.add_argument("--max_tokens_per_batch", "--batch", type=positive_int, default=None,
                        help="token budget per batch (proteins x longest); default 2048 on CPU, 65536 on CUDA")
    parser.add_argument("--chunk_size", type=positive_int, default=4096,
                        help=f"records read, {done} at a time (default 4096)")
    parser.add_argument("--device", default=None,
                        help="cpu, cuda, cuda:1, ... (default: cuda if available; the process's own GPU under "
                             "torchrun / accelerate launch)")
    parser.add_argument("--precision", default="auto", choices=PRECISIONS,
                        help="auto: per device (esmloc.engine.AUTO_PRECISION: fp32 on CPU, bf16 or fp16 autocast on "
                             "CUDA); int8: dynamic int8 linear layers on CPU (docs: speed and precision)")
    parser.add_argument("--long_proteins", choices=LONG_PROTEIN_RULES, default=None,
                        help="a protein longer than the model's window (max_residues): crop (as the model's crop "
                             "says) or windows (embedded whole, in overlapping windows); default: the model's own "
                             "rule, saved with it (crop for a stock ESM-2 checkpoint)")
    parser.add_argument("--window_overlap", type=non_negative_int, default=None,
                        help="with windows: the least overlap of neighbouring windows, in residues (default: the "
                             "model's own; a quarter of max_residues)")
    parser.add_argument("--no_progress", action="store_true",
                        help="no progress bar (default: a bar when stderr is a terminal)")
    parser.add_argument("--part_size", type=positive_int, default=None,
                        help="records per resumable part (large jobs: several processes or --resumable); default "
                             "about 1/1024 of the input, between 16 and 4096")


def show_progress(args) -> bool:
    """Whether a file tool draws progress bars: not with --no_progress, and only on a terminal."""
    return not args.no_progress and progress_bars_wanted()


# --- where and how a tool runs -------------------------------------------------------------------------------------


def cpu_ddp_backend() -> str | None:
    """"gloo" when two or more processes (torchrun / accelerate launch) run on a machine without GPUs, else None
    (torch's own choice: nccl for GPUs, nothing for one process)."""
    several = int(os.environ.get("WORLD_SIZE", "1")) > 1
    return "gloo" if several and not torch.cuda.is_available() else None


def choose_device(requested: str | None = None, state=None) -> torch.device:
    """The device a tool computes on: `--device` when given (checked), else the process's own device under a launcher
    (`state`: accelerate's PartialState), else cuda when available, else cpu."""
    if requested:
        try:
            device = torch.device(requested)
        except RuntimeError:
            raise InputError(f"--device {requested}: not a device (cpu, cuda, cuda:1, ...)") from None
        if device.type == "cuda" and not torch.cuda.is_available():
            raise InputError(f"--device {requested}: no CUDA GPU is available here; use --device cpu")
        if device.type == "cuda" and device.index is not None and device.index >= torch.cuda.device_count():
            raise InputError(f"--device {requested}: this machine has {torch.cuda.device_count()} GPU(s)")
        return device
    if state is not None:
        return state.device
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


# --- output paths --------------------------------------------------------------------------------------------------


def same_file(a, b) -> bool:
    """Whether two paths name one file (also through links or another spelling)."""
    a, b = Path(a), Path(b)
    return a.resolve() == b.resolve() or (a.exists() and b.exists() and os.path.samefile(a, b))


def _check_writable(path: Path, option: str) -> None:
    """The nearest existing folder of `path` must be a folder this process can write into."""
    parent = path.parent if str(path.parent) else Path(".")
    while not parent.exists():
        parent = parent.parent
    if not parent.is_dir():
        raise InputError(f"{option} {path}: {parent} is a file, not a directory")
    try:  # a real file, as os.access answers for the user's permissions only (root: always yes, read-only mounts too)
        with tempfile.TemporaryFile(dir=parent, prefix=".esmloc-write-check-"):
            pass
    except OSError as error:
        raise EnvironmentProblem(f"{option} {path}: cannot write into {parent} ({error.strerror})") from None


def check_output_file(path, inputs=(), option: str = "-o") -> Path:
    """Refuses, before any work, an output file path that is a directory, one of the input files (also through links
    or another spelling: the output would replace what it comes from) or in a place that cannot be written."""
    path = Path(path)
    if path.is_dir():
        raise InputError(f"{option} {path} is a directory; give the path of a file to write")
    for source in inputs:
        if same_file(path, Path(source)):
            raise InputError(f"{option} {path} is the input file {source}: refusing to overwrite it; choose another "
                             "output path")
    _check_writable(path, option)
    return path


def check_output_dir(path, option: str) -> Path:
    """Refuses, before any work, an output directory path that is a file or in a place that cannot be written."""
    path = Path(path)
    if path.exists() and not path.is_dir():
        raise InputError(f"{option} {path} is a file; give a directory (it is created when missing)")
    _check_writable(path / "output", option)
    return path


__all__ = [
    "ArgumentParser",
    "DataclassParser",
    "EnvironmentProblem",
    "InputError",
    "add_engine_options",
    "check_output_dir",
    "check_output_file",
    "choose_device",
    "cpu_ddp_backend",
    "file_job_parser",
    "positive_int",
    "probability",
    "progress_bars_wanted",
    "require",
    "run",
    "setup_logging",
    "show_progress",
]


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
