"""Bounds on a transfer's progress, and the release of what a refused transfer held.

A stall timeout cuts a transfer that moves nothing; it does not cut one that trickles a
byte every few seconds, which would hold a round open for as long as it likes
(docs/architecture.md, "Trust boundary"). `RateFloor` cuts a transfer whose bytes over the last
window average below a floor, whatever its size: a multi-gigabyte upload over a slow but
moving link passes, a trickle does not.
"""

from __future__ import annotations

import asyncio
import collections
import gc
import time
from collections.abc import Callable

from fedstream.server.errors import TransferStalled

BUCKETS_PER_WINDOW = 32
"""Bytes are counted in buckets of a 32nd of the window: the bucket the window's start
falls in counts whole (in the transfer's favour, by at most a 32nd of a window's bytes),
and the memory per transfer stays constant."""


class RateFloor:
    """Raises TransferStalled when a transfer's bytes over the last `window` seconds
    average below `min_rate` bytes per second. The first `window` seconds of a transfer
    are not judged (a connection ramps up); a `min_rate` of 0 turns the floor off.

    `add` is called with each chunk's size; `check` judges the transfer without new bytes
    (a caller that waits for the next chunk longer than a window should call it).
    """

    def __init__(
        self, min_rate: float, window: float, clock: Callable[[], float] = time.monotonic
    ) -> None:
        if window <= 0:
            raise ValueError(f"window must be positive, got {window}")
        self.min_rate = min_rate
        self.window = window
        self.total = 0
        """Bytes moved so far."""
        self._clock = clock
        self._start = clock()
        self._step = window / BUCKETS_PER_WINDOW
        self._buckets: collections.deque[list[float]] = collections.deque()
        """[start time, bytes] of each bucket that may overlap the last window, oldest first."""
        self._recent = 0
        """Bytes in `_buckets`."""

    def add(self, nbytes: int) -> None:
        """Count `nbytes` moved now; TransferStalled when the transfer is below the floor."""
        now = self._clock()
        if self._buckets and now - self._buckets[-1][0] < self._step:
            self._buckets[-1][1] += nbytes
        else:
            self._buckets.append([now, nbytes])
        self.total += nbytes
        self._recent += nbytes
        self._judge(now)

    def check(self) -> None:
        """TransferStalled when the transfer is below the floor now."""
        self._judge(self._clock())

    def _judge(self, now: float) -> None:
        horizon = now - self.window
        while self._buckets and self._buckets[0][0] + self._step <= horizon:
            self._recent -= int(self._buckets.popleft()[1])
        if self.min_rate <= 0 or horizon < self._start:
            return
        rate = self._recent / self.window
        if rate < self.min_rate:
            raise TransferStalled(
                f"transfer too slow: {self._recent} bytes in the last {self.window:g}s "
                f"({rate:.0f} B/s), below the floor of {self.min_rate:.0f} B/s"
            )


_collection_pending = False


def release_refused(delay: float = 0.05) -> None:
    """Have the cyclic garbage collector run shortly, once, after a refused request.

    grpc.aio's request receiver keeps the last message it received in a reference cycle
    (the suspended `_MessageReceiver` generator's scope, reached from the handler's
    frame), which only the cyclic collector frees; in a long-lived daemon those cycles
    reach the oldest generation, collected rarely. Measured: each refused 60 MiB upload
    message stayed resident until a collection (100 refusals: +3.0 GB, +4.2 GB at
    the peak). `delay` lets the
    refused call finish first, so its cycle is garbage by then; calls while one
    collection is pending share it. A full collection costs well under a millisecond
    once the daemon's long-lived objects are frozen (`gc.freeze`). Call from the event
    loop's thread.
    """
    global _collection_pending
    if _collection_pending:
        return
    _collection_pending = True
    asyncio.get_running_loop().call_later(delay, _collect)


def _collect() -> None:
    global _collection_pending
    _collection_pending = False
    gc.collect()
