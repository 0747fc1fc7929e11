"""Moving models over the bulk channel: the global model down, the client's update up.

A download goes to a `HeldModel` on disk as its bytes arrive; one that breaks (the link
drops, or `StallWatchdog` cancels it after `stall_timeout` seconds without a byte)
resumes from the last byte received. An upload streams the header, then the update's
bytes cut to the session's chunk size, framed by hand (common/wire/framing.py).
"""

from __future__ import annotations

import hashlib
import logging
import threading
import time
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path
from typing import Any

import grpc
import torch

from fedstream.client.held_model import HeldModel
from fedstream.client.retry import RETRYABLE, Backoff, rpc_status
from fedstream.client.session import Session
from fedstream.common.codecs import wire_chunks
from fedstream.common.errors import WireError
from fedstream.common.progress import ProgressView, Tracker
from fedstream.common.proto.v1 import coordinator_pb2 as pb
from fedstream.common.wire.framing import MalformedChunk, frame_data
from fedstream.common.wire.manifest import Manifest

log = logging.getLogger(__name__)


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


def _resume_reason(exc: BaseException, watchdog: StallWatchdog) -> str | None:
    """Why a download that failed with `exc` may resume from its last byte ("stalled", or
    the status it ended with); None when it may not.

    CANCELLED without a stall is the coordinator closing the round: not retried.
    """
    if not isinstance(exc, grpc.RpcError):
        return None
    if watchdog.stalled:
        return "stalled"
    code = rpc_status(exc)[0]
    return code.name if code in RETRYABLE and code != grpc.StatusCode.CANCELLED else None


def download(
    call: Callable[..., Any],
    session: Session,
    version: int,
    expected: Manifest,
    stall_timeout: float,
    progress_view: ProgressView,
    attempts: int = 5,
    directory: Path | None = None,
    fragment: int | None = None,
) -> HeldModel:
    """The global model `version` through the Download stub `call`, resuming from the
    last byte received after a break.

    The bytes go to a `HeldModel` on disk as they arrive, never to a second copy of
    the model in memory. InvalidManifest, before any model bytes are received, when
    the coordinator's model is not laid out as `expected` (the client's own model).
    With `directory` (--model-dir) the model is kept there once complete; WireError when
    its bytes are not the ones the coordinator's header names (SHA-256). With
    `fragment`, only that streaming fragment's tensors (`expected` is its manifest).
    """
    held: HeldModel | None = None
    digest = ""
    backoff = Backoff(cap=5.0)
    progress: Tracker | None = None
    for attempt in range(1, attempts + 1):
        offset = held.bytes_written if held is not None else 0
        request = pb.DownloadRequest(
            model_version=version, offset=offset, chunk_bytes=session.chunk_bytes
        )
        if fragment is not None:
            request.fragment = fragment
        stream = call(request, metadata=session.metadata)
        watchdog = StallWatchdog(stream, stall_timeout)
        started = False
        try:
            for item in stream:
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
                    digest = digest or item.sha256
                    if held is None:
                        held = HeldModel(received, version, directory)
                        what = f"fragment {fragment} of " if fragment is not None else ""
                        progress = progress_view.start(
                            "download", f"download of {what}model v{version}", received.total_bytes
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
            if digest and held.sha256 != digest:
                raise WireError(
                    f"model v{version} arrived with SHA-256 {held.sha256}, not {digest[:64]!r}"
                )
            held.keep()
            if progress is not None:
                progress.finish()
            return held
        except BaseException as exc:
            reason = _resume_reason(exc, watchdog)
            if reason is None or attempt == attempts:
                if progress is not None:
                    progress.finish()
                if held is not None:
                    held.close()  # a failed download leaves no file behind
                raise
            log.warning(
                "download of model v%d broke at byte %d (%s); resuming",
                version,
                held.bytes_written if held else 0,
                reason,
            )
            backoff.sleep()
        finally:
            watchdog.close()
    raise AssertionError("unreachable: the last attempt returns or raises")


class Sent:
    """Bytes an upload put on the wire, all its attempts together."""

    def __init__(self) -> None:
        self.bytes = 0


def upload(
    call: Callable[..., Any],
    session: Session,
    header: pb.UpdateHeader,
    manifest: Manifest,
    pieces: Iterable[torch.Tensor],
    progress_view: ProgressView,
    offset: int = 0,
    sent: Sent | None = None,
    trailer: bool = False,
) -> pb.UploadReply:
    """Stream one update through the Upload stub `call`: the header, the bytes of
    `pieces` (in manifest order) from byte `offset` on (the bytes before it are the ones
    the coordinator kept of a cut upload, `UploadOffset`), then, with `trailer`, the
    SHA-256 of the whole stream, skipped bytes included, so that the coordinator checks
    the update whole (a coordinator older than the trailer refuses it; a resumed upload
    needs it). `sent` adds up the data bytes sent."""
    header.manifest.CopyFrom(manifest.to_proto())
    header.resume_offset = offset
    counted = sent or Sent()

    def messages(progress: Tracker) -> Iterator[pb.UpdateChunk | bytes]:
        yield pb.UpdateChunk(header=header)
        digest = hashlib.sha256()
        position = 0
        for chunk in wire_chunks(manifest, pieces, session.chunk_bytes):
            digest.update(chunk)
            start = max(0, offset - position)
            position += len(chunk)
            if start < len(chunk):
                part = memoryview(chunk)[start:]
                yield frame_data(part)
                counted.bytes += len(part)
            progress.advance(len(chunk))
        if trailer:
            yield pb.UpdateChunk(trailer=pb.UpdateTrailer(sha256=digest.hexdigest()))

    label = f"upload for round {header.round}"
    if offset:
        label += f" (resumed at byte {offset})"
    with progress_view.track("upload", label, manifest.total_bytes) as progress:
        reply: pb.UploadReply = call(messages(progress), metadata=session.metadata)
    return reply
