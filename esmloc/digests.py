"""Content digests, made one way everywhere: a data file's (run identities, large-job fingerprints) and a model's
tensors' (the feature cache's backbone fingerprint, large-job fingerprints)."""

import hashlib
from collections.abc import Iterable

import torch


def file_digest(path) -> str:
    """sha256 (hex) of a file's bytes, read in blocks."""
    with open(path, "rb") as handle:
        return hashlib.file_digest(handle, "sha256").hexdigest()


def update_with_tensors(digest, named_tensors: Iterable[tuple[str, torch.Tensor]]) -> None:
    """Feeds `digest` the name, dtype, shape and bytes of every tensor, in the order given."""
    for name, tensor in named_tensors:
        data = tensor.detach().contiguous().cpu().reshape(-1)
        digest.update(f"{name}|{data.dtype}|{tuple(tensor.shape)}|".encode())
        digest.update(data.view(torch.uint8).numpy().data)


def tensors_digest(*modules, skip: tuple[str, ...] = ()) -> str:
    """sha256 (hex) over every tensor of the modules' state dicts (sorted by name), but those whose names start with
    a prefix in `skip`."""
    digest = hashlib.sha256()
    for module in modules:
        update_with_tensors(digest, ((name, tensor) for name, tensor in sorted(module.state_dict().items())
                                     if not name.startswith(skip)))
    return digest.hexdigest()
