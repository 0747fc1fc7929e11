"""Progress lines for long transfers: bytes moved, rate, at most one line per interval."""

from __future__ import annotations

import logging
import time


def human_bytes(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB"):
        if abs(n) < 1024 or unit == "GiB":
            return f"{n:.1f} {unit}" if unit != "B" else f"{int(n)} B"
        n /= 1024
    raise AssertionError("unreachable")


class TransferProgress:
    """Counts bytes of one transfer and logs progress every `interval` seconds."""

    def __init__(
        self, logger: logging.Logger, what: str, total: int, interval: float = 5.0
    ) -> None:
        self.logger = logger
        self.what = what
        self.total = total
        self.interval = interval
        self.done = 0
        self.started = time.monotonic()
        self.last_progress = self.started
        self._last_log = self.started

    def advance(self, nbytes: int) -> None:
        self.done += nbytes
        now = time.monotonic()
        self.last_progress = now
        if now - self._last_log >= self.interval:
            self._last_log = now
            self.logger.info("%s: %s", self.what, self.summary())

    @property
    def rate(self) -> float:
        return self.done / max(time.monotonic() - self.started, 1e-9)

    def summary(self) -> str:
        share = f" ({100 * self.done / self.total:.0f}%)" if self.total else ""
        return (
            f"{human_bytes(self.done)} of {human_bytes(self.total)}{share} "
            f"at {human_bytes(self.rate)}/s"
        )
