"""A cut upload resumes at the byte the coordinator holds, and is checked whole.

docs/checkpoints.md, "Uploads resume at their byte offset": the coordinator keeps a cut
upload's spool; the client asks UploadOffset how much it holds and sends the rest, then a
trailer with the SHA-256 of the whole update. One flipped byte, in the kept part or in
the resumed one, refuses the whole update (DATA_LOSS) and drops what was kept.
"""

from __future__ import annotations

import hashlib
import json
import logging
import re
import threading
from collections.abc import Callable, Iterator

import grpc
import pytest
import torch

from fedstream.common.proto.v1 import coordinator_pb2 as pb
from fedstream.common.service import bearer_metadata, stub
from fedstream.common.wire.framing import frame_data
from fedstream.common.wire.stream import iter_chunks

from .conftest import ClientThread, RunningCoordinator, client_config, wait_for, wide_task
from .faultproxy import FaultProxy
from .test_bad_requests import Arena, RawPeer, good, header
from .test_network_faults import MODEL_BYTES

CHUNK = 7


@pytest.fixture
def arena(coordinator: Callable[..., RunningCoordinator]) -> Iterator[Arena]:
    """Round 1 open with mallory, alone, selected for it (as in test_bad_requests)."""
    running = coordinator(rounds=1, min_clients=1, done_grace=0.5)
    opened = Arena(running, RawPeer(running.address), "")
    opened.token = opened.join("mallory", 2)
    assert opened.poll().train.round == 1
    yield opened
    opened.peer.channel.close()


def stream_bytes(tensors: dict[str, torch.Tensor]) -> bytes:
    return b"".join(bytes(c) for c in iter_chunks(list(tensors.values()), 1 << 20))


def pieces(raw: bytes) -> list[bytes]:
    return [raw[i : i + CHUNK] for i in range(0, len(raw), CHUNK)]


def flipped(raw: bytes, at: int) -> bytes:
    return raw[:at] + bytes([raw[at] ^ 0x01]) + raw[at + 1 :]


def cut_upload(arena: Arena, first: bytes) -> int:
    """Send the header and `first`, cut the call once the coordinator has them; the
    bytes it then says it holds."""
    meter = arena.running.daemon.live.meter("mallory")
    gate = threading.Event()

    def messages() -> Iterator[bytes]:
        yield header(1, good())
        for part in pieces(first):
            yield frame_data(part)
        gate.wait(30)

    call = arena.peer._upload.future(messages(), metadata=bearer_metadata(arena.token), timeout=30)
    wait_for(lambda: meter.up >= len(first), 20, "the coordinator to receive the first part")
    call.cancel()
    gate.set()
    return offset(arena)


def offset(arena: Arena) -> int:
    ask = stub(arena.peer.channel, "UploadOffset")
    request = pb.UploadOffsetRequest(round=1, model_version=0, attempt=1)

    def held() -> int | None:
        reply: pb.UploadOffsetReply = ask(
            request, metadata=bearer_metadata(arena.token), timeout=10
        )
        return reply.offset or None

    return int(wait_for(held, 10, "the coordinator to hold the cut upload") or 0)


def resume(arena: Arena, rest: bytes, at: int, digest: str) -> pb.UploadReply:
    head = pb.UpdateChunk.FromString(header(1, good()))
    head.header.resume_offset = at
    trailer = pb.UpdateChunk(trailer=pb.UpdateTrailer(sha256=digest))
    messages = [head.SerializeToString(), *map(frame_data, pieces(rest))]
    return arena.peer.upload([*messages, trailer.SerializeToString()], arena.token)


@pytest.mark.parametrize("flip", [None, "kept", "resumed"])
def test_a_cut_upload_resumes_and_is_checked_whole(arena: Arena, flip: str | None) -> None:
    whole = stream_bytes(good())
    half = 4 * CHUNK
    sent = flipped(whole, 3) if flip == "kept" else whole
    at = cut_upload(arena, sent[:half])
    assert 0 < at <= half
    rest = flipped(whole, len(whole) - 2) if flip == "resumed" else whole
    digest = hashlib.sha256(whole).hexdigest()
    if flip is None:
        reply = resume(arena, rest[at:], at, digest)
        assert reply.accepted, reply.detail
        assert arena.reported() == {"mallory"}
        arena.running.wait_done(30)
        record = json.loads((arena.running.config.run_dir / "metrics.jsonl").read_text())
        assert record["uploads_resumed"] == 1 and record["updates"] == 1
        assert record["bytes_up"] == len(whole)
        return
    with pytest.raises(grpc.RpcError) as info:
        resume(arena, rest[at:], at, digest)
    assert info.value.code() == grpc.StatusCode.DATA_LOSS, info.value.details()
    assert "the whole update is refused" in info.value.details()
    assert arena.reported() == set()
    # refused whole: nothing is kept to resume from, the next upload starts at byte 0
    ask = stub(arena.peer.channel, "UploadOffset")
    request = pb.UploadOffsetRequest(round=1, model_version=0, attempt=1)
    assert ask(request, metadata=bearer_metadata(arena.token), timeout=10).offset == 0
    with pytest.raises(grpc.RpcError) as info:
        resume(arena, whole[at:], at, digest)
    assert info.value.code() == grpc.StatusCode.OUT_OF_RANGE, info.value.details()


def test_a_resume_without_the_trailer_is_refused(arena: Arena) -> None:
    whole = stream_bytes(good())
    at = cut_upload(arena, whole[: 4 * CHUNK])
    head = pb.UpdateChunk.FromString(header(1, good()))
    head.header.resume_offset = at
    messages = [head.SerializeToString(), *map(frame_data, pieces(whole[at:]))]
    with pytest.raises(grpc.RpcError) as info:
        arena.peer.upload(messages, arena.token)
    assert info.value.code() == grpc.StatusCode.DATA_LOSS
    assert "must end with a trailer" in info.value.details()


@pytest.mark.slow
def test_a_client_whose_upload_is_cut_sends_only_the_rest(coordinator, tmp_path, caplog):
    caplog.set_level(logging.INFO)
    running = coordinator(task=wide_task(), rounds=1, min_clients=1, chunk_bytes=64 << 10)
    with FaultProxy(running.address) as proxy:
        config = client_config(proxy.address, 0, chunk_bytes=64 << 10)
        proxy.cut_upstream_after(MODEL_BYTES // 2)  # the bulk connection, mid-upload
        client = ClientThread(config, wide_task(0))
        assert client.join(60) == 0
        assert proxy.cuts == 1
        upstream = proxy.upstream_bytes
    running.wait_done(30)
    record = json.loads((tmp_path / "run" / "metrics.jsonl").read_text())
    assert record["updates"] == 1 and record["uploads_resumed"] == 1
    assert record["bytes_up"] == MODEL_BYTES  # the update booked, whole
    messages = [r.getMessage() for r in caplog.records]
    held = [m for m in messages if "resuming there" in m]
    assert held, "the client did not resume its upload"
    accepted = [m for m in messages if "update accepted" in m]
    match = re.search(r"(\d+) bytes sent for an update of (\d+)", accepted[-1])
    assert match, accepted
    sent, size = int(match.group(1)), int(match.group(2))
    print(f"cut upload: {sent} bytes sent, {upstream} on the wire, for an update of {size}")
    assert size == MODEL_BYTES and sent < 1.5 * size
    # everything the client sent (both connections: control calls and framing included)
    assert upstream < 1.5 * size
