"""Process memory settings for moving large buffers through Python."""

from __future__ import annotations

import ctypes
import ctypes.util

M_MMAP_THRESHOLD = -3
"""glibc's mallopt parameter number for the mmap threshold."""
MMAP_THRESHOLD_BYTES = 256 << 10


def return_freed_buffers_to_os() -> None:
    """Make glibc serve allocations of 256 KiB and more from mmap, and unmap them on free.

    Every chunk that crosses the wire is a short-lived multi-megabyte `bytes` object.
    By default glibc raises its mmap threshold each time such a buffer is freed, after
    which these buffers come from the heap arenas of whichever thread allocated them,
    and freed ones are kept there: the coordinator's resident memory then grows by
    hundreds of megabytes with the number of concurrent transfers. A fixed threshold
    keeps it flat. A no-op where the C library is not glibc.
    """
    name = ctypes.util.find_library("c")
    if name is None:
        return
    try:
        libc = ctypes.CDLL(name)
        mallopt = libc.mallopt
    except (OSError, AttributeError):
        return
    mallopt(M_MMAP_THRESHOLD, MMAP_THRESHOLD_BYTES)
