"""Before and at the door: what a call must prove before its request is read, names and
metric names, sessions bound to certificates, and the bounds on transfers that move
nothing, over real gRPC on loopback."""

from __future__ import annotations

import errno
import json
import logging
import resource
import threading
import time
from collections.abc import Iterator

import grpc
import pytest
import torch

from fedstream.certs import CertsConfig, make_certs
from fedstream.cli import main as cli_main
from fedstream.common.config import ConfigError
from fedstream.common.proto.v1 import coordinator_pb2 as pb
from fedstream.common.service import bearer_metadata, stub
from fedstream.common.tls import client_credentials
from fedstream.common.tokens import new_token, token_hash
from fedstream.common.wire.framing import frame_data
from fedstream.common.wire.manifest import Manifest
from fedstream.server.admission.connections import (
    connection_cap,
    limits_line,
    raise_descriptor_limit,
)
from fedstream.server.admission.names import BadName, check_metric_name, normalise_name
from fedstream.server.config import ServerConfig
from fedstream.server.daemon import disk_full
from fedstream.server.phases import weigh_claims

from .conftest import (
    ClientThread,
    RunningCoordinator,
    client_config,
    start_client,
    tiny_join,
    tiny_task,
    wait_for,
    wide_task,
)

sc = grpc.StatusCode
RAW = {"request_serializer": lambda b: b}


def code_of(call: object) -> grpc.RpcError:
    with pytest.raises(grpc.RpcError) as info:
        call()  # type: ignore[operator]
    error: grpc.RpcError = info.value
    return error


def padded_poll(size: int) -> bytes:
    """A PollRequest carrying `size` bytes in an unknown field (15, bytes)."""
    length = bytearray()
    value = size
    while True:
        length.append((value & 0x7F) | (0x80 if value > 0x7F else 0))
        value >>= 7
        if not value:
            break
    return b"\x7a" + bytes(length) + b"\0" * size


@pytest.fixture
def channel(request: pytest.FixtureRequest) -> Iterator[list[grpc.Channel]]:
    opened: list[grpc.Channel] = []
    yield opened
    for c in opened:
        c.close()


def plain(opened: list[grpc.Channel], address: str) -> grpc.Channel:
    """A plaintext channel whose receive windows stay small (no BDP probing), so a
    download it does not read stays unsent on the coordinator's side."""
    options = [("grpc.max_send_message_length", 64 << 20), ("grpc.http2.bdp_probe", 0)]
    c = grpc.insecure_channel(address, options=options)
    opened.append(c)
    return c


# ---- nothing is read before authentication ----------------------------------------------


def test_a_join_proving_nobody_is_refused_before_it_is_read(coordinator, tmp_path, channel):
    """A Join over the server's receive limit would be refused by grpc as it arrived
    (RESOURCE_EXHAUSTED) if it were read; refused unread, it is UNAUTHENTICATED. A Join
    with a forged token is read (its refusal names the name it claims), one of a few at
    a time, and refused unparsed when over the Join limit."""
    tokens = tmp_path / "tokens.txt"
    tokens.write_text(f"client-0 {token_hash(new_token())}\n")
    running = coordinator(tokens=tokens)
    join = stub(plain(channel, running.address), "Join", **RAW)
    huge = pb.JoinRequest(name="x" * (40 << 20), task="tiny", num_partitions=1)
    error = code_of(lambda: join(huge.SerializeToString(), timeout=20))
    assert error.code() == sc.UNAUTHENTICATED, error.details()
    assert "needs a client token" in error.details()
    forged = bearer_metadata("forged")
    small = tiny_join("client-0", 0).SerializeToString()
    error = code_of(lambda: join(small, metadata=forged, timeout=20))
    assert error.code() == sc.UNAUTHENTICATED and "unknown token for 'client-0'" in error.details()
    large = pb.JoinRequest(name="x" * (1 << 20), task="tiny", num_partitions=1)
    error = code_of(lambda: join(large.SerializeToString(), metadata=forged, timeout=20))
    assert error.code() == sc.RESOURCE_EXHAUSTED and "Join request of" in error.details()


def test_a_session_call_over_its_method_limit_is_refused_unparsed(coordinator, channel):
    running = coordinator()
    c = plain(channel, running.address)
    session: pb.JoinReply = stub(c, "Join")(tiny_join("client-0", 0), timeout=5)
    poll = stub(c, "Poll", **RAW)
    error = code_of(lambda: poll(padded_poll(64 << 10), metadata=bearer_metadata(session.token)))
    assert error.code() == sc.RESOURCE_EXHAUSTED
    assert "Poll request of" in error.details() and "limit" in error.details()
    forged = code_of(lambda: poll(padded_poll(20 << 20), metadata=bearer_metadata("forged")))
    assert forged.code() == sc.UNAUTHENTICATED  # over the receive limit: refused unread


# ---- names ---------------------------------------------------------------------------------


def test_client_names_are_one_name_in_nfkc_and_a_safe_set() -> None:
    assert normalise_name("ｓｉｔｅ－ａ") == "site-a"  # full-width forms
    assert normalise_name("ﬁle.site") == "file.site"  # a ligature
    for bad in ("", "a b", "a\nb", "a\x1b[31m", "x" * 129, "a/b"):
        with pytest.raises(BadName):
            normalise_name(bad)
    check_metric_name("eval/loss")
    for bad in ("", "loss\nINFO forged", "loss ok", "m" * 65):
        with pytest.raises(BadName):
            check_metric_name(bad)


def test_a_full_width_spelling_joins_as_the_plain_name(coordinator, channel):
    running = coordinator()
    join = stub(plain(channel, running.address), "Join")
    reply: pb.JoinReply = join(tiny_join("ｃｌｉｅｎｔ－０", 0), timeout=5)
    assert reply.client_id == "client-0"
    taken = code_of(lambda: join(tiny_join("client-0", 1), timeout=5))
    assert taken.code() == sc.ALREADY_EXISTS  # the same identity, spelt plainly
    bad = code_of(lambda: join(tiny_join("client\n0", 1), timeout=5))
    assert bad.code() == sc.INVALID_ARGUMENT and "characters outside" in bad.details()


# ---- an open round, one hand-driven peer selected ------------------------------------------


class Selected:
    """Round 1 open, with `mallory` (hand-driven) and an honest client selected."""

    def __init__(
        self, running: RunningCoordinator, opened: list[grpc.Channel], wide: bool = False
    ) -> None:
        self.running = running
        c = plain(opened, running.address)
        digest = running.coordinator.model.manifest.digest()
        self.token = stub(c, "Join")(tiny_join("mallory", 1, digest), timeout=5).token
        self.upload = stub(c, "Upload", **RAW)
        poll = stub(c, "Poll")
        self.honest = (
            ClientThread(client_config(running.address, 0), wide_task(0))
            if wide
            else start_client(running.address, 0)
        )
        wait_for(
            lambda: (
                poll(pb.PollRequest(), metadata=self.metadata, timeout=10).WhichOneof("action")
                == "train"
            ),
            30,
            "a train task",
        )

    @property
    def metadata(self) -> tuple[tuple[str, str], ...]:
        return bearer_metadata(self.token)

    @staticmethod
    def header(metrics: dict[str, float] | None = None, wide: bool = False) -> bytes:
        state = (wide_task() if wide else tiny_task()).build_model().state_dict()
        deltas = {n: torch.zeros_like(t) for n, t in state.items() if t.is_floating_point()}
        header = pb.UpdateHeader(round=1, model_version=0, num_examples=10, metrics=metrics or {})
        header.manifest.CopyFrom(Manifest.from_tensors(deltas).to_proto())
        return pb.UpdateChunk(header=header).SerializeToString()


def test_a_metric_name_with_a_newline_is_refused_naming_it(coordinator, channel):
    arena = Selected(coordinator(rounds=1, round_timeout=3.0), channel)
    forged = Selected.header({"loss\n2026 INFO round 1 committed": 0.5})
    error = code_of(lambda: arena.upload(iter([forged]), metadata=arena.metadata, timeout=10))
    assert error.code() == sc.INVALID_ARGUMENT
    assert "metric name" in error.details() and "newlines" in error.details()
    assert arena.honest.join(60) == 0


@pytest.mark.slow
def test_tiny_chunks_past_the_allowance_are_refused(coordinator, channel):
    running = coordinator(task=wide_task(), rounds=1, round_timeout=3.0)
    arena = Selected(running, channel, wide=True)
    chunks = [Selected.header(wide=True), *(frame_data(b"\0") for _ in range(80))]
    error = code_of(lambda: arena.upload(iter(chunks), metadata=arena.metadata, timeout=10))
    assert error.code() == sc.INVALID_ARGUMENT
    assert "under 1024 bytes" in error.details()
    assert arena.honest.join(60) == 0


@pytest.mark.slow
def test_a_header_and_then_nothing_is_cut_and_holds_no_round_open(coordinator, tmp_path, channel):
    running = coordinator(rounds=1, round_timeout=3.0, stall_timeout=6.0, heartbeat_seconds=1.0)
    arena = Selected(running, channel)
    release = threading.Event()

    def header_then_nothing() -> Iterator[bytes]:
        yield Selected.header()
        release.wait(30)

    outcome: list[grpc.RpcError] = []
    started = time.monotonic()

    def send() -> None:
        try:
            arena.upload(header_then_nothing(), metadata=arena.metadata, timeout=30)
        except grpc.RpcError as exc:
            outcome.append(exc)

    sender = threading.Thread(target=send)
    sender.start()
    assert arena.honest.join(60) == 0
    (record,) = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").open()]
    assert record["updates"] == 1
    assert record["duration_s"] < 3.0 + 2.0  # its deadline, not the stalled upload's cut
    sender.join(30)
    release.set()
    assert outcome and outcome[0].code() in (sc.DEADLINE_EXCEEDED, sc.FAILED_PRECONDITION)
    assert time.monotonic() - started < 30


def opened_download(channel, running, name: str):
    """`name` joined, told to train, and its download of the model opened: its header read."""
    c = plain(channel, running.address)
    digest = running.coordinator.model.manifest.digest()
    token = stub(c, "Join")(tiny_join(name, 1, digest)).token
    poll = stub(c, "Poll")
    wait_for(
        lambda: poll(pb.PollRequest(), metadata=bearer_metadata(token), timeout=10).train.round,
        30,
        "a train task",
    )
    download = stub(c, "Download")(
        pb.DownloadRequest(model_version=0, chunk_bytes=1 << 20), metadata=bearer_metadata(token)
    )
    next(download)
    return download


def test_a_download_nobody_reads_is_cut(coordinator, channel, caplog):
    caplog.set_level(logging.INFO, logger="fedstream")
    running = coordinator(task=wide_task(), rounds=1, min_clients=1, stall_timeout=1.5)
    download = opened_download(channel, running, "mallory")  # then nothing is read
    wait_for(lambda: "download stalled" in caplog.text, 20, "the stalled download cut")
    with pytest.raises(grpc.RpcError) as info:
        for _ in download:
            pass
    assert info.value.code() == sc.DEADLINE_EXCEEDED


def test_a_cancelled_download_is_one_line(coordinator, channel, caplog):
    """(Its client's name is its own: the line is rate-limited per client name, across
    the process, and other tests cancel downloads as mallory.)"""
    caplog.set_level(logging.INFO)
    running = coordinator(task=wide_task(), rounds=1, min_clients=1)
    download = opened_download(channel, running, "canceller")
    caplog.clear()
    download.cancel()
    wait_for(lambda: "cancelled after" in caplog.text, 30, "the cancelled download's line")
    tracebacks = [f"{r.name}: {r.getMessage()}" for r in caplog.records if r.exc_info]
    assert not tracebacks, tracebacks


# ---- sessions bound to certificates --------------------------------------------------------


def test_a_session_token_works_only_with_the_certificate_it_was_issued_to(coordinator, tmp_path):
    pki = tmp_path / "certs"
    make_certs(CertsConfig(out=pki, server_name="127.0.0.1", clients="client-0,client-1"))
    running = coordinator(
        tls_cert=pki / "server.pem", tls_key=pki / "server.key", client_ca=pki / "ca.pem"
    )

    def channel_of(name: str) -> grpc.Channel:
        creds = client_credentials(pki / "ca.pem", pki / f"{name}.pem", pki / f"{name}.key")
        return grpc.secure_channel(running.address, creds)

    with channel_of("client-0") as own, channel_of("client-1") as other:
        session: pb.JoinReply = stub(own, "Join")(tiny_join("client-0", 0), timeout=10)
        metadata = bearer_metadata(session.token)
        stolen = code_of(lambda: stub(other, "Poll")(pb.PollRequest(), metadata=metadata))
        assert stolen.code() == sc.PERMISSION_DENIED
        assert "another" in stolen.details()
        reply = stub(own, "Poll")(pb.PollRequest(), metadata=metadata, timeout=10)
        assert reply.WhichOneof("action") in ("wait", "train")


# ---- safe defaults on a network -----------------------------------------------------------


def test_a_network_address_needs_client_authentication_or_open_enrolment(tmp_path, capsys):
    with pytest.raises(ConfigError, match="--open-enrolment"):
        ServerConfig(address="0.0.0.0:50051", insecure=True).validate()
    tokens = tmp_path / "tokens.txt"
    tokens.write_text(f"a {token_hash(new_token())}\n")
    ServerConfig(address="0.0.0.0:50051", insecure=True, tokens=tokens).validate()
    ServerConfig(address="0.0.0.0:50051", insecure=True, open_enrolment=True).validate()
    ServerConfig(address="127.0.0.1:50051").validate()  # loopback: as before
    code = cli_main(["server", "--address", "0.0.0.0:0", "--insecure", "--run-dir", "r"])
    assert code == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "not loopback" in err[0] and "--open-enrolment" in err[0]


# ---- the rest: descriptors, a full disk, evaluation claims --------------------------------


def test_the_descriptor_limit_is_raised_to_the_hard_limit() -> None:
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    try:
        now = raise_descriptor_limit()
        assert resource.getrlimit(resource.RLIMIT_NOFILE)[0] == now
        assert hard == resource.RLIM_INFINITY or now == hard
        assert limits_line().startswith(f"open-file limit {now}; at most ")
        assert 16 <= connection_cap(now) < now
    finally:
        resource.setrlimit(resource.RLIMIT_NOFILE, (soft, hard))


def test_a_full_disk_is_one_line() -> None:
    try:
        try:
            raise OSError(errno.ENOSPC, "No space left on device", "run/metrics.jsonl")
        except OSError as exc:
            raise RuntimeError("checkpoint failed") from exc
    except RuntimeError as chained:
        line = disk_full(chained)
    assert line is not None and "no space left" in line and "run/metrics.jsonl" in line
    assert "\n" not in line
    assert disk_full(ValueError("other")) is None


def test_one_evaluation_claim_cannot_set_the_result() -> None:
    assert weigh_claims([5, 10, 15]) == [5, 10, 15]  # honest sizes differ: as claimed
    assert weigh_claims([300, 1 << 40]) == [300, 300]  # at most the others' weight
    assert weigh_claims([300] * 4 + [1 << 40]) == [300] * 4 + [1200]  # 4 x the median
    assert weigh_claims([0, 1 << 40]) == [0, 1 << 40]  # one report that counts: no cap
    assert weigh_claims([7]) == [7]


@pytest.mark.slow
def test_a_cancelled_upload_logs_no_traceback(coordinator, channel, caplog):
    caplog.set_level(logging.INFO)
    running = coordinator(task=wide_task(), rounds=1, round_timeout=3.0)
    arena = Selected(running, channel, wide=True)
    release = threading.Event()

    def some_then_nothing() -> Iterator[bytes]:
        yield Selected.header(wide=True)
        yield frame_data(b"\0" * (64 << 10))
        release.wait(30)

    call = arena.upload.future(some_then_nothing(), metadata=arena.metadata, timeout=30)
    open_round = running.coordinator.round
    wait_for(lambda: open_round and "mallory" in open_round.uploading, 20, "the upload")
    caplog.clear()
    call.cancel()
    release.set()
    assert arena.honest.join(60) == 0
    tracebacks = [f"{r.name}: {r.getMessage()}" for r in caplog.records if r.exc_info]
    assert not tracebacks, tracebacks
