"""Uploads spooled to disk as they arrive, then read back one tensor at a time.

An upload is written to its own file chunk by chunk, so a client that dies mid-upload
leaves nothing in the model, and the coordinator's memory does not grow with the number
of clients uploading at once. Only a complete, verified spool is folded into the round.
"""

from __future__ import annotations

import contextlib
import math
import mmap
from collections.abc import Iterator
from pathlib import Path
from typing import BinaryIO

import torch

from fedstream.common.errors import NonFiniteValues, WireError
from fedstream.common.tensor_codec import Manifest, tensor_bytes


FINITE_CHECK_BLOCK = 1 << 24
"""Elements checked at a time, so the check's mask stays small for huge tensors."""


class UploadSpool:
    """One client's update for one round, on disk."""

    def __init__(self, path: Path, manifest: Manifest) -> None:
        self.path = path
        self.manifest = manifest
        self.bytes_written = 0
        path.parent.mkdir(parents=True, exist_ok=True)
        self._file: BinaryIO | None = open(path, "wb")  # noqa: SIM115 (closed in finish/discard)

    def write(self, chunk: memoryview) -> None:
        if self._file is None:
            raise WireError("spool is closed")
        if self.bytes_written + len(chunk) > self.manifest.total_bytes:
            raise WireError(
                f"update overflows its manifest: {self.bytes_written + len(chunk)} bytes "
                f"sent, {self.manifest.total_bytes} declared"
            )
        self._file.write(chunk)
        self.bytes_written += len(chunk)

    def finish(self) -> None:
        """Close for writing; WireError unless every declared byte arrived."""
        if self._file is not None:
            self._file.close()
            self._file = None
        if self.bytes_written != self.manifest.total_bytes:
            raise WireError(
                f"update ended after {self.bytes_written} of "
                f"{self.manifest.total_bytes} declared bytes"
            )

    def tensors(self) -> Iterator[tuple[str, torch.Tensor]]:
        """The spooled tensors in manifest order, as views of the memory-mapped file.

        The pages belong to the page cache, not to the coordinator's heap, so reading a
        multi-gigabyte update costs no extra resident memory of its own. A tensor whose
        offset is not aligned to its element size is read into fresh memory instead.
        """
        with open(self.path, "rb") as f:
            mapped = (
                mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_COPY) if self.bytes_written else None
            )
            try:
                offset = 0
                for entry in self.manifest.entries:
                    yield entry.name, self._tensor_at(mapped, f, offset, entry.dtype, entry.shape)
                    offset += entry.nbytes
            finally:
                if mapped is not None:
                    with contextlib.suppress(BufferError):
                        mapped.close()

    @staticmethod
    def _tensor_at(
        mapped: mmap.mmap | None,
        f: BinaryIO,
        offset: int,
        dtype: torch.dtype,
        shape: tuple[int, ...],
    ) -> torch.Tensor:
        count = math.prod(shape)
        if mapped is None or count == 0:
            return torch.empty(shape, dtype=dtype)
        if offset % dtype.itemsize == 0:
            return torch.frombuffer(mapped, dtype=dtype, count=count, offset=offset).view(shape)
        tensor = torch.empty(shape, dtype=dtype)
        f.seek(offset)
        f.readinto(tensor_bytes(tensor))
        return tensor

    def verify_finite(self) -> None:
        """NonFiniteValues naming the first tensor holding a NaN or an infinity."""
        for name, tensor in self.tensors():
            if not tensor.is_floating_point():
                continue
            flat = tensor.reshape(-1)
            for start in range(0, flat.numel(), FINITE_CHECK_BLOCK):
                if not bool(torch.isfinite(flat[start : start + FINITE_CHECK_BLOCK]).all()):
                    raise NonFiniteValues(f"update tensor {name!r} holds NaN or infinite values")

    def discard(self) -> None:
        if self._file is not None:
            self._file.close()
            self._file = None
        self.path.unlink(missing_ok=True)
