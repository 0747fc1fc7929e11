"""Who may join, as whom, and for how long, over real gRPC on loopback."""

from __future__ import annotations

import json
import time
from collections.abc import Iterator
from pathlib import Path

import grpc
import pytest
import torch

from fedstream.common.proto.v1 import coordinator_pb2 as pb
from fedstream.common.service import bearer_metadata, stub
from fedstream.common.tokens import new_token, token_hash
from fedstream.common.wire.framing import frame_data
from fedstream.common.wire.manifest import Manifest
from fedstream.common.wire.stream import iter_chunks
from fedstream.server.admission.identity import Authenticator
from fedstream.server.errors import IdentityMismatch, UnknownClient

from .conftest import TinyModel, start_client, tiny_join, wait_for


class Peer:
    """A hand-driven client: raw calls through the service's own stubs."""

    def __init__(self, address: str) -> None:
        self.channel = grpc.insecure_channel(address)
        self.calls = {name: stub(self.channel, name) for name in ("Join", "Poll", "Download")}
        self.upload_call = stub(self.channel, "Upload")

    def join(self, name: str, partition: int = 1, token: str | None = None) -> pb.JoinReply:
        metadata = bearer_metadata(token) if token else ()
        reply: pb.JoinReply = self.calls["Join"](
            tiny_join(name, partition), metadata=metadata, timeout=5
        )
        return reply

    def poll(self, token: str) -> pb.PollReply:
        reply: pb.PollReply = self.calls["Poll"](
            pb.PollRequest(), metadata=bearer_metadata(token), timeout=10
        )
        return reply

    def download(self, token: str, version: int = 0) -> list[object]:
        request = pb.DownloadRequest(model_version=version)
        return list(self.calls["Download"](request, metadata=bearer_metadata(token), timeout=5))

    def close(self) -> None:
        self.channel.close()


def status_of(call: object) -> grpc.StatusCode:
    with pytest.raises(grpc.RpcError) as info:
        call()  # type: ignore[operator]
    code: grpc.StatusCode = info.value.code()  # type: ignore[attr-defined]
    return code


@pytest.fixture
def peer(request: pytest.FixtureRequest) -> Iterator[type[Peer]]:
    made: list[Peer] = []

    class Tracked(Peer):
        def __init__(self, address: str) -> None:
            super().__init__(address)
            made.append(self)

    yield Tracked
    for p in made:
        p.close()


# ---- the Authenticator alone ------------------------------------------------------------


def test_claimed_names_are_identities_when_nothing_authenticates() -> None:
    identity = Authenticator(mutual_tls=False, tokens=None).identify("a", None, None)
    assert identity.name == "a" and not identity.authenticated


def test_mutual_tls_takes_the_certificates_name() -> None:
    auth = Authenticator(mutual_tls=True, tokens=None)
    assert auth.identify("site-a", "site-a", None).authenticated
    with pytest.raises(IdentityMismatch, match="site-b"):
        auth.identify("site-a", "site-b", None)
    with pytest.raises(UnknownClient):
        auth.identify("site-a", None, None)


def test_tokens_prove_the_name_they_belong_to() -> None:
    a, b = new_token(), new_token()
    auth = Authenticator(
        mutual_tls=False, tokens={"site-a": token_hash(a), "site-b": token_hash(b)}
    )
    assert auth.identify("site-a", None, a).authenticated
    with pytest.raises(IdentityMismatch, match="'site-b''s; it cannot join as 'site-a'"):
        auth.identify("site-a", None, b)
    with pytest.raises(UnknownClient, match="needs a client token"):
        auth.identify("site-a", None, None)
    with pytest.raises(UnknownClient, match="unknown token"):
        auth.identify("site-a", None, new_token())


# ---- over the wire ------------------------------------------------------------------------


def test_a_token_proves_only_its_own_name(coordinator, tmp_path: Path, peer) -> None:
    a, b = new_token(), new_token()
    tokens = tmp_path / "tokens"
    tokens.write_text(f"# sites\nsite-a {token_hash(a)}\nsite-b {token_hash(b)}\n")
    running = coordinator(rounds=1, tokens=tokens)
    mallory = peer(running.address)
    assert status_of(lambda: mallory.join("site-a", token=b)) == grpc.StatusCode.PERMISSION_DENIED
    assert status_of(lambda: mallory.join("site-a")) == grpc.StatusCode.UNAUTHENTICATED
    assert status_of(lambda: mallory.join("site-c", token=new_token())) == (
        grpc.StatusCode.UNAUTHENTICATED
    )
    first = peer(running.address).join("site-a", token=a)
    # The same site, restarted, proves who it is and replaces its old session.
    second = peer(running.address).join("site-a", token=a)
    assert first.token != second.token
    assert status_of(lambda: mallory.poll(first.token)) == grpc.StatusCode.UNAUTHENTICATED


def test_a_live_name_cannot_be_taken_without_credentials(coordinator, peer) -> None:
    running = coordinator(rounds=1, min_clients=3)
    honest = peer(running.address)
    session = honest.join("site-a")
    with pytest.raises(grpc.RpcError) as info:
        peer(running.address).join("site-a")
    assert info.value.code() == grpc.StatusCode.ALREADY_EXISTS
    assert "site-a" in info.value.details()
    assert honest.poll(session.token).WhichOneof("action") == "wait"  # still its session


def test_joins_beyond_max_clients_are_refused(coordinator, peer) -> None:
    running = coordinator(rounds=1, min_clients=3, max_clients=2)
    peer(running.address).join("a")
    peer(running.address).join("b")
    assert status_of(lambda: peer(running.address).join("c")) == (
        grpc.StatusCode.RESOURCE_EXHAUSTED
    )


def test_only_the_selected_download_the_model(coordinator, peer) -> None:
    running = coordinator(rounds=1, min_clients=1, round_timeout=30.0)
    selected = peer(running.address)
    session = selected.join("chosen")
    wait_for(
        lambda: selected.poll(session.token).WhichOneof("action") == "train",
        20,
        "a train task",
    )
    outsider = peer(running.address)
    late = outsider.join("late", partition=2)  # joined after the round was drawn
    assert status_of(lambda: outsider.download(late.token)) == grpc.StatusCode.PERMISSION_DENIED
    assert len(selected.download(session.token)) > 1  # the header and the data


def test_a_selected_client_that_falls_silent_is_released(coordinator, tmp_path, peer) -> None:
    running = coordinator(
        rounds=1, min_clients=2, round_timeout=60.0, heartbeat_seconds=0.5, poll_timeout=1.0
    )
    silent = peer(running.address)
    session = silent.join("silent")
    honest = start_client(running.address, 0)
    wait_for(
        lambda: silent.poll(session.token).WhichOneof("action") == "train",
        30,
        "the silent client's train task",
    )
    started = time.monotonic()
    assert honest.join(60) == 0  # it finished, so the round closed without the silent one
    assert time.monotonic() - started < 30
    (record,) = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").open()]
    assert record["clients_selected"] == 2 and record["updates"] == 1
    assert record["duration_s"] < 30  # released after 3 missed heartbeats, not at 60 s


def trickle(tensors: dict[str, torch.Tensor], round_number: int) -> Iterator[bytes]:
    """An update whose bytes arrive one every 0.2 s: a peer holding the round open."""
    header = pb.UpdateHeader(round=round_number, model_version=0, num_examples=10)
    header.manifest.CopyFrom(Manifest.from_tensors(tensors).to_proto())
    yield pb.UpdateChunk(header=header).SerializeToString()
    for chunk in iter_chunks(list(tensors.values()), 1):
        time.sleep(0.2)  # the attack: one byte at a time
        yield frame_data(chunk)


@pytest.mark.slow
def test_a_round_ends_at_its_hard_limit_however_slowly_an_upload_arrives(
    coordinator, tmp_path, peer
) -> None:
    running = coordinator(
        rounds=1,
        min_clients=2,
        round_timeout=3.0,
        min_transfer_rate=0.0,  # only the hard end bounds this upload
        stall_timeout=30.0,
        heartbeat_seconds=30.0,
    )
    slow = peer(running.address)
    session = slow.join("slow")
    honest = start_client(running.address, 0)
    wait_for(lambda: slow.poll(session.token).WhichOneof("action") == "train", 30, "a train task")
    model = TinyModel(0)
    deltas = {
        n: torch.zeros_like(t) for n, t in model.state_dict().items() if t.is_floating_point()
    }
    started = time.monotonic()
    with pytest.raises(grpc.RpcError) as info:
        slow.upload_call(trickle(deltas, 1), metadata=bearer_metadata(session.token), timeout=60)
    assert info.value.code() == grpc.StatusCode.FAILED_PRECONDITION  # cut when the round ended
    assert time.monotonic() - started < 58 * 0.2  # before its last byte would have arrived
    assert honest.join(60) == 0
    (record,) = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").open()]
    assert record["updates"] == 1
    assert record["duration_s"] <= 2 * 3.0 + 1.0  # the hard end: twice the round timeout


def test_a_trickling_upload_is_cut_by_the_rate_floor(coordinator, tmp_path, peer) -> None:
    running = coordinator(
        rounds=1,
        min_clients=2,
        round_timeout=30.0,
        min_transfer_rate=1000.0,  # bytes/s; the trickle moves 5
        transfer_window=1.0,
        stall_timeout=30.0,
        heartbeat_seconds=1.0,  # and, cut, the trickler is released 3 s after its last call
    )
    slow = peer(running.address)
    session = slow.join("slow")
    honest = start_client(running.address, 0)
    wait_for(lambda: slow.poll(session.token).WhichOneof("action") == "train", 30, "a train task")
    state = TinyModel(0).state_dict()
    deltas = {n: torch.zeros_like(t) for n, t in state.items() if t.is_floating_point()}
    started = time.monotonic()
    with pytest.raises(grpc.RpcError) as info:
        slow.upload_call(trickle(deltas, 1), metadata=bearer_metadata(session.token), timeout=60)
    assert info.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED
    assert "below the floor" in info.value.details()
    assert time.monotonic() - started < 5  # one window in, not at the round's end
    assert honest.join(60) == 0
    (record,) = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").open()]
    assert record["updates"] == 1 and record["duration_s"] < 20
