"""Hand framing of the bulk chunk messages, wire-compatible with protobuf.

`ModelChunk` and `UpdateChunk` both carry their payload as field 2 (`bytes data`). Going
through the protobuf library costs an extra copy of every payload each way, so data
chunks are framed by hand on send (tag, length, payload: one copy into the message) and
parsed by hand on receive (a zero-copy view of the payload). Anything else, such as the
header message or a chunk framed differently by another protobuf implementation, goes
through the protobuf parser, so any protobuf peer still speaks to us.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Generic, Protocol, TypeVar

from google.protobuf.message import DecodeError, Message

DATA_TAG = (2 << 3) | 2  # field 2, wire type 2 (length-delimited)


class _ChunkMessage(Protocol):
    def WhichOneof(self, name: str) -> str | None: ...  # noqa: N802 (protobuf API)


H = TypeVar("H", bound=Message)


@dataclass(frozen=True)
class MalformedMessage:
    """A received message that could not be decoded, in place of the message: the RPC
    handler turns it into a status (INVALID_ARGUMENT) instead of grpc answering UNKNOWN
    for an exception raised inside its deserializer."""

    reason: str


class MalformedChunk(MalformedMessage):
    """A chunk of a bulk stream that could not be decoded."""


def encode_varint(value: int) -> bytes:
    out = bytearray()
    while True:
        byte = value & 0x7F
        value >>= 7
        if value:
            out.append(byte | 0x80)
        else:
            out.append(byte)
            return bytes(out)


def frame_data(payload: bytes | bytearray | memoryview) -> bytes:
    """A serialised chunk message whose only field is `data = payload`."""
    return b"".join((bytes((DATA_TAG,)), encode_varint(len(payload)), payload))


def serialize_chunk(item: bytes | Message) -> bytes:
    """gRPC serializer for chunk streams: pre-framed bytes pass through, messages serialise."""
    if isinstance(item, bytes):
        return item
    return item.SerializeToString()


def _fast_data_view(raw: bytes) -> memoryview | None:
    """The payload of `raw` if it is exactly one data field, without copying it."""
    if not raw or raw[0] != DATA_TAG:
        return None
    length = 0
    shift = 0
    pos = 1
    while pos < len(raw) and pos <= 10:
        byte = raw[pos]
        length |= (byte & 0x7F) << shift
        pos += 1
        if not byte & 0x80:
            return memoryview(raw)[pos:] if pos + length == len(raw) else None
        shift += 7
    return None


class ChunkParser(Generic[H]):
    """gRPC deserializer for a chunk stream: a header message, a payload view, or a failure."""

    def __init__(self, chunk_type: type[Message], header_field: str = "header") -> None:
        self.chunk_type = chunk_type
        self.header_field = header_field

    def __call__(self, raw: bytes) -> H | memoryview | MalformedChunk:
        view = _fast_data_view(raw)
        if view is not None:
            return view
        try:
            message = self.chunk_type.FromString(raw)
        except DecodeError as exc:
            return MalformedChunk(f"undecodable chunk message: {exc}")
        kind = message.WhichOneof("payload")
        if kind == "data":
            return memoryview(message.data)  # type: ignore[attr-defined]
        if kind == self.header_field:
            return getattr(message, self.header_field)  # type: ignore[no-any-return]
        if kind is not None:  # another member of the payload (an upload's trailer)
            return getattr(message, kind)  # type: ignore[no-any-return]
        return MalformedChunk("chunk message carries neither header nor data")
