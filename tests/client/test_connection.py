"""The client's Connection against an in-process fake channel: no socket is opened, yet
every request and reply crosses as the bytes it would be on the wire, through the same
serializers and deserializers that common/service.py gives the real stubs."""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from typing import Any

import pytest
import torch

from fedstream.client import connection
from fedstream.client.connection import Connection, Session, negotiated_chunk_bytes
from fedstream.common.framing import frame_data
from fedstream.common.proto.v1 import coordinator_pb2 as pb
from fedstream.common.tensor_codec import Manifest, iter_chunks, tensor_bytes

MIB = 1 << 20

Answer = Callable[[list[bytes]], list[bytes]]
"""What the fake coordinator replies (wire bytes) to one call's requests (wire bytes)."""


@dataclass
class Sent:
    method: str
    wire: list[bytes]
    metadata: Any


class ReplyStream:
    """A server-streaming call's replies, cancellable as a grpc call is."""

    def __init__(self, items: Iterable[Any]) -> None:
        self._items = iter(items)
        self.cancelled = False

    def __iter__(self) -> Iterator[Any]:
        return self._items

    def cancel(self) -> None:
        self.cancelled = True


class WireCall:
    def __init__(
        self,
        channel: FakeChannel,
        path: str,
        serializer: Callable[[Any], bytes],
        deserializer: Callable[[bytes], Any],
        request_streaming: bool,
        response_streaming: bool,
    ) -> None:
        self.channel = channel
        self.method = path.rsplit("/", 1)[1]
        self.serializer = serializer
        self.deserializer = deserializer
        self.request_streaming = request_streaming
        self.response_streaming = response_streaming

    def __call__(self, request: Any, timeout: float | None = None, metadata: Any = None) -> Any:
        requests = list(request) if self.request_streaming else [request]
        wire = [self.serializer(r) for r in requests]
        self.channel.sent.append(Sent(self.method, wire, metadata))
        replies = [self.deserializer(raw) for raw in self.channel.answers[self.method](wire)]
        return ReplyStream(replies) if self.response_streaming else replies[0]


class FakeChannel:
    """Stands in for a grpc channel: calls are answered by `answers[method]` in process."""

    def __init__(self, answers: dict[str, Answer]) -> None:
        self.answers = answers
        self.sent: list[Sent] = []

    def unary_unary(
        self, path: str, request_serializer: Any, response_deserializer: Any
    ) -> WireCall:
        return WireCall(self, path, request_serializer, response_deserializer, False, False)

    def unary_stream(
        self, path: str, request_serializer: Any, response_deserializer: Any
    ) -> WireCall:
        return WireCall(self, path, request_serializer, response_deserializer, False, True)

    def stream_unary(
        self, path: str, request_serializer: Any, response_deserializer: Any
    ) -> WireCall:
        return WireCall(self, path, request_serializer, response_deserializer, True, False)

    def stream_stream(
        self, path: str, request_serializer: Any, response_deserializer: Any
    ) -> WireCall:
        return WireCall(self, path, request_serializer, response_deserializer, True, True)

    def close(self) -> None:
        pass


def model() -> dict[str, torch.Tensor]:
    generator = torch.Generator().manual_seed(1)
    return {
        "w": torch.randn(40, 50, generator=generator),
        "h": torch.randn(300, generator=generator).to(torch.bfloat16),
    }


def stream_bytes(tensors: dict[str, torch.Tensor]) -> bytes:
    return b"".join(tensor_bytes(t).tobytes() for t in tensors.values())


def join_answer(max_chunk_bytes: int) -> Answer:
    reply = pb.JoinReply(
        client_id="c-1", token="tok", run_id="run", max_chunk_bytes=max_chunk_bytes
    )
    return lambda wire: [reply.SerializeToString()]


def download_answer(tensors: dict[str, torch.Tensor], version: int) -> Answer:
    """Serve `tensors` as the coordinator would: a header, then data chunks of the size
    the request asks for."""

    def answer(wire: list[bytes]) -> list[bytes]:
        request = pb.DownloadRequest.FromString(wire[0])
        header = pb.ModelHeader(
            model_version=version,
            manifest=Manifest.from_tensors(tensors).to_proto(),
            offset=request.offset,
        )
        chunks = iter_chunks(list(tensors.values()), request.chunk_bytes, request.offset)
        return [pb.ModelChunk(header=header).SerializeToString(), *map(frame_data, chunks)]

    return answer


def upload_answer(wire: list[bytes]) -> list[bytes]:
    return [pb.UploadReply(accepted=True, detail="booked").SerializeToString()]


@pytest.fixture
def fake_channels(monkeypatch: pytest.MonkeyPatch) -> dict[str, FakeChannel]:
    """The control and bulk channels a Connection opens, by name, answering nothing yet."""
    channels: dict[str, FakeChannel] = {}

    def open_channel(target: str, name: str) -> FakeChannel:
        channels[name] = FakeChannel({})
        return channels[name]

    monkeypatch.setattr(connection, "_channel", open_channel)
    return channels


@pytest.mark.parametrize(
    ("configured", "server_max", "expected"),
    [
        pytest.param(MIB, 16 * MIB, MIB, id="server-allows-more"),
        pytest.param(MIB, 64 << 10, 64 << 10, id="server-allows-less"),
        pytest.param(4096, 4096, 4096, id="equal"),
        pytest.param(MIB, 0, MIB, id="server-states-no-bound"),
    ],
)
def test_chunk_size_is_the_smaller_of_the_clients_and_the_coordinators(
    configured: int, server_max: int, expected: int
) -> None:
    assert negotiated_chunk_bytes(configured, server_max) == expected


@pytest.mark.parametrize(("server_max", "expected"), [(64 << 10, 64 << 10), (0, MIB)])
def test_join_keeps_the_negotiated_chunk_size_on_the_session(
    fake_channels: dict[str, FakeChannel], server_max: int, expected: int
) -> None:
    conn = Connection("coordinator:1", MIB, stall_timeout=30.0)
    fake_channels["control"].answers["Join"] = join_answer(server_max)
    session = conn.join(pb.JoinRequest(name="a", task="tiny"))
    assert (session.client_id, session.token, session.run_id) == ("c-1", "tok", "run")
    assert session.chunk_bytes == expected
    assert conn.chunk_bytes == MIB  # the configured size stays for the next Join
    assert [s.method for s in fake_channels["control"].sent] == ["Join"]
    assert fake_channels["bulk"].sent == []


def test_upload_cuts_its_data_to_the_sessions_chunk_size(
    fake_channels: dict[str, FakeChannel],
) -> None:
    conn = Connection("coordinator:1", MIB, stall_timeout=30.0)
    fake_channels["bulk"].answers["Upload"] = upload_answer
    tensors = model()
    manifest = Manifest.from_tensors(tensors)
    session = Session("c-1", "tok", "run", chunk_bytes=1024)

    reply = conn.upload(
        session, pb.UpdateHeader(round=3, num_examples=7), manifest, tensors.values()
    )

    assert reply.accepted and reply.detail == "booked"
    [sent] = fake_channels["bulk"].sent
    assert sent.method == "Upload"
    assert sent.metadata == (("authorization", "Bearer tok"),)
    messages = [pb.UpdateChunk.FromString(raw) for raw in sent.wire]
    assert messages[0].WhichOneof("payload") == "header"
    assert messages[0].header.round == 3
    assert Manifest.from_proto(messages[0].header.manifest) == manifest
    data = [m.data for m in messages[1:]]
    assert all(m.WhichOneof("payload") == "data" for m in messages[1:])
    assert max(len(d) for d in data) == 1024
    assert b"".join(data) == stream_bytes(tensors)


def test_download_asks_for_the_sessions_chunk_size(
    fake_channels: dict[str, FakeChannel],
) -> None:
    conn = Connection("coordinator:1", MIB, stall_timeout=30.0)
    tensors = model()
    fake_channels["bulk"].answers["Download"] = download_answer(tensors, version=4)
    session = Session("c-1", "tok", "run", chunk_bytes=2048)

    held = conn.download(session, 4, Manifest.from_tensors(tensors))
    try:
        [sent] = fake_channels["bulk"].sent
        request = pb.DownloadRequest.FromString(sent.wire[0])
        assert (request.model_version, request.offset, request.chunk_bytes) == (4, 0, 2048)
        assert sent.metadata == (("authorization", "Bearer tok"),)
        assert held.complete
        out = {name: torch.zeros_like(t) for name, t in tensors.items()}
        held.load_into(out)
        for name, tensor in tensors.items():
            assert torch.equal(out[name], tensor), name
    finally:
        held.close()


def test_poll_presents_the_session_and_asks_nothing_else(
    fake_channels: dict[str, FakeChannel],
) -> None:
    conn = Connection("coordinator:1", MIB, stall_timeout=30.0)
    done = pb.PollReply(done=pb.Done(reason="finished"))
    fake_channels["control"].answers["Poll"] = lambda wire: [done.SerializeToString()]

    reply = conn.poll(Session("c-1", "tok", "run", chunk_bytes=MIB))

    assert reply == done
    [sent] = fake_channels["control"].sent
    assert sent.wire == [b""]  # an empty PollRequest
    assert sent.metadata == (("authorization", "Bearer tok"),)
