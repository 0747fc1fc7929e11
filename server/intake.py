"""Upload intake: an update's manifest checked, its bytes spooled to disk as they arrive,
the whole checked, and only then handed on as a `VerifiedUpdate`.

A client that dies mid-upload leaves nothing but a spool file, which goes back to the
pool; memory does not grow with the number of clients uploading at once (docs/architecture.md,
"The aggregation path").
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import logging
import time
from collections.abc import AsyncIterator, Callable, Mapping
from pathlib import Path
from typing import TYPE_CHECKING

from fedstream.common.codecs import UplinkCodec
from fedstream.common.errors import InvalidManifest
from fedstream.common.logs import RateLimitedLog
from fedstream.common.proto.v1 import coordinator_pb2 as pb
from fedstream.common.wire.manifest import Manifest, ManifestLimits
from fedstream.server.calls import UploadTrailer
from fedstream.server.config import UplinkConfig
from fedstream.server.errors import DigestMismatch, TransferStalled
from fedstream.server.spool import SpoolFiles, SpoolFull, UpdateCutShort, UploadSpool
from fedstream.server.transfer import RateFloor, release_refused
from fedstream.server.updates import VerifiedUpdate

if TYPE_CHECKING:
    from fedstream.server.fragments import Fragments

log = logging.getLogger(__name__)
_disk_full = RateLimitedLog(log, interval=60.0)
"""A full spool disk refuses every upload; the operator needs to hear it once a minute."""


class UploadIntake:
    """Takes uploads of updates to the global model `model`, in the run's uplink codec."""

    def __init__(
        self,
        config: UplinkConfig,
        model: Manifest,
        spool_dir: Path,
        *,
        min_rate: float = 0.0,
        window: float = 30.0,
        max_uploads: int = 16,
        clock: Callable[[], float] = time.monotonic,
        fragments: Fragments | None = None,
    ) -> None:
        uplink = UplinkCodec.parse(config.uplink_codec, config.topk_fraction)
        self.uplink = UplinkCodec(uplink.codec, zstd=True) if config.uplink_zstd else uplink
        self.fragments = fragments
        """Streaming: the round's upload is its fragment's tensors (`begin_round`)."""
        self.expect(model)
        self.readback = asyncio.Lock()
        """Held while an update is read back (verified, then handed on): concurrent
        read-backs would each hold a block buffer and compete for the same cores."""
        self.min_rate = min_rate
        self.window = window
        """Each upload's progress floor (`RateFloor`), from when it takes a slot."""
        self.clock = clock
        self.slots = asyncio.Semaphore(max_uploads)
        """Uploads spooling at once; the others wait for a slot, their bytes left unread."""
        self.received_bytes = 0
        """Upload bytes received since the coordinator started, refused ones included."""
        self._writer = concurrent.futures.ThreadPoolExecutor(2, "spool-writer")
        self._files = SpoolFiles(spool_dir, max_idle=max_uploads)

    def expect(self, model: Manifest) -> None:
        """Take uploads of updates to the tensors `model` lists from now on."""
        self.model = model
        self.layout = self.uplink.layout(model)
        """The manifest every upload must have, up to the byte counts of coded tensors."""
        # Loose enough that a wrong dtype is reported as such, tight enough that no
        # manifest can make the coordinator spool far more than a model's worth.
        bound = 4 * model.total_bytes + (1 << 20)
        self.limits = ManifestLimits(
            max_tensors=len(self.layout.entries), max_total_bytes=bound, max_tensor_bytes=bound
        )

    def begin_round(self, number: int) -> None:
        """Round `number` is open: with streaming fragments, its uploads are its
        fragment's (server/fragments.py); an upload of other tensors is refused as a
        manifest that is not the round's (INVALID_ARGUMENT)."""
        if self.fragments is not None:
            self.expect(self.fragments.manifest(self.fragments.of_round(number)))

    def check_manifest(self, proto: pb.Manifest) -> Manifest:
        """The upload's manifest, bounded and checked against the run's layout."""
        manifest = Manifest.from_proto(proto, self.limits)
        if manifest.codec != self.uplink.spec:
            raise InvalidManifest(
                f"codec {manifest.codec[:64]!r} is not this run's uplink codec {self.uplink.spec!r}"
            )
        self.layout.require_same_layout(manifest)
        return manifest

    @contextlib.asynccontextmanager
    async def receive(
        self,
        label: str,
        client: str,
        num_examples: int,
        metrics: Mapping[str, float],
        manifest: Manifest,
        chunks: AsyncIterator[memoryview],
        *,
        trailer: UploadTrailer | None = None,
        resume: UploadSpool | None = None,
        keep: Callable[[UploadSpool], bool] | None = None,
    ) -> AsyncIterator[VerifiedUpdate]:
        """Spool the upload, verify it whole, and yield it, holding `readback`.

        The body decides what becomes of the update (a strategy takes it, the round books
        it); when the body raises, or anything before it does, the spool is given back,
        except that an upload cut on its way (the stream cancelled, or stalled) goes to
        `keep`, which may hold it for a resume (`server/partial_uploads.py`). A resumed
        upload continues the spool `resume` holds; it must end with a `trailer`, whose
        SHA-256, when given, is checked against the whole update's.
        """
        try:
            async with self.slots:
                spool = resume or UploadSpool(self._files, label, manifest, self.uplink, self.model)
                await self._spool(spool, chunks, keep)
        except BaseException as exc:
            if isinstance(exc, SpoolFull):
                _disk_full.log(logging.ERROR, "spool", "uploads refused: %s", exc)
            # Also for a cancelled upload, which never reaches the servicer's refusals:
            # grpc still holds its last chunk (see release_refused).
            release_refused()
            raise
        try:
            _check_digest(spool, trailer, resumed=resume is not None)
            async with self.readback:
                await asyncio.to_thread(spool.verify_finite)
                yield VerifiedUpdate(
                    client, num_examples, dict(metrics), spool.bytes_written, spool, spool.norm
                )
        except BaseException:
            spool.discard()
            raise

    async def _spool(
        self,
        spool: UploadSpool,
        chunks: AsyncIterator[memoryview],
        keep: Callable[[UploadSpool], bool] | None,
    ) -> None:
        """Write the chunks to `spool`; the spool is discarded when anything fails, unless
        the stream was cut and `keep` keeps it."""
        floor = RateFloor(self.min_rate, self.window, self.clock)
        writing: concurrent.futures.Future[None] | None = None
        try:
            async for chunk in chunks:
                floor.add(len(chunk))
                self.received_bytes += len(chunk)
                if writing is not None:
                    await asyncio.wrap_future(writing)
                # A thread writes each chunk while the next one arrives: the write system
                # call then overlaps the event loop's work on every other stream.
                writing = self._writer.submit(spool.write, chunk)
            if writing is not None:
                await asyncio.wrap_future(writing)
            spool.finish()
        except BaseException as exc:
            if writing is not None:
                concurrent.futures.wait([writing])  # never close the spool under a write
            cut = isinstance(exc, asyncio.CancelledError | TransferStalled | UpdateCutShort)
            if not (cut and keep is not None and keep(spool)):
                spool.discard()
            raise

    def close(self) -> None:
        self._writer.shutdown()
        self._files.close()


def _check_digest(spool: UploadSpool, trailer: UploadTrailer | None, *, resumed: bool) -> None:
    """DigestMismatch unless the whole spooled update is what its trailer names; a resumed
    upload must name it (its kept part came over another stream)."""
    claimed = trailer.sha256 if trailer is not None else ""
    if not claimed:
        if resumed:
            raise DigestMismatch("a resumed upload must end with a trailer naming its SHA-256")
        return
    if claimed.lower() != spool.sha256:
        raise DigestMismatch(
            f"update {spool.name} is not the one its trailer names: SHA-256 {spool.sha256} "
            f"of the {spool.bytes_written} bytes received, {claimed[:64]!r} claimed; "
            "the whole update is refused"
        )
