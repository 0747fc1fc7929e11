"""Streaming fragments through real `fedstream` processes (docs/low-communication.md,
"Streaming fragments"): a fragment's round is a round.

A coordinator killed with `kill -9` in the middle of round 2 (fragment 1 of 2), after one
of its two updates was acknowledged, restarts into round 2 and so into fragment 1: the
acknowledged update, whose logged manifest holds fragment 1's tensors alone, is taken
again from the round's log, the other client sends its own, and the run carries on. A
client killed and started again holds no model: it catches up with the whole model, then
trains on fragment by fragment.

The clients run `gated_train:GatedTrainTask` (tests/e2e/gated_train.py): synthetic,
whose training of each round waits for a gate file this test creates.
"""

from __future__ import annotations

import base64
import json
import signal
from pathlib import Path
from typing import Any

import pytest

from fedstream.common.fragments import fragment_manifests
from fedstream.common.proto.v1 import coordinator_pb2 as pb
from fedstream.common.wire.manifest import Manifest
from fedstream.tasks import exchanged_names
from fedstream.tasks.synthetic import SyntheticTask

from .test_round_log import accepted, env, listening, metrics

pytestmark = [pytest.mark.e2e, pytest.mark.slow]

TASK = "gated_train:GatedTrainTask"
OPTIONS = {"params": "200000", "layers": "2"}
FRAGMENTS = 2


def task_args(gate: Path) -> tuple[str, ...]:
    opts = [arg for k, v in OPTIONS.items() for arg in ("--task-opt", f"{k}={v}")]
    return ("--task", TASK, *opts, "--task-opt", f"gate_dir={gate}")


def fragment_names() -> list[tuple[str, ...]]:
    """Each fragment's tensors, cut as the coordinator and the clients cut them."""
    task = SyntheticTask(OPTIONS)
    model = task.build_model()
    manifest = Manifest.of_model(model.state_dict(), exchanged_names(task, model))
    return [m.names for m in fragment_manifests(manifest, FRAGMENTS)]


def logged_names(header: Path) -> tuple[str, ...]:
    record: dict[str, Any] = json.loads(header.read_text())
    manifest = pb.Manifest.FromString(base64.b64decode(record["manifest"]))
    return tuple(t.name for t in manifest.tensors)


class Streaming:
    """A coordinator streaming in two fragments, and its clients, in the test's directory."""

    def __init__(self, procs: Any, free_port: Any, rounds: int, clients: int) -> None:
        self.procs = procs
        self.run = procs.workdir / "run"
        self.gate = procs.workdir / "gate"
        self.address = f"127.0.0.1:{free_port()}"
        self.server_args = (
            "server", "--address", self.address, "--run-dir", str(self.run),
            "--rounds", str(rounds), "--min-clients", str(clients),
            "--fragments", str(FRAGMENTS), "--fragment-alpha", "0.5",
            "--strategy", "diloco", "--client-timeout", "3", "--heartbeat-seconds", "0.5",
            "--done-grace", "15", *task_args(self.gate),
        )  # fmt: skip
        self.server = procs("server", *self.server_args, env=env())
        self.clients = [self.client(i, f"client-{i}") for i in range(clients)]

    def client(self, partition: int, label: str) -> Any:
        return self.procs(
            label,
            "client", "--server", self.address, "--name", f"site-{partition}",
            *task_args(self.gate), "--partition", str(partition), "--num-partitions", "2",
            "--threads", "1", "--max-backoff", "1",
            env=env(),
        )  # fmt: skip

    def open(self, partition: int, *numbers: int) -> None:
        self.gate.mkdir(parents=True, exist_ok=True)
        for number in numbers:
            (self.gate / f"open-p{partition}-r{number}").touch()

    def training(self, partition: int, number: int) -> bool:
        return (self.gate / f"train-p{partition}-r{number}").exists()


def test_a_coordinator_killed_mid_fragment_resumes_at_that_fragment(procs, free_port, wait_for):
    fed = Streaming(procs, free_port, rounds=3, clients=2)
    everyone = [fed.server, *fed.clients]
    fed.open(0, 1)
    fed.open(1, 1)
    wait_for(
        lambda: fed.training(0, 2) and fed.training(1, 2),
        120,
        "both clients to train round 2",
        alive=everyone,
    )
    fed.open(0, 2)
    wait_for(
        lambda: accepted(fed.clients[0].log(), 2) == 1,
        120,
        "client 0's update of round 2 acknowledged",
        alive=everyone,
    )
    fed.server.send_signal(signal.SIGKILL)
    assert fed.server.wait(30) == -signal.SIGKILL
    headers = list((fed.run / "round-log").glob("r00002-a1-*.json"))
    assert len(headers) == 1
    names = fragment_names()
    assert logged_names(headers[0]) == names[1]  # round 2's upload: fragment 1 alone
    assert not (fed.run / "checkpoints" / "round_00002.safetensors").exists()

    restarted = procs("server-restarted", *fed.server_args, env=env())
    wait_for(lambda: listening(fed.run, restarted.pid), 60, "the restarted server to listen")
    for partition in (0, 1):
        fed.open(partition, 2, 3)
    codes = procs.wait_all(240, [restarted, *fed.clients])
    assert set(codes.values()) == {0}, codes
    rows = metrics(fed.run)
    print(f"rounds after kill -9 in round 2: {[(r['round'], r.get('fragment')) for r in rows]}")
    assert [(r["round"], r["fragment"]) for r in rows] == [(1, 0), (2, 1), (3, 0)]
    assert rows[1]["updates"] == 2 and rows[1]["updates_from_log"] == 1
    assert rows[1]["attempt"] == 1
    assert "resumed" in restarted.log() and "round 2/3 started" in restarted.log()
    for client in fed.clients:  # each took the whole model once, then fragments
        log = client.log()
        assert log.count("catching up to model") == 1, log
        assert "fragment 1 of model v2 mixed in" in log, log


def test_a_restarted_client_catches_up_and_trains_on(procs, free_port, wait_for):
    rounds = 6
    fed = Streaming(procs, free_port, rounds=rounds, clients=2)
    fed.open(0, *range(1, rounds + 1))
    fed.open(1, 1, 2)
    wait_for(lambda: fed.training(1, 3), 120, "client 1 to train round 3", alive=[fed.server])
    first = fed.clients[1]
    first.send_signal(signal.SIGKILL)
    assert first.wait(30) == -signal.SIGKILL
    (fed.gate / "train-p1-r3").unlink()
    restarted = fed.client(1, "client-1-restarted")
    fed.open(1, *range(3, rounds + 1))
    codes = procs.wait_all(240, [fed.server, fed.clients[0], restarted])
    assert set(codes.values()) == {0}, codes
    log = restarted.log()
    print(log[-3000:])
    assert "holding no model, catching up to model v" in log
    caught = int(log.split("catching up to model v")[1].split()[0])
    assert 2 <= caught <= rounds - 2  # a model the first process never held whole
    assert f"fragment {caught % FRAGMENTS} of model v{caught + 1} mixed in" in log
    assert accepted(log, caught + 2) == 1  # then trained on and was heard
    rows = metrics(fed.run)
    assert [r["fragment"] for r in rows] == [0, 1] * (rounds // 2)
