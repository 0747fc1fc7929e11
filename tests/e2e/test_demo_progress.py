"""`fedstream demo` in a terminal (a pseudo-terminal) shows its cluster's progress as live
bars; the logs of its processes, which are not terminals, hold plain lines instead."""

from __future__ import annotations

import os
import pty
import re
import select
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

pytestmark = pytest.mark.e2e

BAR = "━"
"""What rich draws a bar with."""
ESCAPE = re.compile(r"\x1b\[[0-9;?]*[A-Za-z]")
DEADLINE_S = 240.0


def run_in_terminal(argv: list[str], cwd: Path, deadline: float) -> tuple[int, str]:
    """Run `argv` with a pseudo-terminal as its stdin, stdout and stderr; its exit code and
    everything it wrote. Its whole process group is stopped if it outlives `deadline`."""
    master, slave = pty.openpty()
    proc = subprocess.Popen(
        argv, cwd=cwd, stdin=slave, stdout=slave, stderr=slave, start_new_session=True
    )
    os.close(slave)
    output = bytearray()
    try:
        end = time.monotonic() + deadline
        while time.monotonic() < end:
            ready, _, _ = select.select([master], [], [], 1.0)
            if not ready:
                if proc.poll() is not None:
                    break
                continue
            try:
                data = os.read(master, 65536)
            except OSError:  # EIO: every writer has closed the terminal
                break
            if not data:
                break
            output += data
        code = proc.wait(timeout=max(1.0, end - time.monotonic()))
    finally:
        os.close(master)
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
    return code, output.decode("utf-8", "replace")


def test_demo_in_a_terminal_draws_bars_and_its_logs_hold_plain_lines(tmp_path: Path) -> None:
    argv = [
        sys.executable, "-m", "fedstream", "demo",
        "--clients", "1",
        "--rounds", "1",
        "--task", "synthetic",
        "--task-opt", "params=1e5",
        "--run-dir", "run",
        "--timeout", str(DEADLINE_S - 30),
    ]  # fmt: skip
    code, shown = run_in_terminal(argv, tmp_path, DEADLINE_S)
    assert code == 0, shown[-3000:]

    # The terminal: live redrawing (cursor movements), bars, and what they were about.
    assert ESCAPE.search(shown) and BAR in shown
    text = ESCAPE.sub("", shown)
    assert "coordinator: waiting for clients" in text
    assert re.search(r"status page: http://127\.0\.0\.1:\d+/", text)
    assert "coordinator: done: 1 of 1 rounds" in text  # the last state stays on the screen
    assert re.search(r"client-0: upload for round 1 \S+ [\d.]+ KiB of [\d.]+ KiB \(100%\)", text)
    assert "round 1/1: 1 updates" in text
    header = next(line for line in text.splitlines() if line.lstrip().startswith("round "))
    assert header.split()[-7:] == ["MiB", "down", "MiB", "up", "seconds", "coord", "MiB"]

    # The logs, written to files: plain lines, no bars, no terminal control.
    logs = tmp_path / "run" / "logs"
    client = (logs / "client-0.log").read_text()
    server = (logs / "server.log").read_text()
    for log in (client, server):
        assert BAR not in log and "\x1b" not in log
    assert re.search(r"download of model v0: [\d.]+ KiB of [\d.]+ KiB \(100%\) at ", client)
    assert re.search(r"upload for round 1: [\d.]+ KiB of [\d.]+ KiB \(100%\) at ", client)
    assert "fedstream.server.progress_line: waiting for clients: 0 of 1 joined" in server
