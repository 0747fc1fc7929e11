"""FederatedClient's decisions, run through its real loop against fake channels (Join,
refusals, heartbeats, backoff), and its TLS failure against a real TLS port on loopback.
Every wait is recorded, not slept."""

from __future__ import annotations

import logging
import threading
from collections.abc import Iterator
from concurrent import futures
from pathlib import Path
from typing import Any

import grpc
import pytest
import torch

from fedstream.certs import CertsConfig, make_certs
from fedstream.client.config import ClientConfig
from fedstream.client.connection import Connection
from fedstream.client.loop import EXIT_DONE, EXIT_REFUSED, EXIT_UNREACHABLE, FederatedClient
from fedstream.client.retry import Backoff
from fedstream.common.proto.v1 import coordinator_pb2 as pb
from fedstream.common.wire.manifest import Manifest

from .fakes import (
    FakeChannel,
    FakeRpcError,
    SmallTask,
    UpperBound,
    download_answer,
    join_reply,
    replies,
    wait_for,
)

DONE = pb.PollReply(done=pb.Done(reason="finished"))


def train(round_number: int) -> pb.PollReply:
    return pb.PollReply(
        train=pb.TrainTask(round=round_number, model_version=0, deadline_seconds=30.0)
    )


def make_client(**overrides: Any) -> tuple[FederatedClient, list[float], list[float]]:
    """A client whose waits are recorded: (client, reconnection waits, refusal waits)."""
    settings: dict[str, Any] = {"server": "coordinator:1", "task": "small", "name": "a"}
    settings.update(overrides)
    client = FederatedClient(ClientConfig(**settings), SmallTask())
    waits: list[float] = []
    refusal_waits: list[float] = []
    client.backoff = Backoff(base=0.5, cap=30.0, rng=UpperBound(), sleep=waits.append)
    client.refusals = Backoff(base=0.5, cap=30.0, rng=UpperBound(), sleep=refusal_waits.append)
    return client, waits, refusal_waits


def heartbeat_threads() -> list[threading.Thread]:
    return [t for t in threading.enumerate() if t.name == "heartbeat"]


@pytest.mark.parametrize("token", ["", "s3cret"], ids=["no-token", "token"])
def test_join_sends_the_model_digest_and_the_clients_token(
    fake_channels: dict[str, FakeChannel], token: str
) -> None:
    client, _, _ = make_client(token=token)
    control = fake_channels["control"]
    control.answers["Join"] = replies(join_reply())
    control.answers["Poll"] = replies(DONE)

    assert client.run() == EXIT_DONE

    join, poll = control.sent
    request = pb.JoinRequest.FromString(join.wire[0])
    expected = Manifest.from_tensors({"w": torch.ones(3, 2)}).digest()
    assert request.model_digest == expected == client.layout.digest()
    assert request.name == "a"
    assert join.metadata == ((("authorization", f"Bearer {token}"),) if token else None)
    assert poll.metadata == (("authorization", "Bearer tok"),)


@pytest.mark.parametrize(
    "code",
    [
        grpc.StatusCode.FAILED_PRECONDITION,
        grpc.StatusCode.INVALID_ARGUMENT,
        grpc.StatusCode.PERMISSION_DENIED,
        grpc.StatusCode.UNAUTHENTICATED,
    ],
)
def test_a_join_refused_for_what_the_client_is_ends_it(
    fake_channels: dict[str, FakeChannel], caplog: pytest.LogCaptureFixture, code: grpc.StatusCode
) -> None:
    client, waits, _ = make_client()
    control = fake_channels["control"]
    control.answers["Join"] = replies(FakeRpcError(code, "no such thing"))

    with caplog.at_level(logging.ERROR, logger="fedstream.client.loop"):
        assert client.run() == EXIT_REFUSED

    assert control.methods() == ["Join"]
    assert waits == []
    [record] = caplog.records
    assert code.name in record.getMessage() and "no such thing" in record.getMessage()


@pytest.mark.parametrize(
    "code", [grpc.StatusCode.ALREADY_EXISTS, grpc.StatusCode.RESOURCE_EXHAUSTED]
)
def test_a_join_refused_for_now_is_retried_with_backoff(
    fake_channels: dict[str, FakeChannel], caplog: pytest.LogCaptureFixture, code: grpc.StatusCode
) -> None:
    client, waits, _ = make_client(give_up_after=0.0)
    control = fake_channels["control"]
    refusal = FakeRpcError(code, "not now")
    control.answers["Join"] = replies(refusal, refusal, refusal, join_reply())
    control.answers["Poll"] = replies(DONE)

    with caplog.at_level(logging.WARNING, logger="fedstream.client.loop"):
        # give_up_after=0: an answered Join is contact, not silence, so no give-up.
        assert client.run() == EXIT_DONE

    assert control.methods() == ["Join"] * 4 + ["Poll"]
    assert waits == [0.5, 1.0, 2.0]  # growing, as reconnection does
    assert len(caplog.records) == 3
    assert all(code.name in r.getMessage() for r in caplog.records)


def test_an_unknown_session_later_joins_again(fake_channels: dict[str, FakeChannel]) -> None:
    client, _, _ = make_client()
    control = fake_channels["control"]
    control.answers["Join"] = replies(join_reply())
    control.answers["Poll"] = replies(FakeRpcError(grpc.StatusCode.UNAUTHENTICATED), DONE)

    assert client.run() == EXIT_DONE
    assert control.methods() == ["Join", "Poll", "Join", "Poll"]


def test_refused_updates_pause_polling_longer_each_time_until_one_is_accepted(
    fake_channels: dict[str, FakeChannel],
) -> None:
    client, _, refusal_waits = make_client()
    control, bulk = fake_channels["control"], fake_channels["bulk"]
    control.answers["Join"] = replies(join_reply())
    control.answers["Poll"] = replies(train(1), train(2), train(3), train(4), DONE)
    bulk.answers["Download"] = download_answer({"w": torch.zeros(3, 2)}, version=0)
    bulk.answers["Upload"] = replies(
        FakeRpcError(grpc.StatusCode.FAILED_PRECONDITION, "round 1 is closed"),
        pb.UploadReply(accepted=False, detail="already booked"),
        pb.UploadReply(accepted=True, detail="booked"),
        FakeRpcError(grpc.StatusCode.PERMISSION_DENIED, "not selected"),
    )

    assert client.run() == EXIT_DONE

    assert bulk.methods() == ["Download", "Upload", "Upload", "Upload", "Upload"]
    # refused, refused again (twice as long), accepted (no wait, reset), refused
    assert refusal_waits == [0.5, 1.0, 0.5]


def test_a_refused_report_pauses_polling(fake_channels: dict[str, FakeChannel]) -> None:
    client, _, refusal_waits = make_client()
    control, bulk = fake_channels["control"], fake_channels["bulk"]
    evaluate = pb.PollReply(evaluate=pb.EvaluateTask(round=3, model_version=0))
    control.answers["Join"] = replies(join_reply())
    control.answers["Poll"] = replies(evaluate, evaluate, DONE)
    control.answers["ReportEvaluation"] = replies(
        FakeRpcError(grpc.StatusCode.FAILED_PRECONDITION, "evaluation closed"),
        pb.EvaluationReply(accepted=False, detail="already booked"),
    )
    bulk.answers["Download"] = download_answer({"w": torch.zeros(3, 2)}, version=0)

    assert client.run() == EXIT_DONE
    assert len(control.calls("ReportEvaluation")) == 2
    assert refusal_waits == [0.5, 1.0]


def test_heartbeats_run_while_a_task_is_held_and_stop_after(
    fake_channels: dict[str, FakeChannel],
) -> None:
    client, _, _ = make_client()
    control, bulk = fake_channels["control"], fake_channels["bulk"]
    control.answers["Join"] = replies(join_reply(heartbeat_seconds=0.01))
    control.answers["Poll"] = replies(train(5), DONE)
    control.answers["Heartbeat"] = replies(pb.HeartbeatReply(phase_open=True))
    bulk.answers["Download"] = download_answer({"w": torch.zeros(3, 2)}, version=0)
    bulk.answers["Upload"] = replies(pb.UploadReply(accepted=True))
    assert isinstance(client.task, SmallTask)
    client.task.during_train = lambda: wait_for(
        lambda: len(control.calls("Heartbeat")) >= 3, 10.0, "heartbeats while training"
    )

    assert client.run() == EXIT_DONE
    wait_for(lambda: not heartbeat_threads(), 10.0, "the heartbeat to stop")

    methods = control.methods()
    assert methods[:2] == ["Join", "Poll"]  # none before the task
    assert methods[-1] == "Poll" and "Heartbeat" not in methods[:2]
    beats = control.calls("Heartbeat")
    assert {pb.HeartbeatRequest.FromString(b.wire[0]).round for b in beats} == {5}
    assert all(b.metadata == (("authorization", "Bearer tok"),) for b in beats)


@pytest.fixture
def tls_port(tmp_path: Path) -> Iterator[tuple[str, Path, Path]]:
    """A TLS port on loopback that serves no service: (target, its CA, another CA), the
    certificates made by `fedstream certs`."""
    for folder in ("right", "other"):
        make_certs(CertsConfig(out=tmp_path / folder, server_name="127.0.0.1"))
    right = tmp_path / "right"
    server = grpc.server(futures.ThreadPoolExecutor(max_workers=1))
    pair = ((right / "server.key").read_bytes(), (right / "server.pem").read_bytes())
    port = server.add_secure_port("127.0.0.1:0", grpc.ssl_server_credentials([pair]))
    server.start()
    yield f"127.0.0.1:{port}", right / "ca.pem", tmp_path / "other" / "ca.pem"
    server.stop(None)


@pytest.mark.parametrize(
    ("trust", "expected"),
    [
        # the handshake passed and the port answered that it serves no such method
        ("right", grpc.StatusCode.UNIMPLEMENTED),
        # the port's certificate does not chain to the CA: no connection
        ("other", grpc.StatusCode.UNAVAILABLE),
    ],
)
def test_tls_reaches_only_a_port_whose_certificate_chains_to_the_ca(
    tls_port: tuple[str, Path, Path], trust: str, expected: grpc.StatusCode
) -> None:
    target, right, other = tls_port
    conn = Connection(target, 1 << 20, 30.0, ca=right if trust == "right" else other)
    try:
        with pytest.raises(grpc.RpcError) as raised:
            conn.join(pb.JoinRequest(name="a"))
        assert raised.value.code() == expected  # type: ignore[attr-defined]
    finally:
        conn.close()


def test_a_failed_tls_handshake_is_named_when_the_client_gives_up(
    tls_port: tuple[str, Path, Path], caplog: pytest.LogCaptureFixture
) -> None:
    target, _, other = tls_port
    client = FederatedClient(
        ClientConfig(server=target, name="a", ca=other, give_up_after=0.0), SmallTask()
    )
    with caplog.at_level(logging.ERROR, logger="fedstream.client.loop"):
        assert client.run() == EXIT_UNREACHABLE
    [record] = caplog.records
    message = record.getMessage()
    assert "TLS handshake may have failed" in message and str(other) in message
    assert "CERTIFICATE_VERIFY_FAILED" in message  # grpc's own details, passed on
