"""An in-process stand-in for the coordinator's channels: no socket is opened, yet every
request and reply crosses as the bytes it would be on the wire, through the same
serializers and deserializers that common/service.py gives the real stubs."""

from __future__ import annotations

import random
import threading
from collections.abc import Callable, Iterable, Iterator, Mapping
from dataclasses import dataclass
from typing import Any

import grpc
import torch

from fedstream.client.held_model import HeldModel
from fedstream.common.proto.v1 import coordinator_pb2 as pb
from fedstream.common.wire.framing import frame_data
from fedstream.common.wire.manifest import Manifest
from fedstream.common.wire.stream import iter_chunks, tensor_bytes
from fedstream.tasks import ConfigScalar, Task, TrainResult
from tests.conftest import wait_for as wait_for  # re-exported for the tests here

Answer = Callable[[list[bytes]], list[bytes]]
"""What the fake coordinator replies (wire bytes) to one call's requests (wire bytes);
it may raise a `FakeRpcError` instead, as a call that ends with a status."""


class FakeRpcError(grpc.RpcError):
    """A call that ended with `code`, as grpc raises it to a client."""

    def __init__(self, code: grpc.StatusCode, details: str = "") -> None:
        super().__init__(f"{code.name}: {details}")
        self._code = code
        self._details = details

    def code(self) -> grpc.StatusCode:
        return self._code

    def details(self) -> str:
        return self._details


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
        with self.channel.lock:
            self.channel.sent.append(Sent(self.method, wire, metadata))
        replies = [self.deserializer(raw) for raw in self.channel.answers[self.method](wire)]
        return ReplyStream(replies) if self.response_streaming else replies[0]


class FakeChannel:
    """Stands in for a grpc channel: calls are answered by `answers[method]` in process.
    Calls may come from several threads (the heartbeat's among them)."""

    def __init__(
        self, answers: dict[str, Answer], credentials: grpc.ChannelCredentials | None = None
    ) -> None:
        self.answers = answers
        self.credentials = credentials
        self.sent: list[Sent] = []
        self.lock = threading.Lock()

    def calls(self, method: str) -> list[Sent]:
        with self.lock:
            return [s for s in self.sent if s.method == method]

    def methods(self) -> list[str]:
        with self.lock:
            return [s.method for s in self.sent]

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


def replies(*outcomes: Any) -> Answer:
    """Answer successive calls with `outcomes` in turn (the last one again and again): a
    message is the reply, a `FakeRpcError` is raised."""
    queue = list(outcomes)

    def answer(wire: list[bytes]) -> list[bytes]:
        outcome = queue.pop(0) if len(queue) > 1 else queue[0]
        if isinstance(outcome, BaseException):
            raise outcome
        return [outcome.SerializeToString()]

    return answer


def model() -> dict[str, torch.Tensor]:
    generator = torch.Generator().manual_seed(1)
    return {
        "w": torch.randn(40, 50, generator=generator),
        "h": torch.randn(300, generator=generator).to(torch.bfloat16),
    }


def stream_bytes(tensors: dict[str, torch.Tensor]) -> bytes:
    return b"".join(tensor_bytes(t).tobytes() for t in tensors.values())


def join_reply(max_chunk_bytes: int = 0, heartbeat_seconds: float = 0.0) -> pb.JoinReply:
    return pb.JoinReply(
        client_id="c-1",
        token="tok",
        run_id="run",
        max_chunk_bytes=max_chunk_bytes,
        heartbeat_seconds=heartbeat_seconds,
    )


def download_answer(tensors: Mapping[str, torch.Tensor], version: int) -> Answer:
    """Serve `tensors` as the coordinator would: a header, then data chunks of the size
    the request asks for."""

    def answer(wire: list[bytes]) -> list[bytes]:
        request = pb.DownloadRequest.FromString(wire[0])
        header = pb.ModelHeader(
            model_version=version,
            manifest=Manifest.from_tensors(dict(tensors)).to_proto(),
            offset=request.offset,
        )
        chunks = iter_chunks(list(tensors.values()), request.chunk_bytes, request.offset)
        return [pb.ModelChunk(header=header).SerializeToString(), *map(frame_data, chunks)]

    return answer


def upload_answer(wire: list[bytes]) -> list[bytes]:
    return [pb.UploadReply(accepted=True, detail="booked").SerializeToString()]


class SmallModel(torch.nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.w = torch.nn.Parameter(torch.ones(3, 2))


class SmallTask(Task):
    """Training adds 1 to every weight, after `during_train` (a test's hook) returns."""

    during_train: Callable[[], object] = staticmethod(lambda: None)

    def build_model(self) -> torch.nn.Module:
        return SmallModel()

    def load_data(self, partition: int, num_partitions: int) -> None:
        pass

    def train(self, model: torch.nn.Module, config: Mapping[str, ConfigScalar]) -> TrainResult:
        self.during_train()
        with torch.no_grad():
            for p in model.parameters():
                p.add_(1.0)
        return TrainResult(4, {"loss": 0.5})


class UpperBound(random.Random):
    """Draws the top of every range it is asked for, and records the ranges."""

    def __init__(self) -> None:
        super().__init__(0)
        self.ranges: list[tuple[float, float]] = []

    def uniform(self, a: float, b: float) -> float:
        self.ranges.append((a, b))
        return b


def assert_holds(held: HeldModel, tensors: Mapping[str, torch.Tensor]) -> None:
    """`held` is complete and holds exactly `tensors`."""
    assert held.complete
    out = {name: torch.zeros_like(t) for name, t in tensors.items()}
    held.load_into(out)
    for name, tensor in tensors.items():
        assert torch.equal(out[name], tensor), name
