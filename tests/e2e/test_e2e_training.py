"""Real `fedstream server` and `fedstream client` processes, started through the CLI."""

from __future__ import annotations

import json
import signal
from pathlib import Path

import pytest

pytestmark = pytest.mark.e2e


def metrics(run_dir: Path) -> list[dict]:
    path = run_dir / "metrics.jsonl"
    if not path.exists():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def start_cluster(procs, address: str, task: str, clients: int, rounds: int, *extra: str):
    server = procs(
        "server",
        "server",
        "--address", address,
        "--run-dir", "run",
        "--rounds", str(rounds),
        "--min-clients", str(clients),
        "--task", task,
        "--done-grace", "15",
        *extra,
    )  # fmt: skip
    workers = [
        procs(
            f"client-{i}",
            "client",
            "--server",
            address,
            "--task",
            task,
            "--partition",
            str(i),
            "--num-partitions",
            str(clients),
            "--threads",
            "1",
            "--max-backoff",
            "1",
        )  # fmt: skip
        for i in range(clients)
    ]
    return server, workers


def test_digits_three_non_iid_clients_reach_85_percent_in_5_rounds(procs, free_port):
    address = f"127.0.0.1:{free_port()}"
    start_cluster(procs, address, "digits", clients=3, rounds=5)
    codes = procs.wait_all(240)
    assert set(codes.values()) == {0}

    history = metrics(procs.workdir / "run")
    accuracy = [round(r["eval_accuracy"], 4) for r in history]
    print(f"digits held-out accuracy per round: {accuracy}")
    assert [r["round"] for r in history] == [1, 2, 3, 4, 5]
    assert all(r["updates"] == 3 for r in history)
    assert max(accuracy) >= 0.85
    assert history[-1]["eval_loss"] < history[0]["eval_loss"]
    run = procs.workdir / "run"
    assert (run / "metrics.png").stat().st_size > 0
    assert (run / "checkpoints" / "round_00005.safetensors").exists()


def test_charlm_server_and_two_clients_complete_three_rounds(procs, free_port):
    address = f"127.0.0.1:{free_port()}"
    start_cluster(procs, address, "charlm", clients=2, rounds=3)
    codes = procs.wait_all(300)
    assert codes == {"server": 0, "client-0": 0, "client-1": 0}
    history = metrics(procs.workdir / "run")
    losses = [r["eval_loss"] for r in history]
    print(f"charlm held-out loss per round: {losses}")
    assert len(history) == 3 and losses[-1] < losses[0]


def test_killed_coordinator_resumes_and_clients_rejoin_without_restart(procs, free_port, wait_for):
    address = f"127.0.0.1:{free_port()}"
    run = procs.workdir / "run"
    server, workers = start_cluster(procs, address, "digits", clients=2, rounds=4)
    wait_for(lambda: len(metrics(run)) >= 2, 180, "two rounds", alive=[server, *workers])
    server.send_signal(signal.SIGKILL)
    assert server.wait(30) == -signal.SIGKILL
    # The newest checkpoint is what a restart resumes from (metrics.jsonl may lag it by
    # the round whose checkpoint landed just before the kill; the restart rewrites it).
    saved = (run / "checkpoints").glob("round_*.safetensors")
    completed_before = max(int(path.stem.removeprefix("round_")) for path in saved)
    assert completed_before >= 2

    restarted = procs(
        "server-restarted",
        "server",
        "--address", address,
        "--run-dir", "run",
        "--rounds", "4",
        "--min-clients", "2",
        "--task", "digits",
        "--done-grace", "15",
    )  # fmt: skip
    codes = procs.wait_all(240, [restarted, *workers])
    assert set(codes.values()) == {0}
    history = metrics(run)
    assert [r["round"] for r in history] == [1, 2, 3, 4]
    assert "resumed" in restarted.log() and f"at round {completed_before}" in restarted.log()
    for worker in workers:
        assert "joining again" in worker.log()


def test_sigterm_stops_the_server_cleanly(procs, free_port, wait_for):
    address = f"127.0.0.1:{free_port()}"
    server = procs("server", "server", "--address", address, "--run-dir", "run", "--task", "digits")
    wait_for(
        lambda: (procs.workdir / "run" / "coordinator.json").exists(),
        60,
        "the server to listen",
        alive=[server],
    )
    server.send_signal(signal.SIGTERM)
    assert server.wait(30) == 0
    assert "stopping on signal" in server.log()
