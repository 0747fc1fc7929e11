"""An upload's data after its header, as the servicer hands it to the coordinator: each
chunk waited for with a stall timeout, bounded in size, and decoded or refused.

A chunk costs the coordinator about the same work whatever its size, so every chunk but the
last should be at least `MIN_CHUNK_BYTES`; an upload may send `SHORT_CHUNKS` shorter ones
(a peer that frames differently), and is refused at the next. An upload joins its round
only once its first data chunk is in (`first_then_rest`): a header followed by nothing
holds nothing open.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from typing import Any

from fedstream.common.errors import FedstreamError, LimitExceeded, WireError
from fedstream.common.proto.v1 import coordinator_pb2 as pb
from fedstream.common.wire.framing import MalformedChunk
from fedstream.server.calls import UploadTrailer
from fedstream.server.errors import TransferStalled
from fedstream.server.live_state import TransferMeter

MIN_CHUNK_BYTES = 1024
"""The smallest data chunk of an upload but its last (the clients' smallest --chunk-bytes)."""
SHORT_CHUNKS = 64
"""Chunks under MIN_CHUNK_BYTES an upload may send before it is refused: each chunk costs
the coordinator about the same work whatever its size, so a stream of tiny ones is a
cheap way to burn its CPU; a trickle of them is also cut by the rate floor."""


async def first_then_rest(chunks: AsyncIterator[memoryview]) -> AsyncIterator[memoryview]:
    """`chunks` once its first item has arrived (or it has ended). TransferStalled when
    none arrives in time: such an upload never joined its round. Any other failure of
    the first chunk is raised from the iterator returned, inside the round (which counts
    the upload as rejected, as it counts a failure of any later chunk)."""
    try:
        first = await anext(chunks, None)
    except TransferStalled:
        raise
    except FedstreamError as exc:
        failure = exc

        async def failing() -> AsyncIterator[memoryview]:
            raise failure
            yield

        return failing()
    if first is None:
        return _none()

    async def all_of() -> AsyncIterator[memoryview]:
        yield first
        async for chunk in chunks:
            yield chunk

    return all_of()


async def _none() -> AsyncIterator[memoryview]:
    return
    yield


async def data_chunks(
    iterator: AsyncIterator[Any],
    meter: TransferMeter,
    stall_timeout: float,
    max_chunk_bytes: int,
    trailer: UploadTrailer,
) -> AsyncIterator[memoryview]:
    """The data chunks after an upload's header, failing when none arrives in time,
    and at the `SHORT_CHUNKS`-th chunk under `MIN_CHUNK_BYTES` that is not the last; a
    trailer fills in `trailer` and must be the last message."""
    short = 0
    while True:
        try:
            # asyncio.timeout, not wait_for: wait_for wraps every chunk in a new Task.
            async with asyncio.timeout(stall_timeout):
                item = await iterator.__anext__()
        except StopAsyncIteration:
            return
        except TimeoutError:
            raise TransferStalled(f"no bytes for {stall_timeout:.0f}s: upload stalled") from None
        if isinstance(item, MalformedChunk):
            raise WireError(item.reason)
        if trailer.sha256:
            raise WireError("a message arrived after the upload's trailer")
        if isinstance(item, pb.UpdateTrailer):
            trailer.sha256 = item.sha256 or "-"
            continue
        if not isinstance(item, memoryview):
            raise WireError("a second header arrived in the middle of the upload")
        if len(item) > max_chunk_bytes:
            raise LimitExceeded(
                f"a data chunk of {len(item)} bytes is over this coordinator's "
                f"max_chunk_bytes of {max_chunk_bytes}"
            )
        if short >= SHORT_CHUNKS:
            raise WireError(
                f"{short} data chunks under {MIN_CHUNK_BYTES} bytes before the upload's "
                f"last: every chunk but the last must hold at least {MIN_CHUNK_BYTES} bytes"
            )
        if len(item) < MIN_CHUNK_BYTES:
            short += 1
        meter.up += len(item)
        yield item
