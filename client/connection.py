"""The client's two channels to the coordinator and the calls it makes over them.

Control calls (Join, Poll, Heartbeat, ReportEvaluation) and bulk calls (Download, Upload)
run on two separate channels, each with its own HTTP/2 connection, so a long-poll or a
heartbeat never queues behind tensor bytes. The session a Join opens is in session.py;
how the bulk calls move a model, in transfers.py.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable
from pathlib import Path

import grpc
import torch

from fedstream.client import transfers
from fedstream.client.held_model import HeldModel
from fedstream.client.retry import HandshakeWatch
from fedstream.client.session import Session, negotiated_chunk_bytes
from fedstream.common.progress import LogLines, ProgressView
from fedstream.common.proto.v1 import coordinator_pb2 as pb
from fedstream.common.service import bearer_metadata, stub
from fedstream.common.tls import client_credentials
from fedstream.common.wire.manifest import Manifest

log = logging.getLogger(__name__)

MAX_MESSAGE = 80 << 20
POLL_DEADLINE = 120.0
CONTROL_DEADLINE = 30.0
HEARTBEAT_DEADLINE = 5.0


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
    `handshakes` tells a credential mistake from an outage (`retry.py`); an answered
    Join or Poll resets it.
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
        self.handshakes = HandshakeWatch(target, tls=ca is not None, mutual=cert is not None)
        self.control = _channel(target, "control", credentials)
        self.bulk = _channel(target, "bulk", credentials)
        self._join = stub(self.control, "Join")
        self._poll = stub(self.control, "Poll")
        self._heartbeat = stub(self.control, "Heartbeat")
        self._report_evaluation = stub(self.control, "ReportEvaluation")
        self._download = stub(self.bulk, "Download")
        self._upload = stub(self.bulk, "Upload")
        self._upload_offset = stub(self.control, "UploadOffset")

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
        self.handshakes.reset()
        chunk_bytes = negotiated_chunk_bytes(self.chunk_bytes, reply.max_chunk_bytes)
        return Session(
            reply.client_id, reply.token, reply.run_id, chunk_bytes, reply.heartbeat_seconds
        )

    def poll(self, session: Session) -> pb.PollReply:
        reply: pb.PollReply = self._poll(
            pb.PollRequest(), metadata=session.metadata, timeout=POLL_DEADLINE
        )
        self.handshakes.reset()
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
        self,
        session: Session,
        version: int,
        expected: Manifest,
        attempts: int = 5,
        directory: Path | None = None,
        fragment: int | None = None,
    ) -> HeldModel:
        """The global model `version` (or one streaming fragment of it), on disk (kept in
        `directory` when given), resuming after a break (transfers.py)."""
        return transfers.download(
            self._download,
            session,
            version,
            expected,
            self.stall_timeout,
            self.progress,
            attempts,
            directory,
            fragment,
        )

    def upload(
        self,
        session: Session,
        header: pb.UpdateHeader,
        manifest: Manifest,
        pieces: Iterable[torch.Tensor],
        offset: int = 0,
        sent: transfers.Sent | None = None,
        trailer: bool = False,
    ) -> pb.UploadReply:
        """Stream one update: the header, then the bytes of `pieces` (in manifest order)
        from byte `offset` on, then its digest (transfers.py)."""
        return transfers.upload(
            self._upload, session, header, manifest, pieces, self.progress, offset, sent, trailer
        )

    def upload_offset(self, session: Session, header: pb.UpdateHeader) -> int:
        """Bytes the coordinator holds of this update from a cut upload; 0 from one that
        holds none or does not know the call (older than it)."""
        request = pb.UploadOffsetRequest(
            round=header.round, model_version=header.model_version, attempt=header.attempt
        )
        try:
            reply: pb.UploadOffsetReply = self._upload_offset(
                request, metadata=session.metadata, timeout=CONTROL_DEADLINE
            )
        except grpc.RpcError as exc:
            if exc.code() == grpc.StatusCode.UNIMPLEMENTED:  # type: ignore[attr-defined]
                return 0
            raise
        return int(reply.offset)
