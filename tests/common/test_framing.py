"""Hand framing of the chunk messages is protobuf's wire format: what we frame by hand the
protobuf library parses, what the protobuf library serialises we parse, and what neither
can make sense of is a MalformedChunk with a reason."""

from __future__ import annotations

import pytest

from fedstream.common.proto.v1 import coordinator_pb2 as pb
from fedstream.common.wire.framing import (
    DATA_TAG,
    ChunkParser,
    MalformedChunk,
    encode_varint,
    frame_data,
    serialize_chunk,
)

ChunkType = type[pb.ModelChunk] | type[pb.UpdateChunk]
"""The two chunk messages whose `data` field is framed by hand."""

CHUNK_TYPES = [
    pytest.param(pb.ModelChunk, id="ModelChunk"),
    pytest.param(pb.UpdateChunk, id="UpdateChunk"),
]

# Around every boundary where the length's varint grows a byte.
SIZES = [0, 1, 127, 128, 16383, 16384, 2097151, 2097152]


def payload(size: int) -> bytes:
    return (bytes(range(251)) * (size // 251 + 1))[:size]


@pytest.mark.parametrize("value", [1, 127, 128, 300, 16383, 16384, (1 << 32) - 1, 1 << 63])
def test_varints_are_protobufs(value: int) -> None:
    # DownloadRequest.offset is uint64 field 2: tag 0x10, then the value as a varint.
    expected = pb.DownloadRequest(offset=value).SerializeToString()
    assert bytes((0x10,)) + encode_varint(value) == expected


def test_zero_is_one_byte() -> None:
    assert encode_varint(0) == b"\x00"


@pytest.mark.parametrize("chunk_type", CHUNK_TYPES)
@pytest.mark.parametrize("size", SIZES)
def test_hand_framed_data_is_what_protobuf_serialises(chunk_type: ChunkType, size: int) -> None:
    data = payload(size)
    framed = frame_data(data)
    assert framed == chunk_type(data=data).SerializeToString()
    parsed = chunk_type.FromString(framed)
    assert parsed.WhichOneof("payload") == "data"
    assert parsed.data == data


@pytest.mark.parametrize("kind", [bytes, bytearray, memoryview])
def test_frame_data_takes_any_buffer(kind: type) -> None:
    data = payload(300)
    assert frame_data(kind(data)) == frame_data(data)


def test_serialize_chunk_passes_framed_bytes_through_and_serialises_messages() -> None:
    framed = frame_data(b"abc")
    assert serialize_chunk(framed) is framed
    header = pb.UpdateChunk(header=pb.UpdateHeader(round=4, num_examples=12))
    assert serialize_chunk(header) == header.SerializeToString()
    assert pb.UpdateChunk.FromString(serialize_chunk(header)) == header


@pytest.mark.parametrize("chunk_type", CHUNK_TYPES)
@pytest.mark.parametrize("size", SIZES)
def test_protobufs_data_parses_to_a_zero_copy_view(chunk_type: ChunkType, size: int) -> None:
    data = payload(size)
    raw = chunk_type(data=data).SerializeToString()
    item = ChunkParser(chunk_type)(raw)
    assert isinstance(item, memoryview)
    assert item.tobytes() == data
    assert item.obj is raw  # a view into the received message, not a copy


def test_a_model_header_parses_to_the_header_message() -> None:
    header = pb.ModelHeader(model_version=5, offset=1024)
    header.manifest.tensors.add(name="w", dtype="BF16", shape=[3, 4], nbytes=24)
    header.manifest.codec = "raw"
    item = ChunkParser(pb.ModelChunk)(pb.ModelChunk(header=header).SerializeToString())
    assert isinstance(item, pb.ModelHeader)
    assert item == header


def test_an_update_header_parses_to_the_header_message() -> None:
    header = pb.UpdateHeader(round=2, model_version=1, num_examples=30, metrics={"loss": 0.25})
    item = ChunkParser(pb.UpdateChunk)(pb.UpdateChunk(header=header).SerializeToString())
    assert isinstance(item, pb.UpdateHeader)
    assert item == header


def test_data_framed_differently_still_parses_as_protobuf_would() -> None:
    """Another implementation may put an unknown field first, or repeat the field (the last
    one wins): not our fast path, but still a data chunk."""
    parse: ChunkParser[pb.UpdateHeader] = ChunkParser(pb.UpdateChunk)
    unknown_first = bytes((9 << 3 | 0, 1)) + frame_data(b"payload")
    item = parse(unknown_first)
    assert isinstance(item, memoryview) and item.tobytes() == b"payload"
    repeated = frame_data(b"first") + frame_data(b"second")
    item = parse(repeated)
    assert isinstance(item, memoryview) and item.tobytes() == b"second"
    long_length = bytes((DATA_TAG, 0x83, 0x00)) + b"abc"  # length 3, as a two-byte varint
    item = parse(long_length)
    assert isinstance(item, memoryview) and item.tobytes() == b"abc"


@pytest.mark.parametrize(
    ("raw", "reason"),
    [
        pytest.param(b"\xff\xff\xff", "undecodable", id="garbage"),
        pytest.param(frame_data(b"abcdef")[:-2], "undecodable", id="truncated-data"),
        pytest.param(bytes((DATA_TAG,)) + b"\x80" * 11, "undecodable", id="endless-varint"),
        pytest.param(b"", "neither header nor data", id="empty-message"),
        pytest.param(bytes((9 << 3 | 0, 1)), "neither header nor data", id="unknown-field-only"),
    ],
)
def test_malformed_chunks_say_why(raw: bytes, reason: str) -> None:
    item = ChunkParser(pb.UpdateChunk)(raw)
    assert isinstance(item, MalformedChunk)
    assert reason in item.reason
