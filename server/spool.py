"""Uploads spooled to disk as they arrive, then read back one tensor at a time.

An upload is written to its own file chunk by chunk, so a client that dies mid-upload
leaves nothing in the model, and the coordinator's memory does not grow with the number
of clients uploading at once. Only a complete, verified spool is folded into the round,
read back through a small reused buffer with plain reads: memory-mapping the file would
count a whole update's pages in the coordinator's resident set.
"""

from __future__ import annotations

import io
import math
import warnings
from collections.abc import Iterator
from pathlib import Path
from typing import BinaryIO

import torch

from fedstream.common.errors import NonFiniteValues, WireError
from fedstream.common.tensor_codec import Manifest, TensorEntry, tensor_bytes
from fedstream.server.strategies.base import DeltaBlock

BLOCK_BYTES = 4 << 20
"""Bytes of an update read back at a time when folding it."""


def _read_exactly(f: io.RawIOBase, into: memoryview, path: Path) -> None:
    done = 0
    while done < len(into):
        n = f.readinto(into[done:])
        if not n:
            raise WireError(f"spool {path.name} is shorter than its manifest")
        done += n


class FiniteScan:
    """Looks for NaN and infinity in a raw update stream while its chunks arrive.

    A chunk is in memory (and in cache) when it arrives; scanning it then costs a fraction
    of reading the whole spool back from disk afterwards. Chunks may cut tensors, and even
    elements, anywhere: the scan follows the manifest with a cursor and carries the bytes
    of a cut element over to the next chunk.
    """

    def __init__(self, manifest: Manifest) -> None:
        self._entries = manifest.entries
        self._index = 0
        self._within = 0
        self._carry = b""
        self.bad: str | None = None
        """The first tensor found holding a non-finite value."""

    def feed(self, chunk: memoryview) -> None:
        data = chunk.cast("B") if chunk.format != "B" else chunk
        pos = 0
        while pos < len(data) and self._index < len(self._entries):
            entry = self._entries[self._index]
            take = min(entry.nbytes - self._within, len(data) - pos)
            if entry.dtype.is_floating_point and self.bad is None:
                self._scan(entry, data[pos : pos + take])
            pos += take
            self._within += take
            if self._within == entry.nbytes:
                self._index += 1
                self._within = 0
                self._carry = b""

    def _scan(self, entry: TensorEntry, piece: memoryview) -> None:
        itemsize = entry.dtype.itemsize
        if self._carry:
            need = itemsize - len(self._carry)
            self._carry += bytes(piece[:need])
            piece = piece[need:]
            if len(self._carry) < itemsize:
                return
            whole, self._carry = self._carry, b""
            self._check(entry, memoryview(whole))
        usable = len(piece) - len(piece) % itemsize
        self._carry = bytes(piece[usable:])
        if usable:
            self._check(entry, piece[:usable])

    def _check(self, entry: TensorEntry, piece: memoryview) -> None:
        with warnings.catch_warnings():  # received bytes are read-only; only read here
            warnings.simplefilter("ignore", UserWarning)
            values = torch.frombuffer(piece, dtype=torch.uint8).view(entry.dtype)
        # One pass, no temporaries: NaN propagates through min and max, and an infinity
        # is the min or the max. Twenty times faster than `isfinite(values).all()`.
        low, high = torch.aminmax(values)
        if not (math.isfinite(low.item()) and math.isfinite(high.item())):
            self.bad = entry.name


class UploadSpool:
    """One client's update for one round, on disk."""

    def __init__(self, path: Path, manifest: Manifest) -> None:
        self.path = path
        self.manifest = manifest
        self.bytes_written = 0
        path.parent.mkdir(parents=True, exist_ok=True)
        self._file: BinaryIO | None = open(path, "wb")  # noqa: SIM115 (closed in finish/discard)
        self._scan = FiniteScan(manifest)

    def write(self, chunk: memoryview) -> None:
        if self._file is None:
            raise WireError("spool is closed")
        if self.bytes_written + len(chunk) > self.manifest.total_bytes:
            raise WireError(
                f"update overflows its manifest: {self.bytes_written + len(chunk)} bytes "
                f"sent, {self.manifest.total_bytes} declared"
            )
        self._file.write(chunk)
        self._scan.feed(chunk)
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

    def blocks(self, block_bytes: int = BLOCK_BYTES) -> Iterator[DeltaBlock]:
        """The spooled tensors in manifest order, a block of elements at a time.

        Blocks are read into one reused buffer, so folding a multi-gigabyte update costs
        `block_bytes` of memory; each block is valid only until the next is read.
        """
        buffer = torch.empty(block_bytes, dtype=torch.uint8)
        view = tensor_bytes(buffer)
        with open(self.path, "rb", buffering=0) as f:
            for entry in self.manifest.entries:
                itemsize = entry.dtype.itemsize
                per_block = max(1, block_bytes // itemsize)
                for start in range(0, entry.numel, per_block):
                    count = min(per_block, entry.numel - start)
                    nbytes = count * itemsize
                    if nbytes > len(view):
                        buffer = torch.empty(nbytes, dtype=torch.uint8)
                        view = tensor_bytes(buffer)
                    _read_exactly(f, view[:nbytes], self.path)
                    yield DeltaBlock(entry.name, start, buffer[:nbytes].view(entry.dtype))

    def verify_finite(self) -> None:
        """NonFiniteValues naming the first tensor holding a NaN or an infinity.

        The values were scanned as they arrived (`FiniteScan`), so nothing is read back.
        """
        if self._scan.bad is not None:
            raise NonFiniteValues(f"update tensor {self._scan.bad!r} holds NaN or infinite values")

    def discard(self) -> None:
        if self._file is not None:
            self._file.close()
            self._file = None
        self.path.unlink(missing_ok=True)
