"""Tests of the wire format: manifests, chunking, assembly, and the trust boundary."""

from __future__ import annotations

from collections.abc import Callable, Iterable

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from fedstream.client.held_model import HeldModel
from fedstream.common.errors import InvalidManifest, LimitExceeded, WireError
from fedstream.common.proto.v1 import coordinator_pb2 as pb
from fedstream.common.wire.manifest import DTYPES, Manifest, ManifestLimits, TensorEntry, dtype_name
from fedstream.common.wire.stream import iter_chunks, tensor_bytes

LAYOUTS = ("contiguous", "transposed", "sliced")


def random_bits(dtype: torch.dtype, shape: tuple[int, ...], seed: int) -> torch.Tensor:
    """A contiguous tensor of arbitrary bit patterns (NaNs, -0.0, subnormals included)."""
    gen = torch.Generator().manual_seed(seed)
    numel = 1
    for dim in shape:
        numel *= dim
    high = 2 if dtype == torch.bool else 256  # a bool byte other than 0 or 1 is invalid
    raw = torch.randint(0, high, (numel * dtype.itemsize,), dtype=torch.uint8, generator=gen)
    return raw.view(dtype).reshape(shape)


@st.composite
def tensors(draw: st.DrawFn) -> torch.Tensor:
    """A tensor of any wire dtype and random shape, often not contiguous."""
    dtype = draw(st.sampled_from(list(DTYPES.values())))
    shape = tuple(draw(st.lists(st.integers(0, 6), max_size=3)))
    layout = draw(st.sampled_from(LAYOUTS))
    seed = draw(st.integers(0, 2**32 - 1))
    if layout == "transposed" and len(shape) >= 2:
        base = random_bits(dtype, (*shape[:-2], shape[-1], shape[-2]), seed)
        return base.transpose(-1, -2)
    if layout == "sliced" and shape:
        base = random_bits(dtype, (*shape[:-1], 2 * shape[-1] + 1), seed)
        return base[..., 1::2]
    return random_bits(dtype, shape, seed)


state_dicts = st.lists(tensors(), min_size=1, max_size=5).map(
    lambda ts: {f"layer{i}.weight": t for i, t in enumerate(ts)}
)


def raw_bytes(t: torch.Tensor) -> bytes:
    return bytes(tensor_bytes(t.contiguous()))


def stream_bytes(state: dict[str, torch.Tensor]) -> bytes:
    return b"".join(raw_bytes(t) for t in state.values())


def assert_bit_exact(got: dict[str, torch.Tensor], want: dict[str, torch.Tensor]) -> None:
    assert list(got) == list(want)
    for name, tensor in want.items():
        assert got[name].dtype == tensor.dtype, name
        assert got[name].shape == tensor.shape, name
        assert raw_bytes(got[name]) == raw_bytes(tensor), name


def received(manifest: Manifest, chunks: Iterable[bytes | memoryview]) -> dict[str, torch.Tensor]:
    """What a client holds after receiving `chunks`: written as they arrive to its held
    copy of the model (the receiving side of the codec), then loaded into fresh tensors."""
    held = HeldModel(manifest, version=0)
    try:
        for chunk in chunks:
            held.write(chunk)
        out = {e.name: torch.empty(e.shape, dtype=e.dtype) for e in manifest.entries}
        held.load_into(out)
        return out
    finally:
        held.close()


def valid_proto() -> pb.Manifest:
    return Manifest.from_tensors(
        {"embed": torch.zeros(4, 3), "head.bias": torch.zeros(2, dtype=torch.bfloat16)}
    ).to_proto()


# Round trips


@settings(max_examples=300, deadline=None)
@given(state=state_dicts, data=st.data())
def test_round_trip_is_bit_exact_for_any_chunk_size(
    state: dict[str, torch.Tensor], data: st.DataObject
) -> None:
    manifest = Manifest.from_tensors(state)
    total = manifest.total_bytes
    chunk_size = data.draw(st.integers(1, total + 16), label="chunk_size")

    chunks = list(iter_chunks(list(state.values()), chunk_size))

    assert b"".join(chunks) == stream_bytes(state)
    assert all(len(c) == chunk_size for c in chunks[:-1])
    assert not chunks or 0 < len(chunks[-1]) <= chunk_size
    assert_bit_exact(received(manifest, chunks), state)


@settings(max_examples=200, deadline=None)
@given(state=state_dicts, data=st.data())
def test_chunks_re_split_differently_still_assemble(
    state: dict[str, torch.Tensor], data: st.DataObject
) -> None:
    manifest = Manifest.from_tensors(state)
    stream = b"".join(iter_chunks(list(state.values()), 7))
    cuts = sorted(data.draw(st.lists(st.integers(0, len(stream)), max_size=10), label="cuts"))

    pieces = [
        memoryview(stream)[start:end]  # empty pieces included
        for start, end in zip([0, *cuts], [*cuts, len(stream)], strict=True)
    ]

    assert_bit_exact(received(manifest, pieces), state)


@settings(max_examples=200, deadline=None)
@given(state=state_dicts, data=st.data())
def test_resume_from_any_offset_completes_the_same_stream(
    state: dict[str, torch.Tensor], data: st.DataObject
) -> None:
    manifest = Manifest.from_tensors(state)
    total = manifest.total_bytes
    offset = data.draw(st.integers(0, total), label="offset")
    chunk_size = data.draw(st.integers(1, total + 16), label="chunk_size")
    stream = stream_bytes(state)

    tail = list(iter_chunks(list(state.values()), chunk_size, offset=offset))

    assert b"".join(tail) == stream[offset:]
    assert all(len(c) == chunk_size for c in tail[:-1])
    assert_bit_exact(received(manifest, [stream[:offset], *tail]), state)


@settings(max_examples=50, deadline=None)
@given(state=state_dicts)
def test_manifest_proto_round_trip(state: dict[str, torch.Tensor]) -> None:
    manifest = Manifest.from_tensors(state, codec="zstd")
    wire = manifest.to_proto().SerializeToString()

    back = Manifest.from_proto(pb.Manifest.FromString(wire))

    assert back == manifest
    assert back.names == tuple(state)
    assert back.total_bytes == sum(t.numel() * t.element_size() for t in state.values())


def test_every_bf16_and_f16_bit_pattern_survives() -> None:
    bits = torch.arange(-(2**15), 2**15, dtype=torch.int32).to(torch.int16)
    state = {"bf16": bits.view(torch.bfloat16), "f16": bits.view(torch.float16)}
    got = received(Manifest.from_tensors(state), iter_chunks(list(state.values()), 1000))

    assert torch.equal(got["bf16"].view(torch.int16), bits)
    assert torch.equal(got["f16"].view(torch.int16), bits)


def test_zero_d_empty_and_bool_tensors() -> None:
    state = {
        "scalar": torch.tensor(-0.0),
        "empty": torch.empty(0, 5),
        "mask": torch.tensor([True, False, True]),
        "step": torch.tensor(7, dtype=torch.int64),
    }
    manifest = Manifest.from_tensors(state)
    assert manifest.total_bytes == 4 + 0 + 3 + 8
    got = received(manifest, iter_chunks(list(state.values()), 3))

    assert_bit_exact(got, state)
    assert torch.signbit(got["scalar"])


# iter_chunks


def test_interior_chunks_are_zero_copy_views_and_spanning_chunks_are_joined() -> None:
    a = torch.zeros(10, dtype=torch.uint8)
    b = torch.ones(10, dtype=torch.uint8)

    chunks = list(iter_chunks([a, b], 4))

    assert [type(c) for c in chunks] == [memoryview, memoryview, bytes, memoryview, memoryview]
    assert [len(c) for c in chunks] == [4, 4, 4, 4, 4]
    assert bytes(chunks[2]) == b"\x00\x00\x01\x01"
    a[0] = 42
    b[-1] = 43
    assert chunks[0][0] == 42  # shares the tensor's memory
    assert chunks[-1][-1] == 43


def test_last_chunk_inside_one_tensor_is_a_view() -> None:
    chunks = list(iter_chunks([torch.zeros(3)], 5))

    assert [type(c) for c in chunks] == [memoryview, memoryview, memoryview]
    assert [len(c) for c in chunks] == [5, 5, 2]


def test_empty_tensors_contribute_nothing() -> None:
    tensors = [torch.empty(0), torch.ones(1, dtype=torch.uint8), torch.empty(3, 0)]

    assert [bytes(c) for c in iter_chunks(tensors, 4)] == [b"\x01"]
    assert list(iter_chunks([torch.empty(0)], 4)) == []


@pytest.mark.parametrize("chunk_size", [0, -1])
def test_iter_chunks_rejects_a_non_positive_chunk_size(chunk_size: int) -> None:
    with pytest.raises(ValueError, match="chunk_size"):
        iter_chunks([torch.zeros(2)], chunk_size)


def test_iter_chunks_offset_bounds() -> None:
    tensors = [torch.zeros(2)]
    assert list(iter_chunks(tensors, 4, offset=8)) == []
    with pytest.raises(ValueError, match="offset"):
        iter_chunks(tensors, 4, offset=-1)
    with pytest.raises(ValueError, match="past the end"):
        list(iter_chunks(tensors, 4, offset=9))


def test_tensor_bytes_refuses_non_contiguous_tensors() -> None:
    with pytest.raises(ValueError, match="contiguous"):
        tensor_bytes(torch.zeros(3, 4).t())


@pytest.mark.parametrize(
    "t",
    [
        torch.arange(5.0)[2:3:2],  # contiguous, but its one dimension has stride 2
        torch.arange(20.0).reshape(5, 4)[1:2, 1:2],
        torch.arange(5.0)[0:0:2],
        torch.tensor(3.0),
    ],
)
def test_tensor_bytes_of_contiguous_tensors_with_odd_strides(t: torch.Tensor) -> None:
    assert (
        bytes(tensor_bytes(t)) == t.clone(memory_format=torch.contiguous_format).numpy().tobytes()
    )


def test_tensor_bytes_of_bf16_is_its_raw_bits() -> None:
    t = torch.tensor([1.0, -2.0], dtype=torch.bfloat16)

    view = tensor_bytes(t)

    assert view.format == "B"
    assert bytes(view) == t.view(torch.int16).numpy().tobytes()


# Manifests


def test_dtype_names() -> None:
    assert all(dtype_name(dtype) == name for name, dtype in DTYPES.items())
    with pytest.raises(InvalidManifest, match="complex64"):
        dtype_name(torch.complex64)
    with pytest.raises(InvalidManifest, match="not supported"):
        Manifest.from_tensors({"z": torch.zeros(2, dtype=torch.complex64)})


def test_tensor_entry_sizes() -> None:
    entry = TensorEntry("w", torch.bfloat16, (3, 0, 2))
    assert (entry.numel, entry.nbytes) == (0, 0)
    scalar = TensorEntry("s", torch.float64, ())
    assert (scalar.numel, scalar.nbytes) == (1, 8)


def _duplicate(msg: pb.Manifest) -> None:
    msg.tensors[1].name = "embed"


def _unknown_dtype(msg: pb.Manifest) -> None:
    msg.tensors[1].dtype = "F8_E4M3"


def _negative_dim(msg: pb.Manifest) -> None:
    msg.tensors[0].shape[:] = [-4, -3]


def _nbytes_mismatch(msg: pb.Manifest) -> None:
    msg.tensors[0].nbytes += 1


def _nbytes_wraps_around_64_bits(msg: pb.Manifest) -> None:
    # 2**62 float32 elements are 2**64 bytes: 0 in a uint64 that overflowed.
    msg.tensors[0].shape[:] = [2**31, 2**31]
    msg.tensors[0].nbytes = 0


def _too_many_tensors(msg: pb.Manifest) -> None:
    msg.tensors.add(name="extra", dtype="U8", shape=[1], nbytes=1)


def _empty_name(msg: pb.Manifest) -> None:
    msg.tensors[0].name = ""


def _long_name(msg: pb.Manifest) -> None:
    msg.tensors[1].name = "é" * 40  # 80 bytes of UTF-8, 40 characters


def _too_many_dims(msg: pb.Manifest) -> None:
    msg.tensors[1].shape[:] = [1] * 5
    msg.tensors[1].nbytes = 2


def _tensor_too_big(msg: pb.Manifest) -> None:
    msg.tensors[0].shape[:] = [100, 100]
    msg.tensors[0].nbytes = 40_000


def _total_too_big(msg: pb.Manifest) -> None:
    msg.tensors[0].shape[:] = [90, 90]
    msg.tensors[0].nbytes = 32_400
    msg.tensors[1].shape[:] = [90, 90]
    msg.tensors[1].nbytes = 16_200


def _empty_codec(msg: pb.Manifest) -> None:
    msg.codec = ""


TIGHT = ManifestLimits(
    max_tensors=2, max_ndim=4, max_name_bytes=64, max_total_bytes=40_000, max_tensor_bytes=33_000
)


@pytest.mark.parametrize(
    ("corrupt", "error", "message"),
    [
        (_duplicate, InvalidManifest, "tensor 1 ('embed'): duplicate name"),
        (_unknown_dtype, InvalidManifest, "tensor 1 ('head.bias'): dtype 'F8_E4M3' is not one of"),
        (_negative_dim, InvalidManifest, "tensor 0 ('embed'): shape [-4, -3] has a negative"),
        (_nbytes_mismatch, InvalidManifest, "tensor 0 ('embed'): nbytes is 49 but"),
        (_nbytes_wraps_around_64_bits, InvalidManifest, "takes 18446744073709551616"),
        (_too_many_tensors, LimitExceeded, "manifest lists 3 tensors; the limit is 2"),
        (_empty_name, InvalidManifest, "tensor 0: name is empty"),
        (_long_name, LimitExceeded, "name is 80 bytes; the limit is 64"),
        (_too_many_dims, LimitExceeded, "tensor 1 ('head.bias'): shape has 5 dimensions"),
        (_tensor_too_big, LimitExceeded, "tensor 0 ('embed'): nbytes 40000 exceeds"),
        (_total_too_big, LimitExceeded, "tensor 1 ('head.bias'): total bytes reach 48600"),
        (_empty_codec, InvalidManifest, "codec is empty"),
    ],
)
def test_from_proto_rejects(
    corrupt: Callable[[pb.Manifest], None], error: type[Exception], message: str
) -> None:
    msg = valid_proto()
    Manifest.from_proto(msg, TIGHT)  # the uncorrupted manifest passes these limits
    corrupt(msg)

    with pytest.raises(error) as excinfo:
        Manifest.from_proto(msg, TIGHT)

    assert message in str(excinfo.value)


def test_from_proto_bounds_a_huge_tensor_under_default_limits() -> None:
    msg = pb.Manifest(codec="raw")
    msg.tensors.add(name="huge", dtype="F32", shape=[2**20, 2**20], nbytes=2**42)

    with pytest.raises(LimitExceeded, match="'huge'"):
        Manifest.from_proto(msg)


def test_require_same_layout_accepts_equal_layouts_whatever_the_codec() -> None:
    state = {"a": torch.zeros(2), "b": torch.zeros(3, dtype=torch.int8)}
    Manifest.from_tensors(state).require_same_layout(Manifest.from_tensors(state, codec="zstd"))


@pytest.mark.parametrize(
    ("other", "message"),
    [
        ({"a": torch.zeros(2)}, "expected 2 tensors, got 1"),
        ({"a": torch.zeros(2), "c": torch.zeros(3)}, "tensor 1: expected name 'b', got 'c'"),
        (
            {"a": torch.zeros(2), "b": torch.zeros(3, dtype=torch.float16)},
            "tensor 1 ('b'): expected dtype F32, got F16",
        ),
        ({"a": torch.zeros(2), "b": torch.zeros(1, 3)}, "tensor 1 ('b'): expected shape [3]"),
    ],
)
def test_require_same_layout_names_the_first_difference(
    other: dict[str, torch.Tensor], message: str
) -> None:
    expected = Manifest.from_tensors({"a": torch.zeros(2), "b": torch.zeros(3)})

    with pytest.raises(InvalidManifest) as excinfo:
        expected.require_same_layout(Manifest.from_tensors(other))

    assert message in str(excinfo.value)


# The receiving side


def test_a_chunk_past_the_end_is_refused_without_writing() -> None:
    held = HeldModel(Manifest.from_tensors({"w": torch.zeros(2)}), version=0)
    held.write(b"\x00" * 6)

    with pytest.raises(WireError, match="chunk of 3 bytes at offset 6 overflows the stream of 8"):
        held.write(b"\x01" * 3)

    assert held.bytes_written == 6
    held.close()


def test_a_truncated_stream_cannot_be_loaded() -> None:
    with pytest.raises(WireError, match="incomplete"):
        received(Manifest.from_tensors({"w": torch.zeros(4)}), [bytes(10)])


def test_an_empty_manifest_is_complete_at_once() -> None:
    assert received(Manifest(()), [b""]) == {}


def test_chunks_of_other_formats_are_taken_as_bytes() -> None:
    chunk = torch.tensor([1.5, -3.0]).numpy().data  # format "f", not "B"

    got = received(Manifest.from_tensors({"w": torch.zeros(2)}), [chunk])

    assert torch.equal(got["w"], torch.tensor([1.5, -3.0]))
