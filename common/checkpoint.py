"""Checkpoint I/O: tensors as safetensors files and small JSON sidecars, written atomically.

Every write goes to a temporary file in the target's directory and is then renamed over
the target, so a process killed at any point leaves either the old file or the new one,
never a torn mix: `kill -9` of the coordinator loses at most the round in flight. By
default the file is fsynced before the rename and the directory after it, so the same
holds through a power cut. `save_checkpoint(..., sync=False)` leaves both fsyncs to a
later `sync_to_disk`: the file is complete and in place for every process at once, and
its caller decides when to wait for the disk (the run store does it off the round's
critical path, keeping the previous checkpoint until then).
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


def _fsync(path: Path, flags: int = os.O_RDWR) -> None:
    """fsync the file (or, with O_RDONLY, the directory) at `path`."""
    fd = os.open(path, flags)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _sync_directory(path: Path) -> None:
    """The rename into `path.parent` is only durable once the directory entry is on disk."""
    if os.name == "posix":
        _fsync(path.parent, os.O_RDONLY)


def sync_to_disk(path: Path) -> None:
    """Wait until the file at `path`, and its name in its directory, are on disk."""
    _fsync(path)
    _sync_directory(path)


def _write_atomic(path: Path, write: Callable[[Path], object], sync: bool = True) -> None:
    """Have `write` create a temporary file, then make it `path` atomically, and durably
    unless `sync` is False (then see `sync_to_disk`)."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.{secrets.token_hex(8)}.tmp")
    try:
        write(tmp)
        # Some writers (safetensors) create their file 0600; give it the mode any other
        # file would get, so the run directory stays readable to the operator's tools.
        os.chmod(tmp, 0o666 & ~_umask())
        if sync:
            _fsync(tmp)
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    if sync:
        _sync_directory(path)


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
    path: Path,
    tensors: Mapping[str, torch.Tensor],
    metadata: Mapping[str, str],
    *,
    sync: bool = True,
) -> None:
    """Write `tensors` and string `metadata` to a safetensors file at `path`, atomically;
    on disk before returning unless `sync` is False (module docstring).

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
    _write_atomic(
        path, lambda tmp: safetensors.torch.save_file(contents, tmp, metadata=header), sync
    )


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
    InvalidCheckpoint when the file is not a whole safetensors file (such as one cut
    short by a power cut before it reached the disk).
    """
    try:
        with safetensors.safe_open(path, framework="pt") as f:
            order, metadata = _split_metadata(path, f.metadata())
            keys = list(f.keys())
            if order is None:
                order = keys
            elif sorted(order) != sorted(keys):
                raise InvalidCheckpoint(f"{path}: {_ORDER_KEY} does not list the file's tensors")
            tensors = {name: f.get_tensor(name) for name in order}
    except safetensors.SafetensorError as exc:
        raise InvalidCheckpoint(f"{path} is not a readable safetensors file: {exc}") from None
    return tensors, metadata


def read_checkpoint_metadata(path: Path) -> dict[str, str]:
    """A checkpoint's metadata, reading only the file's header."""
    with safetensors.safe_open(path, framework="pt") as f:
        return _split_metadata(path, f.metadata())[1]


def write_json_atomic(path: Path, obj: object) -> None:
    """Write `obj` as JSON to `path`, atomically, as checkpoints are written."""
    text = json.dumps(obj, indent=2) + "\n"
    _write_atomic(path, lambda tmp: tmp.write_text(text, encoding="utf-8"))
