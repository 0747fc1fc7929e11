"""Progress over real gRPC: the coordinator's line and a client's activities reach their
progress files (what `fedstream demo` shows) and the coordinator's log."""

from __future__ import annotations

import json
import logging

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
