"""Uploads spooled to disk as they arrive, then read back one tensor at a time.

An upload is written to its own file chunk by chunk, so a client that dies mid-upload
leaves nothing in the model, and the coordinator's memory does not grow with the number
of clients uploading at once. Only a complete, verified spool is folded into the round,
read back through a small reused buffer with plain reads: memory-mapping the file would
count a whole update's pages in the coordinator's resident set.

An update in a compressed uplink codec is spooled as it arrived (encoded, and zstd
compressed if the run says so) and decoded only while it is read back: one model tensor
at a time (its parts, then the decoded tensor), so the coordinator's memory for it is
bounded by the model's largest tensor.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import BinaryIO

import torch

from fedstream.common.codecs import UplinkCodec
from fedstream.common.codecs.base import Raw
from fedstream.common.codecs.zstd import ZstdError
from fedstream.common.errors import NonFiniteValues, WireError
from fedstream.common.tensor_codec import Manifest, tensor_bytes
from fedstream.server.strategies.base import DeltaBlock

BLOCK_BYTES = 1 << 20
"""Bytes of an update read back at a time when verifying and folding it: larger blocks
measured no faster, and the block buffer is resident while a spool is read."""


RAW = UplinkCodec(Raw())


def _read_exactly(f: BinaryIO, into: memoryview, path: Path) -> None:
    done = 0
    while done < len(into):
        n = f.readinto(into[done:])  # type: ignore[attr-defined]
        if not n:
            raise WireError(f"spool {path.name} is shorter than its manifest")
        done += n


def _all_finite(values: torch.Tensor) -> bool:
    """NaN propagates into the minimum and maximum, and an infinity is one of them: two
    scalars to check instead of a mask as large as the block."""
    low, high = torch.aminmax(values)
    return bool(torch.isfinite(low)) and bool(torch.isfinite(high))


class UploadSpool:
    """One client's update for one round, on disk, in the codec it arrived in.

    `manifest` is the received (already validated) manifest; with a codec other than
    raw, `model` is the layout of the model tensors its parts encode.
    """

    def __init__(
        self,
        path: Path,
        manifest: Manifest,
        uplink: UplinkCodec = RAW,
        model: Manifest | None = None,
    ) -> None:
        self.path = path
        self.manifest = manifest
        self.uplink = uplink
        self.model = model if model is not None else manifest
        self.max_bytes = uplink.max_wire_bytes(manifest)
        self.bytes_written = 0
        path.parent.mkdir(parents=True, exist_ok=True)
        self._file: BinaryIO | None = open(path, "wb")  # noqa: SIM115 (closed in finish/discard)

    def write(self, chunk: memoryview) -> None:
        if self._file is None:
            raise WireError("spool is closed")
        if self.bytes_written + len(chunk) > self.max_bytes:
            raise WireError(
                f"update overflows its manifest: {self.bytes_written + len(chunk)} bytes "
                f"sent, at most {self.max_bytes} allowed"
            )
        self._file.write(chunk)
        self.bytes_written += len(chunk)

    def finish(self) -> None:
        """Close for writing; WireError unless every declared byte arrived."""
        if self._file is not None:
            self._file.close()
            self._file = None
        if not self.uplink.zstd and self.bytes_written != self.manifest.total_bytes:
            raise WireError(
                f"update ended after {self.bytes_written} of "
                f"{self.manifest.total_bytes} declared bytes"
            )

    def blocks(self, block_bytes: int = BLOCK_BYTES) -> Iterator[DeltaBlock]:
        """The decoded update tensors in model order, a block of elements at a time.

        Blocks are read into one reused buffer, so folding a multi-gigabyte raw update
        costs `block_bytes` of memory; each block is valid only until the next is read.
        WireError when the bytes do not decode to exactly what the manifest describes.
        """
        with open(self.path, "rb", buffering=0) as f, self.uplink.reader(f) as reader:
            try:
                if isinstance(self.uplink.codec, Raw):
                    yield from self._raw_blocks(reader, block_bytes)
                else:
                    yield from self._decoded_blocks(reader, block_bytes)
                if reader.read(1):
                    raise WireError(f"spool {self.path.name} is longer than its manifest")
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
                _read_exactly(f, view[:nbytes], self.path)
                yield DeltaBlock(entry.name, start, buffer[:nbytes].view(entry.dtype))

    def _decoded_blocks(self, f: BinaryIO, block_bytes: int) -> Iterator[DeltaBlock]:
        entries = iter(self.manifest.entries)
        for target in self.model.entries:
            parts = []
            for _ in self.uplink.codec.layout(target):
                entry = next(entries)
                part = torch.empty(entry.shape, dtype=entry.dtype)
                _read_exactly(f, tensor_bytes(part), self.path)
                parts.append(part)
            decoded = self.uplink.codec.decode(parts, target.dtype, target.shape).reshape(-1)
            per_block = max(1, block_bytes // target.dtype.itemsize)
            for start in range(0, target.numel, per_block):
                yield DeltaBlock(target.name, start, decoded[start : start + per_block])

    def verify_finite(self) -> None:
        """NonFiniteValues naming the first tensor holding a NaN or an infinity."""
        for block in self.blocks():
            if block.values.is_floating_point() and not _all_finite(block.values):
                raise NonFiniteValues(f"update tensor {block.name!r} holds NaN or infinite values")

    def discard(self) -> None:
        if self._file is not None:
            self._file.close()
            self._file = None
        self.path.unlink(missing_ok=True)
