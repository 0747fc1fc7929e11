"""Time as the coordinator sees it, injected so that tests can drive it.

The state machine reads the time and waits for "something changed or a deadline passed"
only through a `Clock`; `MonotonicClock` is the real one. Tests substitute a clock they
advance by hand (tests/server/fake_clock.py), and run whole rounds with no real waiting.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from typing import Protocol


class Clock(Protocol):
    def now(self) -> float:
        """Seconds on a monotonic scale."""
        ...

    async def wait(self, event: asyncio.Event, timeout: float) -> None:
        """Return once `event` is set or `timeout` seconds have passed, whichever is first."""
        ...


class MonotonicClock:
    def now(self) -> float:
        return time.monotonic()

    async def wait(self, event: asyncio.Event, timeout: float) -> None:
        # asyncio.timeout, not wait_for: Python 3.11's wait_for loses a cancellation that
        # arrives as the event is set, and a cancelled coordinator then runs on.
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(max(0.0, timeout)):
                await event.wait()


class Changes:
    """A broadcast "the state changed": every waiter wakes on the next `notify`."""

    def __init__(self, clock: Clock) -> None:
        self._clock = clock
        self._event = asyncio.Event()

    def notify(self) -> None:
        self._event.set()
        self._event = asyncio.Event()

    async def wait(self, timeout: float) -> None:
        """Until the next change, or `timeout` seconds on the clock."""
        await self._clock.wait(self._event, timeout)
