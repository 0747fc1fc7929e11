"""The downloaded global model, held in a temporary file instead of in memory.

A client needs the global weights twice: to load them into its model before training,
and to subtract them from the trained weights for the update it uploads. Holding them in
memory beside the model doubles the client's footprint (8 GB instead of 4 at a billion
float32 parameters), so the download streams into an anonymous file as it arrives (the
page cache keeps it fast while memory is plentiful, and the kernel may write it out when
it is not), the model is loaded from the file, and the delta is computed against it a
block at a time while the upload streams.
"""

from __future__ import annotations

import os
import tempfile
from collections.abc import Iterator, Mapping

import torch

from fedstream.common.errors import WireError
from fedstream.common.wire.manifest import Manifest, TensorEntry
from fedstream.common.wire.stream import tensor_bytes

BLOCK_ELEMENTS = 1 << 20
"""Elements of the global model read back at a time when loading it onto a device."""


class HeldModel:
    """One version of the global model: its manifest and its byte stream, on disk."""

    def __init__(self, manifest: Manifest, version: int) -> None:
        self.manifest = manifest
        self.version = version
        self.bytes_written = 0
        self._file = tempfile.TemporaryFile(prefix="fedstream-model-")  # noqa: SIM115
        self._offsets: dict[str, int] = {}
        offset = 0
        for entry in manifest.entries:
            self._offsets[entry.name] = offset
            offset += entry.nbytes

    @property
    def complete(self) -> bool:
        return self.bytes_written == self.manifest.total_bytes

    def write(self, chunk: bytes | memoryview) -> None:
        """Append the next bytes of the stream; WireError, writing nothing, past its end."""
        view = memoryview(chunk).cast("B")
        size = len(view)
        if self.bytes_written + size > self.manifest.total_bytes:
            raise WireError(
                f"chunk of {size} bytes at offset {self.bytes_written} overflows the stream "
                f"of {self.manifest.total_bytes} bytes"
            )
        done = 0
        while done < size:
            done += os.pwrite(self._file.fileno(), view[done:], self.bytes_written + done)
        self.bytes_written += size

    def _read(self, entry: TensorEntry, start: int, into: torch.Tensor) -> torch.Tensor:
        """Elements [start, start + into.numel()) of tensor `entry`, read into `into`."""
        if not self.complete:
            raise WireError(f"model v{self.version} is incomplete")
        view = tensor_bytes(into)
        offset = self._offsets[entry.name] + start * entry.dtype.itemsize
        done = 0
        while done < len(view):
            n = os.preadv(self._file.fileno(), [view[done:]], offset + done)
            if not n:
                raise WireError("held model file is shorter than its manifest")
            done += n
        return into

    def _blocks(self, block_elements: int | None) -> Iterator[tuple[TensorEntry, int, int]]:
        """(entry, first element, element count) in stream order; whole tensors for None."""
        for entry in self.manifest.entries:
            if block_elements is None:
                yield entry, 0, entry.numel
                continue
            for start in range(0, entry.numel, block_elements):
                yield entry, start, min(block_elements, entry.numel - start)

    def load_into(self, state: Mapping[str, torch.Tensor]) -> None:
        """Copy the global weights into the same-named tensors of `state` (any device):
        CPU tensors are read into directly, others through a reused staging block."""
        staging = torch.empty(0, dtype=torch.uint8)
        with torch.no_grad():
            for entry, start, count in self._blocks(BLOCK_ELEMENTS):
                target = state[entry.name].view(-1)[start : start + count]
                if target.device.type == "cpu":
                    self._read(entry, start, target)
                    continue
                nbytes = count * entry.dtype.itemsize
                if nbytes > staging.numel():
                    staging = torch.empty(nbytes, dtype=torch.uint8)
                target.copy_(self._read(entry, start, staging[:nbytes].view(entry.dtype)))

    def read(self, entry: TensorEntry) -> torch.Tensor:
        """The whole global tensor `entry`, shaped, in a new CPU tensor."""
        flat = torch.empty(entry.numel, dtype=entry.dtype)
        return self._read(entry, 0, flat).view(entry.shape)

    def deltas(
        self, state: Mapping[str, torch.Tensor], block_elements: int | None
    ) -> Iterator[torch.Tensor]:
        """`state` minus the global weights, in manifest order, `block_elements` at a time
        (whole tensors, shaped, for None).

        Every block is a new tensor: a chunker may hold on to the tail of one block while
        it takes the next, so blocks must not share a read buffer.
        """
        with torch.no_grad():
            for entry, start, count in self._blocks(block_elements):
                delta = self._read(entry, start, torch.empty(count, dtype=entry.dtype))
                local = state[entry.name].detach().reshape(-1)[start : start + count]
                torch.sub(local.to("cpu"), delta, out=delta)  # in the read buffer: no copy
                yield delta.view(entry.shape) if block_elements is None else delta

    def close(self) -> None:
        self._file.close()
