"""What `fedstream demo` shows while its cluster runs: the coordinator's line about the
round in flight and each client's download, training or upload.

The demo's server and clients log to files, and each keeps what it is doing in a progress
file (`--progress-file`, `common/progress_file.py`) that this view reads. On a terminal it
draws them live with rich (a bar per client, below the lines the demo prints); otherwise
it prints what changed as plain lines, at most every PLAIN_INTERVAL_S.
"""

from __future__ import annotations

import sys
import time
from pathlib import Path
from typing import Any, TextIO

from fedstream.common.progress_file import read_snapshot

PLAIN_INTERVAL_S = 10.0


class DemoView:
    """Progress of the processes whose files are `files` (name -> path), on `out`."""

    def __init__(self, files: dict[str, Path], out: TextIO | None = None) -> None:
        self.files = files
        self.out = out or sys.stdout
        self.tty = self.out.isatty()
        self.started = time.monotonic()
        self._shown: dict[str, str] = {}
        self._last_plain = time.monotonic()
        self._live: Any = None
        if self.tty:
            self._start_live()

    def print(self, text: str) -> None:
        """A line of the demo's own (a round completed), above the live view if any."""
        if self._live is not None:
            self._live.console.print(text, markup=False, highlight=False)
        else:
            print(text, file=self.out, flush=True)

    def refresh(self) -> None:
        snapshots = {name: read_snapshot(path) for name, path in self.files.items()}
        if self._live is not None:
            self._draw(snapshots)
        elif time.monotonic() - self._last_plain >= PLAIN_INTERVAL_S:
            self._last_plain = time.monotonic()
            self._print_changes(snapshots)

    def close(self) -> None:
        """Draw the last state and leave it on the screen."""
        if self._live is not None:
            self.refresh()
            self._live.stop()
            self._live = None

    # ---- plain lines ---------------------------------------------------------------------

    def _print_changes(self, snapshots: dict[str, dict[str, Any] | None]) -> None:
        for name, snapshot in snapshots.items():
            if snapshot is None:
                continue
            text = _plain(snapshot)
            if text and text != self._shown.get(name):
                self._shown[name] = text
                elapsed = time.monotonic() - self.started
                print(f"[{elapsed:6.1f}s] {name}: {text}", file=self.out, flush=True)

    # ---- live view -----------------------------------------------------------------------

    def _start_live(self) -> None:
        from rich.console import Console
        from rich.live import Live
        from rich.progress import Progress

        from fedstream.common.progress_bars import bar_columns

        console = Console(file=self.out)
        self._bars = Progress(*bar_columns(elapsed=False), console=console)
        self._tasks = {
            name: self._bars.add_task(name, total=None, amount="", visible=False)
            for name in self.files
        }
        self._live = Live(console=console, auto_refresh=False, redirect_stderr=False)
        self._live.start()

    def _draw(self, snapshots: dict[str, dict[str, Any] | None]) -> None:
        from rich.console import Group
        from rich.text import Text

        lines: list[Any] = []
        for name, snapshot in snapshots.items():
            if snapshot is None:
                continue
            if "line" in snapshot:  # the coordinator's
                lines.append(Text(f"{name}: {snapshot['line']}", style="bold"))
                continue
            total = snapshot.get("total") or None
            done = snapshot.get("done", 0)
            if snapshot.get("finished") and total is None:
                total = done = 1
            self._bars.update(
                self._tasks[name],
                description=f"{name}: {snapshot.get('label', '')}",
                completed=done,
                total=total,
                amount=snapshot.get("summary", ""),
                visible=True,
            )
        self._live.update(Group(*lines, self._bars), refresh=True)


def _plain(snapshot: dict[str, Any]) -> str:
    """The line of a coordinator's snapshot, or a client's activity while it runs."""
    if "line" in snapshot:
        return str(snapshot["line"])
    if snapshot.get("finished"):
        return ""
    return f"{snapshot.get('label', '')}: {snapshot.get('summary', '')}"
