"""Files that appear whole or not at all: written to a temporary file beside the target, renamed into place."""

import os
import uuid
from contextlib import contextmanager
from pathlib import Path


# Names of files still being written start with this; readers skip them.
TEMPORARY_PREFIX = ".tmp-"


@contextmanager
def atomic_file(path, mode: str = "wb", **open_kwargs):
    """`open(path, mode)` whose content appears at `path` only when the block ends without an error; an
    interrupted write leaves `path` as it was (and at worst a `.tmp-*` file beside it)."""
    path = Path(path)
    temporary = path.with_name(f"{TEMPORARY_PREFIX}{uuid.uuid4().hex}-{path.name}")
    try:
        with open(temporary, mode, **open_kwargs) as handle:
            yield handle
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(temporary, path)
    finally:
        if temporary.exists():
            temporary.unlink()
