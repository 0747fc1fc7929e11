"""Cut uploads, kept for a while so that their clients resume at the byte they reached.

A client whose upload is cut (the link drops, the stream ends short of its declared
bytes, or the coordinator cuts a stalled stream)
asks `UploadOffset` how much the coordinator holds of its update for (round, attempt)
and sends the rest (`UpdateHeader.resume_offset`). What is kept is the cut upload's
spool as it stood: its file, and the state of the checks it was under (the finiteness
scan, the norm's sum of squares, the running SHA-256), so the resumed upload is checked
exactly as a fresh one, whole: layout, every declared byte, finite values, norm, and the
SHA-256 of the whole stream against the trailer the client sends last; one flipped byte
in either part refuses the whole update (DATA_LOSS), and its spool is dropped.

Bounds (docs/checkpoints.md, "Uploads resume at their byte offset"): one cut upload per
client identity (a newer one replaces it), kept at most `partial_upload_seconds` and
only when it holds at most `partial_upload_bytes`; a new round or attempt drops the
ones kept for another.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass

from fedstream.server.errors import OffsetOutOfRange
from fedstream.server.spool import UploadSpool


@dataclass(frozen=True)
class UploadKey:
    """Which update a cut upload was: one client's for one try of one round."""

    round: int
    attempt: int
    model_version: int


@dataclass
class _Kept:
    key: UploadKey
    manifest: bytes
    """The upload's manifest, serialized: a resume must declare the same one."""
    spool: UploadSpool
    until: float


class PartialUploads:
    """The cut uploads kept, by client identity."""

    def __init__(
        self, max_seconds: float, max_bytes: int, clock: Callable[[], float] = time.monotonic
    ) -> None:
        self.max_seconds = max_seconds
        self.max_bytes = max_bytes
        self.clock = clock
        self._kept: dict[str, _Kept] = {}
        self.resumed = 0
        """Uploads resumed from a kept part since the coordinator started."""

    def keep(self, client: str, key: UploadKey, manifest: bytes, spool: UploadSpool) -> bool:
        """Keep `client`'s cut `spool` for a resume; False (the caller discards it) when
        the bounds say no or nothing was received."""
        self.expire()
        if self.max_seconds <= 0 or not 0 < spool.bytes_written <= self.max_bytes:
            return False
        self.drop(client)
        self._kept[client] = _Kept(key, manifest, spool, self.clock() + self.max_seconds)
        return True

    def offset(self, client: str, key: UploadKey) -> int:
        """Bytes held of `client`'s update `key`; 0 when none are."""
        self.expire()
        kept = self._kept.get(client)
        return kept.spool.bytes_written if kept is not None and kept.key == key else 0

    def take(self, client: str, key: UploadKey, manifest: bytes, offset: int) -> UploadSpool:
        """The kept spool an upload resumed at `offset` continues; OffsetOutOfRange when
        none is kept for that update, manifest and offset (the client starts again from
        byte 0)."""
        held = self.offset(client, key)
        kept = self._kept.get(client)
        if kept is None or held != offset or kept.manifest != manifest:
            raise OffsetOutOfRange(
                f"upload resumed at byte {offset}, but the coordinator holds {held} bytes of "
                f"{client}'s update for round {key.round} (attempt {key.attempt}) with that "
                "manifest: start again from byte 0"
            )
        del self._kept[client]
        self.resumed += 1
        return kept.spool

    def retain(self, key: UploadKey) -> None:
        """Drop every cut upload of another round or attempt than `key`'s."""
        for client in [c for c, kept in self._kept.items() if kept.key != key]:
            self.drop(client)

    def drop(self, client: str) -> None:
        kept = self._kept.pop(client, None)
        if kept is not None:
            kept.spool.discard()

    def expire(self) -> None:
        now = self.clock()
        for client in [c for c, kept in self._kept.items() if kept.until <= now]:
            self.drop(client)

    def held_bytes(self) -> int:
        """Bytes of cut uploads kept now."""
        return sum(kept.spool.bytes_written for kept in self._kept.values())

    def clear(self) -> None:
        for client in list(self._kept):
            self.drop(client)
