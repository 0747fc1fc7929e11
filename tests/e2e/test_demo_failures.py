"""`fedstream demo` ends at once when a process of its cluster fails, and says why."""

from __future__ import annotations

import subprocess
import sys
import time
from pathlib import Path

import pytest

from fedstream.demo import ProcessFailed, _check_exits

pytestmark = pytest.mark.e2e


def test_a_server_that_cannot_start_ends_the_demo_with_its_reason(tmp_path: Path) -> None:
    started = time.monotonic()
    result = subprocess.run(
        [
            sys.executable, "-m", "fedstream", "demo",
            "--run-dir", str(tmp_path / "run"),
            "--server-opt", "min-reports=0",
        ],
        capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert result.returncode == 1, result.stdout + result.stderr
    assert "server exited with code 2" in result.stderr, result.stderr
    # The reason, from the server's own log, is on the demo's screen.
    assert "min_reports" in result.stderr, result.stderr
    assert time.monotonic() - started < 60


def test_a_crashed_process_is_named_with_its_last_log_lines(tmp_path: Path) -> None:
    log = tmp_path / "client-1.log"
    with open(log, "wb") as out:
        proc = subprocess.Popen(
            [sys.executable, "-c", "print('loading'); print('boom: bad data'); exit(3)"],
            stdout=out,
            stderr=subprocess.STDOUT,
        )
    proc.wait(timeout=30)
    with pytest.raises(ProcessFailed) as failed:
        _check_exits({"client-1": proc}, tmp_path)
    message = str(failed.value)
    assert "client-1 exited with code 3" in message
    assert "boom: bad data" in message
