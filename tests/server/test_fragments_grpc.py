"""Streaming fragments over real gRPC (docs/low-communication.md, "Streaming fragments"):
a fragment's round is a round.

TinyTask's model has two exchanged tensors (`w`, float32, and `h`, bfloat16), so with
`fragments=2` round r synchronises `w` when r is odd and `h` when it is even. Its training
adds 0.125 (partition + 1) to every weight, so the whole protocol (catch-up, mixing with
alpha, anchors, the pseudo-gradient of one fragment, FedAvg over it) is computed by hand
here and compared with the coordinator's checkpoints.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import grpc
import pytest
import torch

from fedstream.common.checkpoint import load_checkpoint
from fedstream.common.fragments import split
from fedstream.common.proto.v1 import coordinator_pb2 as pb
from fedstream.common.proto.v1 import coordinator_pb2_grpc as pb_grpc
from fedstream.common.wire.manifest import Manifest
from fedstream.tasks import ConfigScalar, TrainResult

from .conftest import (
    ClientThread,
    TinyModel,
    TinyTask,
    client_config,
    start_client,
    tiny_join,
    tiny_task,
    wait_for,
)

ROUNDS = 5
ALPHA = 0.25
STREAMING: dict[str, Any] = {"fragments": 2, "fragment_alpha": ALPHA, "keep_checkpoints": 10}
OUTER = {"fedavg": (1.0, 0.0), "diloco": (0.7, 0.9)}
"""Each strategy's outer step as (lr, Nesterov momentum): FedAvg is lr 1 without momentum."""


def records(run: Path) -> list[dict[str, Any]]:
    return [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]


def checkpoint(run: Path, number: int) -> dict[str, torch.Tensor]:
    tensors, _ = load_checkpoint(run / "checkpoints" / f"round_{number:05d}.safetensors")
    return {k: v for k, v in tensors.items() if k in ("w", "h")}


def by_hand(rounds: int, clients: int, lr: float, mu: float) -> list[dict[str, torch.Tensor]]:
    """The global model after each round, the streaming protocol stepped by hand, with
    DiLoCo's outer step (its momentum per tensor, so per fragment)."""
    state = TinyModel(0).state_dict()
    glob = {"w": state["w"].clone(), "h": state["h"].clone()}
    order = ["w", "h"]
    local: list[dict[str, torch.Tensor]] = []
    anchor: list[dict[str, torch.Tensor]] = []
    velocity = {n: torch.zeros(t.shape) for n, t in glob.items()}
    out = []
    for number in range(1, rounds + 1):
        name = order[(number - 1) % 2]
        deltas, weights = [], []
        for k in range(clients):
            if number == 1:  # catch-up: the whole model
                local.append({n: t.clone() for n, t in glob.items()})
                anchor.append({n: t.clone() for n, t in glob.items()})
            else:  # the fragment round number - 1 changed, mixed in
                changed = order[(number - 2) % 2]
                local[k][changed].mul_(ALPHA).add_(glob[changed], alpha=1 - ALPHA)
                anchor[k][changed] = glob[changed].clone()
            for t in local[k].values():
                t.add_(0.125 * (k + 1))
            deltas.append(local[k][name] - anchor[k][name])
            weights.append(10.0 * (k + 1))
        mean = sum(w * d.float() for w, d in zip(weights, deltas, strict=True)) / sum(weights)
        velocity[name] = mu * velocity[name] + mean
        step = lr * (mean + mu * velocity[name])
        glob[name] = (glob[name].float() + step).to(glob[name].dtype)
        out.append({n: t.clone() for n, t in glob.items()})
    return out


@pytest.mark.slow
@pytest.mark.parametrize(
    ("strategy", "eval_every"), [("fedavg", 0), ("diloco", 0), ("diloco", 1)]
)  # a federated evaluation after a round changes nothing of the training
def test_each_round_steps_exactly_its_fragment_as_computed_by_hand(
    coordinator, strategy, eval_every
):
    # the safeguards off: the claim cap and the clip would re-weigh these updates
    running = coordinator(
        rounds=ROUNDS, strategy=strategy, safeguards=False, eval_every=eval_every, **STREAMING
    )
    clients = [start_client(running.address, p) for p in (0, 1)]
    assert [c.join(60) for c in clients] == [0, 0]
    running.wait_done(30)
    run = running.config.run_dir
    rows = records(run)
    assert [r["fragment"] for r in rows] == [0, 1, 0, 1, 0]
    expected = by_hand(ROUNDS, 2, *OUTER[strategy])
    before = (
        checkpoint(run, 0) if (run / "checkpoints" / "round_00000.safetensors").exists() else None
    )
    for number in range(1, ROUNDS + 1):
        after = checkpoint(run, number)
        synced = "w" if number % 2 else "h"
        if before is not None:  # the other fragment's tensors did not move
            other = "h" if synced == "w" else "w"
            assert torch.equal(after[other], before[other]), number
        for name in ("w", "h"):
            torch.testing.assert_close(after[name], expected[number - 1][name], msg=name)
        before = after
    w_bytes, h_bytes = 4 * 3 * 4, 5 * 2
    # round 1: both clients take the whole model; then each the fragment the last round changed
    assert rows[0]["bytes_down"] == 2 * (w_bytes + h_bytes)
    fragments = [2 * w_bytes, 2 * h_bytes] * 2 if not eval_every else [0] * 4  # evaluated
    assert [r["bytes_down"] for r in rows[1:]] == fragments
    # each upload holds its round's fragment alone
    assert [r["bytes_up"] for r in rows] == [2 * w_bytes, 2 * h_bytes] * 2 + [2 * w_bytes]
    if eval_every:  # each evaluation took the whole model; the clients kept their own,
        # mixing in the fragment the evaluated version changed, as the next round would
        assert [r["fed_eval_clients"] for r in rows] == [2] * ROUNDS
        assert [r["fed_eval_bytes_down"] for r in rows] == [2 * (w_bytes + h_bytes)] * ROUNDS


@pytest.mark.slow
@pytest.mark.parametrize("strategy", ["fedavg", "median"])  # folds on arrival; holds updates
def test_the_safeguards_see_the_fragment_and_step_only_its_tensors(coordinator, strategy):
    # the safeguards on, as by default
    running = coordinator(rounds=4, strategy=strategy, **STREAMING)
    clients = [start_client(running.address, p) for p in (0, 1)]
    assert [c.join(60) for c in clients] == [0, 0]
    running.wait_done(30)
    run = running.config.run_dir
    rows = records(run)
    assert [(r["fragment"], r["updates"]) for r in rows] == [(0, 2), (1, 2), (0, 2), (1, 2)]
    for number in range(2, 5):
        before, after = checkpoint(run, number - 1), checkpoint(run, number)
        synced, other = ("h", "w") if number % 2 == 0 else ("w", "h")
        assert torch.equal(after[other], before[other]), number
        assert not torch.equal(after[synced], before[synced]), number
    # round 1's updates are `w` alone: 0.125 and 0.25 on each of 12 elements; the clip
    # bound is made of those norms, not of the whole model's (17 elements)
    fragment_norms = {0.125 * 12**0.5, 0.25 * 12**0.5}
    bound = rows[0]["clip_bound"]
    assert any(bound == pytest.approx(n, rel=1e-4) for n in fragment_norms), bound


def test_split_is_contiguous_and_balanced_by_bytes():
    sizes = {"a": 4, "b": 4, "c": 8, "d": 1, "e": 7}
    assert split(sizes, 1) == [["a", "b", "c", "d", "e"]]
    assert split(sizes, 3) == [["a", "b"], ["c"], ["d", "e"]]
    with pytest.raises(ValueError, match="cannot cut 5 tensors into 6"):
        split(sizes, 6)


def _joined(address: str) -> tuple[grpc.Channel, pb_grpc.CoordinatorStub, list[tuple[str, str]]]:
    channel = grpc.insecure_channel(address)
    stub = pb_grpc.CoordinatorStub(channel)
    reply = stub.Join(tiny_join("raw", 0))
    return channel, stub, [("authorization", f"Bearer {reply.token}")]


def _train_task(stub: pb_grpc.CoordinatorStub, metadata: list[tuple[str, str]]) -> pb.TrainTask:
    def polled() -> pb.TrainTask | None:
        reply = stub.Poll(pb.PollRequest(), metadata=metadata)
        return reply.train if reply.WhichOneof("action") == "train" else None

    task = wait_for(polled, 20, "a train task")
    assert task is not None  # wait_for returns only a truthy value
    return task


def test_a_fragment_out_of_range_and_an_upload_of_another_fragment_are_refused(coordinator):
    running = coordinator(task=tiny_task(), min_clients=1, rounds=1, **STREAMING)
    channel, stub, metadata = _joined(running.address)
    with channel:
        task = _train_task(stub, metadata)
        assert (task.config["fragment"].integer, task.config["fragments"].integer) == (0, 2)
        assert task.config["fragment_alpha"].number == ALPHA
        request = pb.DownloadRequest(model_version=0, fragment=2)
        with pytest.raises(grpc.RpcError) as refused:
            list(stub.Download(request, metadata=metadata))
        assert refused.value.code() == grpc.StatusCode.INVALID_ARGUMENT
        assert "fragment 2 is out of range" in refused.value.details()
        chunks = list(
            stub.Download(pb.DownloadRequest(model_version=0, fragment=1), metadata=metadata)
        )
        header = chunks[0].header
        assert [t.name for t in header.manifest.tensors] == ["h"]
        # round 1 synchronises fragment 0 (`w`): an update of `h` is not the round's manifest
        h = Manifest.from_tensors({"h": torch.zeros(5, dtype=torch.bfloat16)})
        header = pb.UpdateHeader(
            round=1, model_version=0, num_examples=1, manifest=h.to_proto(), attempt=task.attempt
        )
        with pytest.raises(grpc.RpcError) as wrong:
            stub.Upload(
                iter([pb.UpdateChunk(header=header), pb.UpdateChunk(data=bytes(10))]),
                metadata=metadata,
            )
        assert wrong.value.code() == grpc.StatusCode.INVALID_ARGUMENT
        assert "expected name 'w', got 'h'" in wrong.value.details()


def test_a_fragment_download_is_refused_without_streaming(coordinator):
    running = coordinator(task=tiny_task(), min_clients=1, rounds=1)
    channel, stub, metadata = _joined(running.address)
    with channel:
        task = _train_task(stub, metadata)
        assert "fragments" not in task.config
        with pytest.raises(grpc.RpcError) as refused:
            list(stub.Download(pb.DownloadRequest(model_version=0, fragment=0), metadata=metadata))
        assert refused.value.code() == grpc.StatusCode.INVALID_ARGUMENT
        assert "1 fragment (0..0)" in refused.value.details()


class RememberingTask(TinyTask):
    """TinyTask that records the rounds it trains and each time its client drops the
    inner optimiser state (`forget_optimizer_state`, what a catch-up does)."""

    def __init__(self, partition: int) -> None:
        super().__init__({}, 0)
        self.load_data(partition, 8)
        self.events: list[int | str] = []

    def train(self, model: torch.nn.Module, config: Mapping[str, ConfigScalar]) -> TrainResult:
        self.events.append(int(config["round"]))
        return super().train(model, config)

    def forget_optimizer_state(self) -> None:
        self.events.append("forget")


@pytest.mark.slow
def test_a_client_that_missed_fragments_catches_up_with_the_whole_model(coordinator):
    rounds = 8
    running = coordinator(rounds=rounds, fraction=0.5, **STREAMING)
    tasks = [RememberingTask(p) for p in range(3)]
    threads = [ClientThread(client_config(running.address, p), tasks[p]) for p in range(3)]
    assert [t.join(60) for t in threads] == [0, 0, 0]
    running.wait_done(30)
    rows = records(running.config.run_dir)
    assert [r["updates"] for r in rows] == [2] * rounds
    caught_up = 0
    for task in tasks:
        assert task.events[0] == "forget", task.events  # a new client takes the whole model
        last: int | None = None
        for before, event in zip(task.events, task.events[1:], strict=False):
            if isinstance(event, int) and isinstance(before, int):
                assert event == before + 1, task.events  # fragment by fragment: no gap
            if isinstance(event, int) and before == "forget" and last is not None:
                assert event > last + 1, task.events  # a catch-up only after missed rounds
                caught_up += 1
            if isinstance(event, int):
                last = event
    print(f"each client's rounds and catch-ups: {[t.events for t in tasks]}")
    assert caught_up >= 1  # some client missed rounds, took the whole model and trained on
    # what the coordinator served, round by round: the whole model to a client catching
    # up, and to the others the fragment the last round changed (`w` or `h`)
    whole, w_bytes, h_bytes = 4 * 3 * 4 + 5 * 2, 4 * 3 * 4, 5 * 2
    for row in rows:
        number, served = row["round"], 0
        for task in tasks:
            if number in task.events:
                before = task.events[task.events.index(number) - 1]
                served += whole if before == "forget" else (w_bytes, h_bytes)[number % 2]
        assert row["bytes_down"] == served, (number, row["bytes_down"], served)
