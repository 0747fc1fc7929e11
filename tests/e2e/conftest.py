"""A federation whose training the test steps through: `gated_cluster`.

A coordinator and two clients run `gated_train:GatedTrainTask` (tests/e2e/gated_train.py)
as real processes; each client's training of each round waits for the test to open its
gate, so a test can look at the status page while a round is in a known state.
"""

from __future__ import annotations

import json
import os
import urllib.request
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

TASK = "gated_train:GatedTrainTask"
CLIENTS = ("site-a", "site-b")
TIMEOUT = 120.0


class GatedCluster:
    def __init__(self, procs: Any, wait_for: Callable[..., Any], rounds: int) -> None:
        self.procs = procs
        self.wait_for = wait_for
        self.rounds = rounds
        self.run_dir = procs.workdir / "run"
        self.gate = procs.workdir / "gate"
        path = [str(Path(__file__).resolve().parent), os.environ.get("PYTHONPATH", "")]
        self.env = {"PYTHONPATH": os.pathsep.join(p for p in path if p)}
        task = ["--task", TASK, "--task-opt", "params=200000", "--task-opt", "layers=2"]
        self.server = procs(
            "server",
            "server",
            "--address", "127.0.0.1:0",
            "--status-address", "127.0.0.1:0",
            "--run-dir", "run",
            "--rounds", str(rounds),
            "--min-clients", str(len(CLIENTS)),
            "--done-grace", "15",
            *task,
            env=self.env,
        )  # fmt: skip
        info = wait_for(self._coordinator_info, TIMEOUT, "coordinator.json", alive=[self.server])
        self.address: str = info["address"]
        self.status_url: str = info["status_url"]
        self.clients = [
            procs(
                name,
                "client",
                "--server",
                self.address,
                "--name",
                name,
                "--partition",
                str(i),
                "--num-partitions",
                str(len(CLIENTS)),
                "--threads",
                "1",
                "--max-backoff",
                "1",
                *task,
                env=self.env,
            )  # fmt: skip
            for i, name in enumerate(CLIENTS)
        ]

    def _coordinator_info(self) -> dict[str, Any] | None:
        try:
            info: dict[str, Any] = json.loads((self.run_dir / "coordinator.json").read_text())
        except (OSError, ValueError):
            return None
        return info

    def get(self, path: str) -> bytes:
        with urllib.request.urlopen(self.status_url + path.lstrip("/"), timeout=10) as reply:
            body: bytes = reply.read()
        return body

    def status(self) -> dict[str, Any]:
        snapshot: dict[str, Any] = json.loads(self.get("status.json"))
        return snapshot

    def states(self) -> dict[str, str]:
        return {c["name"]: c["state"] for c in self.status()["clients"]}

    def wait_training(self, partition: int, number: int) -> None:
        marker = self.gate / f"train-p{partition}-r{number}"
        self.wait_for(
            marker.exists,
            TIMEOUT,
            f"partition {partition} to train round {number}",
            alive=[self.server, *self.clients],
        )

    def open_gate(self, partition: int, number: int) -> None:
        (self.gate / f"open-p{partition}-r{number}").touch()

    def wait_status(self, predicate: Callable[[dict[str, Any]], bool], what: str) -> dict[str, Any]:
        def check() -> dict[str, Any] | None:
            snapshot = self.status()
            return snapshot if predicate(snapshot) else None

        result: dict[str, Any] = self.wait_for(check, TIMEOUT, what, alive=[self.server])
        return result

    def finish(self) -> dict[str, int]:
        """Open every gate and wait for every process to exit."""
        for number in range(1, self.rounds + 1):
            for partition in range(len(CLIENTS)):
                self.open_gate(partition, number)
        codes: dict[str, int] = self.procs.wait_all(TIMEOUT)
        return codes


@pytest.fixture
def gated_cluster(procs: Any, wait_for: Callable[..., Any]) -> Callable[[int], GatedCluster]:
    """Start a gated federation of `rounds` rounds (call it once per test)."""
    return lambda rounds: GatedCluster(procs, wait_for, rounds)
