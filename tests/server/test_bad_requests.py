"""Hostile and broken requests get a precise status, change nothing, and the round completes.

Each bad request is its own test against a fresh coordinator whose round is open for the
sender, so one refusal that goes wrong does not hide the others; one more test sends them
all into a round that honest clients share and checks that round's model is exact.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import grpc
import pytest
import torch

from fedstream.client.connection import Connection
from fedstream.common.checkpoint import load_checkpoint
from fedstream.common.proto.v1 import coordinator_pb2 as pb
from fedstream.common.service import METHODS, bearer_metadata, stub
from fedstream.common.wire.framing import frame_data
from fedstream.common.wire.manifest import Manifest
from fedstream.common.wire.stream import iter_chunks

from .conftest import (
    ClientThread,
    RunningCoordinator,
    TinyModel,
    client_config,
    start_client,
    tiny_join,
    wait_for,
    wide_task,
)
from .test_rounds_grpc import fedavg_of_tiny

sc = grpc.StatusCode


class RawPeer:
    """A client that writes whatever bytes it likes onto the wire."""

    def __init__(self, address: str) -> None:
        self.channel = grpc.insecure_channel(address)
        self._upload = self.channel.stream_unary(
            METHODS["Upload"].path,
            request_serializer=lambda raw: raw,
            response_deserializer=METHODS["Upload"].response_deserializer,
        )
        self._download = self.channel.unary_stream(
            METHODS["Download"].path,
            request_serializer=METHODS["Download"].request_serializer,
            response_deserializer=lambda raw: raw,
        )
        self._poll = stub(self.channel, "Poll")
        self._join = stub(self.channel, "Join")

    def upload(self, messages: list[bytes], token: str | None) -> pb.UploadReply:
        metadata = bearer_metadata(token) if token else ()
        reply: pb.UploadReply = self._upload(iter(messages), metadata=metadata, timeout=20)
        return reply

    def download(self, request: pb.DownloadRequest, token: str) -> list[bytes]:
        return list(self._download(request, metadata=bearer_metadata(token), timeout=20))


def header(round_number: int, tensors: dict[str, torch.Tensor], **fields: Any) -> bytes:
    msg = pb.UpdateHeader(
        round=round_number, model_version=fields.pop("model_version", 0), num_examples=30
    )
    for key, value in fields.items():
        setattr(msg, key, value)
    msg.manifest.CopyFrom(Manifest.from_tensors(tensors).to_proto())
    return pb.UpdateChunk(header=msg).SerializeToString()


def data(tensors: dict[str, torch.Tensor], chunk: int = 7) -> list[bytes]:
    return [frame_data(c) for c in iter_chunks(list(tensors.values()), chunk)]


def expect(code: grpc.StatusCode, fragment: str, call: Callable[..., Any], *args: Any) -> None:
    with pytest.raises(grpc.RpcError) as info:
        call(*args)
    assert info.value.code() == code, info.value.details()
    assert fragment in info.value.details(), info.value.details()


def good() -> dict[str, torch.Tensor]:
    """The update every honest client of TinyTask would send, in the tiny model's layout."""
    init = {k: v for k, v in TinyModel(0).state_dict().items() if v.is_floating_point()}
    return {k: (v + 0.375) - v for k, v in init.items()}


def update(tensors: dict[str, torch.Tensor], round_number: int = 1, **fields: Any) -> list[bytes]:
    return [header(round_number, tensors, **fields), *data(tensors)]


@dataclass
class Arena:
    """A coordinator with round 1 open, and a raw peer selected for it holding `token`."""

    running: RunningCoordinator
    peer: RawPeer
    token: str

    def join(self, name: str, partition: int) -> str:
        request = tiny_join(name, partition)
        reply: pb.JoinReply = self.peer._join(request, timeout=5)
        return reply.token

    def poll(self) -> pb.PollReply:
        reply: pb.PollReply = self.peer._poll(
            pb.PollRequest(), metadata=bearer_metadata(self.token), timeout=30
        )
        return reply

    def reported(self) -> set[str]:
        open_round = self.running.coordinator.round
        assert open_round is not None, "the round closed"
        return set(open_round.reported)


def wrong_shape() -> list[bytes]:
    return update({"w": torch.zeros(3, 4), "h": good()["h"]})


def wrong_dtype() -> list[bytes]:
    return update({"w": good()["w"].double(), "h": good()["h"]})


def renamed() -> list[bytes]:
    return update({"x": good()["w"], "h": good()["h"]})


def poisoned() -> list[bytes]:
    tensors = good()
    tensors["w"][1, 1] = float("nan")
    return update(tensors)


def zero_examples() -> list[bytes]:
    first = pb.UpdateChunk.FromString(update(good())[0])
    first.header.num_examples = 0
    return [first.SerializeToString()]


def huge_manifest() -> list[bytes]:
    first = pb.UpdateChunk.FromString(update(good())[0])
    first.header.manifest.tensors[0].shape[:] = [1 << 20, 1 << 20]
    first.header.manifest.tensors[0].nbytes = 4 << 40
    return [first.SerializeToString()]


def not_selected(arena: Arena) -> pb.UploadReply:
    """An upload from a client that joined after the round's selection: eve joins through
    the client's own Connection, as a real client would."""
    outsider = Connection(arena.running.address, 1 << 20, 30.0)
    try:
        eve = outsider.join(tiny_join("eve", 3))
    finally:
        outsider.close()
    return arena.peer.upload(update(good()), eve.token)


Send = Callable[[Arena], object]

BAD_REQUESTS: list[Any] = [
    pytest.param(
        sc.UNAUTHENTICATED,
        "Join first",
        lambda a: a.peer.upload(update(good()), "forged-token"),
        id="forged-token",
    ),
    pytest.param(
        sc.UNAUTHENTICATED,
        "Join first",
        lambda a: a.peer.upload(update(good()), None),
        id="no-token",
    ),
    pytest.param(
        sc.FAILED_PRECONDITION,
        "round 99",
        lambda a: a.peer.upload(update(good(), round_number=99), a.token),
        id="wrong-round",
    ),
    pytest.param(
        sc.FAILED_PRECONDITION,
        "model version 5",
        lambda a: a.peer.upload(update(good(), model_version=5), a.token),
        id="wrong-model-version",
    ),
    pytest.param(
        sc.INVALID_ARGUMENT,
        "shape",
        lambda a: a.peer.upload(wrong_shape(), a.token),
        id="wrong-shape",
    ),
    pytest.param(
        sc.INVALID_ARGUMENT,
        "dtype",
        lambda a: a.peer.upload(wrong_dtype(), a.token),
        id="wrong-dtype",
    ),
    pytest.param(
        sc.INVALID_ARGUMENT,
        "'w'",
        lambda a: a.peer.upload(renamed(), a.token),
        id="renamed-tensor",
    ),
    pytest.param(
        sc.INVALID_ARGUMENT,
        "ended after",
        lambda a: a.peer.upload(update(good())[:-2], a.token),
        id="truncated",
    ),
    pytest.param(
        sc.INVALID_ARGUMENT,
        "overflows",
        lambda a: a.peer.upload([*update(good()), frame_data(b"x" * 4)], a.token),
        id="overflowing",
    ),
    pytest.param(
        sc.INVALID_ARGUMENT,
        "NaN",
        lambda a: a.peer.upload(poisoned(), a.token),
        id="nan",
    ),
    pytest.param(
        sc.INVALID_ARGUMENT,
        "undecodable",
        lambda a: a.peer.upload([update(good())[0], b"\xff\xff\xff"], a.token),
        id="undecodable-chunk",
    ),
    pytest.param(
        sc.INVALID_ARGUMENT,
        "empty",
        lambda a: a.peer.upload([], a.token),
        id="empty-stream",
    ),
    pytest.param(
        sc.INVALID_ARGUMENT,
        "header",
        lambda a: a.peer.upload(update(good())[1:], a.token),
        id="no-header",
    ),
    pytest.param(
        sc.INVALID_ARGUMENT,
        "second header",
        lambda a: a.peer.upload([update(good())[0], *update(good())], a.token),
        id="second-header",
    ),
    pytest.param(
        sc.INVALID_ARGUMENT,
        "num_examples",
        lambda a: a.peer.upload(zero_examples(), a.token),
        id="zero-examples",
    ),
    pytest.param(
        sc.RESOURCE_EXHAUSTED,
        "limit",
        lambda a: a.peer.upload(huge_manifest(), a.token),
        id="huge-manifest",
    ),
    pytest.param(
        sc.FAILED_PRECONDITION,
        "not current",
        lambda a: a.peer.download(pb.DownloadRequest(model_version=9), a.token),
        id="download-not-current",
    ),
    pytest.param(
        sc.OUT_OF_RANGE,
        "beyond",
        lambda a: a.peer.download(pb.DownloadRequest(model_version=0, offset=1 << 30), a.token),
        id="download-beyond-the-end",
    ),
    pytest.param(
        sc.FAILED_PRECONDITION,
        "task",
        lambda a: a.peer._join(
            pb.JoinRequest(name="x", task="digits", partition=0, num_partitions=1)
        ),
        id="join-with-another-task",
    ),
    pytest.param(sc.PERMISSION_DENIED, "not selected", not_selected, id="not-selected"),
]


@pytest.fixture
def arena(coordinator: Callable[..., RunningCoordinator]) -> Iterator[Arena]:
    """Round 1 open with mallory, alone, selected for it."""
    running = coordinator(rounds=1, min_clients=1)
    arena = Arena(running, RawPeer(running.address), "")
    arena.token = arena.join("mallory", 2)
    assert arena.poll().train.round == 1
    yield arena
    arena.peer.channel.close()


@pytest.mark.parametrize(("code", "fragment", "send"), BAD_REQUESTS)
def test_bad_request_is_refused_and_changes_nothing(
    arena: Arena, code: grpc.StatusCode, fragment: str, send: Send
) -> None:
    expect(code, fragment, send, arena)
    assert arena.reported() == set()
    # what the refusal held is freed: the sender's honest update is still booked, once
    assert arena.peer.upload(update(good()), arena.token).accepted


@pytest.mark.slow
def test_bad_requests_are_refused_and_the_round_completes(
    coordinator: Callable[..., RunningCoordinator], tmp_path: Path
) -> None:
    # the honest clients' claims (10, 20) and updates weigh as made: no claim cap, no clip
    running = coordinator(rounds=1, min_clients=3, claim_cap_factor=0, clip_factor=0)
    arena = Arena(running, RawPeer(running.address), "")
    arena.token = arena.join("mallory", 2)
    honest = [start_client(running.address, p) for p in (0, 1)]
    assert arena.poll().train.round == 1
    wait_for(lambda: arena.reported() == {"client-0", "client-1"}, 30, "the honest updates")

    for case in BAD_REQUESTS:
        code, fragment, send = case.values
        expect(code, fragment, send, arena)

    # nothing of the above reached the round; an honest update still does, exactly once
    assert arena.reported() == {"client-0", "client-1"}
    # the download still works, resumed from an offset
    whole = arena.peer.download(pb.DownloadRequest(model_version=0, chunk_bytes=1024), arena.token)
    tail = arena.peer.download(
        pb.DownloadRequest(model_version=0, offset=10, chunk_bytes=1024), arena.token
    )
    assert b"".join(m[2:] for m in whole[1:])[10:] == b"".join(m[2:] for m in tail[1:])

    assert arena.peer.upload(update(good()), arena.token).accepted
    assert [c.join(60) for c in honest] == [0, 0]
    running.wait_done(30)
    arena.peer.channel.close()

    record = json.loads((tmp_path / "run" / "metrics.jsonl").read_text())
    assert record["updates"] == 3 and record["rejected_uploads"] >= 4
    expected = fedavg_of_tiny(TinyModel(0), [0, 1, 2], rounds=1)
    final, _ = load_checkpoint(tmp_path / "run" / "checkpoints" / "round_00001.safetensors")
    for name, tensor in expected.items():
        torch.testing.assert_close(final[name], tensor, rtol=0, atol=1e-6)


@pytest.mark.slow
def test_repeated_update_is_idempotent(
    coordinator: Callable[..., RunningCoordinator], tmp_path: Path
) -> None:
    running = coordinator(rounds=1, min_clients=2)
    arena = Arena(running, RawPeer(running.address), "")
    arena.token = arena.join("twice", 2)
    other = arena.join("waiting", 3)
    assert arena.poll().train.round == 1
    msgs = update(good())
    assert arena.peer.upload(msgs, arena.token).accepted
    second = arena.peer.upload(msgs, arena.token)
    assert not second.accepted and "already" in second.detail
    open_round = running.coordinator.round
    assert open_round is not None and open_round.num_examples == 30
    arena.peer.upload(update(good()), other)
    running.wait_done(30)
    arena.peer.channel.close()


def test_a_client_cuts_its_chunks_to_the_coordinators_bound(
    coordinator: Callable[..., RunningCoordinator], tmp_path: Path
) -> None:
    """Not a bad request: a client configured for larger chunks than the coordinator
    accepts learns the bound from Join and uploads within it."""
    bound = 16 << 10
    running = coordinator(
        task=wide_task(), rounds=1, min_clients=1, chunk_bytes=bound, max_chunk_bytes=bound
    )
    client = ClientThread(client_config(running.address, 0, chunk_bytes=256 << 10), wide_task(0))
    assert client.join(60) == 0
    running.wait_done(30)
    assert client.client.session is not None
    assert client.client.session.chunk_bytes == bound
    record = json.loads((tmp_path / "run" / "metrics.jsonl").read_text())
    assert record["updates"] == 1 and record["rejected_uploads"] == 0
