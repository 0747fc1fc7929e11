"""One line about the round in flight, for the person watching the coordinator: its phase,
the reports so far and the bytes moving.

    round 3/5: training, 1/3 reported, 229.0 MiB down, 80.0 MiB up, 120.4 MiB/s

On a terminal the line is redrawn in place twice a second, below the log (rich); where
stderr is not a terminal it is logged when it has changed, at most every
LOG_INTERVAL_S. With --progress-file it is also kept in that file, for `fedstream demo`.
It only reads what the coordinator keeps anyway (the phase, its counters, the intake's
byte count), from the event loop, so it costs the transfers nothing.
"""

from __future__ import annotations

import asyncio
import logging
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from rich.text import Text

from fedstream.common.progress import human_bytes
from fedstream.common.progress_file import write_snapshot
from fedstream.server.coordinator import Coordinator
from fedstream.server.phases import Aggregating, Done, OpenEvaluation, OpenRound, Waiting

log = logging.getLogger(__name__)

TICK_S = 0.5
LOG_INTERVAL_S = 10.0


@dataclass
class RoundView:
    """What the line says, read from the coordinator at one moment."""

    phase: str
    round: int
    rounds: int
    attempt: int = 1
    reported: int = 0
    selected: int = 0
    bytes_down: int = 0
    bytes_up: int = 0
    rate: float = 0.0
    """Bytes per second, both ways, over the last few ticks."""

    def text(self) -> str:
        if self.phase == "waiting":
            return f"waiting for clients: {self.reported} of {self.selected} joined"
        if self.phase == "done":
            return f"done: {self.round} of {self.rounds} rounds"
        attempt = f" (attempt {self.attempt})" if self.attempt > 1 else ""
        line = (
            f"round {self.round}/{self.rounds}{attempt}: {self.phase}, "
            f"{self.reported}/{self.selected} reported"
        )
        if self.phase != "evaluating":
            line += f", {human_bytes(self.bytes_down)} down, {human_bytes(self.bytes_up)} up"
            if self.rate > 0:
                line += f", {human_bytes(self.rate)}/s"
        return line

    def snapshot(self) -> dict[str, Any]:
        return {**vars(self), "line": self.text(), "time": time.time()}


class RoundLine:
    """Reads the coordinator every TICK_S and shows the line (see the module docstring)."""

    def __init__(
        self, coordinator: Coordinator, tty: bool | None = None, file: Path | None = None
    ) -> None:
        self.coordinator = coordinator
        self.tty = sys.stderr.isatty() if tty is None else tty
        self.file = file
        self._round_key: tuple[int, int] | None = None
        self._up_base = 0
        self._moved = 0
        self._moved_at = time.monotonic()
        self._rate = 0.0
        self._last_logged = ""
        self._last_log_time = -LOG_INTERVAL_S

    def read(self) -> RoundView:
        """The line's content now; also advances the byte rate."""
        coordinator = self.coordinator
        rounds = coordinator.rounds.rounds
        phase = coordinator.phase
        if isinstance(phase, Waiting):  # reported: clients joined; selected: clients needed
            joined = len(coordinator.admission.live())
            return RoundView("waiting", coordinator.completed, rounds, 1, joined, phase.needed)
        if isinstance(phase, Done):
            return RoundView("done", phase.completed, rounds)
        if isinstance(phase, OpenEvaluation):
            return RoundView(
                "evaluating", phase.number, rounds, 1, len(phase.reported), len(phase.selected)
            )
        open_round: OpenRound = phase.round if isinstance(phase, Aggregating) else phase
        received = coordinator.intake.received_bytes
        key = (open_round.number, open_round.attempt)
        if key != self._round_key:
            self._round_key, self._up_base, self._moved, self._rate = key, received, 0, 0.0
        bytes_up = max(open_round.bytes_up, received - self._up_base)
        moved = open_round.bytes_down + bytes_up
        now = time.monotonic()
        step_rate = (moved - self._moved) / max(now - self._moved_at, 1e-3)
        # Smoothed over the last few ticks while bytes move; none shown once they stop.
        self._rate = 0.5 * self._rate + 0.5 * step_rate if step_rate > 0 else 0.0
        self._moved, self._moved_at = moved, now
        return RoundView(
            "aggregating" if isinstance(phase, Aggregating) else "training",
            open_round.number,
            rounds,
            open_round.attempt,
            len(open_round.reported),
            len(open_round.selected),
            open_round.bytes_down,
            bytes_up,
            self._rate,
        )

    async def run(self) -> None:
        """Until cancelled."""
        live = self._live() if self.tty else None
        try:
            while True:
                view = self.read()
                text = view.text()
                if live is not None:  # as a Text, shown as it is (rich would colour numbers)
                    live.update(Text(text), refresh=True)
                elif text != self._last_logged and (
                    time.monotonic() - self._last_log_time >= LOG_INTERVAL_S
                ):
                    log.info("%s", text)
                    self._last_logged, self._last_log_time = text, time.monotonic()
                if self.file is not None:
                    await asyncio.to_thread(write_snapshot, self.file, view.snapshot())
                await asyncio.sleep(TICK_S)
        finally:
            final = self.read()  # the run's end, which the last tick may have missed
            if live is not None:
                live.update(Text(final.text()), refresh=True)
                live.stop()
            if self.file is not None:
                write_snapshot(self.file, final.snapshot())

    def _live(self) -> Any:
        from rich.console import Console
        from rich.live import Live

        live = Live("", console=Console(file=sys.stderr), auto_refresh=False)
        live.start()
        return live
