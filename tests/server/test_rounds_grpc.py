"""Rounds over real gRPC on loopback: clients, stragglers, deadlines, resume."""

from __future__ import annotations

import json
import tempfile
from pathlib import Path

import grpc
import pytest
import torch
from grpc_health.v1 import health_pb2, health_pb2_grpc

from fedstream.client.connection import Connection
from fedstream.common.checkpoint import load_checkpoint
from fedstream.common.proto.v1 import coordinator_pb2 as pb
from fedstream.common.wire.manifest import Manifest

from .conftest import (
    ClientThread,
    TinyModel,
    WideTask,
    client_config,
    layout_digest,
    start_client,
    tiny_join,
    wait_for,
)


def fedavg_of_tiny(model: TinyModel, partitions: list[int], rounds: int) -> dict[str, torch.Tensor]:
    """The FedAvg result of TinyTask computed independently, the way the formula reads."""
    state = {k: v.detach().clone() for k, v in model.state_dict().items() if v.is_floating_point()}
    for _ in range(rounds):
        weights = [10 * (p + 1) for p in partitions]
        for name, g in state.items():
            deltas = [(g + 0.125 * (p + 1)) - g for p in partitions]  # in the tensor's dtype
            mean = sum(w * d.float() for w, d in zip(weights, deltas, strict=True)) / sum(weights)
            state[name] = (g.float() + mean).to(g.dtype)
    return state


def attempt(running) -> int:
    """The open round's attempt number, 0 while no round is open."""
    open_round = running.coordinator.round
    return open_round.attempt if open_round is not None else 0


def read_metrics(run_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


def test_clients_complete_rounds_and_model_is_the_weighted_mean(coordinator, tmp_path):
    # FedAvg by the claims and updates as made: the default claim cap would weigh 30
    # examples as the round's median claim, 20 (tests/server/test_safeguards.py), and
    # bounded influence clip the largest update (tests/server/test_influence.py)
    running = coordinator(rounds=3, min_clients=3, claim_cap_factor=0, clip_factor=0)
    clients = [start_client(running.address, p) for p in (0, 1, 2)]
    assert [c.join(60) for c in clients] == [0, 0, 0]
    running.wait_done(30)

    expected = fedavg_of_tiny(TinyModel(0), [0, 1, 2], rounds=3)
    final, metadata = load_checkpoint(tmp_path / "run" / "checkpoints" / "round_00003.safetensors")
    for name, tensor in expected.items():
        assert final[name].dtype == tensor.dtype
        torch.testing.assert_close(final[name], tensor, rtol=0, atol=1e-6)
    assert metadata["task"] == "tiny" and metadata["round"] == "3"

    history = read_metrics(tmp_path / "run")
    assert [r["round"] for r in history] == [1, 2, 3]
    assert all(r["updates"] == 3 and r["num_examples"] == 60 for r in history)
    # client metrics are example-weighted: loss = partition, weights 10, 20, 30
    assert history[0]["train_loss"] == pytest.approx((0 * 10 + 1 * 20 + 2 * 30) / 60)
    assert history[-1]["eval_loss"] == pytest.approx(float(expected["w"].sum()), rel=1e-5)
    assert history[0]["bytes_up"] == 3 * (12 * 4 + 5 * 2)
    assert (tmp_path / "run" / "metrics.png").stat().st_size > 0


def test_client_without_disk_for_the_model_exits_with_a_clear_error(
    coordinator, tmp_path, monkeypatch, caplog
):
    running = coordinator(rounds=1, min_clients=1)
    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path / "missing"))
    assert start_client(running.address, 0).join(60) == 2
    assert "cannot keep the downloaded model on local disk" in caplog.text
    assert "missing" in caplog.text


def test_round_config_reaches_the_task(coordinator):
    running = coordinator(rounds=1, min_clients=1, round_config={"lr": "0.5", "mode": "x"})
    client = start_client(running.address, 0)
    assert client.join(60) == 0
    config = client.client.task.last_config
    assert config["lr"] == 0.5 and config["mode"] == "x" and config["round"] == 1


@pytest.mark.slow
def test_silent_client_costs_its_update_not_the_round(coordinator, tmp_path):
    running = coordinator(rounds=1, min_clients=2, round_timeout=3.0)
    silent = Connection(running.address, 1 << 20, 30.0)
    session = silent.join(tiny_join("silent", 1))
    honest = start_client(running.address, 0)
    reply = silent.poll(session)
    assert reply.WhichOneof("action") == "train"  # selected, then never answers
    assert honest.join(60) == 0
    running.wait_done(30)
    silent.close()
    (record,) = read_metrics(tmp_path / "run")
    assert record["clients_selected"] == 2 and record["updates"] == 1
    assert record["duration_s"] >= 3.0


@pytest.mark.slow
def test_round_without_enough_updates_is_run_again(coordinator, tmp_path):
    running = coordinator(rounds=1, min_clients=1, min_reports=1, round_timeout=1.5)
    silent = Connection(running.address, 1 << 20, 30.0)
    session = silent.join(tiny_join("silent", 1))
    first = silent.poll(session)
    assert first.train.round == 1
    # nothing is uploaded: after the deadline round 1 starts again with a fresh selection
    wait_for(lambda: attempt(running) >= 2, 20, "round 1 to be re-run")
    assert running.coordinator.completed == 0
    assert silent.poll(session).train.round == 1
    honest = start_client(running.address, 0)
    assert honest.join(60) == 0
    silent.close()
    running.wait_done(30)
    (record,) = read_metrics(tmp_path / "run")
    assert record["attempt"] >= 2 and record["updates"] >= 1


def test_health_service_reports_serving(coordinator):
    running = coordinator(rounds=1)
    with grpc.insecure_channel(running.address) as channel:
        stub = health_pb2_grpc.HealthStub(channel)
        for service in ("", "fedstream.v1.Coordinator"):
            reply = stub.Check(health_pb2.HealthCheckRequest(service=service), timeout=5)
            assert reply.status == health_pb2.HealthCheckResponse.SERVING
        with pytest.raises(grpc.RpcError) as info:
            stub.Check(health_pb2.HealthCheckRequest(service="nope"), timeout=5)
        assert info.value.code() == grpc.StatusCode.NOT_FOUND


def test_health_service_reports_not_serving_once_the_run_is_done(coordinator):
    running = coordinator(rounds=1, min_clients=2, round_timeout=2.0, done_grace=30.0)
    silent = Connection(running.address, 1 << 20, 30.0)
    session = silent.join(tiny_join("silent", 1))
    honest = start_client(running.address, 0)
    wait_for(
        lambda: silent.poll(session).WhichOneof("action") == "train",  # and never uploads
        30,
        "the silent client's train task",
    )
    assert honest.join(60) == 0
    with grpc.insecure_channel(running.address) as channel:
        stub = health_pb2_grpc.HealthStub(channel)

        def status() -> int:
            request = health_pb2.HealthCheckRequest(service="fedstream.v1.Coordinator")
            return stub.Check(request, timeout=5).status

        # The daemon still answers polls while it waits for the silent client to hear
        # that the run is done, but it serves no more rounds.
        wait_for(
            lambda: status() == health_pb2.HealthCheckResponse.NOT_SERVING,
            30,
            "health to turn NOT_SERVING",
        )
        assert silent.poll(session).WhichOneof("action") == "done"
    silent.close()
    running.wait_done(30)


@pytest.mark.slow
def test_resumed_run_ends_where_the_uninterrupted_run_ends(coordinator, tmp_path):
    # FedAvg as the claims and updates are made (no claim cap, no clip), computed by hand
    plain = {"claim_cap_factor": 0, "clip_factor": 0}
    first = coordinator(rounds=2, min_clients=2, run_dir=tmp_path / "resumed", **plain)
    clients = [start_client(first.address, p) for p in (0, 1)]
    assert [c.join(60) for c in clients] == [0, 0]
    first.wait_done(30)

    second = coordinator(rounds=4, min_clients=2, run_dir=tmp_path / "resumed", **plain)
    assert second.coordinator.completed == 2
    clients = [start_client(second.address, p) for p in (0, 1)]
    assert [c.join(60) for c in clients] == [0, 0]
    second.wait_done(30)

    expected = fedavg_of_tiny(TinyModel(0), [0, 1], rounds=4)
    final, _ = load_checkpoint(tmp_path / "resumed" / "checkpoints" / "round_00004.safetensors")
    for name, tensor in expected.items():
        torch.testing.assert_close(final[name], tensor, rtol=0, atol=1e-6)
    assert [r["round"] for r in read_metrics(tmp_path / "resumed")] == [1, 2, 3, 4]


def test_resume_refuses_a_different_run(coordinator, tmp_path):
    from fedstream.common.config import ConfigError

    first = coordinator(rounds=1, min_clients=1, run_dir=tmp_path / "r")
    assert start_client(first.address, 0).join(60) == 0
    first.wait_done(30)
    with pytest.raises(ConfigError, match="different run"):
        coordinator(rounds=2, min_clients=1, run_dir=tmp_path / "r", seed=7)


@pytest.mark.slow
def test_client_holding_the_model_version_skips_the_download(coordinator, tmp_path):
    running = coordinator(rounds=1, min_clients=2, min_reports=2, round_timeout=2.0)
    silent = Connection(running.address, 1 << 20, 30.0)
    session = silent.join(tiny_join("late", 1))
    client = start_client(running.address, 0)
    wait_for(lambda: attempt(running) >= 2, 30, "round 1 to be re-run")
    # attempt 2 trains the same model version: the client reuses its copy
    wait_for(lambda: "client-0" in running.coordinator.round.reported, 30, "client-0's update")
    init = {k: v for k, v in TinyModel(0).state_dict().items() if v.is_floating_point()}
    manifest = Manifest.from_tensors(init)
    header = pb.UpdateHeader(round=1, model_version=0, num_examples=20)
    pieces = [(v + 0.25) - v for v in init.values()]
    assert silent.upload(session, header, manifest, pieces).accepted
    assert client.join(60) == 0
    running.wait_done(30)
    silent.close()
    (record,) = read_metrics(tmp_path / "run")
    assert record["attempt"] >= 2 and record["updates"] == 2
    assert record["bytes_down"] == 0


@pytest.mark.slow
def test_closing_a_round_ends_a_stalled_download(coordinator, tmp_path):
    task = WideTask({}, 0)
    task.load_data(0, 8)
    running = coordinator(task=task, rounds=1, min_clients=2, round_timeout=3.0, chunk_bytes=1024)
    slow = Connection(running.address, 1024, 60.0)
    session = slow.join(tiny_join("slow", 1, layout_digest(WideTask({}, 0))))
    wide = WideTask({}, 0)
    wide.load_data(0, 8)
    honest = ClientThread(client_config(running.address, 0), wide)
    assert slow.poll(session).train.round == 1
    stream = slow._download(
        pb.DownloadRequest(model_version=0, chunk_bytes=1024), metadata=session.metadata
    )
    next(stream), next(stream)  # the header and one chunk, then nothing more is read
    wait_for(lambda: running.coordinator.completed == 1, 30, "round 1 to complete")
    with pytest.raises(grpc.RpcError) as info:
        for _ in stream:
            pass
    assert info.value.code() == grpc.StatusCode.FAILED_PRECONDITION
    assert "closed during the download" in info.value.details()
    assert honest.join(60) == 0
    running.wait_done(30)
    slow.close()
    (record,) = read_metrics(tmp_path / "run")
    assert record["updates"] == 1


def test_client_with_a_different_model_exits_with_a_clear_error(coordinator):
    running = coordinator(task=WideTask({}, 0), rounds=1, min_clients=1)
    client = start_client(running.address, 0)  # a TinyTask client: no `wide` tensor
    assert client.join(60) == 2
    running.stop()
