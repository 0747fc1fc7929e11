"""Strategies, FedProx, client sampling and federated evaluation over real gRPC."""

from __future__ import annotations

import json
from pathlib import Path

import grpc
import pytest
import torch

from fedstream.client.connection import Connection
from fedstream.client.held_model import HeldModel
from fedstream.common.checkpoint import load_checkpoint
from fedstream.common.proto.v1 import coordinator_pb2 as pb
from fedstream.common.wire.manifest import Manifest
from fedstream.server.coordinator import select_clients
from fedstream.server.strategies import STRATEGIES

from .conftest import TinyModel, start_client, tiny_join, wait_for

SERVICE = "/fedstream.v1.Coordinator"
TINY_LAYOUT = Manifest.from_tensors(
    {k: v for k, v in TinyModel(0).state_dict().items() if v.is_floating_point()}
)


def read_metrics(run_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


def final_model(run_dir: Path, rounds: int) -> dict[str, torch.Tensor]:
    return load_checkpoint(run_dir / "checkpoints" / f"round_{rounds:05d}.safetensors")[0]


def run_clients(address: str, partitions: tuple[int, ...] = (0, 1)) -> None:
    clients = [start_client(address, p) for p in partitions]
    assert [c.join(60) for c in clients] == [0] * len(partitions)


def downloaded(held: HeldModel) -> dict[str, torch.Tensor]:
    """The tensors of a downloaded model, read back from its file."""
    tensors = {e.name: torch.empty(e.shape, dtype=e.dtype) for e in held.manifest.entries}
    held.load_into(tensors)
    held.close()
    return tensors


STATELESS = {"mean", "fedavg", "median", "trimmed-mean", "krum", "geomedian"}
"""Strategies that carry nothing from one round to the next."""


@pytest.mark.slow
@pytest.mark.parametrize("strategy", sorted(STRATEGIES))
def test_resumed_run_ends_where_the_uninterrupted_run_ends(coordinator, tmp_path, strategy):
    """Optimiser state (momentum, moments, step counts) rides in the checkpoint. Bit for
    bit, so the safeguards' claim cap and clipping are off: with them a round of two is
    folded after its review, and the sums then differ in their last bits with the order
    in which the two updates arrive."""
    flags = {
        "strategy": strategy,
        "client_weight": {"client-1": "3"},
        "min_clients": 2,
        "claim_cap_factor": 0,
        "clip_factor": 0,
    }
    whole = coordinator(rounds=3, run_dir=tmp_path / "whole", **flags)
    run_clients(whole.address)
    whole.wait_done(30)

    first = coordinator(rounds=1, run_dir=tmp_path / "resumed", **flags)
    run_clients(first.address)
    first.wait_done(30)
    second = coordinator(rounds=3, run_dir=tmp_path / "resumed", **flags)
    assert second.coordinator.completed == 1
    run_clients(second.address)
    second.wait_done(30)

    expected = final_model(tmp_path / "whole", 3)
    got = final_model(tmp_path / "resumed", 3)
    assert expected.keys() == got.keys()
    assert any(k.startswith("strategy/") for k in got) == (strategy not in STATELESS)
    for name, tensor in expected.items():
        assert torch.equal(got[name], tensor), name
    initial = TinyModel(0).w.detach()
    assert not torch.equal(got["w"], initial)


def test_fedsgd_clients_send_gradients_and_the_server_steps_sgd(coordinator, tmp_path):
    running = coordinator(  # the mean gradient as sent: no claim cap, no clipping
        rounds=2, min_clients=2, strategy="fedsgd", server_lr=0.5, claim_cap_factor=0, clip_factor=0
    )
    clients = [start_client(running.address, p) for p in (0, 1)]
    assert [c.join(60) for c in clients] == [0, 0]
    running.wait_done(30)
    assert clients[0].client.task.last_config["mode"] == "gradient"

    # gradients 0.25 and 0.5, weighted by 10 and 20 examples: 5/12 per round
    start = TinyModel(0)
    final = final_model(tmp_path / "run", 2)
    mean_gradient = (10 * 0.25 + 20 * 0.5) / 30
    w = start.w.detach() - 0.5 * mean_gradient - 0.5 * mean_gradient
    torch.testing.assert_close(final["w"], w, rtol=0, atol=1e-6)
    h = start.h.detach()
    for _ in range(2):
        h = (h.float() - 0.5 * mean_gradient).to(torch.bfloat16)
    assert torch.equal(final["h"], h)


def test_proximal_mu_flag_reaches_the_task(coordinator):
    running = coordinator(rounds=1, min_clients=1, proximal_mu=0.01)
    client = start_client(running.address, 0)
    assert client.join(60) == 0
    assert client.client.task.last_config["proximal_mu"] == 0.01


def test_client_sampling_is_seeded_per_round_and_bounded() -> None:
    live = [f"c{i}" for i in range(20)]
    picks = [select_clients(live, 0.25, 2, seed=7, round_number=r, attempt=1) for r in range(8)]
    assert all(len(p) == 5 for p in picks)
    assert picks == [
        select_clients(list(reversed(live)), 0.25, 2, seed=7, round_number=r, attempt=1)
        for r in range(8)
    ]
    assert len(set(picks)) > 1  # varies by round
    assert select_clients(live, 0.25, 2, seed=8, round_number=0, attempt=1) != picks[0]
    assert select_clients(live, 0.25, 2, 7, 0, attempt=2) != picks[0]
    assert len(select_clients(live, 0.01, 3, 7, 0, 1)) == 3  # never below min_clients
    assert select_clients(live[:2], 0.5, 3, 7, 0, 1) == frozenset(live[:2])


def test_fraction_selects_a_subset_each_round(coordinator, tmp_path):
    running = coordinator(rounds=3, min_clients=2, fraction=0.5, round_timeout=2.0)
    run_clients(running.address, (0, 1, 2, 3))
    running.wait_done(30)
    history = read_metrics(tmp_path / "run")
    assert [r["clients_selected"] for r in history] == [2, 2, 2]
    assert all(r["updates"] == 2 for r in history)


class Reporter:
    """Raw ReportEvaluation calls."""

    def __init__(self, address: str) -> None:
        self.channel = grpc.insecure_channel(address)
        self.call = self.channel.unary_unary(
            f"{SERVICE}/ReportEvaluation",
            request_serializer=pb.EvaluationReport.SerializeToString,
            response_deserializer=pb.EvaluationReply.FromString,
        )

    def __call__(self, token: str | None, **fields) -> pb.EvaluationReply:
        metrics = fields.pop("metrics", {})
        report = pb.EvaluationReport(**fields)
        report.metrics.update(metrics)
        metadata = (("authorization", f"Bearer {token}"),) if token else ()
        return self.call(report, metadata=metadata, timeout=10)


def poll_for_work(peer: Connection, session) -> pb.PollReply:
    """Poll past Wait replies (the harness's long-poll lasts one second)."""
    while True:
        reply = peer.poll(session)
        if reply.WhichOneof("action") != "wait":
            return reply


def expect(code: grpc.StatusCode, fragment: str, call, *args, **kwargs) -> None:
    with pytest.raises(grpc.RpcError) as info:
        call(*args, **kwargs)
    assert info.value.code() == code, info.value.details()
    assert fragment in info.value.details(), info.value.details()


@pytest.mark.slow
def test_evaluation_rounds_record_the_example_weighted_client_metrics(coordinator, tmp_path):
    running = coordinator(rounds=2, min_clients=3, eval_every=2, eval_timeout=20.0)
    peer = Connection(running.address, 1 << 20, 30.0)
    session = peer.join(tiny_join("mallory", 2))
    reporter = Reporter(running.address)
    sc = grpc.StatusCode
    expect(sc.FAILED_PRECONDITION, "no evaluation", reporter, session.token, round=1)
    honest = [start_client(running.address, p) for p in (0, 1)]

    # mallory trains like a client would, then takes the evaluation task
    for round_number in (1, 2):
        task = poll_for_work(peer, session)
        assert task.train.round == round_number
        held = downloaded(peer.download(session, task.train.model_version, TINY_LAYOUT))
        delta = {k: (v + 0.375) - v for k, v in held.items()}
        header = pb.UpdateHeader(
            round=round_number, model_version=task.train.model_version, num_examples=30
        )
        assert peer.upload(session, header, Manifest.from_tensors(delta), delta.values()).accepted
    reply = poll_for_work(peer, session)
    assert reply.WhichOneof("action") == "evaluate"
    assert reply.evaluate.round == 2 and reply.evaluate.model_version == 2

    good = {"round": 2, "model_version": 2, "num_examples": 15, "metrics": {"loss": 2.0}}
    expect(sc.UNAUTHENTICATED, "Join first", reporter, "forged", **good)
    expect(sc.FAILED_PRECONDITION, "round 1", reporter, session.token, **{**good, "round": 1})
    expect(
        sc.FAILED_PRECONDITION,
        "model version 1",
        reporter,
        session.token,
        **{**good, "model_version": 1},
    )
    expect(
        sc.INVALID_ARGUMENT,
        "must be finite",
        reporter,
        session.token,
        **{**good, "metrics": {"loss": float("nan")}},
    )
    expect(
        sc.INVALID_ARGUMENT,
        "limit",
        reporter,
        session.token,
        **{**good, "metrics": {f"m{i}": 1.0 for i in range(65)}},
    )
    expect(
        sc.INVALID_ARGUMENT,
        "0 evaluated",
        reporter,
        session.token,
        **{**good, "num_examples": 0},
    )
    expect(
        sc.INVALID_ARGUMENT,
        "num_examples",
        reporter,
        session.token,
        **{**good, "num_examples": 1 << 50},
    )
    outsider = peer.join(tiny_join("eve", 3))
    expect(sc.PERMISSION_DENIED, "not selected", reporter, outsider.token, **good)
    assert reporter(session.token, **good).accepted  # the last report closes the evaluation
    expect(sc.FAILED_PRECONDITION, "no evaluation", reporter, session.token, **good)

    assert [c.join(60) for c in honest] == [0, 0]
    running.wait_done(30)
    reporter.channel.close()
    peer.close()
    first, second = read_metrics(tmp_path / "run")
    assert "fed_eval_loss" not in first
    # honest: loss 0 over 5 examples, loss 1 over 10; mallory: loss 2 over 15
    assert second["fed_eval_clients"] == 3 and second["fed_eval_examples"] == 30
    assert second["fed_eval_loss"] == pytest.approx((0 * 5 + 1 * 10 + 2 * 15) / 30)
    assert "eval_loss" in second
    # the clients evaluated the new global model (version 2), not their local one
    final = final_model(tmp_path / "run", 2)
    for client in honest:
        assert torch.equal(client.client.task.evaluated_w, final["w"])


@pytest.mark.slow
def test_evaluation_closes_at_its_deadline_without_reports(coordinator, tmp_path):
    running = coordinator(rounds=1, min_clients=2, eval_every=1, eval_timeout=1.0)
    silent = Connection(running.address, 1 << 20, 30.0)
    session = silent.join(tiny_join("silent", 1))
    honest = start_client(running.address, 0)
    task = poll_for_work(silent, session).train
    held = downloaded(silent.download(session, task.model_version, TINY_LAYOUT))
    header = pb.UpdateHeader(round=1, model_version=0, num_examples=10)
    silent.upload(session, header, Manifest.from_tensors(held), held.values())
    assert honest.join(60) == 0
    wait_for(lambda: not running.coordinator.evaluation, 20, "the evaluation to close")
    running.wait_done(30)
    silent.close()
    (record,) = read_metrics(tmp_path / "run")
    assert record["fed_eval_clients"] == 1 and record["fed_eval_loss"] == 0.0
