"""The Coordinator service as both sides speak it: its name, its methods, its credentials.

The generated `coordinator_pb2_grpc` stubs send every message through the protobuf
library. The bulk chunk messages (`ModelChunk`, `UpdateChunk`) are framed by hand instead
(`common/wire/framing.py`), so the server registers, and the client calls, the service through
this table. The table is read from the service's descriptor, so it cannot drift from
protos/: the only thing written here is which messages are framed by hand.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from typing import Any, TypeAlias

import grpc
from google.protobuf.descriptor import Descriptor, MethodDescriptor
from google.protobuf.message import DecodeError, Message

from fedstream.common.proto.v1 import coordinator_pb2 as pb
from fedstream.common.wire.framing import ChunkParser, MalformedMessage, serialize_chunk

_SERVICE = pb.DESCRIPTOR.services_by_name["Coordinator"]
SERVICE_NAME: str = _SERVICE.full_name

FRAMED: frozenset[type[Message]] = frozenset({pb.ModelChunk, pb.UpdateChunk})
"""The chunk messages whose data is framed by hand, both ways."""

Serializer = Callable[[Any], bytes]
Deserializer = Callable[[bytes], Any]
MultiCallable: TypeAlias = (
    grpc.UnaryUnaryMultiCallable
    | grpc.UnaryStreamMultiCallable
    | grpc.StreamUnaryMultiCallable
    | grpc.StreamStreamMultiCallable
)


@dataclass(frozen=True)
class Method:
    """One RPC: its path, its cardinality, and how its messages cross the wire.

    A framed message serialises with `serialize_chunk` (pre-framed bytes pass through) and
    deserialises with a `ChunkParser` (a header message, a zero-copy data view, or a
    `MalformedChunk`); every other message goes through the protobuf library, and a
    request that does not decode reaches the handler as a `MalformedMessage`.
    """

    name: str
    path: str
    request_streaming: bool
    response_streaming: bool
    request_serializer: Serializer
    request_deserializer: Deserializer
    response_serializer: Serializer
    response_deserializer: Deserializer


def _message_class(descriptor: Descriptor) -> type[Message]:
    cls: type[Message] = getattr(pb, descriptor.name)
    return cls


class MessageParser:
    """The server's deserializer for a plain request message: the message, or a
    `MalformedMessage` for bytes that do not decode as one. It never raises: an exception
    inside grpc's deserializer reaches the client as UNKNOWN, with no word of what was
    wrong."""

    def __init__(self, message: type[Message]) -> None:
        self.message = message

    def __call__(self, raw: bytes) -> Message | MalformedMessage:
        try:
            return self.message.FromString(raw)
        except DecodeError as exc:
            name = self.message.DESCRIPTOR.name
            return MalformedMessage(f"undecodable {name} message of {len(raw)} bytes: {exc}")


def _codec(message: type[Message], received_by_server: bool) -> tuple[Serializer, Deserializer]:
    if message in FRAMED:
        return serialize_chunk, ChunkParser(message)
    if received_by_server:
        return message.SerializeToString, MessageParser(message)
    # A client's grpc turns an exception raised here into an RpcError (INTERNAL), which
    # its retry logic handles by status code like any other.
    return message.SerializeToString, message.FromString


def _method(descriptor: MethodDescriptor) -> Method:
    request = _message_class(descriptor.input_type)
    request_serializer, request_deserializer = _codec(request, received_by_server=True)
    response = _message_class(descriptor.output_type)
    response_serializer, response_deserializer = _codec(response, received_by_server=False)
    return Method(
        name=descriptor.name,
        path=f"/{SERVICE_NAME}/{descriptor.name}",
        request_streaming=descriptor.client_streaming,
        response_streaming=descriptor.server_streaming,
        request_serializer=request_serializer,
        request_deserializer=request_deserializer,
        response_serializer=response_serializer,
        response_deserializer=response_deserializer,
    )


METHODS: dict[str, Method] = {m.name: _method(m) for m in _SERVICE.methods}
"""Every RPC of the Coordinator service, by name ("Join", "Download", ...)."""

_HANDLER_OF_CARDINALITY = {
    (False, False): grpc.unary_unary_rpc_method_handler,
    (False, True): grpc.unary_stream_rpc_method_handler,
    (True, False): grpc.stream_unary_rpc_method_handler,
    (True, True): grpc.stream_stream_rpc_method_handler,
}


def method_handlers(behaviours: Mapping[str, Callable[..., Any]]) -> grpc.GenericRpcHandler:
    """The server's handler for the whole service: `behaviours[name]` serves RPC `name`.

    ValueError naming them when a method of the service has no behaviour or a behaviour
    names no method of the service.
    """
    missing = sorted(set(METHODS) - set(behaviours))
    unknown = sorted(set(behaviours) - set(METHODS))
    if missing or unknown:
        raise ValueError(
            f"behaviours for {SERVICE_NAME}: missing {missing or 'none'}, "
            f"unknown {unknown or 'none'}"
        )
    handlers = {
        name: _HANDLER_OF_CARDINALITY[method.request_streaming, method.response_streaming](
            behaviours[name],
            request_deserializer=method.request_deserializer,
            response_serializer=method.response_serializer,
        )
        for name, method in METHODS.items()
    }
    return grpc.method_handlers_generic_handler(SERVICE_NAME, handlers)


def stub(
    channel: grpc.Channel,
    method: str,
    request_serializer: Serializer | None = None,
    response_deserializer: Deserializer | None = None,
) -> MultiCallable:
    """The client's callable for RPC `method` on `channel` (KeyError for no such RPC), with
    the method's own (de)serializers unless others are given (raw bytes, for tests)."""
    m = METHODS[method]
    match m.request_streaming, m.response_streaming:
        case False, False:
            factory = channel.unary_unary
        case False, True:
            factory = channel.unary_stream
        case True, False:
            factory = channel.stream_unary
        case _:
            factory = channel.stream_stream
    return factory(
        m.path,
        request_serializer=request_serializer or m.request_serializer,
        response_deserializer=response_deserializer or m.response_deserializer,
    )


AUTHORIZATION = "authorization"
BEARER_PREFIX = "Bearer "


def bearer_metadata(token: str) -> tuple[tuple[str, str], ...]:
    """Call metadata presenting session `token` (what Join handed out)."""
    return ((AUTHORIZATION, BEARER_PREFIX + token),)


def bearer_token(metadata: Iterable[tuple[str, str | bytes]] | None) -> str | None:
    """The token of the first `authorization: Bearer <token>` entry; None without one."""
    for key, value in metadata or ():
        if key == AUTHORIZATION and isinstance(value, str) and value.startswith(BEARER_PREFIX):
            return value[len(BEARER_PREFIX) :]
    return None
