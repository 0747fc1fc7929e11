"""A clock a test moves by hand: the coordinator's deadlines pass when the test says so."""

from __future__ import annotations

import asyncio


class FakeClock:
    def __init__(self, start: float = 1000.0) -> None:
        self.time = start
        self._timers: list[tuple[float, asyncio.Future[object]]] = []

    def now(self) -> float:
        return self.time

    async def wait(self, event: asyncio.Event, timeout: float) -> None:
        if event.is_set() or timeout <= 0:
            return
        timer: asyncio.Future[object] = asyncio.get_running_loop().create_future()
        entry = (self.time + timeout, timer)
        self._timers.append(entry)
        waiter: asyncio.Future[object] = asyncio.ensure_future(event.wait())
        try:
            await asyncio.wait({waiter, timer}, return_when=asyncio.FIRST_COMPLETED)
        finally:
            waiter.cancel()
            self._timers.remove(entry)

    def advance(self, seconds: float) -> None:
        """Move time on, waking every wait whose timeout has passed."""
        self.time += seconds
        for deadline, timer in self._timers:
            if deadline <= self.time and not timer.done():
                timer.set_result(None)
