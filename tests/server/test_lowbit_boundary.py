"""int4 and topk2 at the coordinator's boundary, over real gRPC: an upload with the exact
layout whose values do not decode (a NaN or negative scale, a code the format does not
have, padding that is not zero, indices out of order or range) is refused with
INVALID_ARGUMENT naming what was wrong and books nothing; hostile bytes drawn by
hypothesis get a precise status, never UNKNOWN or INTERNAL; the run then completes."""

from __future__ import annotations

import json
import math
from collections.abc import Callable
from pathlib import Path

import grpc
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from fedstream.common.codecs import UplinkCodec
from fedstream.common.proto.v1 import coordinator_pb2 as pb
from fedstream.common.wire.framing import frame_data
from fedstream.common.wire.manifest import Manifest
from fedstream.common.wire.stream import iter_chunks

from .conftest import RunningCoordinator, start_client, tiny_join
from .test_bad_requests import RawPeer, expect, good
from .test_fuzz import PRECISE

sc = grpc.StatusCode
Parts = dict[str, list[torch.Tensor]]
"""Each model tensor's encoded parts, by tensor name."""


def encoded(uplink: UplinkCodec, model: Manifest) -> Parts:
    deltas = good()
    return {
        entry.name: [
            part.to(spec.dtype)
            for part, spec in zip(
                uplink.codec.encode(deltas[entry.name].float()),
                uplink.codec.layout(entry),
                strict=True,
            )
        ]
        for entry in model.entries
    }


def corrupt(parts: Parts, name: str, index: int, edit: Callable[[torch.Tensor], object]) -> Parts:
    out = {key: [p.clone() for p in value] for key, value in parts.items()}
    edit(out[name][index])
    return out


def set_at(position: tuple[int, ...], value: float) -> Callable[[torch.Tensor], object]:
    def edit(part: torch.Tensor) -> None:
        part[position] = value

    return edit


MALFORMED: dict[str, list[tuple[str, int, Callable[[torch.Tensor], object], str]]] = {
    # w: 12 elements, one scale, 6 value bytes; h: 5 elements, its 3rd byte's high nibble pads
    "int4": [
        ("w", 0, set_at((0,), math.nan), "scales must be finite and non-negative"),
        ("w", 0, set_at((0,), -1.0), "scales must be finite and non-negative"),
        ("w", 1, set_at((2,), 0x80), "value code 0 is not a value"),
        ("h", 1, set_at((2,), 0x18), "padding nibble after the last element must be 0"),
    ],
    # fraction 0.25: w keeps 3 (one byte of codes, its last 2 bits padding), h keeps 2
    "topk2": [
        ("w", 0, lambda t: t.copy_(t.flip(0)), "strictly increasing"),
        ("w", 0, set_at((2,), 12), "strictly increasing and within 0..11"),
        ("w", 1, set_at((0, 1), math.inf), "levels must be finite"),
        ("w", 1, set_at((0, 0), 1e9), "0 <= lower <= upper"),
        ("h", 2, lambda t: t.bitwise_or_(0xF0), "bits after the last value must be 0"),
    ],
}


def upload(layout: Manifest, parts: Parts | bytes) -> list[bytes]:
    msg = pb.UpdateHeader(round=1, model_version=0, num_examples=30)
    msg.manifest.CopyFrom(layout.to_proto())
    if isinstance(parts, bytes):
        chunks = [frame_data(parts[i : i + 64]) for i in range(0, len(parts), 64)]
    else:
        pieces = [p for entry in parts.values() for p in entry]
        chunks = [frame_data(c) for c in iter_chunks(pieces, 64)]
    return [pb.UpdateChunk(header=msg).SerializeToString(), *chunks]


@pytest.mark.slow
@pytest.mark.parametrize("codec", sorted(MALFORMED))
def test_malformed_low_bit_updates_are_refused_precisely(
    coordinator: Callable[..., RunningCoordinator], tmp_path: Path, codec: str
) -> None:
    running = coordinator(
        rounds=1, min_clients=2, uplink_codec=codec, topk_fraction=0.25, round_timeout=120
    )
    peer = RawPeer(running.address)
    token = peer._join(tiny_join("mallory", 2), timeout=5).token
    honest = start_client(running.address, 0)  # the round opens with two clients
    metadata = (("authorization", f"Bearer {token}"),)
    assert peer._poll(pb.PollRequest(), metadata=metadata, timeout=30).train.round == 1
    uplink = running.coordinator.intake.uplink
    layout = running.coordinator.intake.layout
    honest_parts = encoded(uplink, running.coordinator.model.manifest)
    assert [e.name for e in layout.entries] == [
        f"{name}::{part}" for name, parts in honest_parts.items() for part in _suffixes(codec)
    ]

    def booked() -> bool:
        return "mallory" in getattr(running.coordinator.phase, "reported", set())

    for name, index, edit, message in MALFORMED[codec]:
        bad = corrupt(honest_parts, name, index, edit)
        expect(sc.INVALID_ARGUMENT, message, peer.upload, upload(layout, bad), token)
        assert not booked()

    accepted = False

    @given(data=st.binary(min_size=layout.total_bytes, max_size=layout.total_bytes))
    @settings(
        max_examples=40,
        deadline=None,
        database=None,
        suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
    )
    def hostile(data: bytes) -> None:
        nonlocal accepted
        try:
            peer.upload(upload(layout, data), token)
            accepted = True  # valid by chance: the round holds it, later ones are refused
        except grpc.RpcError as error:
            assert error.code() in PRECISE and error.code() != sc.OK, error.details()
            assert booked() == accepted, error.details()

    hostile()
    if not accepted:
        assert peer.upload(upload(layout, honest_parts), token).accepted
    assert honest.join(60) == 0
    running.wait_done(30)
    peer.channel.close()
    record = json.loads((tmp_path / "run" / "metrics.jsonl").read_text())
    assert record["updates"] == 2
    assert record["rejected_uploads"] >= len(MALFORMED[codec])


def _suffixes(codec: str) -> tuple[str, ...]:
    return ("scales", "values") if codec == "int4" else ("indices", "scales", "values")
