"""int4 and topk2: error within their stated bounds, bytes as stated, and every malformed
value from the network refused (WireError, which the coordinator maps to INVALID_ARGUMENT)."""

from __future__ import annotations

import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from fedstream.common.codecs import Int4, TopK, TopK2, UplinkCodec, int4, make_codec, topk2
from fedstream.common.errors import WireError
from fedstream.common.wire.manifest import TensorEntry

finite = st.floats(-1e6, 1e6, allow_nan=False, width=32)
vectors = st.lists(finite, min_size=0, max_size=700).map(
    lambda xs: torch.tensor(xs, dtype=torch.float32)
)


def round_trip(codec, x: torch.Tensor) -> torch.Tensor:
    parts = codec.encode(x)
    layout = codec.layout(TensorEntry("t", x.dtype, tuple(x.shape)))
    assert [(p.dtype, tuple(p.shape)) for p in parts] == [(e.dtype, e.shape) for e in layout]
    return codec.decode(parts, x.dtype, tuple(x.shape))


def nbytes(parts: tuple[torch.Tensor, ...]) -> int:
    return sum(p.numel() * p.element_size() for p in parts)


# ---- int4 ----------------------------------------------------------------------------


@given(x=vectors)
@settings(max_examples=80, deadline=None)
def test_int4_error_is_at_most_half_a_step_of_its_block(x: torch.Tensor) -> None:
    scales, _ = Int4().encode(x)
    err = (round_trip(Int4(), x) - x).abs()
    per_element = scales.repeat_interleave(int4.BLOCK)[: x.numel()]
    # half a step (block absmax / 14), plus float32 rounding of x / scale * scale
    assert bool((err <= per_element / 2 + 1e-6 * x.abs() + 1e-30).all())
    if x.numel():
        absmax = x.abs().reshape(-1)
        for b in range(scales.numel()):
            block = absmax[b * int4.BLOCK : (b + 1) * int4.BLOCK]
            assert float(scales[b]) == pytest.approx(float(block.max()) / 7, rel=1e-6)


def test_int4_is_exact_for_zeros_and_block_maxima() -> None:
    x = torch.zeros(2 * int4.BLOCK + 3)
    x[5], x[int4.BLOCK + 9], x[-1] = -3.5, 0.25, 7.0
    out = round_trip(Int4(), x)
    assert out[5] == -3.5 and out[int4.BLOCK + 9] == 0.25 and out[-1] == 7.0
    assert int((out != 0).sum()) == 3


@pytest.mark.parametrize("n", [1 << 16, (1 << 16) + 1])
def test_int4_moves_an_eighth_of_float32_plus_its_scales(n: int) -> None:
    scales, values = Int4().encode(torch.randn(n))
    assert nbytes((values,)) == math.ceil(n / 2) <= n * 4 / 8 + 1
    assert nbytes((scales,)) == 4 * math.ceil(n / int4.BLOCK)
    # 12.5% for the values, 4 bytes per 256 elements (0.39%) for the scales, plus at
    # most a padding nibble and one partial block's scale
    assert nbytes((scales, values)) / (n * 4) <= 0.125 + 1 / 256 + 5 / (4 * n)
    assert nbytes((scales, values)) / (n * 4) < 0.129


def int4_parts(n: int) -> tuple[torch.Tensor, torch.Tensor]:
    scales, values = Int4().encode(torch.linspace(-1, 1, n))
    return scales.clone(), values.clone()


@pytest.mark.parametrize(
    ("bad", "match"),
    [
        (lambda s, v: (s.fill_(math.nan), v), "finite"),
        (lambda s, v: (s.fill_(math.inf), v), "finite"),
        (lambda s, v: (s.fill_(-1.0), v), "non-negative"),
        (lambda s, v: (s, v.index_fill_(0, torch.tensor([0]), 0x80)), "code 0"),
        (lambda s, v: (s, v.index_fill_(0, torch.tensor([1]), 0x08)), "code 0"),
        (lambda s, v: (s, v.index_fill_(0, torch.tensor([v.numel() - 1]), 0x88)), "padding"),
        (lambda s, v: (torch.cat((s, s)), v), "blocks"),
        (lambda s, v: (s, v[:-1]), "bytes of values"),
    ],
)
def test_int4_refuses_malformed_parts(bad, match: str) -> None:
    """A 5-element tensor: three value bytes, the last one's high nibble padding."""
    parts = bad(*int4_parts(5))
    with pytest.raises(WireError, match=match):
        Int4().decode(parts, torch.float32, (5,))


# ---- topk2 ---------------------------------------------------------------------------


@given(x=vectors, fraction=st.floats(0.001, 1.0))
@settings(max_examples=80, deadline=None)
def test_topk2_keeps_the_top_k_signs_within_half_of_the_block_range(x, fraction) -> None:
    codec = TopK2(fraction)
    out = round_trip(codec, x)
    if not x.numel():
        return
    indices, levels, _ = codec.encode(x)
    kept = torch.zeros(x.numel(), dtype=torch.bool)
    kept[indices.long()] = True
    assert torch.equal(indices, TopK(fraction).encode(x)[0])  # the same elements as topk
    assert bool((out[~kept] == 0).all())
    got, want = out[indices.long()], x[indices.long()]
    assert bool((got * want >= 0).all())  # the sign survives
    for b in range(levels.shape[0]):
        block = slice(b * topk2.BLOCK, (b + 1) * topk2.BLOCK)
        lo, hi = float(want[block].abs().min()), float(want[block].abs().max())
        assert lo * (1 - 1e-6) <= float(levels[b, 0]) <= float(levels[b, 1]) <= hi * (1 + 1e-6)
        err = (got[block] - want[block]).abs()
        assert bool((err <= (hi - lo) / 2 + 1e-6 * hi).all())


def test_topk2_levels_are_the_mean_magnitude_of_each_half() -> None:
    x = torch.tensor([0.0, 2.0, -2.0, 0.01, 4.0, -10.0, 0.0, 9.0])
    indices, levels, _ = TopK2(0.75).encode(x)  # keeps 6: 2, -2, 0.01, 4, -10, 9; middle 5.005
    assert indices.tolist() == [1, 2, 3, 4, 5, 7]
    torch.testing.assert_close(levels, torch.tensor([[(2 + 2 + 0.01 + 4) / 4, 9.5]]))
    out = round_trip(TopK2(0.75), x)
    assert out.tolist() == pytest.approx([0, 2.0025, -2.0025, 2.0025, 2.0025, -9.5, 0, 9.5])


def test_topk2_is_exact_for_a_block_of_equal_magnitudes() -> None:
    x = torch.tensor([0.0, 2.0, -2.0, 0.1, 2.0, 0.0])
    out = round_trip(TopK2(0.5), x)
    assert out.tolist() == [0.0, 2.0, -2.0, 0.0, 2.0, 0.0]


def test_topk2_moves_about_half_of_topks_bytes() -> None:
    x = torch.randn(1 << 16)
    ratio = nbytes(TopK2(0.01).encode(x)) / nbytes(TopK(0.01).encode(x))
    assert ratio < 0.55  # 4 + 1/4 + 8/256 bytes per kept element against 8


def topk2_parts(n: int = 40, fraction: float = 0.25) -> list[torch.Tensor]:
    """k = 10 kept values: three value bytes, the last one's high 4 bits padding."""
    return [p.clone() for p in TopK2(fraction).encode(torch.linspace(-1, 1, n))]


def with_part(i: int, value: torch.Tensor) -> list[torch.Tensor]:
    parts = topk2_parts()
    parts[i] = value
    return parts


@pytest.mark.parametrize(
    ("parts", "match"),
    [
        (with_part(0, torch.arange(10, dtype=torch.int32).flip(0)), "strictly increasing"),
        (with_part(0, torch.full((10,), 3, dtype=torch.int32)), "strictly increasing"),
        (with_part(0, torch.arange(31, 41, dtype=torch.int32)), "strictly increasing"),
        (with_part(0, torch.arange(-1, 9, dtype=torch.int32)), "strictly increasing"),
        (with_part(1, torch.tensor([[math.nan, 1.0]])), "finite"),
        (with_part(1, torch.tensor([[0.5, math.inf]])), "finite"),
        (with_part(1, torch.tensor([[-0.5, 1.0]])), "0 <= lower <= upper"),
        (with_part(1, torch.tensor([[1.0, 0.5]])), "0 <= lower <= upper"),
        (with_part(1, torch.tensor([[0.5, 1.0], [0.5, 1.0]])), "scales of shape"),
        (with_part(2, torch.tensor([0, 0, 0x10], dtype=torch.uint8)), "after the last value"),
        (with_part(2, torch.tensor([0, 0], dtype=torch.uint8)), "value bytes"),
        (with_part(0, torch.arange(9, dtype=torch.int32)), "indices"),
    ],
)
def test_topk2_refuses_malformed_parts(parts: list[torch.Tensor], match: str) -> None:
    with pytest.raises(WireError, match=match):
        TopK2(0.25).decode(parts, torch.float32, (40,))


def test_new_specs_parse_and_announce_the_fraction() -> None:
    for spec in ("int4", "int4+zstd", "topk2", "topk2+zstd"):
        uplink = UplinkCodec.parse(spec, 0.05)
        assert uplink.spec == spec and uplink.codec.error_feedback
        back = UplinkCodec.from_round_config(uplink.round_config())
        assert back.spec == spec and back.round_config() == uplink.round_config()
    assert UplinkCodec.parse("topk2", 0.05).round_config()["uplink_topk_fraction"] == 0.05
    codec = make_codec("topk2", 0.2)
    assert isinstance(codec, TopK2) and codec.fraction == 0.2
