"""Progress as a small JSON file, rewritten as it changes, for another process to render.

`fedstream demo` starts its server and clients with their output in log files, and shows
their progress in its own terminal: each of them keeps what it is doing in a file
(`--progress-file`), which the demo reads. A file is replaced whole (write, then rename),
so a reader never sees half of one; it is rewritten at most every `interval` seconds
while an activity runs, and always when one begins or ends.
"""

from __future__ import annotations

import json
import os
import threading
import time
from pathlib import Path
from typing import Any

from fedstream.common.progress import Activity

WRITE_INTERVAL_S = 0.25


def write_snapshot(path: Path, snapshot: dict[str, Any]) -> None:
    """Replace `path` with `snapshot` as JSON; not synced to disk (it is a live view)."""
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(json.dumps(snapshot))
    os.replace(tmp, path)


def read_snapshot(path: Path) -> dict[str, Any] | None:
    """The snapshot in `path`, or None when there is none (yet)."""
    try:
        snapshot = json.loads(path.read_text())
    except (OSError, ValueError):
        return None
    return snapshot if isinstance(snapshot, dict) else None


def activity_snapshot(activity: Activity) -> dict[str, Any]:
    return {
        "kind": activity.kind,
        "label": activity.label,
        "unit": activity.unit,
        "done": activity.done,
        "total": activity.total,
        "rate": activity.rate,
        "elapsed": activity.elapsed,
        "finished": activity.finished,
        "summary": activity.summary(),
        "time": time.time(),
    }


class ActivityFile:
    """Keeps the current (or last) activity of this process in `path`."""

    def __init__(self, path: Path, interval: float = WRITE_INTERVAL_S) -> None:
        self.path = path
        self.interval = interval
        self._last_write = 0.0
        self._lock = threading.Lock()  # the bytes of an upload move on grpc's thread
        path.parent.mkdir(parents=True, exist_ok=True)

    def begin(self, activity: Activity) -> None:
        self._write(activity)

    def update(self, activity: Activity) -> None:
        if time.monotonic() - self._last_write >= self.interval:
            self._write(activity)

    def end(self, activity: Activity) -> None:
        self._write(activity)

    def _write(self, activity: Activity) -> None:
        with self._lock:
            self._last_write = time.monotonic()
            write_snapshot(self.path, activity_snapshot(activity))
