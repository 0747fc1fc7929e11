"""The gRPC skin over the Coordinator: unpack, authenticate, delegate, map errors.

This is the one place protobuf messages are built from the coordinator's plain results
(`server/calls.py`) and the one place domain errors become gRPC statuses. Bulk methods
use the hand framing of `common/wire/framing.py`, and every call passes the gate
(`admission/gate.py`) before its request is read, so the service is registered with
explicit method handlers rather than the generated `add_CoordinatorServicer_to_server`.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator, Awaitable, Callable
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
from fedstream.common.wire.framing import MalformedChunk, MalformedMessage, frame_data
from fedstream.server.admission.door import Admission
from fedstream.server.admission.gate import Behaviour, Gate, OversizedMessage, deferred_handlers
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
    UnknownFragment,
    UpdateTooLarge,
    UploadInProgress,
    WrongRound,
)
from fedstream.server.live_state import LiveState
from fedstream.server.transfer import RateFloor, release_refused
from fedstream.server.upload_chunks import data_chunks, first_then_rest

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
    UnknownFragment: grpc.StatusCode.INVALID_ARGUMENT,
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
cancelled = RateLimitedLog(log, interval=REFUSAL_LOG_INTERVAL_S)
"""A client that cancels its transfers: one line per client per burst, no traceback."""


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
    """The request; LimitExceeded (RESOURCE_EXHAUSTED) for one over its method's limit,
    WireError (INVALID_ARGUMENT) for bytes that did not decode."""
    if isinstance(request, OversizedMessage):
        raise LimitExceeded(request.reason)
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
        self.gate = Gate(admission)
        """What each call must prove before its request is read."""
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
            peer_name, token, certificate = self.admission.credentials(context)
            claim = JoinClaim(
                request.name,
                request.task,
                request.partition,
                request.num_partitions,
                request.model_digest,
                peer_name=peer_name,
                token=token,
                certificate=certificate,
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
    ) -> None:
        """Stream the model with `context.write`: a write that the client does not read
        within the stall timeout cuts the download (DEADLINE_EXCEEDED) and frees what it
        held; a download the client cancels ends with one log line."""
        try:
            request = _decoded(message)
            client = self._client(context)
            fragment = request.fragment if request.HasField("fragment") else None
            stream = self.coordinator.open_download(
                client, request.model_version, request.offset, request.chunk_bytes, fragment
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
            await self._write(context, pb.ModelChunk(header=header))
            for chunk in stream.chunks:
                await self._write(context, frame_data(chunk))
                floor.add(len(chunk))
                meter.down += len(chunk)
        except FedstreamError as exc:
            await _reject(context, "Download", exc)
        except asyncio.CancelledError:
            cancelled.log(
                logging.INFO,
                client.name,
                "download by %s cancelled after %d bytes",
                client.name,
                floor.total,
            )
            raise
        finally:
            meter.downloads -= 1
            self.coordinator.count_download(floor.total)

    async def _write(self, context: grpc.aio.ServicerContext, message: Any) -> None:
        """One message of a download; TransferStalled when the client reads nothing of it
        for the stall timeout."""
        try:
            async with asyncio.timeout(self.stall_timeout):
                await context.write(message)
        except TimeoutError:
            raise TransferStalled(
                f"the client read nothing for {self.stall_timeout:.0f}s: download stalled"
            ) from None
        except grpc.aio.InternalError:
            # a send that fails inside grpc (ExecuteBatchError) means the stream is gone:
            # its client cancelled or dropped it, and the handler's own cancel may not
            # have landed yet (context.cancelled() can still be False): it is a cancel
            raise asyncio.CancelledError from None

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
            self._check_header(client, claim)
            meter = self.live.meter(client.name)
            # The upload joins the round (and may hold it past its deadline) only once its
            # first data chunk is in: a header followed by nothing holds nothing.
            chunks = data_chunks(
                iterator, meter, self.stall_timeout, self.max_chunk_bytes, claim.trailer
            )
            data = await first_then_rest(chunks)
            meter.uploads += 1
            try:
                receipt = await self.coordinator.receive_upload(client, claim, data)
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

    def _check_header(self, client: ClientRecord, claim: UpdateClaim) -> None:
        """The refusal an upload's header earns whatever its data, before any is read:
        the open round's checks and the run's upload layout."""
        open_round = self.coordinator.round
        if open_round is None:
            raise WrongRound(f"round {claim.round} is not open for updates")
        open_round.check_update(client.name, claim)
        self.coordinator.intake.check_manifest(claim.manifest)

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

    def handler(self) -> grpc.GenericRpcHandler:
        """The service, every call through the gate before its request is read."""
        unary: dict[str, Callable[[Any, grpc.aio.ServicerContext], Awaitable[Any]]] = {
            "Join": self.join,
            "Poll": self.poll,
            "Download": self.download,
            "UploadOffset": self.upload_offset,
            "ReportEvaluation": self.report_evaluation,
            "Heartbeat": self.heartbeat,
        }
        behaviours = {name: self._gated(name, b) for name, b in unary.items()}
        behaviours["Upload"] = self._gated_upload
        return deferred_handlers(behaviours)

    def _gated(
        self, name: str, behaviour: Callable[[Any, grpc.aio.ServicerContext], Awaitable[Any]]
    ) -> Behaviour:
        """`behaviour` served with the one request the gate lets it read."""

        async def serve(requests: AsyncIterator[Any], context: grpc.aio.ServicerContext) -> Any:
            try:
                async with self.gate.enter(name, context):
                    message = await self.gate.read_one(requests)
                    return await behaviour(message, context)
            except FedstreamError as exc:
                await _reject(context, name, exc)

        return serve

    async def _gated_upload(
        self, requests: AsyncIterator[Any], context: grpc.aio.ServicerContext
    ) -> pb.UploadReply:
        try:
            async with self.gate.enter("Upload", context):
                return await self.upload(requests, context)
        except FedstreamError as exc:  # the gate's refusal: `upload` rejects its own
            self.live.rejected_update(exc)
            await _reject(context, "Upload", exc)
