"""Process memory settings for moving large buffers through Python."""

from __future__ import annotations

import ctypes
import ctypes.util
import resource

import psutil

M_TRIM_THRESHOLD = -1
M_MMAP_THRESHOLD = -3
M_ARENA_MAX = -8
"""glibc's mallopt parameter numbers."""
MMAP_THRESHOLD_BYTES = 2 << 20
TRIM_THRESHOLD_BYTES = 4 << 20
ARENA_MAX = 1


def reuse_chunk_buffers() -> None:
    """Serve chunk-sized buffers from heap memory glibc reuses, in a single arena.

    Every chunk that crosses the wire is a short-lived `bytes` object of about a
    megabyte, allocated by grpc or by our framing, often from grpc's own threads. A
    buffer served from a fresh mapping costs 256 page faults and as many zeroed pages
    per MiB: a fresh 1 MiB copy measured 0.67 ms against 0.036 ms for a reused buffer.
    glibc's default raises its mmap threshold as buffers are freed, but keeps the freed
    ones in per-thread arenas (up to eight per core), where they pile up with the number
    of concurrent transfers. Fixed thresholds just above the chunk size, a trim
    threshold that keeps a few freed chunks at the top of the heap, and one arena for
    all threads bound both the page faults and the memory kept. Larger buffers (tensors)
    still get mappings of their own, returned on free. Measured at P=100M, N=4
    (bench/NOTES.md): coordinator CPU 51 -> 38 s for four rounds, at about the same
    peak. A no-op where the C library is not glibc.
    """
    name = ctypes.util.find_library("c")
    if name is None:
        return
    try:
        mallopt = ctypes.CDLL(name).mallopt
    except (OSError, AttributeError):
        return
    mallopt(M_ARENA_MAX, ARENA_MAX)
    mallopt(M_MMAP_THRESHOLD, MMAP_THRESHOLD_BYTES)
    mallopt(M_TRIM_THRESHOLD, TRIM_THRESHOLD_BYTES)


def peak_rss_bytes() -> int:
    """This process's peak resident memory so far.

    Linux updates the high-water mark that `getrusage` reports lazily (its counters are
    cached per CPU), so alone it is often a little below the current resident memory;
    the peak is the larger of the two."""
    return max(
        resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024,
        psutil.Process().memory_info().rss,
    )
