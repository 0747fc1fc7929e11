"""Uplink codecs: exact where they claim to be, error bounded where lossy (property tests)."""

from __future__ import annotations

import io
import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from fedstream.common.codecs import (
    CODEC_NAMES,
    BFloat16,
    Float16,
    Int8,
    TopK,
    UplinkCodec,
    make_codec,
    wire_chunks,
)
from fedstream.common.codecs.int8 import BLOCK
from fedstream.common.codecs.zstd import compressed_bound, decompressing_reader
from fedstream.common.errors import WireError
from fedstream.common.wire.manifest import Manifest, TensorEntry

finite = st.floats(-1e6, 1e6, allow_nan=False, width=32)
vectors = st.lists(finite, min_size=0, max_size=700).map(
    lambda xs: torch.tensor(xs, dtype=torch.float32)
)
fractions = st.floats(0.001, 1.0)


def round_trip(codec, x: torch.Tensor, dtype: torch.dtype | None = None) -> torch.Tensor:
    parts = codec.encode(x)
    entry = TensorEntry("t", x.dtype, tuple(x.shape))
    layout = codec.layout(entry)
    assert [(p.dtype, tuple(p.shape)) for p in parts] == [(e.dtype, e.shape) for e in layout]
    return codec.decode(parts, dtype or x.dtype, tuple(x.shape))


@pytest.mark.parametrize("name", CODEC_NAMES)
@given(x=vectors)
@settings(max_examples=40, deadline=None)
def test_every_codec_matches_its_layout_and_keeps_shape(name: str, x: torch.Tensor) -> None:
    out = round_trip(make_codec(name, 0.1), x.reshape(-1, 1) if x.numel() else x)
    assert out.dtype == torch.float32 and out.numel() == x.numel()


@pytest.mark.parametrize(
    ("codec", "dtype"), [(Float16(), torch.float16), (BFloat16(), torch.bfloat16)]
)
@given(bits=st.lists(st.integers(-(2**15), 2**15 - 1), max_size=300))
@settings(max_examples=60, deadline=None)
def test_half_precision_is_exact_for_representable_values(codec, dtype, bits) -> None:
    values = torch.tensor(bits, dtype=torch.int16).view(dtype)
    values = values[torch.isfinite(values)].float()
    assert torch.equal(round_trip(codec, values), values)


@pytest.mark.parametrize(
    ("codec", "dtype", "rel", "tiny"),
    [(Float16(), torch.float16, 2.0**-11, 2.0**-25), (BFloat16(), torch.bfloat16, 2.0**-8, 0.0)],
)
@given(x=vectors)
@settings(max_examples=60, deadline=None)
def test_half_precision_error_is_bounded(codec, dtype, rel, tiny, x) -> None:
    out = round_trip(codec, x)
    err = (out - x).abs()
    info = torch.finfo(dtype)
    normal = (x.abs() >= info.tiny) & (x.abs() <= info.max)
    subnormal = x.abs() < info.tiny
    assert bool((err[normal] <= rel * x.abs()[normal]).all())
    assert bool((err[subnormal] <= max(tiny, 2.0**-134)).all())
    beyond = ~(normal | subnormal)
    assert bool((out[beyond].abs() == info.max).all())


def test_fp16_saturates_instead_of_overflowing() -> None:
    out = round_trip(Float16(), torch.tensor([1e9, -1e9, 3.0]))
    assert out.tolist() == [65504.0, -65504.0, 3.0]


@given(x=vectors)
@settings(max_examples=80, deadline=None)
def test_int8_error_is_at_most_half_a_step_of_its_block(x: torch.Tensor) -> None:
    scales, _ = Int8().encode(x)
    err = (round_trip(Int8(), x) - x).abs()
    per_element = scales.repeat_interleave(BLOCK)[: x.numel()]
    # half a quantisation step, plus float32 rounding of x / scale * scale
    assert bool((err <= per_element / 2 + 1e-6 * x.abs() + 1e-30).all())


def test_int8_is_exact_for_zeros_and_block_maxima() -> None:
    x = torch.zeros(3 * BLOCK + 5)
    x[7], x[BLOCK + 1] = -2.5, 1e-3
    out = round_trip(Int8(), x)
    assert out[7] == -2.5 and out[BLOCK + 1] == pytest.approx(1e-3, rel=1e-6)
    assert int((out != 0).sum()) == 2


def test_int8_moves_about_a_quarter_of_float32() -> None:
    x = torch.randn(1 << 16)
    parts = Int8().encode(x)
    assert sum(p.numel() * p.element_size() for p in parts) / (x.numel() * 4) < 0.26


@given(x=vectors, fraction=fractions)
@settings(max_examples=80, deadline=None)
def test_topk_keeps_the_largest_exactly_and_drops_only_smaller(x, fraction) -> None:
    codec = TopK(fraction)
    out = round_trip(codec, x)
    if not x.numel():
        return
    kept = torch.zeros(x.numel(), dtype=torch.bool)
    kept[codec.encode(x)[0].long()] = True
    assert int(kept.sum()) == codec.k(x.numel()) == min(x.numel(), math.ceil(fraction * x.numel()))
    assert torch.equal(out[kept], x[kept])
    assert bool((out[~kept] == 0).all())
    if (~kept).any():
        assert float(x[~kept].abs().max()) <= float(x[kept].abs().min())


@pytest.mark.parametrize(
    ("indices", "numel"), [([0, 0], 4), ([2, 1], 4), ([-1, 2], 4), ([1, 4], 4)]
)
def test_topk_refuses_indices_that_are_not_increasing_and_in_range(indices, numel) -> None:
    parts = (torch.tensor(indices, dtype=torch.int32), torch.ones(len(indices)))
    with pytest.raises(WireError, match="strictly increasing"):
        TopK(0.5).decode(parts, torch.float32, (numel,))


@given(data=st.binary(max_size=5000), chunk=st.integers(1024, 4096))
@settings(max_examples=40, deadline=None)
def test_zstd_is_an_exact_round_trip_within_its_bound(data: bytes, chunk: int) -> None:
    t = (
        torch.frombuffer(bytearray(data), dtype=torch.uint8)
        if data
        else torch.empty(0, dtype=torch.uint8)
    )
    manifest = Manifest((TensorEntry("t", torch.uint8, (len(data),)),), "raw+zstd")
    wire = b"".join(bytes(c) for c in wire_chunks(manifest, [t], chunk))
    assert len(wire) <= compressed_bound(len(data))
    assert decompressing_reader(io.BytesIO(wire)).read() == data


def test_specs_parse_and_travel_in_the_round_config() -> None:
    for spec in ("raw", "fp16", "bf16+zstd", "int8", "topk+zstd"):
        uplink = UplinkCodec.parse(spec, 0.05)
        assert uplink.spec == spec
        assert UplinkCodec.from_round_config(uplink.round_config()).round_config() == (
            uplink.round_config()
        )
    assert UplinkCodec.from_round_config({}).is_raw
    with pytest.raises(ValueError, match="unknown uplink codec"):
        UplinkCodec.parse("gzip")
    with pytest.raises(ValueError, match="fraction"):
        TopK(0.0)
