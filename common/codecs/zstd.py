"""Lossless zstd over an encoded update's byte stream: exact, whatever it wraps.

The manifest still describes the uncompressed parts; the bytes that follow it are one
zstd frame of their concatenation, cut into chunks as usual. The receiver bounds what it
spools by `compressed_bound` and decompresses while reading the spool back, never past
the manifest's byte count, so a small hostile frame cannot expand into a large buffer.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from typing import BinaryIO

import zstandard

LEVEL = 3
"""zstd's default level: fast on both ends; higher levels gain little on float noise."""

ZstdError = zstandard.ZstdError


def compressed_bound(nbytes: int) -> int:
    """The most bytes a zstd frame of `nbytes` may take (zstd's ZSTD_COMPRESSBOUND, padded)."""
    return nbytes + (nbytes >> 8) + (128 << 10) + 1024


def compress_chunks(
    chunks: Iterable[bytes | memoryview], total: int, chunk_size: int
) -> Iterator[bytes]:
    """One zstd frame of `chunks` (`total` bytes in all), re-cut into `chunk_size` chunks."""
    chunker = zstandard.ZstdCompressor(level=LEVEL).chunker(size=total, chunk_size=chunk_size)
    for chunk in chunks:
        yield from chunker.compress(chunk)
    yield from chunker.finish()


def decompressing_reader(source: BinaryIO) -> BinaryIO:
    """A reader of the decompressed bytes of the zstd frames in `source`."""
    reader: BinaryIO = zstandard.ZstdDecompressor().stream_reader(
        source, read_across_frames=True, closefd=False
    )
    return reader
