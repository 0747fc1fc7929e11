"""The gate: what a call must prove before its request is read, and how big a request of
each method may be (docs/security.md, "Before authentication").

grpc reads a unary request whole before a unary handler runs, up to the server's receive
limit, which must leave room for an upload's largest chunk: a stranger's 17 MB Join
would be in memory (and parsed) before anyone asked who sent it. So every method is
registered here as reading its requests itself (`deferred_handlers`): the gate looks at
the call's credentials first (a certificate, a client token, a session token: metadata
and the TLS session, nothing of the message), refuses the call unread when they prove
nobody, and only then lets one request be read, whose size is checked against its
method's limit (`RECEIVE_LIMITS`) before it is parsed. A request left unread costs no
memory: grpc's flow control holds the sender's bytes on the sender's side.

A Join that proves nobody but is read (where clients do not authenticate: loopback or
`--open-enrolment`; or with a client token not in the --tokens file, whose refusal names
the name it claims) waits for one of `UNAUTHENTICATED_READS` turns: so many are read at
once, and no more. A
session, or a name proven by its credentials, has at most `CALLS_PER_SESSION` calls in
flight.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
from collections.abc import AsyncIterator, Awaitable, Callable, Mapping
from dataclasses import dataclass
from typing import Any

import grpc

from fedstream.common.errors import LimitExceeded, WireError
from fedstream.common.service import METHODS, SERVICE_NAME, Deserializer
from fedstream.common.wire.framing import MalformedMessage
from fedstream.server.admission.door import Admission
from fedstream.server.errors import TransferStalled

KIB = 1 << 10
RECEIVE_LIMITS: Mapping[str, int] = {
    "Join": 256 * KIB,
    "Poll": 4 * KIB,
    "Heartbeat": 4 * KIB,
    "Download": 4 * KIB,
    "UploadOffset": 4 * KIB,
    "ReportEvaluation": 64 * KIB,
}
"""The largest request of each method that carries no tensor data, in bytes; Upload's
messages are bounded by the server's receive limit (a chunk and its framing)."""
CALLS_PER_SESSION = 8
"""Calls one session (or one proven name) may have in flight: a client holds a long poll,
a heartbeat and a transfer."""
UNAUTHENTICATED_READS = 2
"""Joins that prove nobody, read at once; the others wait for a turn, unread."""
READ_TIMEOUT = 10.0
"""Seconds a call's single request (or a turn to have it read) is waited for."""


@dataclass(frozen=True)
class OversizedMessage(MalformedMessage):
    """A request over its method's receive limit, in place of the message (never parsed)."""


class SizeLimited:
    """A request deserializer that refuses, unparsed, a request over `limit` bytes."""

    def __init__(self, method: str, limit: int, inner: Deserializer) -> None:
        self.method = method
        self.limit = limit
        self.inner = inner

    def __call__(self, raw: bytes) -> Any:
        if len(raw) > self.limit:
            return OversizedMessage(
                f"a {self.method} request of {len(raw)} bytes is over its limit of "
                f"{self.limit} bytes"
            )
        return self.inner(raw)


class Gate:
    """Who a call is, and whether it may have its request read now."""

    def __init__(
        self,
        admission: Admission,
        calls_per_session: int = CALLS_PER_SESSION,
        unauthenticated_reads: int = UNAUTHENTICATED_READS,
        read_timeout: float = READ_TIMEOUT,
    ) -> None:
        self.admission = admission
        self.calls_per_session = calls_per_session
        self.read_timeout = read_timeout
        self._unauthenticated = asyncio.Semaphore(unauthenticated_reads)
        self._calls: collections.Counter[str] = collections.Counter()

    @contextlib.asynccontextmanager
    async def enter(self, method: str, context: grpc.aio.ServicerContext) -> AsyncIterator[None]:
        """While a `method` call is served, if its credentials let it in: UnknownClient or
        IdentityMismatch when they prove nobody (nothing read), LimitExceeded when its
        session has too many calls in flight or no turn to read a Join comes in time."""
        if method == "Join":
            name = self.admission.joiner(context)
            if name is None:
                async with self._turn():
                    yield
                return
        else:
            name = self.admission.session(context).name
        if self._calls[name] >= self.calls_per_session:
            raise LimitExceeded(
                f"{name} has {self._calls[name]} calls in flight; the limit is "
                f"{self.calls_per_session}"
            )
        self._calls[name] += 1
        try:
            yield
        finally:
            self._calls[name] -= 1
            if not self._calls[name]:
                del self._calls[name]

    @contextlib.asynccontextmanager
    async def _turn(self) -> AsyncIterator[None]:
        try:
            async with asyncio.timeout(self.read_timeout):
                await self._unauthenticated.acquire()
        except TimeoutError:
            raise LimitExceeded(
                "too many Joins without credentials are being read; retry later"
            ) from None
        try:
            yield
        finally:
            self._unauthenticated.release()

    async def read_one(self, requests: AsyncIterator[Any]) -> Any:
        """The call's one request: WireError for none, TransferStalled for one that has
        not arrived within the read timeout."""
        try:
            async with asyncio.timeout(self.read_timeout):
                return await requests.__anext__()
        except StopAsyncIteration:
            raise WireError("the call carried no request message") from None
        except TimeoutError:
            raise TransferStalled(
                f"no request arrived within {self.read_timeout:g}s of the call"
            ) from None


Behaviour = Callable[[AsyncIterator[Any], grpc.aio.ServicerContext], Awaitable[Any]]


def deferred_handlers(behaviours: Mapping[str, Behaviour]) -> grpc.GenericRpcHandler:
    """The service's handler, every method registered as request-streaming: grpc reads
    nothing until `behaviours[name]` asks for it (the wire is the same for a client's
    unary call). Requests of the methods in `RECEIVE_LIMITS` are size-checked first;
    responses of a response-streaming method are written with `context.write`."""
    if set(behaviours) != set(METHODS):
        raise ValueError(f"behaviours for {SERVICE_NAME}: expected {sorted(METHODS)}")
    handlers = {}
    for name, method in METHODS.items():
        deserializer = method.request_deserializer
        if name in RECEIVE_LIMITS:
            deserializer = SizeLimited(name, RECEIVE_LIMITS[name], deserializer)
        factory = (
            grpc.stream_stream_rpc_method_handler
            if method.response_streaming
            else grpc.stream_unary_rpc_method_handler
        )
        handlers[name] = factory(
            behaviours[name],
            request_deserializer=deserializer,
            response_serializer=method.response_serializer,
        )
    return grpc.method_handlers_generic_handler(SERVICE_NAME, handlers)
