"""The client's Connection against an in-process fake channel (tests/client/fakes.py)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import grpc
import pytest

from fedstream.client import connection
from fedstream.client.connection import Connection
from fedstream.client.session import Heartbeat, Session, negotiated_chunk_bytes
from fedstream.common.proto.v1 import coordinator_pb2 as pb
from fedstream.common.wire.manifest import Manifest

from .fakes import (
    FakeChannel,
    FakeRpcError,
    assert_holds,
    download_answer,
    join_reply,
    model,
    replies,
    stream_bytes,
    upload_answer,
    wait_for,
)

MIB = 1 << 20


@pytest.mark.parametrize(
    ("configured", "server_max", "expected"),
    [
        pytest.param(MIB, 16 * MIB, MIB, id="server-allows-more"),
        pytest.param(MIB, 64 << 10, 64 << 10, id="server-allows-less"),
        pytest.param(4096, 4096, 4096, id="equal"),
        pytest.param(MIB, 0, MIB, id="server-states-no-bound"),
    ],
)
def test_chunk_size_is_the_smaller_of_the_clients_and_the_coordinators(
    configured: int, server_max: int, expected: int
) -> None:
    assert negotiated_chunk_bytes(configured, server_max) == expected


@pytest.mark.parametrize(("server_max", "expected"), [(64 << 10, 64 << 10), (0, MIB)])
def test_join_keeps_the_negotiated_chunk_size_on_the_session(
    fake_channels: dict[str, FakeChannel], server_max: int, expected: int
) -> None:
    conn = Connection("coordinator:1", MIB, stall_timeout=30.0)
    fake_channels["control"].answers["Join"] = replies(join_reply(server_max))
    session = conn.join(pb.JoinRequest(name="a", task="tiny"))
    assert (session.client_id, session.token, session.run_id) == ("c-1", "tok", "run")
    assert session.chunk_bytes == expected
    assert conn.chunk_bytes == MIB  # the configured size stays for the next Join
    assert [s.method for s in fake_channels["control"].sent] == ["Join"]
    assert fake_channels["bulk"].sent == []


def test_upload_cuts_its_data_to_the_sessions_chunk_size(
    fake_channels: dict[str, FakeChannel],
) -> None:
    conn = Connection("coordinator:1", MIB, stall_timeout=30.0)
    fake_channels["bulk"].answers["Upload"] = upload_answer
    tensors = model()
    manifest = Manifest.from_tensors(tensors)
    session = Session("c-1", "tok", "run", chunk_bytes=1024)

    reply = conn.upload(
        session, pb.UpdateHeader(round=3, num_examples=7), manifest, tensors.values()
    )

    assert reply.accepted and reply.detail == "booked"
    [sent] = fake_channels["bulk"].sent
    assert sent.method == "Upload"
    assert sent.metadata == (("authorization", "Bearer tok"),)
    messages = [pb.UpdateChunk.FromString(raw) for raw in sent.wire]
    assert messages[0].WhichOneof("payload") == "header"
    assert messages[0].header.round == 3
    assert Manifest.from_proto(messages[0].header.manifest) == manifest
    data = [m.data for m in messages[1:]]
    assert all(m.WhichOneof("payload") == "data" for m in messages[1:])
    assert max(len(d) for d in data) == 1024
    assert b"".join(data) == stream_bytes(tensors)


def test_download_asks_for_the_sessions_chunk_size(
    fake_channels: dict[str, FakeChannel],
) -> None:
    conn = Connection("coordinator:1", MIB, stall_timeout=30.0)
    tensors = model()
    fake_channels["bulk"].answers["Download"] = download_answer(tensors, version=4)
    session = Session("c-1", "tok", "run", chunk_bytes=2048)

    held = conn.download(session, 4, Manifest.from_tensors(tensors))
    try:
        [sent] = fake_channels["bulk"].sent
        request = pb.DownloadRequest.FromString(sent.wire[0])
        assert (request.model_version, request.offset, request.chunk_bytes) == (4, 0, 2048)
        assert sent.metadata == (("authorization", "Bearer tok"),)
        assert_holds(held, tensors)
    finally:
        held.close()


def test_poll_presents_the_session_and_asks_nothing_else(
    fake_channels: dict[str, FakeChannel],
) -> None:
    conn = Connection("coordinator:1", MIB, stall_timeout=30.0)
    done = pb.PollReply(done=pb.Done(reason="finished"))
    fake_channels["control"].answers["Poll"] = lambda wire: [done.SerializeToString()]

    reply = conn.poll(Session("c-1", "tok", "run", chunk_bytes=MIB))

    assert reply == done
    [sent] = fake_channels["control"].sent
    assert sent.wire == [b""]  # an empty PollRequest
    assert sent.metadata == (("authorization", "Bearer tok"),)


def test_join_presents_the_clients_token_on_join_only(
    fake_channels: dict[str, FakeChannel],
) -> None:
    conn = Connection("coordinator:1", MIB, stall_timeout=30.0)
    control = fake_channels["control"]
    control.answers["Join"] = replies(join_reply(heartbeat_seconds=2.5))
    control.answers["Poll"] = replies(pb.PollReply(done=pb.Done()))

    session = conn.join(pb.JoinRequest(name="a", model_digest="ab" * 32), token="s3cret")
    conn.poll(session)
    anonymous = conn.join(pb.JoinRequest(name="a"))

    first, poll, second = control.sent
    assert first.metadata == (("authorization", "Bearer s3cret"),)
    assert pb.JoinRequest.FromString(first.wire[0]).model_digest == "ab" * 32
    assert poll.metadata == (("authorization", "Bearer tok"),)  # the session's, not ours
    assert second.metadata is None
    assert session.heartbeat_seconds == 2.5 and anonymous.heartbeat_seconds == 2.5


def test_without_a_ca_both_channels_are_plaintext(
    fake_channels: dict[str, FakeChannel], monkeypatch: pytest.MonkeyPatch
) -> None:
    def no_tls(*args: Any) -> Any:
        raise AssertionError("client_credentials called without a CA")

    monkeypatch.setattr(connection, "client_credentials", no_tls)
    Connection("coordinator:1", MIB, stall_timeout=30.0)
    assert fake_channels["control"].credentials is None
    assert fake_channels["bulk"].credentials is None


@pytest.mark.parametrize("mutual", [False, True], ids=["tls", "mutual-tls"])
def test_with_a_ca_both_channels_use_the_tls_credentials(
    fake_channels: dict[str, FakeChannel],
    monkeypatch: pytest.MonkeyPatch,
    tmp_path: Path,
    mutual: bool,
) -> None:
    asked: list[tuple[Path, Path | None, Path | None]] = []
    credentials = object()

    def record(ca: Path, cert: Path | None, key: Path | None) -> Any:
        asked.append((ca, cert, key))
        return credentials

    monkeypatch.setattr(connection, "client_credentials", record)
    ca, cert, key = tmp_path / "ca.pem", tmp_path / "c.pem", tmp_path / "c.key"
    if mutual:
        Connection("coordinator:1", MIB, 30.0, ca=ca, cert=cert, key=key)
    else:
        Connection("coordinator:1", MIB, 30.0, ca=ca)
    assert asked == [(ca, cert, key) if mutual else (ca, None, None)]
    assert fake_channels["control"].credentials is credentials
    assert fake_channels["bulk"].credentials is credentials


def test_heartbeat_beats_while_open_and_stops_on_close(
    fake_channels: dict[str, FakeChannel],
) -> None:
    conn = Connection("coordinator:1", MIB, stall_timeout=30.0)
    control = fake_channels["control"]
    control.answers["Heartbeat"] = replies(pb.HeartbeatReply(phase_open=True))
    session = Session("c-1", "tok", "run", chunk_bytes=MIB, heartbeat_seconds=0.01)

    with Heartbeat(conn, session, round_number=7) as heartbeat:
        wait_for(lambda: len(control.calls("Heartbeat")) >= 3, 10.0, "three heartbeats")
        assert heartbeat.running
    wait_for(lambda: not heartbeat.running, 10.0, "the heartbeat thread to end")

    beats = control.calls("Heartbeat")
    assert {pb.HeartbeatRequest.FromString(b.wire[0]).round for b in beats} == {7}
    assert all(b.metadata == (("authorization", "Bearer tok"),) for b in beats)
    assert fake_channels["bulk"].sent == []  # liveness never queues behind bulk bytes


def test_failed_heartbeats_do_not_stop_the_beat(
    fake_channels: dict[str, FakeChannel],
) -> None:
    conn = Connection("coordinator:1", MIB, stall_timeout=30.0)
    control = fake_channels["control"]
    control.answers["Heartbeat"] = replies(
        FakeRpcError(grpc.StatusCode.UNAVAILABLE),
        FakeRpcError(grpc.StatusCode.PERMISSION_DENIED),
        pb.HeartbeatReply(phase_open=False),
    )
    session = Session("c-1", "tok", "run", chunk_bytes=MIB, heartbeat_seconds=0.01)

    with Heartbeat(conn, session, round_number=2) as heartbeat:
        wait_for(lambda: len(control.calls("Heartbeat")) >= 4, 10.0, "beats after failures")
        assert heartbeat.running
    wait_for(lambda: not heartbeat.running, 10.0, "the heartbeat thread to end")


def test_no_heartbeat_when_the_coordinator_asks_for_none(
    fake_channels: dict[str, FakeChannel],
) -> None:
    conn = Connection("coordinator:1", MIB, stall_timeout=30.0)
    session = Session("c-1", "tok", "run", chunk_bytes=MIB, heartbeat_seconds=0.0)
    with Heartbeat(conn, session, round_number=1) as heartbeat:
        assert not heartbeat.running
    assert fake_channels["control"].sent == []
