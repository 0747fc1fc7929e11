"""The live state over real gRPC: client states, bytes this round and refused uploads by
reason, as a coordinator's own status port serves them, behind its TLS settings."""

from __future__ import annotations

import json
import urllib.request
from collections.abc import Callable
from pathlib import Path
from typing import Any

import grpc
import jsonschema
import pytest

from fedstream.certs import CertsConfig, make_certs
from fedstream.common.proto.v1 import coordinator_pb2 as pb
from fedstream.common.tls import client_ssl_context
from fedstream.server.live_state import Rate, snake_case

from .conftest import RunningCoordinator
from .test_bad_requests import Arena, RawPeer, expect, good, update

sc = grpc.StatusCode
SCHEMA = json.loads(
    (Path(__file__).resolve().parents[2] / "server" / "status_schema.json").read_text()
)


def status(running: RunningCoordinator) -> dict[str, Any]:
    info = json.loads((running.config.run_dir / "coordinator.json").read_text())
    with urllib.request.urlopen(info["status_url"] + "status.json", timeout=10) as reply:
        snapshot: dict[str, Any] = json.loads(reply.read())
    jsonschema.validate(snapshot, SCHEMA)
    return snapshot


def test_states_bytes_and_refusals_as_the_round_goes(
    coordinator: Callable[..., RunningCoordinator],
) -> None:
    running = coordinator(rounds=1, min_clients=2)
    arena = Arena(running, RawPeer(running.address), "")
    arena.token = arena.join("mallory", 2)
    arena.join("idle", 3)
    assert arena.poll().train.round == 1

    before = status(running)
    assert before["run"]["phase"] == "training"
    assert {c["name"]: c["state"] for c in before["clients"]} == {
        "idle": "joined",
        "mallory": "training",
    }

    wrong_round = update(good(), round_number=5)
    expect(sc.FAILED_PRECONDITION, "round 5", arena.peer.upload, wrong_round, arena.token)
    expect(sc.UNAUTHENTICATED, "token", arena.peer.upload, update(good()), "forged")
    arena.peer.download(pb.DownloadRequest(model_version=0), arena.token)
    assert arena.peer.upload(update(good()), arena.token).accepted

    after = status(running)
    assert after["totals"]["rejected_updates"] == {"unknown_client": 1, "wrong_round": 1}
    mallory = next(c for c in after["clients"] if c["name"] == "mallory")
    assert mallory["state"] == "reported"
    assert mallory["bytes_down"] == after["run"]["model_bytes"] > 0
    assert mallory["bytes_up"] == after["run"]["upload_bytes"]
    assert after["run"]["reported"] == ["mallory"]
    assert {c["name"]: c["state"] for c in after["clients"]}["idle"] == "joined"
    arena.peer.channel.close()


@pytest.mark.parametrize("zstd", [False, True])
def test_an_uploads_size_is_known_unless_zstd_makes_it_vary(
    coordinator: Callable[..., RunningCoordinator], zstd: bool
) -> None:
    run = status(coordinator(uplink_zstd=zstd))["run"]
    assert run["model_bytes"] > 0
    assert run["upload_bytes"] == (0 if zstd else run["model_bytes"])


def test_a_rate_is_read_over_a_second_at_least() -> None:
    rate = Rate()
    assert rate.read(0, 100.0) == 0.0
    assert rate.read(500, 100.5) == 0.0  # too soon: the last rate stands
    assert rate.read(3000, 101.0) == pytest.approx(3000.0)
    assert rate.read(10, 103.0) == 0.0  # a counter that went back starts again


def test_reasons_are_snake_case() -> None:
    assert snake_case("TransferStalled") == "transfer_stalled"
    assert snake_case("WireError") == "wire_error"


def test_the_status_port_keeps_the_coordinators_mutual_tls(
    coordinator: Callable[..., RunningCoordinator], tmp_path: Path
) -> None:
    pki = tmp_path / "certs"
    make_certs(CertsConfig(out=pki, server_name="localhost,127.0.0.1", clients="site-a"))
    running = coordinator(
        tls_cert=pki / "server.pem", tls_key=pki / "server.key", client_ca=pki / "ca.pem"
    )
    url = json.loads((running.config.run_dir / "coordinator.json").read_text())["status_url"]
    assert url.startswith("https://127.0.0.1:")
    signed = client_ssl_context(pki / "ca.pem", pki / "site-a.pem", pki / "site-a.key")
    with urllib.request.urlopen(url + "status.json", timeout=10, context=signed) as reply:
        jsonschema.validate(json.loads(reply.read()), SCHEMA)
    anonymous = client_ssl_context(pki / "ca.pem", None, None)
    with pytest.raises(OSError):  # the handshake wants a client certificate
        urllib.request.urlopen(url + "metrics", timeout=10, context=anonymous).read()
    with pytest.raises(OSError):  # and nothing is served in plaintext
        urllib.request.urlopen(url.replace("https", "http") + "metrics", timeout=10).read()
