"""The round's log over real gRPC: an acknowledged update outlives its coordinator, and is
taken again only when it passes the checks an upload passes (docs/checkpoints.md, "The
round's log")."""

from __future__ import annotations

import json
import logging
from collections.abc import Callable
from pathlib import Path

import pytest
import torch

from fedstream.common.checkpoint import load_checkpoint
from fedstream.common.proto.v1 import coordinator_pb2 as pb
from fedstream.common.service import bearer_metadata

from .conftest import RunningCoordinator, TinyModel, start_client, tiny_join
from .test_bad_requests import RawPeer, good, update
from .test_rounds_grpc import fedavg_of_tiny

EXACT = {"clip_factor": 0, "claim_cap_factor": 0}
"""Bounded influence and the claim cap off: the checkpoint is compared with FedAvg's exact
mean of the updates as made."""


def acknowledged_then_stopped(start: Callable[..., RunningCoordinator], run: Path) -> Path:
    """client-2's update of round 1 (TinyTask partition 2's), acknowledged by a coordinator
    that then goes away mid-round; the log's file of it."""
    first = start(rounds=1, min_clients=2, heartbeat_seconds=60.0, round_timeout=120.0, **EXACT)
    peer = RawPeer(first.address)
    token = peer._join(tiny_join("client-2", 2), timeout=5).token
    peer._join(tiny_join("client-0", 0), timeout=5)  # the round opens with two clients
    poll = peer._poll(pb.PollRequest(), metadata=bearer_metadata(token), timeout=30)
    assert poll.train.round == 1
    assert peer.upload(update(good()), token).accepted
    peer.channel.close()
    first.stop()
    first.wait_done(60)  # its run directory free for the restart
    [entry] = (run / "round-log").glob("r00001-a1-*.update")
    return entry


@pytest.mark.slow
@pytest.mark.parametrize("corrupt", [False, True])
def test_a_logged_update_is_taken_again_after_a_restart_only_when_it_checks_out(
    coordinator: Callable[..., RunningCoordinator],
    tmp_path: Path,
    caplog: pytest.LogCaptureFixture,
    corrupt: bool,
) -> None:
    caplog.set_level(logging.INFO)
    run = tmp_path / "run"
    entry = acknowledged_then_stopped(coordinator, run)
    if corrupt:  # one flipped bit in the logged bytes: its SHA-256 no longer matches
        raw = bytearray(entry.read_bytes())
        raw[5] ^= 0x01
        entry.write_bytes(bytes(raw))
    caplog.clear()  # what the restarted coordinator and its clients say
    second = coordinator(rounds=1, min_clients=2, **EXACT)
    clients = [start_client(second.address, p) for p in (0, 2)]
    assert [c.join(60) for c in clients] == [0, 0]
    second.wait_done(30)
    record = json.loads((run / "metrics.jsonl").read_text())
    messages = [r.getMessage() for r in caplog.records]
    trained = [m for m in messages if "round 1: update from client-2" in m]
    if corrupt:
        assert record["updates_from_log"] == 0 and len(trained) == 1
        assert any("logged update of client-2 is not taken" in m for m in messages)
    else:
        assert record["updates_from_log"] == 1 and trained == []
        assert any("update of client-2 taken from the round's log" in m for m in messages)
    assert record["updates"] == 2 and record["attempt"] == 1
    tensors, _ = load_checkpoint(run / "checkpoints" / "round_00001.safetensors")
    expected = fedavg_of_tiny(TinyModel(0), [0, 2], 1)
    for name, value in expected.items():
        assert torch.equal(tensors[name], value), name
    assert not list((run / "round-log").glob("*.update"))
