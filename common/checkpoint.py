"""Checkpoint I/O: tensors as safetensors files and small JSON sidecars, written atomically.

Every write goes to a temporary file in the target's directory, is fsynced, and is then
renamed over the target (and the directory fsynced), so a crash at any point leaves
either the old file or the new one, never a torn mix: `kill -9` of the coordinator
loses at most the round in flight.
"""

from __future__ import annotations

import json
import os
import secrets
from collections.abc import Callable, Mapping
from pathlib import Path

import safetensors
import safetensors.torch
import torch

from fedstream.common.errors import InvalidCheckpoint

_ORDER_KEY = "__order__"
"""Metadata key holding the tensor names in saved order: safetensors sorts them on disk."""


def _umask() -> int:
    current = os.umask(0)
    os.umask(current)
    return current


def _write_atomic(path: Path, write: Callable[[Path], object]) -> None:
    """Have `write` create a temporary file, then make it `path` durably and atomically."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.{secrets.token_hex(8)}.tmp")
    try:
        write(tmp)
        # Some writers (safetensors) create their file 0600; give it the mode any other
        # file would get, so the run directory stays readable to the operator's tools.
        os.chmod(tmp, 0o666 & ~_umask())
        fd = os.open(tmp, os.O_RDWR)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    if os.name == "posix":
        # The rename itself is only durable once the directory entry is on disk.
        dir_fd = os.open(path.parent, os.O_RDONLY)
        try:
            os.fsync(dir_fd)
        finally:
            os.close(dir_fd)


def _unaliased(tensors: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """`tensors` made contiguous, with a copy of any tensor sharing memory with another.

    safetensors refuses tensors that share storage, which a state dict with tied
    weights (embedding and output head) always has; each name gets its own copy.
    """
    seen: set[int] = set()
    result = {}
    for name, tensor in tensors.items():
        tensor = tensor.detach().contiguous()
        storage = tensor.untyped_storage()
        ptr = storage.data_ptr()
        if storage.nbytes() and ptr in seen:
            tensor = tensor.clone()
        seen.add(ptr)
        result[name] = tensor
    return result


def save_checkpoint(
    path: Path, tensors: Mapping[str, torch.Tensor], metadata: Mapping[str, str]
) -> None:
    """Write `tensors` and string `metadata` to a safetensors file at `path`, atomically.

    The tensors' order is kept in the metadata, so `load_checkpoint` returns them in
    the same order (a model's state-dict order).
    """
    if _ORDER_KEY in metadata:
        raise ValueError(f"metadata key {_ORDER_KEY!r} is reserved")
    for key, value in metadata.items():
        if not isinstance(key, str) or not isinstance(value, str):
            raise TypeError(f"checkpoint metadata must map str to str; got {key!r}: {value!r}")
    header = {**metadata, _ORDER_KEY: json.dumps(list(tensors))}
    contents = _unaliased(tensors)
    _write_atomic(path, lambda tmp: safetensors.torch.save_file(contents, tmp, metadata=header))


def _split_metadata(
    path: Path, raw: Mapping[str, str] | None
) -> tuple[list[str] | None, dict[str, str]]:
    """The saved tensor order (None if absent) and the caller's metadata without it."""
    metadata = dict(raw or {})
    order_json = metadata.pop(_ORDER_KEY, None)
    if order_json is None:
        return None, metadata
    try:
        order = json.loads(order_json)
    except json.JSONDecodeError as exc:
        raise InvalidCheckpoint(f"{path}: {_ORDER_KEY} is not JSON: {exc}") from None
    if not isinstance(order, list) or not all(isinstance(name, str) for name in order):
        raise InvalidCheckpoint(f"{path}: {_ORDER_KEY} is not a list of names")
    return order, metadata


def load_checkpoint(path: Path) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """The tensors (in saved order) and metadata of a checkpoint written by save_checkpoint.

    A plain safetensors file without a saved order loads in the file's key order.
    """
    with safetensors.safe_open(path, framework="pt") as f:
        order, metadata = _split_metadata(path, f.metadata())
        keys = list(f.keys())
        if order is None:
            order = keys
        elif sorted(order) != sorted(keys):
            raise InvalidCheckpoint(f"{path}: {_ORDER_KEY} does not list the file's tensors")
        tensors = {name: f.get_tensor(name) for name in order}
    return tensors, metadata


def read_checkpoint_metadata(path: Path) -> dict[str, str]:
    """A checkpoint's metadata, reading only the file's header."""
    with safetensors.safe_open(path, framework="pt") as f:
        return _split_metadata(path, f.metadata())[1]


def write_json_atomic(path: Path, obj: object) -> None:
    """Write `obj` as JSON to `path`, atomically, as checkpoints are written."""
    text = json.dumps(obj, indent=2) + "\n"
    _write_atomic(path, lambda tmp: tmp.write_text(text, encoding="utf-8"))
