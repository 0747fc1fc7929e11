"""`kill -9` of the coordinator while its clients evaluate a round loses nothing aggregated.

docs/architecture.md, "The round state machine": aggregate -> checkpoint (atomic) ->
metrics -> next, and a round's federated evaluation comes after its checkpoint. So once
the clients are evaluating round 1, round 1 is on disk, and a coordinator killed then
and restarted on the same run directory carries on at round 2: round 1 is trained once,
not twice.

The clients run `gated_eval:GatedEvalTask` (tests/e2e/gated_eval.py): digits, whose
`evaluate_local` waits for a gate file this test creates, and whose `train` logs every
round it trains to a file, per client.
"""

from __future__ import annotations

import json
import os
import signal
from pathlib import Path

import pytest

from fedstream.common.checkpoint import read_checkpoint_metadata

pytestmark = pytest.mark.e2e

TASK = "gated_eval:GatedEvalTask"
ROUNDS = 3
CLIENTS = 2


def checkpoint(run: Path, number: int) -> Path:
    return run / "checkpoints" / f"round_{number:05d}.safetensors"


def trained_rounds(gate: Path, partition: int) -> list[int]:
    path = gate / f"train-p{partition}.txt"
    return [int(line) for line in path.read_text().split()] if path.exists() else []


def metrics(run: Path) -> list[dict]:
    path = run / "metrics.jsonl"
    if not path.exists():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def listening(run: Path, pid: int) -> bool:
    try:
        return json.loads((run / "coordinator.json").read_text()).get("pid") == pid
    except (OSError, ValueError):
        return False


def test_coordinator_killed_during_federated_evaluation_resumes_after_that_round(
    procs, free_port, wait_for
):
    address = f"127.0.0.1:{free_port()}"
    run = procs.workdir / "run"
    gate = procs.workdir / "gate"
    # The task module lives beside this file; only this directory goes on the path.
    path = [str(Path(__file__).resolve().parent), os.environ.get("PYTHONPATH", "")]
    env = {"PYTHONPATH": os.pathsep.join(p for p in path if p)}
    server_args = (
        "server",
        "--address", address,
        "--run-dir", "run",
        "--rounds", str(ROUNDS),
        "--min-clients", str(CLIENTS),
        "--task", TASK,
        "--task-opt", "gate_dir=gate",
        "--eval-every", "1",
        "--eval-timeout", "600",
        "--done-grace", "15",
    )  # fmt: skip
    server = procs("server", *server_args, env=env)
    client_args = (
        "client",
        "--server", address,
        "--task", TASK,
        "--task-opt", "gate_dir=gate",
        "--num-partitions", str(CLIENTS),
        "--threads", "1",
        "--max-backoff", "1",
    )  # fmt: skip
    workers = [
        procs(f"client-{i}", *client_args, "--partition", str(i), env=env) for i in range(CLIENTS)
    ]

    # Every client is inside evaluate_local of round 1, held there by the closed gate.
    wait_for(
        lambda: all((gate / f"eval-p{i}-1").exists() for i in range(CLIENTS)),
        120,
        "both clients to start the federated evaluation of round 1",
        alive=[server, *workers],
    )
    assert [trained_rounds(gate, i) for i in range(CLIENTS)] == [[1]] * CLIENTS

    server.send_signal(signal.SIGKILL)
    assert server.wait(30) == -signal.SIGKILL
    # What the restart will find: round 1, aggregated before its evaluation began.
    assert checkpoint(run, 1).exists(), (
        "round 1 was aggregated and its federated evaluation was under way, yet its "
        "checkpoint was not on disk when the coordinator was killed: the round is lost; "
        f"checkpoints: {sorted(p.name for p in (run / 'checkpoints').iterdir())}"
    )
    saved = read_checkpoint_metadata(checkpoint(run, 1))
    assert saved["round"] == "1"
    assert [(r["round"], r["attempt"]) for r in json.loads(saved["history"])] == [(1, 1)]

    restarted = procs("server-restarted", *server_args, env=env)
    wait_for(
        lambda: listening(run, restarted.pid),
        60,
        "the restarted server to listen",
        alive=[restarted, *workers],
    )
    (gate / "open").touch()
    codes = procs.wait_all(180, [restarted, *workers])
    assert codes == {"server-restarted": 0, **{f"client-{i}": 0 for i in range(CLIENTS)}}

    log = restarted.log()
    assert "resumed" in log and f"at round 1 of {ROUNDS}" in log, log
    final = read_checkpoint_metadata(checkpoint(run, ROUNDS))
    assert final["round"] == str(ROUNDS)
    history = json.loads(final["history"])
    assert [r["round"] for r in history] == list(range(1, ROUNDS + 1))
    assert history[0]["attempt"] == 1
    assert [r["round"] for r in metrics(run)] == list(range(1, ROUNDS + 1))
    # Round 1 trained once per client, before the kill; never again after it.
    for i in range(CLIENTS):
        assert trained_rounds(gate, i) == list(range(1, ROUNDS + 1)), f"client-{i}"
    for worker in workers:
        assert "joining again" in worker.log()
