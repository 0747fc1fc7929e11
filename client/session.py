"""The client's session with the coordinator, and the heartbeat that keeps it in a round.

A Join opens a `Session` (the coordinator's name for this client, its token, the run,
the chunk size both sides agreed on, how often to beat); every later call presents its
token. While the client works on a task, `Heartbeat` tells the coordinator it is still
at it, from a thread of its own over the control channel.
"""

from __future__ import annotations

import logging
import threading
from dataclasses import dataclass
from types import TracebackType
from typing import Protocol

import grpc

from fedstream.client.retry import rpc_status
from fedstream.common.proto.v1 import coordinator_pb2 as pb
from fedstream.common.service import bearer_metadata

log = logging.getLogger(__name__)


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


class HeartbeatCall(Protocol):
    """What beats: the Heartbeat call on the control channel (`Connection.heartbeat`)."""

    def heartbeat(self, session: Session, round_number: int) -> pb.HeartbeatReply: ...


STOP_WAIT_SECONDS = 10.0
"""The longest the end of a task waits for a beat in flight (its call's own deadline is
shorter)."""


class Heartbeat:
    """While open, calls Heartbeat(round) every `session.heartbeat_seconds` from a daemon
    thread, so the coordinator does not release this client from a round it is working on.

    A beat that fails is only logged: the task carries on, and the coordinator's own
    refusal of the upload or report is what counts. Nothing runs when the coordinator
    asks for no heartbeat (an interval of 0).
    """

    def __init__(self, connection: HeartbeatCall, session: Session, round_number: int) -> None:
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
        # Joined, so that no beat lands after the task's end (after the next Poll): a beat
        # in flight ends within its short deadline, and the wait for it is bounded by that.
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=STOP_WAIT_SECONDS)

    @property
    def running(self) -> bool:
        return self._thread is not None and self._thread.is_alive()

    def _beat(self) -> None:
        told_closed = False
        while not self._stop.wait(self.session.heartbeat_seconds):
            try:
                reply = self.connection.heartbeat(self.session, self.round)
            except grpc.RpcError as exc:
                log.debug("heartbeat for round %d failed (%s)", self.round, rpc_status(exc)[0].name)
                continue
            if not reply.phase_open and not told_closed:
                log.info("round %d: the coordinator has closed this phase", self.round)
                told_closed = True
