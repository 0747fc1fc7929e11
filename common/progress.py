"""Progress a person sees: what a process is doing that takes a while (a download, training,
an upload), shown as it happens.

An `Activity` counts its own progress; a `ProgressView` opens one at a time (`track`) and
hands every change to its outputs: bars on a terminal (`progress_bars.Bars`), plain log
lines where the output is not a terminal (`LogLines`), and, when asked, a small JSON file
that another process renders (`progress_file.ActivityFile`, read by `fedstream demo`).
Outputs are told of every change; each decides how often it shows one.
"""

from __future__ import annotations

import contextlib
import logging
import sys
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal, Protocol

Unit = Literal["bytes", "steps"]


def human_bytes(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB"):
        if abs(n) < 1024 or unit == "GiB":
            return f"{n:.1f} {unit}" if unit != "B" else f"{int(n)} B"
        n /= 1024
    raise AssertionError("unreachable")


@dataclass
class Activity:
    """One thing a process does that takes a while; `total` 0 when not known ahead."""

    kind: str
    """download, train, upload, evaluate, ..."""
    label: str
    """What a person reads: `download of model v3`."""
    total: int
    unit: Unit = "bytes"
    done: int = 0
    started: float = field(default_factory=time.monotonic)
    last_progress: float = 0.0
    finished: bool = False

    def __post_init__(self) -> None:
        self.last_progress = self.started

    @property
    def elapsed(self) -> float:
        return max(time.monotonic() - self.started, 1e-9)

    @property
    def rate(self) -> float:
        """Units per second since the activity started."""
        return self.done / self.elapsed

    def summary(self) -> str:
        """`12.0 MiB of 229.0 MiB (5%) at 80.1 MiB/s`, or `step 3 of 40`."""
        share = f" ({100 * self.done / self.total:.0f}%)" if self.total else ""
        if self.unit == "steps":
            of = f" of {self.total}" if self.total else ""
            return f"step {self.done}{of}{share} in {self.elapsed:.1f}s"
        return (
            f"{human_bytes(self.done)} of {human_bytes(self.total)}{share} "
            f"at {human_bytes(self.rate)}/s"
        )


class ProgressOutput(Protocol):
    """Somewhere progress is shown: told when an activity begins, moves and ends."""

    def begin(self, activity: Activity) -> None: ...

    def update(self, activity: Activity) -> None: ...

    def end(self, activity: Activity) -> None: ...


class LogLines:
    """Progress as log lines: one every `interval` seconds while an activity runs, and one
    when it ends (training's end is left to the caller, which logs the result)."""

    def __init__(self, logger: logging.Logger, interval: float = 5.0) -> None:
        self.logger = logger
        self.interval = interval
        self._last_line = 0.0

    def begin(self, activity: Activity) -> None:
        self._last_line = activity.started

    def update(self, activity: Activity) -> None:
        now = time.monotonic()
        if now - self._last_line >= self.interval:
            self._last_line = now
            self.logger.info("%s: %s", activity.label, activity.summary())

    def end(self, activity: Activity) -> None:
        if activity.unit == "bytes":
            self.logger.info("%s: %s", activity.label, activity.summary())


class Tracker:
    """The handle of one running activity: counts progress and tells the outputs."""

    def __init__(self, activity: Activity, outputs: Sequence[ProgressOutput]) -> None:
        self.activity = activity
        self.outputs = outputs

    def advance(self, amount: int) -> None:
        activity = self.activity
        activity.done += amount
        activity.last_progress = time.monotonic()
        for output in self.outputs:
            output.update(activity)

    def update(self, done: int, total: int) -> None:
        """Set how far the activity is (a training loop reports step `done` of `total`)."""
        self.activity.total = total
        self.advance(done - self.activity.done)

    def finish(self) -> None:
        """The activity is over (done or not); the outputs show it so, once."""
        if self.activity.finished:
            return
        self.activity.finished = True
        for output in self.outputs:
            output.end(self.activity)


class ProgressView:
    """Where a process shows its progress: the outputs every tracked activity goes to."""

    def __init__(self, outputs: Sequence[ProgressOutput]) -> None:
        self.outputs = list(outputs)

    def start(self, kind: str, label: str, total: int, unit: Unit = "bytes") -> Tracker:
        """A new activity, shown until its tracker's `finish`."""
        activity = Activity(kind, label, total, unit)
        for output in self.outputs:
            output.begin(activity)
        return Tracker(activity, self.outputs)

    @contextlib.contextmanager
    def track(self, kind: str, label: str, total: int, unit: Unit = "bytes") -> Iterator[Tracker]:
        """`start`, and `finish` however the block ends."""
        tracker = self.start(kind, label, total, unit)
        try:
            yield tracker
        finally:
            tracker.finish()


def progress_view(
    logger: logging.Logger, file: Path | None = None, bars: bool | None = None
) -> ProgressView:
    """Bars when stderr is a terminal (or `bars` says so), plain log lines otherwise, and
    the JSON `file` too when given."""
    outputs: list[ProgressOutput] = []
    if bars if bars is not None else sys.stderr.isatty():
        from fedstream.common.progress_bars import Bars

        outputs.append(Bars())
    else:
        outputs.append(LogLines(logger))
    if file is not None:
        from fedstream.common.progress_file import ActivityFile

        outputs.append(ActivityFile(file))
    return ProgressView(outputs)
