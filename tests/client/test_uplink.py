"""The client's uplink encoder: parts as the layout says; top-k's residual survives a failure."""

from __future__ import annotations

from collections.abc import Iterator

import torch

from fedstream.client.uplink import UplinkEncoder
from fedstream.common.codecs import UplinkCodec
from fedstream.common.wire.manifest import Manifest

DELTAS = {
    "w": torch.tensor([[4.0, -1.0], [0.5, 3.0]]),
    "empty": torch.zeros(0),
    "s": torch.tensor(2.0),
}


def deltas(block_elements: int | None = 1) -> Iterator[torch.Tensor]:
    for tensor in DELTAS.values():
        yield tensor.clone() if block_elements is None else tensor.reshape(-1).clone()


def encoder(spec: str) -> UplinkEncoder:
    uplink = UplinkEncoder()
    uplink.configure(UplinkCodec.parse(spec, 0.5))
    return uplink


def test_parts_match_the_announced_layout_for_every_codec() -> None:
    layout = Manifest.from_tensors(DELTAS)
    for spec in ("raw", "fp16", "bf16", "int8", "topk"):
        update = encoder(spec).encode(layout, deltas)
        pieces = list(update.pieces())
        assert update.manifest.codec == spec
        assert sum(p.numel() * p.element_size() for p in pieces) == update.manifest.total_bytes


def test_topk_residual_keeps_the_unsent_part_and_a_failed_upload_loses_nothing() -> None:
    uplink = encoder("topk")
    layout = Manifest.from_tensors(DELTAS)
    first = uplink.encode(layout, deltas)
    indices, values = list(first.pieces())[:2]
    assert indices.tolist() == [0, 3] and values.tolist() == [4.0, 3.0]
    # not committed (the upload failed): the next round's update starts from everything
    second = uplink.encode(layout, deltas)
    assert list(second.pieces())[1].tolist() == [8.0, 6.0]
    second.commit()
    torch.testing.assert_close(uplink.residuals["w"], torch.tensor([[0.0, -2.0], [1.0, 0.0]]))
    assert uplink.residuals["s"].item() == 0.0
    uplink.configure(UplinkCodec.parse("int8"))
    assert uplink.residuals == {}


def test_low_bit_codecs_feed_their_error_into_the_next_update() -> None:
    layout = Manifest.from_tensors(DELTAS)
    for spec in ("int4", "topk2"):
        uplink = encoder(spec)
        codec = uplink.uplink.codec
        update = uplink.encode(layout, deltas)
        pieces = iter(list(update.pieces()))
        assert update.manifest.codec == spec and codec.error_feedback
        update.commit()
        for entry in layout.entries:
            parts = [next(pieces) for _ in codec.layout(entry)]
            sent = codec.decode(parts, torch.float32, entry.shape)
            torch.testing.assert_close(uplink.residuals[entry.name], DELTAS[entry.name] - sent)
        assert bool(uplink.residuals["w"].any())  # neither codec sends w exactly
