"""Progress a person sees: bars on a terminal (a real pseudo-terminal here), log lines
elsewhere, a JSON file for another process, and the demo's view of those files."""

from __future__ import annotations

import io
import json
import logging
import os
import pty
import re
import sys
from pathlib import Path

import pytest

from fedstream import demo_view
from fedstream.common.progress import LogLines, ProgressView, progress_view
from fedstream.common.progress_bars import Bars
from fedstream.common.progress_file import ActivityFile, read_snapshot
from fedstream.demo_view import DemoView
from fedstream.server.progress_line import RoundView

BAR = "━"
"""What rich draws a bar with."""
ESCAPE = re.compile(r"\x1b\[")


def read_all(fd: int) -> str:
    os.set_blocking(fd, False)
    data = b""
    while True:
        try:
            chunk = os.read(fd, 65536)
        except (BlockingIOError, OSError):
            return data.decode("utf-8", "replace")
        if not chunk:
            return data.decode("utf-8", "replace")
        data += chunk


def test_bars_on_a_terminal_draw_each_activity_and_leave_it_shown() -> None:
    master, slave = pty.openpty()
    with os.fdopen(slave, "w", encoding="utf-8") as terminal:
        view = ProgressView([Bars(terminal)])
        with view.track("download", "download of model v3", 4 << 20) as bar:
            for _ in range(4):
                bar.advance(1 << 20)
        with view.track("train", "round 4: training", 0, "steps") as bar:
            bar.update(20, 40)
            bar.update(40, 40)
        terminal.flush()
        shown = read_all(master)
    os.close(master)
    assert BAR in shown and ESCAPE.search(shown)
    assert "download of model v3" in shown and "4.0 MiB of 4.0 MiB (100%)" in shown
    assert "round 4: training" in shown and "step 40 of 40 (100%)" in shown


def test_log_lines_off_a_terminal(
    caplog: pytest.LogCaptureFixture, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(sys, "stderr", io.StringIO())  # not a terminal
    logger = logging.getLogger("test.progress")
    view = progress_view(logger)
    assert [type(output) for output in view.outputs] == [LogLines]
    view.outputs = [LogLines(logger, interval=0.0)]
    caplog.set_level(logging.INFO, "test.progress")
    with view.track("upload", "upload for round 2", 2 << 20) as bar:
        bar.advance(1 << 20)
        bar.advance(1 << 20)
    lines = [r.getMessage() for r in caplog.records]
    assert lines[0].startswith("upload for round 2: 1.0 MiB of 2.0 MiB (50%) at ")
    assert lines[-1].startswith("upload for round 2: 2.0 MiB of 2.0 MiB (100%) at ")
    assert not any(BAR in line or ESCAPE.search(line) for line in lines)


def test_the_progress_file_holds_the_activity_as_it_ends(tmp_path: Path) -> None:
    path = tmp_path / "progress" / "client-0.json"
    view = ProgressView([ActivityFile(path, interval=0.0)])
    with view.track("download", "download of model v1", 300) as bar:
        bar.advance(100)
        running = read_snapshot(path)
        bar.advance(200)
    assert running is not None and running["done"] == 100 and not running["finished"]
    ended = json.loads(path.read_text())
    assert ended["label"] == "download of model v1"
    assert (ended["done"], ended["total"], ended["finished"]) == (300, 300, True)
    assert read_snapshot(tmp_path / "missing.json") is None


def test_the_coordinator_line_per_phase() -> None:
    assert RoundView("waiting", 0, 5, 1, 2, 3).text() == "waiting for clients: 2 of 3 joined"
    line = RoundView("training", 3, 5, 2, 1, 3, 229 << 20, 80 << 20, 120 << 20).text()
    assert line == (
        "round 3/5 (attempt 2): training, 1/3 reported, 229.0 MiB down, 80.0 MiB up, 120.0 MiB/s"
    )
    assert RoundView("evaluating", 3, 5, 1, 2, 3).text() == "round 3/5: evaluating, 2/3 reported"
    assert RoundView("done", 5, 5).text() == "done: 5 of 5 rounds"


def test_the_demo_view_off_a_terminal_prints_plain_lines(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(demo_view, "PLAIN_INTERVAL_S", 0.0)
    server, client = tmp_path / "server.json", tmp_path / "client-0.json"
    server.write_text(json.dumps(RoundView("training", 1, 2, 1, 0, 1, 3 << 20).snapshot()))
    ActivityFile(client).begin(
        ProgressView([]).start("download", "download of model v0", 8).activity
    )
    out = io.StringIO()
    view = DemoView({"coordinator": server, "client-0": client}, out)
    view.print("round 1/2: 1 updates")
    view.refresh()
    view.refresh()  # nothing changed: nothing printed again
    view.close()
    lines = out.getvalue().splitlines()
    assert lines[0] == "round 1/2: 1 updates"
    assert lines[1].endswith("coordinator: round 1/2: training, 0/1 reported, 3.0 MiB down, 0 B up")
    assert lines[2].endswith("client-0: download of model v0: 0 B of 8 B (0%) at 0 B/s")
    assert len(lines) == 3
    assert not ESCAPE.search(out.getvalue()) and BAR not in out.getvalue()
