"""Progress over real gRPC: the coordinator's line and a client's activities reach their
progress files (what `fedstream demo` shows) and the coordinator's log."""

from __future__ import annotations

import json
import logging
import os
import pty
import re
import sys
import threading

from fedstream.client import loop
from fedstream.common.progress import ProgressView
from fedstream.common.progress_file import read_snapshot
from fedstream.server.run_store import RunStore

from .conftest import start_client


def test_coordinator_and_client_keep_their_progress_files(
    coordinator, tmp_path, caplog, monkeypatch
):
    monkeypatch.setattr(RunStore, "plot", lambda self, force=True: None)  # a matplotlib child
    caplog.set_level(logging.INFO, "fedstream.server.progress_line")
    server_file, client_file = tmp_path / "server.json", tmp_path / "client-0.json"
    running = coordinator(rounds=1, min_clients=1, progress_file=server_file)
    client = start_client(running.address, 0, progress_file=client_file)
    assert client.join(60) == 0
    running.wait_done(30)

    server = read_snapshot(server_file)
    assert server is not None and server["line"] == "done: 1 of 1 rounds"
    record = json.loads((tmp_path / "run" / "metrics.jsonl").read_text())
    last = read_snapshot(client_file)
    assert last is not None and last["label"] == "upload for round 1" and last["finished"]
    assert last["done"] == last["total"] == record["bytes_up"]
    logged = [r.getMessage() for r in caplog.records if r.name == "fedstream.server.progress_line"]
    assert logged[0] == "waiting for clients: 0 of 1 joined"


def test_on_a_terminal_the_coordinator_redraws_its_line_in_place(
    coordinator, tmp_path, monkeypatch
):
    monkeypatch.setattr(RunStore, "plot", lambda self, force=True: None)
    # The client runs in this process too: its bars would draw on the same terminal.
    monkeypatch.setattr(loop, "progress_view", lambda logger, file=None: ProgressView([]))
    master, slave = pty.openpty()
    shown = bytearray()
    reader = threading.Thread(target=drain, args=(master, shown), daemon=True)
    reader.start()
    with os.fdopen(slave, "w", encoding="utf-8") as terminal:
        monkeypatch.setattr(sys, "stderr", terminal)  # the daemon's stderr is a terminal
        running = coordinator(rounds=1, min_clients=1)
        client = start_client(running.address, 0)
        assert client.join(60) == 0
        running.wait_done(30)
    reader.join(10)
    raw = shown.decode("utf-8", "replace")
    assert "\r\x1b[2K" in raw  # back to the line's start and erase it: redrawn in place
    lines = re.sub(r"\x1b\[[0-9;?]*[A-Za-z]", "", raw).replace("\r", "\n").split("\n")
    assert "waiting for clients: 0 of 1 joined" in lines
    # The client (a thread here) may log its last line after the coordinator's final redraw.
    drawn = [line for line in lines if line.strip() and not LOG_RECORD.match(line)]
    assert drawn[-1] == "done: 1 of 1 rounds"


LOG_RECORD = re.compile(r"\d\d:\d\d:\d\d \S+ [A-Z]+ ")
"""The start of a log record's line (`common/logs.py`)."""


def drain(fd: int, into: bytearray) -> None:
    """Read the terminal's output until every writer has closed it."""
    while True:
        try:
            data = os.read(fd, 65536)
        except OSError:
            break
        if not data:
            break
        into += data
    os.close(fd)
