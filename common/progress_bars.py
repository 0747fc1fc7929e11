"""Progress bars on a terminal, drawn by rich.

Each activity gets its own bar, live while it runs and left on the screen when it ends,
as the record of what it took. While a bar is live, rich stands in for sys.stderr, so log
lines (whose handler writes to whatever sys.stderr is at the time: `common/logs.py`)
appear above the bar instead of tearing through it.
"""

from __future__ import annotations

import sys
import threading
from typing import TextIO

from rich.console import Console
from rich.progress import BarColumn, Progress, TaskID, TextColumn, TimeElapsedColumn

from fedstream.common.progress import Activity

REFRESHES_PER_SECOND = 4


def bar_columns(elapsed: bool = True) -> list[TextColumn | BarColumn | TimeElapsedColumn]:
    """Label, bar, `12.0 MiB of 229.0 MiB (5%) at 80.1 MiB/s`, and the time elapsed since
    the bar's task was added (left out where that is not when the activity began)."""
    columns: list[TextColumn | BarColumn | TimeElapsedColumn] = [
        TextColumn("{task.description}", markup=False),
        BarColumn(),
        TextColumn("{task.fields[amount]}", markup=False),
    ]
    return [*columns, TimeElapsedColumn()] if elapsed else columns


class Bars:
    """One live rich progress bar per activity, on `stream` (stderr by default)."""

    def __init__(self, stream: TextIO | None = None) -> None:
        self.console = Console(file=stream or sys.stderr)
        self._lock = threading.Lock()
        self._progress: Progress | None = None
        self._task: TaskID | None = None

    def begin(self, activity: Activity) -> None:
        progress = Progress(
            *bar_columns(),
            console=self.console,
            refresh_per_second=REFRESHES_PER_SECOND,
        )
        with self._lock:
            self._task = progress.add_task(
                activity.label, total=activity.total or None, amount=activity.summary()
            )
            self._progress = progress
        progress.start()

    def update(self, activity: Activity) -> None:
        # Called for every chunk, from whichever thread moves the bytes: rich's own lock
        # keeps the bar consistent, and it redraws at REFRESHES_PER_SECOND whatever the rate.
        with self._lock:
            if self._progress is None or self._task is None:
                return
            self._progress.update(
                self._task,
                completed=activity.done,
                total=activity.total or None,
                amount=activity.summary(),
            )

    def end(self, activity: Activity) -> None:
        with self._lock:
            progress, task = self._progress, self._task
            self._progress = self._task = None
        if progress is None or task is None:
            return
        # An activity of unknown size (a task that reports no steps) ends as a full bar.
        total = activity.total or max(activity.done, 1)
        progress.update(
            task, completed=activity.done or total, total=total, amount=activity.summary()
        )
        progress.stop()
