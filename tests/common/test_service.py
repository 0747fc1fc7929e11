"""The service table both sides use: every RPC with its cardinality and (de)serializers, and
the bearer credentials. Handlers and stubs are inspected directly; one test serves junk
over real gRPC on loopback."""

from __future__ import annotations

from collections.abc import Callable
from concurrent import futures
from dataclasses import dataclass
from typing import Any

import grpc
import pytest

from fedstream.common.proto.v1 import coordinator_pb2 as pb
from fedstream.common.service import (
    BEARER_PREFIX,
    METHODS,
    SERVICE_NAME,
    Method,
    bearer_metadata,
    bearer_token,
    method_handlers,
    stub,
)
from fedstream.common.wire.framing import MalformedChunk, MalformedMessage, frame_data

SERVICE = pb.DESCRIPTOR.services_by_name["Coordinator"]

CARDINALITY = {
    "Join": (False, False),
    "Poll": (False, False),
    "Download": (False, True),
    "Upload": (True, False),
    "UploadOffset": (False, False),
    "ReportEvaluation": (False, False),
    "Heartbeat": (False, False),
}
"""What the clients and the servicer are written for; a proto change shows here."""


def test_service_name_is_the_protos() -> None:
    assert SERVICE_NAME == "fedstream.v1.Coordinator"


def test_every_rpc_of_the_service_is_in_the_table() -> None:
    assert sorted(METHODS) == sorted(m.name for m in SERVICE.methods)
    for descriptor in SERVICE.methods:
        method = METHODS[descriptor.name]
        assert method.name == descriptor.name
        assert method.path == f"/fedstream.v1.Coordinator/{descriptor.name}"
        assert method.request_streaming == descriptor.client_streaming
        assert method.response_streaming == descriptor.server_streaming


@pytest.mark.parametrize("name", sorted(CARDINALITY))
def test_cardinality(name: str) -> None:
    method = METHODS[name]
    assert (method.request_streaming, method.response_streaming) == CARDINALITY[name]


def test_download_responses_are_framed_by_hand() -> None:
    method = METHODS["Download"]
    framed = frame_data(b"tensor bytes")
    assert method.response_serializer(framed) is framed
    view = method.response_deserializer(framed)
    assert isinstance(view, memoryview) and view.tobytes() == b"tensor bytes"
    header = pb.ModelChunk(header=pb.ModelHeader(model_version=3, offset=7))
    parsed = method.response_deserializer(method.response_serializer(header))
    assert parsed == header.header
    assert isinstance(method.response_deserializer(b"\xff\xff\xff"), MalformedChunk)


def test_upload_requests_are_framed_by_hand() -> None:
    method = METHODS["Upload"]
    framed = frame_data(b"delta bytes")
    assert method.request_serializer(framed) is framed
    view = method.request_deserializer(framed)
    assert isinstance(view, memoryview) and view.tobytes() == b"delta bytes"
    header = pb.UpdateChunk(header=pb.UpdateHeader(round=2, num_examples=9))
    assert method.request_deserializer(method.request_serializer(header)) == header.header


@pytest.mark.parametrize(
    ("name", "request_message", "response_message"),
    [
        pytest.param(
            "Join",
            pb.JoinRequest(name="a", task="t"),
            pb.JoinReply(token="x", max_chunk_bytes=9),
            id="Join",
        ),
        pytest.param(
            "Poll", pb.PollRequest(), pb.PollReply(wait=pb.Wait(retry_after_seconds=1.5)), id="Poll"
        ),
        pytest.param(
            "Download",
            pb.DownloadRequest(model_version=4, offset=10, chunk_bytes=1024),
            None,
            id="Download",
        ),
        pytest.param("Upload", None, pb.UploadReply(accepted=True, detail="ok"), id="Upload"),
        pytest.param(
            "ReportEvaluation",
            pb.EvaluationReport(round=1, num_examples=5, metrics={"loss": 0.5}),
            pb.EvaluationReply(accepted=True),
            id="ReportEvaluation",
        ),
        pytest.param(
            "Heartbeat",
            pb.HeartbeatRequest(round=3),
            pb.HeartbeatReply(phase_open=True),
            id="Heartbeat",
        ),
    ],
)
def test_plain_messages_round_trip_through_protobuf(
    name: str, request_message: Any, response_message: Any
) -> None:
    method = METHODS[name]
    if request_message is not None:
        raw = method.request_serializer(request_message)
        assert raw == request_message.SerializeToString()
        assert method.request_deserializer(raw) == request_message
    if response_message is not None:
        raw = method.response_serializer(response_message)
        assert raw == response_message.SerializeToString()
        assert method.response_deserializer(raw) == response_message


JUNK = [b"\xff\xff\xff", b"\x08", b"\x0a\x05ab"]
"""An invalid wire type, a varint cut short, a length past the end."""


@pytest.mark.parametrize("name", sorted(METHODS))
@pytest.mark.parametrize("raw", JUNK, ids=["wire-type", "short-varint", "short-length"])
def test_a_server_deserializer_never_raises_on_junk(name: str, raw: bytes) -> None:
    parsed = METHODS[name].request_deserializer(raw)
    assert isinstance(parsed, MalformedMessage)
    assert parsed.reason


def test_a_malformed_plain_request_names_its_message_type() -> None:
    parsed = METHODS["Join"].request_deserializer(b"\xff")
    assert isinstance(parsed, MalformedMessage) and not isinstance(parsed, MalformedChunk)
    assert "undecodable JoinRequest message of 1 bytes" in parsed.reason


def test_junk_to_a_plain_rpc_reaches_the_handler_over_grpc() -> None:
    """grpc answers UNKNOWN for a deserializer that raises; ours hands the handler a value
    it can refuse precisely."""
    seen: list[Any] = []

    def join(request: Any, context: grpc.ServicerContext) -> pb.JoinReply:
        seen.append(request)
        if isinstance(request, MalformedMessage):
            context.abort(grpc.StatusCode.INVALID_ARGUMENT, request.reason)
        return pb.JoinReply()

    behaviours: dict[str, Callable[..., Any]] = {name: behaviour(name) for name in METHODS}
    behaviours["Join"] = join
    server = grpc.server(futures.ThreadPoolExecutor(2))
    server.add_generic_rpc_handlers((method_handlers(behaviours),))
    port = server.add_insecure_port("127.0.0.1:0")
    server.start()
    try:
        with grpc.insecure_channel(f"127.0.0.1:{port}") as channel:
            raw_join = channel.unary_unary(
                METHODS["Join"].path,
                request_serializer=lambda raw: raw,
                response_deserializer=pb.JoinReply.FromString,
            )
            with pytest.raises(grpc.RpcError) as refused:
                raw_join(b"\xff\xff\xff", timeout=10)
            assert refused.value.code() == grpc.StatusCode.INVALID_ARGUMENT
            assert "undecodable JoinRequest" in (refused.value.details() or "")
            good = pb.JoinRequest(name="c", task="t")
            assert raw_join(good.SerializeToString(), timeout=10) == pb.JoinReply()
    finally:
        server.stop(None)
    assert isinstance(seen[0], MalformedMessage) and seen[1] == good


@dataclass
class CallDetails:
    """What grpc hands a generic handler: the method path of the incoming call."""

    method: str


def behaviour(name: str) -> Callable[..., str]:
    def serve(request: Any, context: Any) -> str:
        return name

    return serve


def test_method_handlers_register_every_method_with_its_codec() -> None:
    behaviours = {name: behaviour(name) for name in METHODS}
    handler = method_handlers(behaviours)
    for name, method in METHODS.items():
        served = handler.service(CallDetails(method.path))
        assert served is not None, name
        assert served.request_streaming == method.request_streaming
        assert served.response_streaming == method.response_streaming
        assert served.request_deserializer is method.request_deserializer
        assert served.response_serializer is method.response_serializer
        kind = {
            (False, False): served.unary_unary,
            (False, True): served.unary_stream,
            (True, False): served.stream_unary,
            (True, True): served.stream_stream,
        }[method.request_streaming, method.response_streaming]
        assert kind is behaviours[name]
    assert handler.service(CallDetails("/fedstream.v1.Coordinator/Nope")) is None


def test_method_handlers_name_a_missing_behaviour() -> None:
    behaviours = {name: behaviour(name) for name in METHODS if name != "Upload"}
    with pytest.raises(ValueError, match="Upload"):
        method_handlers(behaviours)


def test_method_handlers_name_an_unknown_behaviour() -> None:
    behaviours = {name: behaviour(name) for name in METHODS}
    behaviours["Downlaod"] = behaviour("Downlaod")
    with pytest.raises(ValueError, match="Downlaod"):
        method_handlers(behaviours)


class RecordingChannel(grpc.Channel):
    """A channel that records which multicallable each stub asked for; no connection."""

    def __init__(self) -> None:
        self.made: list[tuple[str, str, Any, Any]] = []

    def _make(self, kind: str, path: str, serializer: Any, deserializer: Any) -> str:
        self.made.append((kind, path, serializer, deserializer))
        return kind

    def unary_unary(
        self, method: str, request_serializer: Any = None, response_deserializer: Any = None
    ) -> str:
        return self._make("unary_unary", method, request_serializer, response_deserializer)

    def unary_stream(
        self, method: str, request_serializer: Any = None, response_deserializer: Any = None
    ) -> str:
        return self._make("unary_stream", method, request_serializer, response_deserializer)

    def stream_unary(
        self, method: str, request_serializer: Any = None, response_deserializer: Any = None
    ) -> str:
        return self._make("stream_unary", method, request_serializer, response_deserializer)

    def stream_stream(
        self, method: str, request_serializer: Any = None, response_deserializer: Any = None
    ) -> str:
        return self._make("stream_stream", method, request_serializer, response_deserializer)

    def subscribe(self, callback: Any, try_to_connect: bool = False) -> None:
        raise NotImplementedError

    def unsubscribe(self, callback: Any) -> None:
        raise NotImplementedError

    def close(self) -> None:
        pass


@pytest.mark.parametrize("name", sorted(METHODS))
def test_stub_calls_with_the_methods_cardinality_and_codec(name: str) -> None:
    channel = RecordingChannel()
    method: Method = METHODS[name]
    made = stub(channel, name)
    kind = {
        (False, False): "unary_unary",
        (False, True): "unary_stream",
        (True, False): "stream_unary",
        (True, True): "stream_stream",
    }[CARDINALITY[name]]
    assert made == kind
    assert channel.made == [
        (kind, method.path, method.request_serializer, method.response_deserializer)
    ]


def test_stub_refuses_an_unknown_method() -> None:
    with pytest.raises(KeyError):
        stub(RecordingChannel(), "Nope")


def test_bearer_round_trip() -> None:
    metadata = bearer_metadata("s3cr3t-token")
    assert metadata == (("authorization", "Bearer s3cr3t-token"),)
    assert bearer_token(metadata) == "s3cr3t-token"
    other = (("user-agent", "x"), ("trace-bin", b"\x00"))
    assert bearer_token(other + metadata) == "s3cr3t-token"


@pytest.mark.parametrize(
    "metadata",
    [
        None,
        (),
        (("user-agent", "fedstream"),),
        (("authorization", "Basic dXNlcjpwYXNz"),),
        (("authorization", b"Bearer bytes-are-not-a-header"),),
        (("x-authorization", f"{BEARER_PREFIX}t"),),
    ],
    ids=["none", "empty", "no-authorization", "basic", "bytes", "other-key"],
)
def test_no_bearer_token(metadata: Any) -> None:
    assert bearer_token(metadata) is None
