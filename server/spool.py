"""Uploads spooled to disk as they arrive, then read back one tensor at a time.

An upload is written to its own file chunk by chunk, so a client that dies mid-upload
leaves nothing in the model, and the coordinator's memory does not grow with the number
of clients uploading at once. Only a complete, verified spool is folded into the round.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import BinaryIO

import torch

from fedstream.common.errors import NonFiniteValues, WireError
from fedstream.common.tensor_codec import Manifest, tensor_bytes


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
        """The spooled tensors in manifest order, each read into fresh memory."""
        with open(self.path, "rb", buffering=0) as f:
            for entry in self.manifest.entries:
                tensor = torch.empty(entry.shape, dtype=entry.dtype)
                view = tensor_bytes(tensor)
                done = 0
                while done < len(view):
                    n = f.readinto(view[done:])
                    if not n:
                        raise WireError(f"spool {self.path.name} is shorter than its manifest")
                    done += n
                yield entry.name, tensor

    def verify_finite(self) -> None:
        """NonFiniteValues naming the first tensor holding a NaN or an infinity."""
        for name, tensor in self.tensors():
            if tensor.is_floating_point() and not bool(torch.isfinite(tensor).all()):
                raise NonFiniteValues(f"update tensor {name!r} holds NaN or infinite values")

    def discard(self) -> None:
        if self._file is not None:
            self._file.close()
            self._file = None
        self.path.unlink(missing_ok=True)
