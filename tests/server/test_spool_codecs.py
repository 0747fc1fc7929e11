"""Spooled updates in a compressed codec decode on read-back, or fail precisely."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
import zstandard

from fedstream.common.codecs import UplinkCodec, wire_chunks
from fedstream.common.errors import NonFiniteValues, WireError
from fedstream.common.wire.manifest import Manifest
from fedstream.server.spool import SpoolFiles, UploadSpool

MODEL = {"a": torch.randn(300), "b": torch.randn(7, 5).to(torch.bfloat16)}


def spooled(tmp_path: Path, spec: str, stream: bytes | None = None) -> UploadSpool:
    uplink = UplinkCodec.parse(spec, 0.1)
    model = Manifest.from_tensors(MODEL)
    layout = uplink.layout(model)
    spool = UploadSpool(SpoolFiles(tmp_path), "u", layout, uplink, model)
    if stream is None:
        parts = [p for t in MODEL.values() for p in uplink.codec.encode(t)]
        stream = b"".join(bytes(c) for c in wire_chunks(layout, parts, 1024))
    spool.write(memoryview(stream))
    spool.finish()
    return spool


@pytest.mark.parametrize("spec", ["raw+zstd", "fp16", "bf16+zstd", "int8", "int8+zstd", "topk"])
def test_read_back_yields_the_decoded_tensors_in_blocks(tmp_path: Path, spec: str) -> None:
    spool = spooled(tmp_path, spec)
    codec = spool.uplink.codec
    got: dict[str, list[torch.Tensor]] = {}
    for block in spool.blocks(block_bytes=256):
        got.setdefault(block.name, []).append(block.values.clone())
    for name, tensor in MODEL.items():
        expected = codec.decode(codec.encode(tensor), tensor.dtype, tuple(tensor.shape))
        assert torch.equal(torch.cat(got[name]), expected.reshape(-1))
    spool.verify_finite()


def test_zstd_that_is_not_zstd_or_says_too_much_is_refused(tmp_path: Path) -> None:
    with pytest.raises(WireError, match="zstd"):
        spooled(tmp_path, "int8+zstd", b"\x00" * 100).verify_finite()
    layout = spooled(tmp_path, "int8").manifest
    bomb = zstandard.ZstdCompressor().compress(b"\x00" * (layout.total_bytes + 10_000_000))
    with pytest.raises(WireError, match="longer than its manifest"):
        spooled(tmp_path, "int8+zstd", bomb).verify_finite()
    short = zstandard.ZstdCompressor().compress(b"\x00" * (layout.total_bytes - 1))
    with pytest.raises(WireError, match="shorter than its manifest"):
        spooled(tmp_path, "int8+zstd", short).verify_finite()


def test_compressed_bytes_beyond_the_bound_are_refused_as_they_arrive(tmp_path: Path) -> None:
    uplink = UplinkCodec.parse("int8+zstd")
    model = Manifest.from_tensors(MODEL)
    spool = UploadSpool(SpoolFiles(tmp_path), "u", uplink.layout(model), uplink, model)
    with pytest.raises(WireError, match="overflows"):
        spool.write(memoryview(b"\x00" * (spool.max_bytes + 1)))
    spool.discard()


def test_scales_that_decode_to_infinity_are_refused(tmp_path: Path) -> None:
    layout = UplinkCodec.parse("int8").layout(Manifest.from_tensors(MODEL))
    scales = torch.full(layout.entries[0].shape, float("inf"))
    values = torch.ones(layout.entries[1].shape, dtype=torch.int8)
    rest = torch.zeros(sum(e.nbytes for e in layout.entries[2:]), dtype=torch.uint8)
    stream = b"".join(bytes(t.view(torch.uint8).numpy()) for t in (scales, values, rest))
    with pytest.raises(NonFiniteValues, match="'a'"):
        spooled(tmp_path, "int8", stream).verify_finite()


def test_topk_indices_out_of_order_are_refused(tmp_path: Path) -> None:
    layout = UplinkCodec.parse("topk", 0.1).layout(Manifest.from_tensors(MODEL))
    indices = torch.zeros(layout.entries[0].shape, dtype=torch.int32)  # all the same index
    rest = torch.zeros(sum(e.nbytes for e in layout.entries[1:]), dtype=torch.uint8)
    stream = bytes(indices.view(torch.uint8).numpy()) + bytes(rest.numpy())
    with pytest.raises(WireError, match="strictly increasing"):
        spooled(tmp_path, "topk", stream).verify_finite()
