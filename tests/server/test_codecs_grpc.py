"""Compressed uplinks over real gRPC: the aggregate is FedAvg of the decoded updates, and
uploads in another codec or larger than the layout are refused before they are spooled."""

from __future__ import annotations

import json

import grpc
import pytest
import torch

from fedstream.common.codecs import UplinkCodec
from fedstream.common.proto.v1 import coordinator_pb2 as pb
from fedstream.common.wire.framing import frame_data
from fedstream.common.wire.manifest import Manifest

from .conftest import TinyModel, start_client, tiny_join
from .test_bad_requests import RawPeer, expect


def fedavg_of_decoded_tiny(uplink: UplinkCodec, partitions: list[int]) -> dict[str, torch.Tensor]:
    """One round of TinyTask's FedAvg, each client's delta passed through the codec."""
    state = {
        k: v.detach().clone() for k, v in TinyModel(0).state_dict().items() if v.is_floating_point()
    }
    weights = [10 * (p + 1) for p in partitions]
    out = {}
    for name, g in state.items():
        decoded = []
        for p in partitions:
            delta = (g + 0.125 * (p + 1)) - g
            parts = uplink.codec.encode(delta.float() if uplink.codec.error_feedback else delta)
            decoded.append(uplink.codec.decode(parts, g.dtype, tuple(g.shape)))
        mean = sum(w * d.float() for w, d in zip(weights, decoded, strict=True)) / sum(weights)
        out[name] = (g.float() + mean).to(g.dtype)
    return out


@pytest.mark.parametrize(
    ("codec", "zstd"),
    [
        ("int8", False),
        ("topk", False),
        ("int8", True),
        ("fp16", True),
        ("int4", False),
        ("topk2", False),
        ("int4", True),
        ("topk2", True),
    ],
)
def test_round_with_a_compressed_uplink_folds_the_decoded_updates(
    coordinator, tmp_path, codec: str, zstd: bool
) -> None:
    running = coordinator(  # FedAvg by the claims and updates as made: no claim cap, no clip
        rounds=1,
        min_clients=3,
        uplink_codec=codec,
        uplink_zstd=zstd,
        topk_fraction=0.25,
        claim_cap_factor=0,
        clip_factor=0,
    )
    clients = [start_client(running.address, p) for p in (0, 1, 2)]
    assert [c.join(60) for c in clients] == [0, 0, 0]
    running.wait_done(30)

    uplink = running.coordinator.intake.uplink
    assert uplink.spec == codec + ("+zstd" if zstd else "")
    expected = fedavg_of_decoded_tiny(uplink, [0, 1, 2])
    final = running.coordinator.model.tensors
    for name, tensor in expected.items():
        torch.testing.assert_close(final[name], tensor, rtol=0, atol=1e-6)
    record = json.loads((tmp_path / "run" / "metrics.jsonl").read_text())
    layout_bytes = uplink.layout(running.coordinator.model.manifest).total_bytes
    if zstd:
        assert (
            0
            < record["bytes_up"]
            <= 3 * uplink.max_wire_bytes(uplink.layout(running.coordinator.model.manifest))
        )
    else:
        assert record["bytes_up"] == 3 * layout_bytes
    if codec in ("topk", "topk2"):  # the client kept what it did not send for its next update
        residuals = clients[0].client.uplink.residuals
        assert set(residuals) == {"w", "h"}
        assert int((residuals["w"] != 0).sum()) == 12 - 3
    if codec == "int4":  # equal deltas are block maxima: int4 sent them exactly
        residuals = clients[0].client.uplink.residuals
        assert set(residuals) == {"w", "h"} and not any(r.any() for r in residuals.values())


@pytest.mark.parametrize("codec", ["topk", "topk2"])
def test_topk_error_feedback_sends_the_residual_later(coordinator, codec: str) -> None:
    running = coordinator(rounds=3, min_clients=1, uplink_codec=codec, topk_fraction=0.5)
    client = start_client(running.address, 0)
    assert client.join(60) == 0
    running.wait_done(30)
    # every round adds 0.125 to every element; half of them travel each round, the rest
    # wait in the residual: after 3 rounds, sent + residual is the whole training drift
    init = TinyModel(0).w.detach()
    sent = running.coordinator.model.tensors["w"] - init
    residual = client.client.uplink.residuals["w"]
    torch.testing.assert_close(sent + residual, torch.full_like(init, 3 * 0.125))
    assert float(sent.sum()) > 0.125 * 12  # more than one round's worth arrived


@pytest.mark.slow
def test_wrong_codec_and_oversize_parts_are_refused_before_spooling(coordinator) -> None:
    running = coordinator(rounds=1, min_clients=2, uplink_codec="int8")
    peer = RawPeer(running.address)
    token = peer._join(tiny_join("mallory", 2), timeout=5).token
    honest = start_client(running.address, 0)
    metadata = (("authorization", f"Bearer {token}"),)
    assert peer._poll(pb.PollRequest(), metadata=metadata, timeout=30).train.round == 1
    model = running.coordinator.model.manifest
    layout = running.coordinator.intake.layout

    def upload_header(manifest: Manifest) -> bytes:
        msg = pb.UpdateHeader(round=1, model_version=0, num_examples=30)
        msg.manifest.CopyFrom(manifest.to_proto())
        return pb.UpdateChunk(header=msg).SerializeToString()

    sc = grpc.StatusCode
    raw = Manifest(model.entries, "raw")
    expect(
        sc.INVALID_ARGUMENT,
        "not this run's uplink codec 'int8'",
        peer.upload,
        [upload_header(raw)],
        token,
    )
    mislabelled = Manifest(layout.entries, "fp16")
    expect(sc.INVALID_ARGUMENT, "'fp16'", peer.upload, [upload_header(mislabelled)], token)
    scales, values, *rest = layout.entries
    bigger = Manifest(
        (scales, type(values)(values.name, values.dtype, (values.numel * 100,)), *rest), "int8"
    )
    expect(sc.INVALID_ARGUMENT, "expected shape", peer.upload, [upload_header(bigger)], token)
    expect(
        sc.INVALID_ARGUMENT,
        "overflows",
        peer.upload,
        [upload_header(layout), frame_data(b"\0" * (layout.total_bytes + 1))],
        token,
    )
    zstd_lie = Manifest(layout.entries, "int8+zstd")
    expect(sc.INVALID_ARGUMENT, "'int8+zstd'", peer.upload, [upload_header(zstd_lie)], token)
    # all-zero int8 parts are a valid (empty) update and still go through
    assert peer.upload(
        [upload_header(layout), frame_data(b"\0" * layout.total_bytes)], token
    ).accepted
    assert honest.join(60) == 0
    running.wait_done(30)
    peer.channel.close()
    # only the overflowing stream got as far as the spool; the manifests never did
    assert running.coordinator.store.history[-1]["rejected_uploads"] == 1
    assert running.coordinator.store.history[-1]["updates"] == 2
