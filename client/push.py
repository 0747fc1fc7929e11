"""Pushing one update until the coordinator has it: retries that resume at the byte the
coordinator holds, and an update kept across a coordinator restart.

A retried upload asks the coordinator how much of the cut one it holds (UploadOffset) and
sends only the rest (docs/checkpoints.md, "Uploads resume at their byte offset"). When the
coordinator restarted before acknowledging it (our session is unknown to it), the update is
kept (`Unsent`): the client joins again, and if the restarted coordinator asks it for the
same round, attempt and model, it sends that update instead of training again.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from dataclasses import dataclass

import grpc

from fedstream.client.connection import Connection
from fedstream.client.retry import RETRYABLE, Backoff, rpc_status
from fedstream.client.session import Session
from fedstream.client.transfers import Sent
from fedstream.client.uplink import EncodedUpdate
from fedstream.common.proto.v1 import coordinator_pb2 as pb

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Unsent:
    """A trained update the coordinator never acknowledged: its header, the task it
    answers (round, attempt, model version and digest), and the update as encoded (an
    error-feedback codec's residual already holds it: it is not encoded twice)."""

    header: pb.UpdateHeader
    task: tuple[int, int, int, str]
    update: EncodedUpdate

    @staticmethod
    def key(task: pb.TrainTask) -> tuple[int, int, int, str]:
        return (task.round, task.attempt, task.model_version, task.model_sha256)

    def answers(self, task: pb.TrainTask) -> bool:
        """Whether this update is what `task` asks for (a coordinator that names its model's
        digest and attempt, so that "the same" can be told)."""
        return bool(task.model_sha256 and task.attempt) and self.task == self.key(task)


def push(
    connection: Connection,
    session: Session,
    header: pb.UpdateHeader,
    task: pb.TrainTask,
    update: EncodedUpdate,
    max_backoff: float,
    contacted: Callable[[], None],
) -> bool:
    """Push `update`, retrying transient failures until the round's deadline; whether
    the coordinator accepted it. UNAUTHENTICATED (the session is gone) is raised on."""
    deadline = time.monotonic() + max(task.deadline_seconds, 1.0)
    backoff = Backoff(cap=max_backoff)
    sent = Sent()
    offset = 0
    resumable = bool(task.model_sha256)  # a coordinator that knows trailers and resumes
    while True:
        try:
            reply = connection.upload(
                session, header, update.manifest, update.pieces(), offset, sent, resumable
            )
            contacted()
            update.commit()
        except grpc.RpcError as exc:
            code, details = rpc_status(exc)
            if code == grpc.StatusCode.UNAUTHENTICATED:
                raise  # the session is gone: join again
            if code == grpc.StatusCode.OUT_OF_RANGE and offset:
                log.warning("round %d: %s; uploading from byte 0", task.round, details)
                offset = 0
                continue
            if code not in RETRYABLE or time.monotonic() + backoff.base > deadline:
                log.warning("round %d: update refused (%s): %s", task.round, code.name, details)
                return False
            log.warning("round %d: upload failed (%s); retrying", task.round, code.name)
            backoff.sleep()
            offset = held_offset(connection, session, header) if resumable else 0
            continue
        log.log(
            logging.INFO if reply.accepted else logging.WARNING,
            "round %d: update %s (%s); %d bytes sent for an update of %d",
            task.round,
            "accepted" if reply.accepted else "not accepted",
            reply.detail,
            sent.bytes,
            update.manifest.total_bytes,
        )
        return reply.accepted


def held_offset(connection: Connection, session: Session, header: pb.UpdateHeader) -> int:
    """Where to resume a cut upload: the bytes the coordinator holds of it (0 when it
    cannot be asked)."""
    try:
        offset = connection.upload_offset(session, header)
    except grpc.RpcError:
        return 0
    if offset:
        log.info("round %d: the coordinator holds %d bytes; resuming there", header.round, offset)
    return offset
