"""The gRPC skin over the Coordinator: unpack, authenticate, delegate, map errors.

This is the one place domain errors become gRPC statuses. Bulk methods use the hand
framing of `common/framing.py`, so the service is registered with explicit method
handlers rather than the generated `add_CoordinatorServicer_to_server`.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator
from typing import Any, NoReturn

import grpc

from fedstream.common.errors import (
    FedstreamError,
    InvalidManifest,
    LimitExceeded,
    NonFiniteValues,
    WireError,
)
from fedstream.common.framing import ChunkParser, MalformedChunk, frame_data, serialize_chunk
from fedstream.common.proto.v1 import coordinator_pb2 as pb
from fedstream.server.coordinator import Coordinator
from fedstream.server.errors import (
    InvalidUpdate,
    NotSelected,
    OffsetOutOfRange,
    TaskMismatch,
    TransferStalled,
    UnknownClient,
    UploadInProgress,
    WrongRound,
)
from fedstream.server.registry import ClientRecord

log = logging.getLogger(__name__)

SERVICE_NAME = pb.DESCRIPTOR.services_by_name["Coordinator"].full_name

STATUS_OF: dict[type[FedstreamError], grpc.StatusCode] = {
    UnknownClient: grpc.StatusCode.UNAUTHENTICATED,
    TaskMismatch: grpc.StatusCode.FAILED_PRECONDITION,
    WrongRound: grpc.StatusCode.FAILED_PRECONDITION,
    NotSelected: grpc.StatusCode.PERMISSION_DENIED,
    UploadInProgress: grpc.StatusCode.ABORTED,
    TransferStalled: grpc.StatusCode.DEADLINE_EXCEEDED,
    OffsetOutOfRange: grpc.StatusCode.OUT_OF_RANGE,
    InvalidUpdate: grpc.StatusCode.INVALID_ARGUMENT,
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


async def _reject(
    context: grpc.aio.ServicerContext, method: str, error: FedstreamError
) -> NoReturn:
    code = status_of(error)
    log.warning("%s rejected (%s): %s", method, code.name, error)
    await context.abort(code, str(error))
    raise AssertionError("unreachable: abort raises")


def bearer_token(context: grpc.aio.ServicerContext) -> str | None:
    for key, value in context.invocation_metadata() or ():
        if key == "authorization" and isinstance(value, str) and value.startswith("Bearer "):
            return value[len("Bearer ") :]
    return None


class CoordinatorServicer:
    def __init__(self, coordinator: Coordinator, stall_timeout: float) -> None:
        self.coordinator = coordinator
        self.stall_timeout = stall_timeout

    def _client(self, context: grpc.aio.ServicerContext) -> ClientRecord:
        return self.coordinator.registry.authenticate(bearer_token(context))

    async def join(
        self, request: pb.JoinRequest, context: grpc.aio.ServicerContext
    ) -> pb.JoinReply:
        try:
            return self.coordinator.join(request)[1]
        except FedstreamError as exc:
            await _reject(context, "Join", exc)

    async def poll(
        self, request: pb.PollRequest, context: grpc.aio.ServicerContext
    ) -> pb.PollReply:
        try:
            return await self.coordinator.poll(self._client(context))
        except FedstreamError as exc:
            await _reject(context, "Poll", exc)

    async def download(
        self, request: pb.DownloadRequest, context: grpc.aio.ServicerContext
    ) -> AsyncIterator[pb.ModelChunk | bytes]:
        try:
            client = self._client(context)
            header, chunks = self.coordinator.open_download(client, request)
        except FedstreamError as exc:
            await _reject(context, "Download", exc)
        sent = 0
        try:
            yield pb.ModelChunk(header=header)
            for chunk in chunks:
                yield frame_data(chunk)
                sent += len(chunk)
        except FedstreamError as exc:
            await _reject(context, "Download", exc)
        finally:
            self.coordinator.count_download(sent)

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
            return await self.coordinator.receive_upload(client, first, self._data_chunks(iterator))
        except FedstreamError as exc:
            await _reject(context, "Upload", exc)

    async def report_evaluation(
        self, request: pb.EvaluationReport, context: grpc.aio.ServicerContext
    ) -> pb.EvaluationReply:
        try:
            return self.coordinator.report_evaluation(self._client(context), request)
        except FedstreamError as exc:
            await _reject(context, "ReportEvaluation", exc)

    async def _data_chunks(self, iterator: AsyncIterator[Any]) -> AsyncIterator[memoryview]:
        """The data chunks after an upload's header, failing when none arrives in time."""
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
            if not isinstance(item, memoryview):
                raise WireError("a second header arrived in the middle of the upload")
            yield item

    def handler(self) -> grpc.GenericRpcHandler:
        return grpc.method_handlers_generic_handler(
            SERVICE_NAME,
            {
                "Join": grpc.unary_unary_rpc_method_handler(
                    self.join,
                    request_deserializer=pb.JoinRequest.FromString,
                    response_serializer=pb.JoinReply.SerializeToString,
                ),
                "Poll": grpc.unary_unary_rpc_method_handler(
                    self.poll,
                    request_deserializer=pb.PollRequest.FromString,
                    response_serializer=pb.PollReply.SerializeToString,
                ),
                "Download": grpc.unary_stream_rpc_method_handler(
                    self.download,
                    request_deserializer=pb.DownloadRequest.FromString,
                    response_serializer=serialize_chunk,
                ),
                "Upload": grpc.stream_unary_rpc_method_handler(
                    self.upload,
                    request_deserializer=ChunkParser(pb.UpdateChunk),
                    response_serializer=pb.UploadReply.SerializeToString,
                ),
                "ReportEvaluation": grpc.unary_unary_rpc_method_handler(
                    self.report_evaluation,
                    request_deserializer=pb.EvaluationReport.FromString,
                    response_serializer=pb.EvaluationReply.SerializeToString,
                ),
            },
        )
