"""TLS and mutual TLS on the coordinator's port, over real gRPC on loopback, with
certificates made by `fedstream certs` (fedstream/certs.py) in a temporary folder."""

from __future__ import annotations

import asyncio
import json
import logging
from collections.abc import Callable
from pathlib import Path

import grpc
import pytest

from fedstream.certs import CertsConfig, make_certs
from fedstream.common.proto.v1 import coordinator_pb2 as pb
from fedstream.common.service import stub
from fedstream.common.tls import client_credentials
from fedstream.server.admission.tls import peer_identity, server_credentials

from .conftest import RunningCoordinator, start_client, wait_for

sc = grpc.StatusCode


def certs(folder: Path, clients: str = "client-0,client-1") -> Path:
    make_certs(CertsConfig(out=folder, server_name="localhost,127.0.0.1", clients=clients))
    return folder


@pytest.fixture
def pki(tmp_path: Path) -> Path:
    """A CA, a server certificate for 127.0.0.1 and localhost, and two clients'."""
    return certs(tmp_path / "certs")


def join(
    running: RunningCoordinator, credentials: grpc.ChannelCredentials | None, name: str
) -> pb.JoinReply:
    """One raw Join to `running` over a fresh channel: TLS with `credentials`, else
    plaintext."""
    if credentials is None:
        channel = grpc.insecure_channel(running.address)
    else:
        channel = grpc.secure_channel(running.address, credentials)
    request = pb.JoinRequest(
        name=name,
        task="tiny",
        partition=0,
        num_partitions=8,
        model_digest=running.coordinator.model.manifest.digest(),
    )
    with channel:
        reply: pb.JoinReply = stub(channel, "Join")(request, timeout=10)
    return reply


def refused(call: Callable[[], object]) -> grpc.RpcError:
    with pytest.raises(grpc.RpcError) as info:
        call()
    assert info.value.code() == sc.UNAVAILABLE, info.value.details()
    return info.value


@pytest.mark.slow
def test_tls_join_and_coordinator_json_records_it(coordinator, pki, tmp_path):
    running = coordinator(tls_cert=pki / "server.pem", tls_key=pki / "server.key")
    reply = join(running, client_credentials(pki / "ca.pem", None, None), "client-0")
    assert reply.token and reply.run_id == running.coordinator.run_id
    record = json.loads((tmp_path / "run" / "coordinator.json").read_text())
    assert record["tls"] is True and record["mutual_tls"] is False


def test_plaintext_client_cannot_reach_a_tls_coordinator(coordinator, pki):
    running = coordinator(tls_cert=pki / "server.pem", tls_key=pki / "server.key")
    refused(lambda: join(running, None, "client-0"))


def test_client_trusting_another_ca_is_refused_at_the_handshake(coordinator, pki, tmp_path):
    running = coordinator(tls_cert=pki / "server.pem", tls_key=pki / "server.key")
    other = certs(tmp_path / "other")
    refused(lambda: join(running, client_credentials(other / "ca.pem", None, None), "x"))


def test_mutual_tls_admits_a_signed_client_and_refuses_one_without_a_certificate(
    coordinator, pki, tmp_path
):
    running = coordinator(
        tls_cert=pki / "server.pem", tls_key=pki / "server.key", client_ca=pki / "ca.pem"
    )
    signed = client_credentials(pki / "ca.pem", pki / "client-0.pem", pki / "client-0.key")
    assert join(running, signed, "client-0").token
    refused(lambda: join(running, client_credentials(pki / "ca.pem", None, None), "client-1"))
    # a certificate from another CA, however well formed, is no credential here
    other = certs(tmp_path / "other")
    stranger = client_credentials(pki / "ca.pem", other / "client-1.pem", other / "client-1.key")
    refused(lambda: join(running, stranger, "client-1"))
    record = json.loads((tmp_path / "run" / "coordinator.json").read_text())
    assert record["tls"] is True and record["mutual_tls"] is True


def test_under_mutual_tls_a_client_joins_only_as_its_certificates_name(coordinator, pki):
    running = coordinator(
        tls_cert=pki / "server.pem", tls_key=pki / "server.key", client_ca=pki / "ca.pem"
    )
    signed = client_credentials(pki / "ca.pem", pki / "client-0.pem", pki / "client-0.key")
    with pytest.raises(grpc.RpcError) as info:
        join(running, signed, "client-1")
    assert info.value.code() == sc.PERMISSION_DENIED, info.value.details()
    assert "client-0" in info.value.details()


def test_plaintext_off_loopback_is_served_with_a_warning(coordinator, tmp_path, caplog):
    caplog.set_level(logging.WARNING, logger="fedstream")
    coordinator(address="0.0.0.0:0", insecure=True, open_enrolment=True)
    assert "PLAINTEXT" in caplog.text
    record = json.loads((tmp_path / "run" / "coordinator.json").read_text())
    assert record["tls"] is False and record["mutual_tls"] is False


def test_peer_identity_is_the_client_certificates_common_name(pki):
    """The identity a servicer reads from its context's auth_context(), over mTLS; None
    when the same server is reached with TLS alone."""

    async def scenario() -> tuple[str, str]:
        def identify(request: bytes, context: grpc.aio.ServicerContext) -> bytes:
            return (peer_identity(context.auth_context()) or "<none>").encode()

        handler = grpc.method_handlers_generic_handler(
            "test.Who", {"Am": grpc.unary_unary_rpc_method_handler(identify)}
        )
        results = []
        for client_ca in (pki / "ca.pem", None):
            server = grpc.aio.server()
            server.add_generic_rpc_handlers((handler,))
            credentials = server_credentials(pki / "server.pem", pki / "server.key", client_ca)
            port = server.add_secure_port("127.0.0.1:0", credentials)
            await server.start()
            cert, key = (pki / "client-1.pem", pki / "client-1.key") if client_ca else (None, None)
            async with grpc.aio.secure_channel(
                f"127.0.0.1:{port}", client_credentials(pki / "ca.pem", cert, key)
            ) as channel:
                answer = await channel.unary_unary("/test.Who/Am")(b"", timeout=10)
            await server.stop(None)
            results.append(answer.decode())
        return results[0], results[1]

    assert asyncio.run(scenario()) == ("client-1", "<none>")


def test_peer_identity_without_a_certificate_is_none():
    assert peer_identity({}) is None
    assert peer_identity({"transport_security_type": [b"ssl"]}) is None


def test_clients_complete_a_run_over_mutual_tls(coordinator, pki, tmp_path):
    running = coordinator(
        tls_cert=pki / "server.pem",
        tls_key=pki / "server.key",
        client_ca=pki / "ca.pem",
        rounds=2,
        min_clients=2,
    )
    clients = [
        start_client(
            running.address,
            p,
            ca=pki / "ca.pem",
            cert=pki / f"client-{p}.pem",
            key=pki / f"client-{p}.key",
        )
        for p in (0, 1)
    ]
    assert [c.join(60) for c in clients] == [0, 0]
    running.wait_done(30)
    records = (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()
    assert [json.loads(r)["updates"] for r in records] == [2, 2]


def test_client_reconnects_over_mutual_tls_after_the_coordinator_restarts(
    coordinator, pki, caplog, free_port
):
    """The client joins a coordinator that waits for a second client, the coordinator is
    stopped and started again on the same address and run directory, and the same client
    process, never restarted, rejoins over mTLS and completes the run."""
    caplog.set_level(logging.INFO, logger="fedstream")
    address = f"127.0.0.1:{free_port()}"
    security = {
        "tls_cert": pki / "server.pem",
        "tls_key": pki / "server.key",
        "client_ca": pki / "ca.pem",
    }
    first = coordinator(address=address, rounds=1, min_clients=2, **security)
    client = start_client(
        address,
        0,
        ca=pki / "ca.pem",
        cert=pki / "client-0.pem",
        key=pki / "client-0.key",
    )
    wait_for(lambda: "client client-0 joined" in caplog.text, 30, "client-0 to join")
    first.stop()
    joins_before = caplog.text.count("client client-0 joined")

    second = coordinator(address=address, rounds=1, min_clients=1, **security)
    assert client.join(60) == 0
    second.wait_done(30)
    assert caplog.text.count("client client-0 joined") > joins_before
    assert second.coordinator.completed == 1
