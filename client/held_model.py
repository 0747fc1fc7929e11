"""The downloaded global model, held in a temporary file instead of in memory.

A client needs the global weights twice: to load them into its model before training,
and to subtract them from the trained weights for the delta it uploads. Holding them in
memory beside the model doubles the client's footprint (8 GB instead of 4 at a billion
float32 parameters), so the download streams to an anonymous file as it arrives (the
page cache keeps it fast while memory is plentiful, and the kernel may drop it when it
is not), the model is loaded from the file, and the delta is computed a block at a time
against it while the upload streams.
"""

from __future__ import annotations

import os
import tempfile
from collections.abc import Iterator, Mapping

import torch

from fedstream.common.errors import WireError
from fedstream.common.tensor_codec import Manifest, tensor_bytes

BLOCK_BYTES = 4 << 20
"""Bytes of the global model read back at a time."""


class HeldModel:
    """One version of the global model: its manifest and its raw byte stream on disk."""

    def __init__(self, manifest: Manifest, version: int) -> None:
        self.manifest = manifest
        self.version = version
        self.bytes_written = 0
        self._file = tempfile.TemporaryFile(prefix="fedstream-model-")  # noqa: SIM115

    @property
    def complete(self) -> bool:
        return self.bytes_written == self.manifest.total_bytes

    def write(self, chunk: bytes | memoryview) -> None:
        """Append the next bytes of the stream; WireError, writing nothing, past its end."""
        size = len(chunk)
        if self.bytes_written + size > self.manifest.total_bytes:
            raise WireError(
                f"chunk of {size} bytes at offset {self.bytes_written} overflows the stream "
                f"of {self.manifest.total_bytes} bytes"
            )
        view = memoryview(chunk).cast("B")
        done = 0
        while done < size:
            done += os.pwrite(self._file.fileno(), view[done:], self.bytes_written + done)
        self.bytes_written += size

    def _blocks(self) -> Iterator[tuple[str, int, torch.Tensor]]:
        """(tensor name, first element, global values) in stream order, a block at a time.

        The values live in one reused buffer: each block is valid until the next is read.
        """
        if not self.complete:
            raise WireError(f"model v{self.version} is incomplete")
        buffer = torch.empty(BLOCK_BYTES, dtype=torch.uint8)
        fd = self._file.fileno()
        offset = 0
        for entry in self.manifest.entries:
            itemsize = entry.dtype.itemsize
            per_block = max(1, BLOCK_BYTES // itemsize)
            for start in range(0, entry.numel, per_block):
                count = min(per_block, entry.numel - start)
                nbytes = count * itemsize
                if nbytes > buffer.numel():
                    buffer = torch.empty(nbytes, dtype=torch.uint8)
                view = tensor_bytes(buffer)[:nbytes]
                done = 0
                while done < nbytes:
                    n = os.preadv(fd, [view[done:]], offset + done)
                    if not n:
                        raise WireError("held model file is shorter than its manifest")
                    done += n
                offset += nbytes
                yield entry.name, start, buffer[:nbytes].view(entry.dtype)

    def load_into(self, state: Mapping[str, torch.Tensor]) -> None:
        """Copy the global weights into the same-named tensors of `state` (any device)."""
        with torch.no_grad():
            for name, start, values in self._blocks():
                state[name].view(-1)[start : start + values.numel()].copy_(values)

    def deltas(self, state: Mapping[str, torch.Tensor]) -> Iterator[torch.Tensor]:
        """`state` minus the global weights, in manifest order, a block at a time.

        Every block is a new tensor: a chunker may hold on to the tail of one block while
        it takes the next, so the blocks must not share the read buffer.
        """
        with torch.no_grad():
            for name, start, values in self._blocks():
                local = state[name].detach().view(-1)[start : start + values.numel()]
                yield local.to("cpu") - values

    def close(self) -> None:
        self._file.close()
