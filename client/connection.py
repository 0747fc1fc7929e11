"""The client's side of the wire: channels, session, model download and update upload.

Control calls (Join, Poll, Heartbeat) and bulk calls (Download, Upload) run on two separate
channels, each with its own HTTP/2 connection, so a long-poll never queues behind
tensor bytes.
"""

from __future__ import annotations

import logging
import random
import threading
import time
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from types import TracebackType
from typing import Any

import grpc
import torch

from fedstream.client.held_model import HeldModel
from fedstream.common.codecs import wire_chunks
from fedstream.common.errors import WireError
from fedstream.common.progress import LogLines, ProgressView, Tracker
from fedstream.common.proto.v1 import coordinator_pb2 as pb
from fedstream.common.service import bearer_metadata, stub
from fedstream.common.tls import client_credentials
from fedstream.common.wire.framing import MalformedChunk, frame_data
from fedstream.common.wire.manifest import Manifest

log = logging.getLogger(__name__)

MAX_MESSAGE = 80 << 20
POLL_DEADLINE = 120.0
CONTROL_DEADLINE = 30.0
HEARTBEAT_DEADLINE = 5.0

RETRYABLE = frozenset(
    {
        grpc.StatusCode.UNAVAILABLE,
        grpc.StatusCode.DEADLINE_EXCEEDED,
        grpc.StatusCode.CANCELLED,
        grpc.StatusCode.RESOURCE_EXHAUSTED,
        grpc.StatusCode.ABORTED,
    }
)
"""Statuses after which the same call may succeed later (the peer or the link recovers)."""


class Backoff:
    """Exponential backoff with full jitter: sleep a uniform draw below a doubling cap.

    The n-th delay since the last reset is drawn from [0, min(cap, base * 2**n)].
    """

    def __init__(
        self,
        base: float = 0.5,
        cap: float = 30.0,
        rng: random.Random | None = None,
        sleep: Callable[[float], None] = time.sleep,
    ) -> None:
        self.base = base
        self.cap = cap
        self.attempt = 0
        self.rng = rng or random.Random()
        self._sleep = sleep

    def ceiling(self) -> float:
        """The bound of the next delay."""
        # 2.0 ** n raises OverflowError past n = 1023, which a client retrying for days
        # reaches; any cap is reached long before 2 ** 1000.
        return min(self.cap, self.base * 2.0 ** min(self.attempt, 1000))

    def next_delay(self) -> float:
        ceiling = self.ceiling()
        self.attempt += 1
        return self.rng.uniform(0.0, ceiling)

    def sleep(self) -> float:
        delay = self.next_delay()
        self._sleep(delay)
        return delay

    def sleep_for(self, delay: float) -> None:
        """Wait `delay` (drawn by `next_delay`, say to log it first) with the sleep given."""
        self._sleep(delay)

    def reset(self) -> None:
        self.attempt = 0


def negotiated_chunk_bytes(configured: int, server_max: int) -> int:
    """The chunk size a client uses after Join: its own, unless the coordinator's
    `max_chunk_bytes` (0 when it states none) is smaller."""
    return min(configured, server_max) if server_max > 0 else configured


@dataclass
class Session:
    client_id: str
    token: str
    run_id: str
    chunk_bytes: int
    """Bytes per upload chunk and asked for per download chunk on this session."""
    heartbeat_seconds: float = 0.0
    """How often to call Heartbeat while holding a task (0: never)."""

    @property
    def metadata(self) -> tuple[tuple[str, str], ...]:
        return bearer_metadata(self.token)


class StallWatchdog:
    """Cancels a streaming call that has moved no bytes for `timeout` seconds."""

    def __init__(self, call: Any, timeout: float) -> None:
        self.call = call
        self.timeout = timeout
        self.last = time.monotonic()
        self.stalled = False
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._watch, daemon=True)
        self._thread.start()

    def progress(self) -> None:
        self.last = time.monotonic()

    def _watch(self) -> None:
        while not self._stop.wait(min(1.0, self.timeout / 4)):
            if time.monotonic() - self.last > self.timeout:
                self.stalled = True
                self.call.cancel()
                return

    def close(self) -> None:
        self._stop.set()


def _resumable(exc: BaseException, watchdog: StallWatchdog) -> bool:
    """Whether a download that failed with `exc` may resume from its last byte.

    CANCELLED without a stall is the coordinator closing the round: not retried.
    """
    if not isinstance(exc, grpc.RpcError):
        return False
    code = exc.code()  # type: ignore[attr-defined]
    return watchdog.stalled or (code in RETRYABLE and code != grpc.StatusCode.CANCELLED)


def _channel(
    target: str, isolated_name: str, credentials: grpc.ChannelCredentials | None
) -> grpc.Channel:
    """A channel of its own (own subchannel pool, so its own HTTP/2 connection); TLS with
    `credentials`, plaintext without."""
    options = [
        ("grpc.max_receive_message_length", MAX_MESSAGE),
        ("grpc.max_send_message_length", MAX_MESSAGE),
        ("grpc.use_local_subchannel_pool", 1),
        ("grpc.primary_user_agent", f"fedstream-{isolated_name}"),
        ("grpc.keepalive_time_ms", 30_000),
        ("grpc.keepalive_timeout_ms", 10_000),
        ("grpc.keepalive_permit_without_calls", 1),
        ("grpc.http2.max_pings_without_data", 0),
    ]
    if credentials is None:
        return grpc.insecure_channel(target, options=options)
    return grpc.secure_channel(target, credentials, options=options)


class Connection:
    """Stubs over one control and one bulk channel to the coordinator.

    With `ca`, both channels speak TLS and the coordinator's certificate must chain to
    `ca`; with `cert` and `key` as well, this client presents its own (mutual TLS).
    """

    def __init__(
        self,
        target: str,
        chunk_bytes: int,
        stall_timeout: float,
        ca: Path | None = None,
        cert: Path | None = None,
        key: Path | None = None,
        progress: ProgressView | None = None,
    ) -> None:
        self.target = target
        self.progress = progress or ProgressView([LogLines(log)])
        self.chunk_bytes = chunk_bytes
        self.stall_timeout = stall_timeout
        self.ca = ca
        credentials = client_credentials(ca, cert, key) if ca is not None else None
        self.control = _channel(target, "control", credentials)
        self.bulk = _channel(target, "bulk", credentials)
        self._join = stub(self.control, "Join")
        self._poll = stub(self.control, "Poll")
        self._heartbeat = stub(self.control, "Heartbeat")
        self._report_evaluation = stub(self.control, "ReportEvaluation")
        self._download = stub(self.bulk, "Download")
        self._upload = stub(self.bulk, "Upload")

    def close(self) -> None:
        self.control.close()
        self.bulk.close()

    def join(self, request: pb.JoinRequest, token: str = "") -> Session:
        """A new session; `token` (the client's own credential, when it has one) is
        presented on this call only: later calls present the session's token."""
        reply: pb.JoinReply = self._join(
            request,
            metadata=bearer_metadata(token) if token else None,
            timeout=CONTROL_DEADLINE,
        )
        chunk_bytes = negotiated_chunk_bytes(self.chunk_bytes, reply.max_chunk_bytes)
        return Session(
            reply.client_id, reply.token, reply.run_id, chunk_bytes, reply.heartbeat_seconds
        )

    def poll(self, session: Session) -> pb.PollReply:
        reply: pb.PollReply = self._poll(
            pb.PollRequest(), metadata=session.metadata, timeout=POLL_DEADLINE
        )
        return reply

    def heartbeat(self, session: Session, round_number: int) -> pb.HeartbeatReply:
        reply: pb.HeartbeatReply = self._heartbeat(
            pb.HeartbeatRequest(round=round_number),
            metadata=session.metadata,
            timeout=HEARTBEAT_DEADLINE,
        )
        return reply

    def report_evaluation(
        self, session: Session, report: pb.EvaluationReport
    ) -> pb.EvaluationReply:
        reply: pb.EvaluationReply = self._report_evaluation(
            report, metadata=session.metadata, timeout=CONTROL_DEADLINE
        )
        return reply

    def download(
        self, session: Session, version: int, expected: Manifest, attempts: int = 5
    ) -> HeldModel:
        """The global model `version`, resuming from the last byte received after a break.

        The bytes go to a `HeldModel` on disk as they arrive, never to a second copy of
        the model in memory. InvalidManifest, before any model bytes are received, when
        the coordinator's model is not laid out as `expected` (the client's own model).
        """
        held: HeldModel | None = None
        backoff = Backoff(cap=5.0)
        progress: Tracker | None = None
        for attempt in range(1, attempts + 1):
            offset = held.bytes_written if held is not None else 0
            request = pb.DownloadRequest(
                model_version=version, offset=offset, chunk_bytes=session.chunk_bytes
            )
            call = self._download(request, metadata=session.metadata)
            watchdog = StallWatchdog(call, self.stall_timeout)
            started = False
            try:
                for item in call:
                    watchdog.progress()
                    if isinstance(item, memoryview):
                        if held is None or not started:
                            raise WireError("model data arrived before the model header")
                        held.write(item)
                        if progress is not None:
                            progress.advance(len(item))
                    elif isinstance(item, pb.ModelHeader):
                        received = Manifest.from_proto(item.manifest)
                        expected.require_same_layout(received)
                        if held is None:
                            held = HeldModel(received, version)
                            progress = self.progress.start(
                                "download", f"download of model v{version}", received.total_bytes
                            )
                        else:
                            held.manifest.require_same_layout(received)
                        if item.offset != offset:
                            raise WireError(f"download resumed at {item.offset}, asked {offset}")
                        started = True
                    elif isinstance(item, MalformedChunk):
                        raise WireError(item.reason)
                if held is None or not held.complete:
                    got = held.bytes_written if held else 0
                    total = held.manifest.total_bytes if held else "?"
                    raise WireError(f"download ended after {got} of {total} bytes")
                if progress is not None:
                    progress.finish()
                return held
            except BaseException as exc:
                if not _resumable(exc, watchdog) or attempt == attempts:
                    if progress is not None:
                        progress.finish()
                    if held is not None:
                        held.close()  # a failed download leaves no file behind
                    raise
                log.warning(
                    "download of model v%d broke at byte %d (%s); resuming",
                    version,
                    held.bytes_written if held else 0,
                    "stalled" if watchdog.stalled else exc.code().name,  # type: ignore[attr-defined]
                )
                backoff.sleep()
            finally:
                watchdog.close()
        raise AssertionError("unreachable: the last attempt returns or raises")

    def upload(
        self,
        session: Session,
        header: pb.UpdateHeader,
        manifest: Manifest,
        pieces: Iterable[torch.Tensor],
    ) -> pb.UploadReply:
        """Stream one update: the header, then the bytes of `pieces` (in manifest order)."""
        header.manifest.CopyFrom(manifest.to_proto())

        def messages(progress: Tracker) -> Iterator[pb.UpdateChunk | bytes]:
            yield pb.UpdateChunk(header=header)
            for chunk in wire_chunks(manifest, pieces, session.chunk_bytes):
                yield frame_data(chunk)
                progress.advance(len(chunk))

        label = f"upload for round {header.round}"
        with self.progress.track("upload", label, manifest.total_bytes) as progress:
            reply: pb.UploadReply = self._upload(messages(progress), metadata=session.metadata)
        return reply


class Heartbeat:
    """While open, calls Heartbeat(round) every `session.heartbeat_seconds` from a daemon
    thread, so the coordinator does not release this client from a round it is working on.

    A beat that fails is only logged: the task carries on, and the coordinator's own
    refusal of the upload or report is what counts. Nothing runs when the coordinator
    asks for no heartbeat (an interval of 0).
    """

    def __init__(self, connection: Connection, session: Session, round_number: int) -> None:
        self.connection = connection
        self.session = session
        self.round = round_number
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def __enter__(self) -> Heartbeat:
        if self.session.heartbeat_seconds > 0:
            self._thread = threading.Thread(target=self._beat, daemon=True, name="heartbeat")
            self._thread.start()
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        # Not joined: a beat in flight ends within its short deadline, and the task's end
        # need not wait for it.
        self._stop.set()

    @property
    def running(self) -> bool:
        return self._thread is not None and self._thread.is_alive()

    def _beat(self) -> None:
        told_closed = False
        while not self._stop.wait(self.session.heartbeat_seconds):
            try:
                reply = self.connection.heartbeat(self.session, self.round)
            except grpc.RpcError as exc:
                log.debug(
                    "heartbeat for round %d failed (%s)",
                    self.round,
                    exc.code().name,  # type: ignore[attr-defined]
                )
                continue
            if not reply.phase_open and not told_closed:
                log.info("round %d: the coordinator has closed this phase", self.round)
                told_closed = True
