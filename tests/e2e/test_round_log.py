"""A round's acknowledged updates outlive the coordinator; a client's model outlives it.

docs/checkpoints.md, "The round's log": a coordinator killed with `kill -9` after k of n
updates of a round were acknowledged restarts into the same round, takes those k again
from its run directory (verified again), and asks only the other clients; the final
model is the uninterrupted run's. "Clients keep their download": a client restarted
with the same --model-dir holds the round's model and downloads nothing.

The clients run `gated_train:GatedTrainTask` (tests/e2e/gated_train.py): synthetic,
whose training of each round waits for a gate file this test creates.
"""

from __future__ import annotations

import json
import os
import signal
import urllib.request
from pathlib import Path
from typing import Any

import pytest
import torch

from fedstream.common.checkpoint import load_checkpoint

pytestmark = [pytest.mark.e2e, pytest.mark.slow]

TASK = "gated_train:GatedTrainTask"
OPTIONS = ("--task-opt", "params=200000", "--task-opt", "layers=2")
CLIENTS = 3
ROUNDS = 2


def env() -> dict[str, str]:
    path = [str(Path(__file__).resolve().parent), os.environ.get("PYTHONPATH", "")]
    return {"PYTHONPATH": os.pathsep.join(p for p in path if p)}


def listening(run: Path, pid: int) -> bool:
    try:
        return json.loads((run / "coordinator.json").read_text()).get("pid") == pid
    except (OSError, ValueError):
        return False


def metrics(run: Path) -> list[dict[str, Any]]:
    return [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]


def final_model(run: Path) -> dict[str, torch.Tensor]:
    tensors, _ = load_checkpoint(run / "checkpoints" / f"round_{ROUNDS:05d}.safetensors")
    return {k: v for k, v in tensors.items() if not k.startswith("strategy.")}


class Federation:
    """A coordinator and CLIENTS gated clients in their own directory under the test's."""

    def __init__(self, procs: Any, wait_for: Any, name: str, free_port: Any) -> None:
        self.procs, self.wait_for, self.name = procs, wait_for, name
        self.dir = procs.workdir / name
        self.dir.mkdir()
        self.run = self.dir / "run"
        self.gate = self.dir / "gate"
        self.address = f"127.0.0.1:{free_port()}"
        self.server_args = (
            "server",
            "--address", self.address,
            "--run-dir", str(self.run),
            "--rounds", str(ROUNDS),
            "--min-clients", str(CLIENTS),
            "--task", TASK, *OPTIONS,
            "--task-opt", f"gate_dir={self.gate}",
            "--done-grace", "15",
        )  # fmt: skip
        self.server = self.start_server("server")
        self.clients = [
            procs(
                f"{name}-client-{i}",
                "client",
                "--server",
                self.address,
                "--name",
                f"site-{i}",
                "--task",
                TASK,
                *OPTIONS,
                "--task-opt",
                f"gate_dir={self.gate}",
                "--partition",
                str(i),
                "--num-partitions",
                str(CLIENTS),
                "--threads",
                "1",
                "--max-backoff",
                "1",
                env=env(),
            )  # fmt: skip
            for i in range(CLIENTS)
        ]

    def start_server(self, label: str) -> Any:
        return self.procs(f"{self.name}-{label}", *self.server_args, env=env())

    def open(self, partition: int, number: int) -> None:
        self.gate.mkdir(parents=True, exist_ok=True)
        (self.gate / f"open-p{partition}-r{number}").touch()

    def training(self, partition: int, number: int) -> bool:
        return (self.gate / f"train-p{partition}-r{number}").exists()


def accepted(log: str, number: int) -> int:
    return log.count(f"round {number}: update accepted")


def test_kill_9_after_k_of_n_acknowledged_resumes_with_those_k(procs, free_port, wait_for):
    whole = Federation(procs, wait_for, "uninterrupted", free_port)
    for number in range(1, ROUNDS + 1):
        for i in range(CLIENTS):
            whole.open(i, number)
    assert set(procs.wait_all(240, [whole.server, *whole.clients]).values()) == {0}

    fed = Federation(procs, wait_for, "killed", free_port)
    wait_for(
        lambda: all(fed.training(i, 1) for i in range(CLIENTS)),
        120,
        "every client to train round 1",
        alive=[fed.server, *fed.clients],
    )
    k = 2
    for i in range(k):
        fed.open(i, 1)
    wait_for(
        lambda: all(accepted(fed.clients[i].log(), 1) == 1 for i in range(k)),
        120,
        f"{k} updates of round 1 acknowledged",
        alive=[fed.server, *fed.clients],
    )
    fed.server.send_signal(signal.SIGKILL)
    assert fed.server.wait(30) == -signal.SIGKILL
    logged = sorted(p.name for p in (fed.run / "round-log").glob("r00001-a1-*.update"))
    assert len(logged) == k, sorted(p.name for p in (fed.run / "round-log").iterdir())
    assert not (fed.run / "checkpoints" / "round_00001.safetensors").exists()

    restarted = fed.start_server("server-restarted")
    wait_for(lambda: listening(fed.run, restarted.pid), 60, "the restarted server to listen")
    fed.open(2, 1)
    status_url = json.loads((fed.run / "coordinator.json").read_text())["status_url"]

    def after_round_1() -> dict[str, Any] | None:
        with urllib.request.urlopen(status_url + "status.json", timeout=10) as reply:
            snapshot: dict[str, Any] = json.loads(reply.read())
        return snapshot if snapshot["run"]["completed"] >= 1 else None

    snapshot = wait_for(after_round_1, 120, "round 1 to complete", alive=[restarted])
    booked = {c["name"]: c["updates_booked"] for c in snapshot["clients"]}
    print(f"per-client uploads booked by the restarted coordinator after round 1: {booked}")
    # the coordinator's own counters: only the client whose update was not logged uploaded
    assert booked == {"site-0": 0, "site-1": 0, "site-2": 1}
    for number in range(1, ROUNDS + 1):
        for i in range(CLIENTS):
            fed.open(i, number)
    codes = procs.wait_all(240, [restarted, *fed.clients])
    assert set(codes.values()) == {0}, codes

    log = restarted.log()
    taken = log.count("taken from the round's log")
    uploaded = {i: log.count(f"round 1: update from site-{i} ") for i in range(CLIENTS)}
    records = metrics(fed.run)
    print(
        f"round 1 after kill -9: {taken} updates taken from the log, uploads to the restarted "
        f"coordinator by client {uploaded}; record {records[0]}"
    )
    assert taken == k
    assert uploaded == {0: 0, 1: 0, 2: 1}
    assert records[0]["updates"] == CLIENTS and records[0]["updates_from_log"] == k
    assert records[0]["attempt"] == 1
    for i in range(CLIENTS):  # each client trained round 1 once, acknowledged once
        client_log = fed.clients[i].log()
        assert accepted(client_log, 1) == 1, f"client {i}"
        assert client_log.count("round 1: trained on") == 1, f"client {i}"
    # the client training when the coordinator died sent that update to the restarted one
    assert "sending the update trained before a restart" in fed.clients[2].log()
    assert not list((fed.run / "round-log").glob("*.update"))  # gone with the checkpoints

    mine, theirs = final_model(fed.run), final_model(whole.run)
    assert mine.keys() == theirs.keys()
    largest = max(float((mine[k] - theirs[k]).abs().max()) for k in mine)
    print(f"final model vs the uninterrupted run's: largest difference {largest:.3g}")
    # FedAvg folds in arrival order: the logged updates first here, in upload order
    # there; float32 sums in another order differ in their last bit at most
    assert largest <= 1e-6


def test_a_restarted_client_keeps_its_download(procs, free_port, wait_for):
    address = f"127.0.0.1:{free_port()}"
    gate = procs.workdir / "gate"
    task = ("--task", TASK, *OPTIONS, "--task-opt", f"gate_dir={gate}")
    server = procs(
        "server",
        "server", "--address", address, "--run-dir", "run", "--rounds", "1",
        "--min-clients", "1", "--client-timeout", "2", "--heartbeat-seconds", "0.5",
        "--done-grace", "15", *task,
        env=env(),
    )  # fmt: skip
    client_args = (
        "client", "--server", address, "--name", "site-0", *task, "--partition", "0",
        "--num-partitions", "1", "--threads", "1", "--max-backoff", "1",
        "--model-dir", "model",
    )  # fmt: skip
    first = procs("client", *client_args, env=env())
    wait_for(lambda: (gate / "train-p0-r1").exists(), 120, "the client to train", alive=[server])
    assert (procs.workdir / "model" / "model.bin").is_file()
    first.send_signal(signal.SIGKILL)
    assert first.wait(30) == -signal.SIGKILL
    (gate / "open-p0-r1").touch()
    second = procs("client-restarted", *client_args, env=env())
    codes = procs.wait_all(180, [server, second])
    assert codes == {"server": 0, "client-restarted": 0}
    print(second.log())
    assert "download of model v0" in first.log()
    assert "is the one kept in model" in second.log()
    assert "download of model" not in second.log()
    record = metrics(procs.workdir / "run")[0]
    model_bytes = (procs.workdir / "model" / "model.bin").stat().st_size
    # the coordinator's count: at most the first client's download, none for the second
    assert record["updates"] == 1 and record["bytes_down"] <= model_bytes
