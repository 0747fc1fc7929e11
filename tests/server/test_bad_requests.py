"""Hostile and broken requests get a precise status, change nothing, and the round completes."""

from __future__ import annotations

import json

import grpc
import pytest
import torch

from fedstream.client.connection import Connection
from fedstream.common.checkpoint import load_checkpoint
from fedstream.common.framing import frame_data
from fedstream.common.proto.v1 import coordinator_pb2 as pb
from fedstream.common.tensor_codec import Manifest, iter_chunks

from .conftest import TinyModel, start_client, wait_for
from .test_rounds_grpc import fedavg_of_tiny

SERVICE = "/fedstream.v1.Coordinator"


class RawPeer:
    """A client that writes whatever bytes it likes onto the wire."""

    def __init__(self, address: str) -> None:
        self.channel = grpc.insecure_channel(address)
        self._upload = self.channel.stream_unary(
            f"{SERVICE}/Upload",
            request_serializer=lambda raw: raw,
            response_deserializer=pb.UploadReply.FromString,
        )
        self._poll = self.channel.unary_unary(
            f"{SERVICE}/Poll",
            request_serializer=pb.PollRequest.SerializeToString,
            response_deserializer=pb.PollReply.FromString,
        )
        self._download = self.channel.unary_stream(
            f"{SERVICE}/Download",
            request_serializer=pb.DownloadRequest.SerializeToString,
            response_deserializer=lambda raw: raw,
        )
        self._join = self.channel.unary_unary(
            f"{SERVICE}/Join",
            request_serializer=pb.JoinRequest.SerializeToString,
            response_deserializer=pb.JoinReply.FromString,
        )

    def upload(self, messages: list[bytes], token: str | None) -> pb.UploadReply:
        metadata = (("authorization", f"Bearer {token}"),) if token else ()
        return self._upload(iter(messages), metadata=metadata, timeout=20)

    def download(self, request: pb.DownloadRequest, token: str) -> list[bytes]:
        return list(
            self._download(request, metadata=(("authorization", f"Bearer {token}"),), timeout=20)
        )


def header(round_number: int, tensors: dict[str, torch.Tensor], **fields) -> bytes:
    msg = pb.UpdateHeader(
        round=round_number, model_version=fields.pop("model_version", 0), num_examples=30
    )
    for key, value in fields.items():
        setattr(msg, key, value)
    msg.manifest.CopyFrom(Manifest.from_tensors(tensors).to_proto())
    return pb.UpdateChunk(header=msg).SerializeToString()


def data(tensors: dict[str, torch.Tensor], chunk: int = 7) -> list[bytes]:
    return [frame_data(c) for c in iter_chunks(list(tensors.values()), chunk)]


def expect(code: grpc.StatusCode, fragment: str, call, *args) -> None:
    with pytest.raises(grpc.RpcError) as info:
        call(*args)
    assert info.value.code() == code, info.value.details()
    assert fragment in info.value.details(), info.value.details()


def test_bad_requests_are_refused_and_the_round_completes(coordinator, tmp_path):
    running = coordinator(rounds=1, min_clients=3)
    peer = RawPeer(running.address)
    joined = peer._join(
        pb.JoinRequest(name="mallory", task="tiny", partition=2, num_partitions=8), timeout=5
    )
    honest = [start_client(running.address, p) for p in (0, 1)]
    token = joined.token
    task = peer._poll(
        pb.PollRequest(), metadata=(("authorization", f"Bearer {token}"),), timeout=30
    )
    assert task.train.round == 1
    wait_for(
        lambda: running.coordinator.round.reported == {"client-0", "client-1"},
        30,
        "the honest updates",
    )

    init = {k: v for k, v in TinyModel(0).state_dict().items() if v.is_floating_point()}
    good = {k: (v + 0.375) - v for k, v in init.items()}
    good_msgs = [header(1, good), *data(good)]

    sc = grpc.StatusCode
    expect(sc.UNAUTHENTICATED, "Join first", peer.upload, good_msgs, "forged-token")
    expect(sc.UNAUTHENTICATED, "Join first", peer.upload, good_msgs, None)
    expect(sc.FAILED_PRECONDITION, "round 99", peer.upload, [header(99, good), *data(good)], token)
    expect(
        sc.FAILED_PRECONDITION,
        "model version 5",
        peer.upload,
        [header(1, good, model_version=5), *data(good)],
        token,
    )
    wrong_shape = {"w": torch.zeros(3, 4), "h": good["h"]}
    expect(
        sc.INVALID_ARGUMENT,
        "shape",
        peer.upload,
        [header(1, wrong_shape), *data(wrong_shape)],
        token,
    )
    wrong_dtype = {"w": good["w"].double(), "h": good["h"]}
    expect(
        sc.INVALID_ARGUMENT,
        "dtype",
        peer.upload,
        [header(1, wrong_dtype), *data(wrong_dtype)],
        token,
    )
    renamed = {"x": good["w"], "h": good["h"]}
    expect(sc.INVALID_ARGUMENT, "'w'", peer.upload, [header(1, renamed), *data(renamed)], token)
    expect(sc.INVALID_ARGUMENT, "ended after", peer.upload, good_msgs[:-2], token)
    expect(sc.INVALID_ARGUMENT, "overflows", peer.upload, [*good_msgs, frame_data(b"x" * 4)], token)
    poisoned = {"w": good["w"].clone(), "h": good["h"]}
    poisoned["w"][1, 1] = float("nan")
    expect(sc.INVALID_ARGUMENT, "NaN", peer.upload, [header(1, poisoned), *data(poisoned)], token)
    expect(sc.INVALID_ARGUMENT, "undecodable", peer.upload, [good_msgs[0], b"\xff\xff\xff"], token)
    expect(sc.INVALID_ARGUMENT, "empty", peer.upload, [], token)
    expect(sc.INVALID_ARGUMENT, "header", peer.upload, good_msgs[1:], token)
    expect(sc.INVALID_ARGUMENT, "second header", peer.upload, [good_msgs[0], *good_msgs], token)
    zero = pb.UpdateChunk.FromString(good_msgs[0])
    zero.header.num_examples = 0
    expect(sc.INVALID_ARGUMENT, "num_examples", peer.upload, [zero.SerializeToString()], token)
    huge = pb.UpdateChunk.FromString(good_msgs[0])
    huge.header.manifest.tensors[0].shape[:] = [1 << 20, 1 << 20]
    huge.header.manifest.tensors[0].nbytes = 4 << 40
    expect(sc.RESOURCE_EXHAUSTED, "limit", peer.upload, [huge.SerializeToString()], token)
    expect(
        sc.FAILED_PRECONDITION,
        "not current",
        peer.download,
        pb.DownloadRequest(model_version=9),
        token,
    )
    expect(
        sc.OUT_OF_RANGE,
        "beyond",
        peer.download,
        pb.DownloadRequest(model_version=0, offset=1 << 30),
        token,
    )
    expect(
        sc.FAILED_PRECONDITION,
        "task",
        peer._join,
        pb.JoinRequest(name="x", task="digits", partition=0, num_partitions=1),
    )
    outsider = Connection(running.address, 1 << 20, 30.0)
    eve = outsider.join(pb.JoinRequest(name="eve", task="tiny", partition=3, num_partitions=8))
    expect(sc.PERMISSION_DENIED, "not selected", peer.upload, good_msgs, eve.token)
    outsider.close()

    # nothing of the above reached the round; an honest update still does, exactly once
    assert running.coordinator.round.reported == {"client-0", "client-1"}
    # the download still works, resumed from an offset
    whole = peer.download(pb.DownloadRequest(model_version=0, chunk_bytes=1024), token)
    tail = peer.download(pb.DownloadRequest(model_version=0, offset=10, chunk_bytes=1024), token)
    assert b"".join(m[2:] for m in whole[1:])[10:] == b"".join(m[2:] for m in tail[1:])

    assert peer.upload(good_msgs, token).accepted
    assert [c.join(60) for c in honest] == [0, 0]
    running.wait_done(30)
    peer.channel.close()

    record = json.loads((tmp_path / "run" / "metrics.jsonl").read_text())
    assert record["updates"] == 3 and record["rejected_uploads"] >= 4
    expected = fedavg_of_tiny(TinyModel(0), [0, 1, 2], rounds=1)
    final, _ = load_checkpoint(tmp_path / "run" / "checkpoints" / "round_00001.safetensors")
    for name, tensor in expected.items():
        torch.testing.assert_close(final[name], tensor, rtol=0, atol=1e-6)


def test_repeated_update_is_idempotent(coordinator, tmp_path):
    running = coordinator(rounds=1, min_clients=2)
    peer = RawPeer(running.address)
    token = peer._join(
        pb.JoinRequest(name="twice", task="tiny", partition=2, num_partitions=8), timeout=5
    ).token
    other = peer._join(
        pb.JoinRequest(name="waiting", task="tiny", partition=3, num_partitions=8), timeout=5
    ).token
    metadata = (("authorization", f"Bearer {token}"),)
    assert peer._poll(pb.PollRequest(), metadata=metadata, timeout=30).train.round == 1
    init = {k: v for k, v in TinyModel(0).state_dict().items() if v.is_floating_point()}
    delta = {k: (v + 0.375) - v for k, v in init.items()}
    msgs = [header(1, delta), *data(delta)]
    assert peer.upload(msgs, token).accepted
    second = peer.upload(msgs, token)
    assert not second.accepted and "already" in second.detail
    assert running.coordinator.round.num_examples == 30
    peer.upload([header(1, delta), *data(delta)], other)
    running.wait_done(30)
    peer.channel.close()
