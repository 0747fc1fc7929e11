"""The gRPC skin over the Coordinator: unpack, authenticate, delegate, map errors.

This is the one place protobuf messages are built from the coordinator's plain results
(`server/calls.py`) and the one place domain errors become gRPC statuses. Bulk methods
use the hand framing of `common/wire/framing.py`, so the service is registered with explicit
method handlers rather than the generated `add_CoordinatorServicer_to_server`.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator
from typing import Any, NoReturn, TypeVar

import grpc
from google.protobuf.message import Message

from fedstream.common.errors import (
    FedstreamError,
    InvalidManifest,
    LimitExceeded,
    NonFiniteValues,
    WireError,
)
from fedstream.common.logs import RateLimitedLog
from fedstream.common.proto.v1 import coordinator_pb2 as pb
from fedstream.common.round_config import to_proto as config_to_proto
from fedstream.common.service import method_handlers
from fedstream.common.wire.framing import MalformedChunk, MalformedMessage, frame_data
from fedstream.server.admission.door import Admission
from fedstream.server.admission.sessions import ClientRecord
from fedstream.server.calls import (
    Agreement,
    EvaluateWork,
    EvaluationClaim,
    JoinClaim,
    Receipt,
    RunDone,
    TrainWork,
    UpdateClaim,
    UploadTrailer,
    Work,
)
from fedstream.server.config import TransportConfig
from fedstream.server.coordinator import Coordinator
from fedstream.server.errors import (
    AlreadyJoined,
    DigestMismatch,
    IdentityMismatch,
    InvalidJoin,
    InvalidUpdate,
    NotSelected,
    OffsetOutOfRange,
    TaskMismatch,
    TooManyClients,
    TransferStalled,
    UnknownClient,
    UpdateTooLarge,
    UploadInProgress,
    WrongRound,
)
from fedstream.server.live_state import LiveState, TransferMeter
from fedstream.server.transfer import RateFloor, release_refused

log = logging.getLogger(__name__)

REFUSAL_LOG_INTERVAL_S = 10.0
MAX_DETAIL = 1024
"""Characters of an error's message sent back in its status (the rest is cut)."""
M = TypeVar("M", bound=Message)

STATUS_OF: dict[type[FedstreamError], grpc.StatusCode] = {
    UnknownClient: grpc.StatusCode.UNAUTHENTICATED,
    IdentityMismatch: grpc.StatusCode.PERMISSION_DENIED,
    AlreadyJoined: grpc.StatusCode.ALREADY_EXISTS,
    TooManyClients: grpc.StatusCode.RESOURCE_EXHAUSTED,
    TaskMismatch: grpc.StatusCode.FAILED_PRECONDITION,
    WrongRound: grpc.StatusCode.FAILED_PRECONDITION,
    NotSelected: grpc.StatusCode.PERMISSION_DENIED,
    UploadInProgress: grpc.StatusCode.ABORTED,
    TransferStalled: grpc.StatusCode.DEADLINE_EXCEEDED,
    OffsetOutOfRange: grpc.StatusCode.OUT_OF_RANGE,
    DigestMismatch: grpc.StatusCode.DATA_LOSS,
    InvalidJoin: grpc.StatusCode.INVALID_ARGUMENT,
    InvalidUpdate: grpc.StatusCode.INVALID_ARGUMENT,
    UpdateTooLarge: grpc.StatusCode.INVALID_ARGUMENT,
    InvalidManifest: grpc.StatusCode.INVALID_ARGUMENT,
    WireError: grpc.StatusCode.INVALID_ARGUMENT,
    NonFiniteValues: grpc.StatusCode.INVALID_ARGUMENT,
    LimitExceeded: grpc.StatusCode.RESOURCE_EXHAUSTED,
}


def status_of(error: FedstreamError) -> grpc.StatusCode:
    for cls in type(error).__mro__:
        if cls in STATUS_OF:
            return STATUS_OF[cls]
    return grpc.StatusCode.INTERNAL


refusals = RateLimitedLog(log, interval=REFUSAL_LOG_INTERVAL_S)
"""A peer can repeat a refused request at will: one line per burst of each kind."""


async def _reject(
    context: grpc.aio.ServicerContext, method: str, error: FedstreamError
) -> NoReturn:
    code = status_of(error)
    detail = str(error)
    if len(detail) > MAX_DETAIL:  # a status message travels in a header of bounded size
        detail = detail[:MAX_DETAIL] + "..."
    host = (context.peer() or "").rpartition(":")[0]
    key = (method, code, type(error), host)
    refusals.log(
        logging.WARNING, key, "%s from %s rejected (%s): %s", method, host, code.name, error
    )
    release_refused()
    await context.abort(code, str(error))
    raise AssertionError("unreachable: abort raises")


def _decoded(request: M | MalformedMessage) -> M:
    """The request, or WireError (INVALID_ARGUMENT) for bytes that did not decode."""
    if isinstance(request, MalformedMessage):
        raise WireError(request.reason)
    return request


def poll_reply(work: Work) -> pb.PollReply:
    if isinstance(work, TrainWork):
        task = pb.TrainTask(
            round=work.round,
            model_version=work.model_version,
            deadline_seconds=work.deadline_seconds,
            attempt=work.attempt,
            model_sha256=work.model_sha256,
        )
        config_to_proto(work.config, task.config)
        return pb.PollReply(train=task)
    if isinstance(work, EvaluateWork):
        return pb.PollReply(
            evaluate=pb.EvaluateTask(
                round=work.round,
                model_version=work.model_version,
                deadline_seconds=work.deadline_seconds,
                model_sha256=work.model_sha256,
            )
        )
    if isinstance(work, RunDone):
        return pb.PollReply(done=pb.Done(reason=work.reason))
    return pb.PollReply(wait=pb.Wait(retry_after_seconds=0.0))


def _receipt(receipt: Receipt) -> dict[str, Any]:
    return {"accepted": receipt.accepted, "detail": receipt.detail}


class CoordinatorServicer:
    def __init__(
        self,
        coordinator: Coordinator,
        admission: Admission,
        config: TransportConfig,
        live: LiveState | None = None,
    ) -> None:
        self.coordinator = coordinator
        self.admission = admission
        """Who each call is (`server/admission/`): asked here, and nowhere else."""
        self.live = live or LiveState(coordinator)
        self.stall_timeout = config.stall_timeout
        self.max_chunk_bytes = config.max_chunk_bytes
        self.min_transfer_rate = config.min_transfer_rate
        self.transfer_window = config.transfer_window

    def _client(self, context: grpc.aio.ServicerContext) -> ClientRecord:
        return self.admission.caller(context)

    async def join(
        self, message: pb.JoinRequest | MalformedMessage, context: grpc.aio.ServicerContext
    ) -> pb.JoinReply:
        try:
            request = _decoded(message)
            peer_name, token = self.admission.credentials(context)
            claim = JoinClaim(
                request.name,
                request.task,
                request.partition,
                request.num_partitions,
                request.model_digest,
                peer_name=peer_name,
                token=token,
                agreement=Agreement.of(request),
            )
            joined = self.coordinator.join(claim)
        except FedstreamError as exc:
            await _reject(context, "Join", exc)
        return pb.JoinReply(
            client_id=joined.client.name,
            token=joined.client.token,
            run_id=joined.run_id,
            max_chunk_bytes=joined.max_chunk_bytes,
            heartbeat_seconds=joined.heartbeat_seconds,
        )

    async def poll(
        self, message: pb.PollRequest | MalformedMessage, context: grpc.aio.ServicerContext
    ) -> pb.PollReply:
        try:
            _decoded(message)
            return poll_reply(await self.coordinator.poll(self._client(context)))
        except FedstreamError as exc:
            await _reject(context, "Poll", exc)

    async def download(
        self, message: pb.DownloadRequest | MalformedMessage, context: grpc.aio.ServicerContext
    ) -> AsyncIterator[pb.ModelChunk | bytes]:
        try:
            request = _decoded(message)
            client = self._client(context)
            stream = self.coordinator.open_download(
                client, request.model_version, request.offset, request.chunk_bytes
            )
        except FedstreamError as exc:
            await _reject(context, "Download", exc)
        header = pb.ModelHeader(
            model_version=stream.version,
            manifest=stream.manifest.to_proto(),
            offset=stream.offset,
            sha256=stream.sha256,
        )
        floor = RateFloor(self.min_transfer_rate, self.transfer_window)
        meter = self.live.meter(client.name)
        meter.downloads += 1
        try:
            yield pb.ModelChunk(header=header)
            for chunk in stream.chunks:
                yield frame_data(chunk)
                floor.add(len(chunk))
                meter.down += len(chunk)
        except FedstreamError as exc:
            await _reject(context, "Download", exc)
        finally:
            meter.downloads -= 1
            self.coordinator.count_download(floor.total)

    async def upload(
        self, requests: AsyncIterator[Any], context: grpc.aio.ServicerContext
    ) -> pb.UploadReply:
        try:
            client = self._client(context)
            iterator = requests.__aiter__()
            try:
                first = await asyncio.wait_for(iterator.__anext__(), self.stall_timeout)
            except StopAsyncIteration:
                raise WireError("upload stream is empty: expected a header") from None
            except TimeoutError:
                raise TransferStalled("no upload header arrived in time") from None
            if isinstance(first, MalformedChunk):
                raise WireError(first.reason)
            if not isinstance(first, pb.UpdateHeader):
                raise WireError("the first upload message must be the header")
            claim = UpdateClaim(
                first.round,
                first.model_version,
                first.num_examples,
                first.metrics,
                first.manifest,
                first.attempt,
                first.resume_offset,
            )
            meter = self.live.meter(client.name)
            meter.uploads += 1
            try:
                receipt = await self.coordinator.receive_upload(
                    client, claim, self._data_chunks(iterator, meter, claim.trailer)
                )
            finally:
                meter.uploads -= 1
            meter.booked += receipt.accepted
            return pb.UploadReply(**_receipt(receipt))
        except FedstreamError as exc:
            self.live.rejected_update(exc)
            await _reject(context, "Upload", exc)

    async def upload_offset(
        self, message: pb.UploadOffsetRequest | MalformedMessage, context: grpc.aio.ServicerContext
    ) -> pb.UploadOffsetReply:
        try:
            request = _decoded(message)
            offset = await self.coordinator.upload_offset(
                self._client(context), request.round, request.model_version, request.attempt
            )
        except FedstreamError as exc:
            await _reject(context, "UploadOffset", exc)
        return pb.UploadOffsetReply(offset=offset)

    async def report_evaluation(
        self, message: pb.EvaluationReport | MalformedMessage, context: grpc.aio.ServicerContext
    ) -> pb.EvaluationReply:
        try:
            request = _decoded(message)
            claim = EvaluationClaim(
                request.round, request.model_version, request.num_examples, request.metrics
            )
            receipt = self.coordinator.report_evaluation(self._client(context), claim)
            return pb.EvaluationReply(**_receipt(receipt))
        except FedstreamError as exc:
            await _reject(context, "ReportEvaluation", exc)

    async def heartbeat(
        self, message: pb.HeartbeatRequest | MalformedMessage, context: grpc.aio.ServicerContext
    ) -> pb.HeartbeatReply:
        try:
            request = _decoded(message)
            open_ = self.coordinator.heartbeat(self._client(context), request.round)
        except FedstreamError as exc:
            await _reject(context, "Heartbeat", exc)
        return pb.HeartbeatReply(phase_open=open_)

    async def _data_chunks(
        self, iterator: AsyncIterator[Any], meter: TransferMeter, trailer: UploadTrailer
    ) -> AsyncIterator[memoryview]:
        """The data chunks after an upload's header, failing when none arrives in time; a
        trailer fills in `trailer` and must be the last message."""
        while True:
            try:
                # asyncio.timeout, not wait_for: wait_for wraps every chunk in a new Task.
                async with asyncio.timeout(self.stall_timeout):
                    item = await iterator.__anext__()
            except StopAsyncIteration:
                return
            except TimeoutError:
                raise TransferStalled(
                    f"no bytes for {self.stall_timeout:.0f}s: upload stalled"
                ) from None
            if isinstance(item, MalformedChunk):
                raise WireError(item.reason)
            if trailer.sha256:
                raise WireError("a message arrived after the upload's trailer")
            if isinstance(item, pb.UpdateTrailer):
                trailer.sha256 = item.sha256 or "-"
                continue
            if not isinstance(item, memoryview):
                raise WireError("a second header arrived in the middle of the upload")
            if len(item) > self.max_chunk_bytes:
                raise LimitExceeded(
                    f"a data chunk of {len(item)} bytes is over this coordinator's "
                    f"max_chunk_bytes of {self.max_chunk_bytes}"
                )
            meter.up += len(item)
            yield item

    def handler(self) -> grpc.GenericRpcHandler:
        return method_handlers(
            {
                "Join": self.join,
                "Poll": self.poll,
                "Download": self.download,
                "Upload": self.upload,
                "UploadOffset": self.upload_offset,
                "ReportEvaluation": self.report_evaluation,
                "Heartbeat": self.heartbeat,
            }
        )
