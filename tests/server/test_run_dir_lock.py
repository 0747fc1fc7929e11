"""One coordinator per run directory: a second one, in this process or another, is
refused naming the holder's pid, and the directory is free again once the first closes."""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import pytest

from fedstream.server.run_store import RunDirLocked, RunIdentity, RunStore

IDENTITY = RunIdentity("synthetic", {"params": "1000"}, 0, "fedavg")


def test_a_second_store_in_the_same_process_is_refused_naming_the_pid(tmp_path: Path) -> None:
    """flock locks belong to the open file: a second open conflicts even in one process."""
    first = RunStore(tmp_path, IDENTITY)
    try:
        with pytest.raises(
            RunDirLocked, match=rf"in use by another coordinator \(pid {os.getpid()}\)"
        ):
            RunStore(tmp_path, IDENTITY)
        assert (tmp_path / "coordinator.lock").read_text() == f"{os.getpid()}\n"
    finally:
        first.close()
    RunStore(tmp_path, IDENTITY).close()  # free once the first is closed


def test_a_refused_store_leaves_the_holders_lock_alone(tmp_path: Path) -> None:
    first = RunStore(tmp_path, IDENTITY)
    try:
        for _ in range(3):
            with pytest.raises(RunDirLocked):
                RunStore(tmp_path, IDENTITY)
        assert (tmp_path / "coordinator.lock").read_text() == f"{os.getpid()}\n"
    finally:
        first.close()


@pytest.mark.e2e
def test_a_second_server_on_the_same_run_dir_exits_2_naming_the_first(
    procs: Any, wait_for: Any
) -> None:
    """`procs` and `wait_for` are tests/conftest.py's fixtures: real processes, reaped."""
    common = ["--task", "synthetic", "--task-opt", "params=1000", "--address", "127.0.0.1:0"]
    first = procs("first", "server", "--run-dir", "run", *common)
    info = procs.workdir / "run" / "coordinator.json"
    wait_for(info.exists, 60, "the first server to write coordinator.json", alive=[first])
    pid = json.loads(info.read_text())["pid"]

    second = procs("second", "server", "--run-dir", "run", *common)

    assert second.wait(60) == 2, second.describe()
    assert f"in use by another coordinator (pid {pid})" in second.log()
    assert first.alive
    assert json.loads(info.read_text())["pid"] == pid  # the second overwrote nothing
