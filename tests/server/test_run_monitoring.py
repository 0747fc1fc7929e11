"""Monitoring a run over real gRPC: a federated evaluation's downloads are counted in the
evaluated round's record, and a restarted coordinator keeps its run id and status port."""

from __future__ import annotations

import json
import socket
from collections.abc import Callable
from pathlib import Path
from urllib.parse import urlsplit

from fedstream.server.run_file import RUN_FILE

from .conftest import RunningCoordinator, start_client


def read_metrics(run_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


def run_two_clients(address: str) -> None:
    clients = [start_client(address, p) for p in (0, 1)]
    assert [c.join(60) for c in clients] == [0, 0]


def test_evaluation_downloads_are_booked_to_the_evaluated_round(
    coordinator: Callable[..., RunningCoordinator], tmp_path: Path
) -> None:
    """Each client downloads version 1 to evaluate it, so round 2, trained from version 1,
    downloads nothing: without `fed_eval_bytes_down` those bytes were in no record."""
    running = coordinator(rounds=2, min_clients=2, eval_every=1, eval_timeout=20.0)
    model_bytes = running.coordinator.model.manifest.total_bytes
    run_two_clients(running.address)
    running.wait_done(30)
    first, second = read_metrics(tmp_path / "run")
    assert first["bytes_down"] == 2 * model_bytes
    assert first["fed_eval_bytes_down"] == 2 * model_bytes
    assert second["bytes_down"] == 0
    assert second["fed_eval_bytes_down"] == 2 * model_bytes


def status_port(running: RunningCoordinator) -> int:
    assert running.daemon.status is not None
    port = urlsplit(running.daemon.status.url).port
    assert port is not None
    return port


def test_a_restart_keeps_the_run_id_and_the_status_port(
    coordinator: Callable[..., RunningCoordinator], tmp_path: Path
) -> None:
    first = coordinator(rounds=1, min_clients=2)
    run_id, port = first.coordinator.run_id, status_port(first)
    run_two_clients(first.address)
    first.wait_done(30)
    assert json.loads((tmp_path / "run" / RUN_FILE).read_text()) == {
        "run_id": run_id,
        "status_port": port,
    }

    second = coordinator(rounds=2, min_clients=2)  # the same run directory: resumed
    assert second.coordinator.completed == 1
    assert second.coordinator.run_id == run_id
    assert status_port(second) == port
    coordinator_json = json.loads((tmp_path / "run" / "coordinator.json").read_text())
    assert coordinator_json["run_id"] == run_id
    second.stop()

    with socket.socket() as squatter:  # the old port is taken: a free one is picked
        squatter.bind(("127.0.0.1", port))
        squatter.listen()
        third = coordinator(rounds=2, min_clients=2)
        assert third.coordinator.run_id == run_id
        assert status_port(third) != port
