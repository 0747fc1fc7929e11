"""Uploads spooled to disk as they arrive, then read back one tensor at a time.

An upload is written to a file of its own chunk by chunk, so a client that dies
mid-upload leaves nothing in the model, and the coordinator's memory does not grow with
the number of clients uploading at once. Only a complete, verified spool is folded into
the round, read back through a small reused buffer with plain reads: memory-mapping the
file would count a whole update's pages in the coordinator's resident set.

Spool files are anonymous and reused from one upload to the next (`SpoolFiles`): writing
into pages a file already has is a copy, while a fresh file makes the kernel allocate and
account every page first, which made spooling the upload path's largest cost. A raw
update is checked for NaN and infinity as it arrives (`FiniteScan`), so the spool is read
back once, to fold it, not twice.

An update in a compressed uplink codec is spooled as it arrived (encoded, and zstd
compressed if the run says so) and decoded only while it is read back: one model tensor
at a time (its parts, then the decoded tensor), so the coordinator's memory for it is
bounded by the model's largest tensor.
"""

from __future__ import annotations

import errno
import hashlib
import math
import os
import tempfile
import warnings
from collections.abc import Iterator
from pathlib import Path
from typing import BinaryIO

import torch

from fedstream.common.codecs import UplinkCodec
from fedstream.common.codecs.base import Raw
from fedstream.common.codecs.zstd import ZstdError
from fedstream.common.errors import LimitExceeded, NonFiniteValues, WireError
from fedstream.common.wire.manifest import Manifest, TensorEntry
from fedstream.common.wire.stream import tensor_bytes
from fedstream.server.finite import is_finite
from fedstream.server.updates import DeltaBlock

# Received chunks are immutable `bytes`; the scan only reads the tensors it views them as.
warnings.filterwarnings(
    "ignore", "The given buffer is not writable", UserWarning, r"fedstream\.server\.spool"
)

BLOCK_BYTES = 1 << 20
"""Bytes of an update read back at a time when verifying and folding it: larger blocks
measured no faster, and the block buffer is resident while a spool is read."""


RAW = UplinkCodec(Raw())


def _read_exactly(f: BinaryIO, into: memoryview, name: str) -> None:
    done = 0
    while done < len(into):
        n = f.readinto(into[done:])  # type: ignore[attr-defined]
        if not n:
            raise WireError(f"spool {name} is shorter than its manifest")
        done += n


def sum_of_squares(values: torch.Tensor) -> float:
    """sum(x^2) of a floating block, as a float64: float32's own sum of squares overflows
    for elements past about 1e19, exactly the updates whose norm matters most."""
    wide = torch.float32 if values.element_size() < 4 else None
    norm = float(torch.linalg.vector_norm(values, dtype=wide))
    if math.isinf(norm):
        norm = float(torch.linalg.vector_norm(values, dtype=torch.float64))
    return norm * norm


def _non_finite(name: str) -> NonFiniteValues:
    return NonFiniteValues(f"update tensor {name!r} holds NaN or infinite values")


class FiniteScan:
    """Checks a raw byte stream's floating-point tensors for NaN and infinity as it
    arrives, chunk by chunk in stream order. A chunk may end inside an element; its
    bytes wait for the next chunk. Bytes past the manifest's end are not scanned (the
    spool refuses them). The same pass sums the squares of the values, for the update's
    L2 norm (`server/safeguards.py`)."""

    def __init__(self, manifest: Manifest) -> None:
        self._entries = iter(manifest.entries)
        self._entry: TensorEntry | None = None
        self._left = 0
        self._carry = b""
        self.sum_squares = 0.0

    def feed(self, chunk: memoryview) -> None:
        """NonFiniteValues naming the tensor when `chunk` holds a NaN or an infinity."""
        while len(chunk):
            while self._left == 0 or self._entry is None:
                self._entry = next(self._entries, None)
                if self._entry is None:
                    return
                self._left = self._entry.nbytes
            part, chunk = chunk[: self._left], chunk[self._left :]
            self._left -= len(part)
            if self._entry.dtype.is_floating_point:
                self._scan(self._entry, part)

    def _scan(self, entry: TensorEntry, part: memoryview) -> None:
        size = entry.dtype.itemsize
        if self._carry:
            need = size - len(self._carry)
            self._carry += bytes(part[:need])
            part = part[need:]
            if len(self._carry) < size:
                return
            self._check(entry, torch.frombuffer(bytearray(self._carry), dtype=entry.dtype))
            self._carry = b""
        whole = len(part) - len(part) % size
        if whole:
            self._check(entry, torch.frombuffer(part[:whole], dtype=entry.dtype))
        self._carry = bytes(part[whole:])

    def _check(self, entry: TensorEntry, values: torch.Tensor) -> None:
        if not is_finite(values):
            raise _non_finite(entry.name)
        self.sum_squares += sum_of_squares(values)


_NO_RANGE_COPY = (errno.EXDEV, errno.ENOSYS, errno.EINVAL, errno.EOPNOTSUPP)
"""copy_file_range's refusals where sendfile still copies in the kernel."""


def _range(source: int, target: int, count: int, offset: int) -> int:
    return os.copy_file_range(source, target, count, offset)


def _send(source: int, target: int, count: int, offset: int) -> int:
    return os.sendfile(target, source, offset, count)


class UpdateCutShort(WireError):
    """An upload whose stream ended before its declared bytes: a connection reset can end
    the stream before it cancels the call, so it is kept for a resume as a cut one is."""


class SpoolFull(LimitExceeded):
    """The spool directory's filesystem is out of space or quota: the upload is refused
    (RESOURCE_EXHAUSTED); the operator has to make room."""


_FULL = (errno.ENOSPC, errno.EDQUOT)


def _full(exc: OSError, directory: Path) -> SpoolFull:
    return SpoolFull(f"spool directory {directory} is full ({os.strerror(exc.errno or 0)})")


class SpoolFiles:
    """Anonymous files in one directory, each handed to one upload after another.

    A file keeps its pages between uploads, so the next update of the same size is
    written into memory the kernel already holds for it. At most `max_idle` files are
    kept between uploads (as many as may spool at once); one given back beyond that is
    closed, and its space returned. Files vanish with the process.
    """

    def __init__(self, directory: Path, max_idle: int = 16) -> None:
        self.directory = directory
        self.max_idle = max_idle
        self._free: list[BinaryIO] = []

    def take(self) -> BinaryIO:
        if self._free:
            return self._free.pop()
        try:
            self.directory.mkdir(parents=True, exist_ok=True)
            return tempfile.TemporaryFile(prefix="upload-", dir=self.directory, buffering=0)
        except OSError as exc:
            if exc.errno in _FULL:
                raise _full(exc, self.directory) from None
            raise

    def give_back(self, f: BinaryIO) -> None:
        if len(self._free) >= self.max_idle:
            f.close()
            return
        f.seek(0)
        self._free.append(f)

    def idle(self) -> int:
        """Files kept for the next uploads."""
        return len(self._free)

    def close(self) -> None:
        """Close the idle files (those of uploads still running close as they come back)."""
        while self._free:
            self._free.pop().close()
        self.max_idle = 0


class UploadSpool:
    """One client's update for one round, on disk, in the codec it arrived in.

    `manifest` is the received (already validated) manifest; with a codec other than
    raw, `model` is the layout of the model tensors its parts encode. `name` labels the
    spool in error messages.
    """

    def __init__(
        self,
        files: SpoolFiles,
        name: str,
        manifest: Manifest,
        uplink: UplinkCodec = RAW,
        model: Manifest | None = None,
    ) -> None:
        self.name = name
        self.manifest = manifest
        self.uplink = uplink
        self.model = model if model is not None else manifest
        self.max_bytes = uplink.max_wire_bytes(manifest)
        self.bytes_written = 0
        self._files = files
        self._file: BinaryIO | None = files.take()
        self._writing = True
        raw = isinstance(uplink.codec, Raw) and not uplink.zstd
        self._scan = FiniteScan(manifest) if raw else None
        self._sum_squares = 0.0
        self._sha256 = hashlib.sha256()
        """Of the bytes written, in order: the whole update's digest once finished (a
        resumed upload's kept and resumed parts alike, `server/partial_uploads.py`)."""

    def write(self, chunk: memoryview) -> None:
        """Append `chunk`; WireError past the manifest's size, NonFiniteValues when a raw
        update's chunk holds a NaN or an infinity, SpoolFull when the disk is."""
        if self._file is None or not self._writing:
            raise WireError("spool is closed")
        if self.bytes_written + len(chunk) > self.max_bytes:
            raise WireError(
                f"update overflows its manifest: {self.bytes_written + len(chunk)} bytes "
                f"sent, at most {self.max_bytes} allowed"
            )
        if self._scan is not None:
            self._scan.feed(chunk)
        self._sha256.update(chunk)
        rest = chunk
        try:
            while rest:  # an unbuffered file may take part of a write
                rest = rest[self._file.write(rest) :]
        except OSError as exc:
            if exc.errno in _FULL:
                raise _full(exc, self._files.directory) from None
            raise
        self.bytes_written += len(chunk)

    def finish(self) -> None:
        """Stop writing; WireError unless every declared byte arrived (UpdateCutShort, the
        spool still open for the rest, when fewer did)."""
        if not self.uplink.zstd and self.bytes_written < self.manifest.total_bytes:
            raise UpdateCutShort(
                f"update ended after {self.bytes_written} of "
                f"{self.manifest.total_bytes} declared bytes"
            )
        if self._file is not None and self._writing:
            self._writing = False
            if os.fstat(self._file.fileno()).st_size > self.bytes_written:
                self._file.truncate(self.bytes_written)  # a reused file's older, longer update
        if not self.uplink.zstd and self.bytes_written != self.manifest.total_bytes:
            raise WireError(
                f"update ended after {self.bytes_written} of "
                f"{self.manifest.total_bytes} declared bytes"
            )

    @property
    def sha256(self) -> str:
        """Hex SHA-256 of the bytes written so far."""
        return self._sha256.hexdigest()

    def copy_to(self, target: int) -> None:
        """Copy the finished spool's bytes into the file descriptor `target` (from its
        current position), in the kernel: the round's log keeps them (`round_log.py`)."""
        if self._file is None or self._writing:
            raise WireError(f"spool {self.name} is not complete")
        source = self._file.fileno()
        done = 0
        copy = _range
        while done < self.bytes_written:
            try:
                n = copy(source, target, self.bytes_written - done, done)
            except OSError as exc:
                if exc.errno not in _NO_RANGE_COPY or copy is _send:
                    raise
                copy = _send  # another filesystem (--spool-dir), or an older kernel
                continue
            if not n:
                raise WireError(f"spool {self.name} is shorter than its {self.bytes_written} bytes")
            done += n

    def blocks(self, block_bytes: int = BLOCK_BYTES) -> Iterator[DeltaBlock]:
        """The decoded update tensors in model order, a block of elements at a time.

        Blocks are read into one reused buffer, so folding a multi-gigabyte raw update
        costs `block_bytes` of memory; each block is valid only until the next is read.
        WireError when the bytes do not decode to exactly what the manifest describes.
        """
        if self._file is None or self._writing:
            raise WireError(f"spool {self.name} is not complete")
        fd = os.dup(self._file.fileno())
        os.lseek(fd, 0, os.SEEK_SET)
        with open(fd, "rb", buffering=0) as f, self.uplink.reader(f) as reader:
            try:
                if isinstance(self.uplink.codec, Raw):
                    yield from self._raw_blocks(reader, block_bytes)
                else:
                    yield from self._decoded_blocks(reader, block_bytes)
                if reader.read(1):
                    raise WireError(f"spool {self.name} is longer than its manifest")
            except ZstdError as exc:
                raise WireError(f"update is not a valid zstd stream: {exc}") from None

    def _raw_blocks(self, f: BinaryIO, block_bytes: int) -> Iterator[DeltaBlock]:
        buffer = torch.empty(block_bytes, dtype=torch.uint8)
        view = tensor_bytes(buffer)
        for entry in self.manifest.entries:
            itemsize = entry.dtype.itemsize
            per_block = max(1, block_bytes // itemsize)
            for start in range(0, entry.numel, per_block):
                count = min(per_block, entry.numel - start)
                nbytes = count * itemsize
                if nbytes > len(view):
                    buffer = torch.empty(nbytes, dtype=torch.uint8)
                    view = tensor_bytes(buffer)
                _read_exactly(f, view[:nbytes], self.name)
                yield DeltaBlock(entry.name, start, buffer[:nbytes].view(entry.dtype))

    def _decoded_blocks(self, f: BinaryIO, block_bytes: int) -> Iterator[DeltaBlock]:
        entries = iter(self.manifest.entries)
        for target in self.model.entries:
            parts = []
            for _ in self.uplink.codec.layout(target):
                entry = next(entries)
                part = torch.empty(entry.shape, dtype=entry.dtype)
                _read_exactly(f, tensor_bytes(part), self.name)
                parts.append(part)
            decoded = self.uplink.codec.decode(parts, target.dtype, target.shape).reshape(-1)
            per_block = max(1, block_bytes // target.dtype.itemsize)
            for start in range(0, target.numel, per_block):
                yield DeltaBlock(target.name, start, decoded[start : start + per_block])

    def verify_finite(self) -> None:
        """NonFiniteValues naming the first tensor holding a NaN or an infinity. A raw
        update was scanned as it arrived; a coded one is decoded and read back."""
        if self._scan is not None:
            return
        total = 0.0
        for block in self.blocks():
            if block.values.is_floating_point():
                if not is_finite(block.values):
                    raise _non_finite(block.name)
                total += sum_of_squares(block.values)
        self._sum_squares = total

    @property
    def norm(self) -> float:
        """The update's L2 norm over its floating tensors (decoded), once verified."""
        return math.sqrt(self._scan.sum_squares if self._scan is not None else self._sum_squares)

    def discard(self) -> None:
        """Hand the file back for the next upload; the spool is unusable afterwards."""
        if self._file is not None:
            self._files.give_back(self._file)
            self._file = None
