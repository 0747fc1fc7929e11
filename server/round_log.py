"""The round's log: every acknowledged update stays on disk until the checkpoint that
includes it is, so a coordinator killed mid-round takes them again on restart instead of
asking their clients to train and upload again (docs/checkpoints.md, "The round's log").

    RUN_DIR/round-log/round-00003.json       round 3 as opened: its attempt, the model
                                             version it trains, whom it selected
    RUN_DIR/round-log/r00003-a1-ID.update    an acknowledged update's bytes, as uploaded
    RUN_DIR/round-log/r00003-a1-ID.json      its header: run, round, attempt, identity,
                                             model version, examples, metrics, norm,
                                             manifest, byte count and SHA-256

`ID` is a digest of the client's identity (names are not file names). An update is
logged before its receipt is sent: its bytes are copied from its spool (in the kernel,
`UploadSpool.copy_to`) to a file of their own, then its header is written beside it; a
header names a complete entry. Nothing is trusted on restart: an entry is taken again
only for the round and attempt its round file names and the model version the restart
resumed at, and only through the same checks as an upload (`UploadIntake.receive`:
layout, every byte, finite values, norm, and the SHA-256 its header names). An entry
that fails them is dropped, and its client asked again.

Entries go once the checkpoint of their round is on disk (`committed`, called after the
checkpoint's fsync), or when their attempt is abandoned (`begin` of the next one).

Whether an entry is on disk before its receipt goes out is `--round-log-fsync`. Without
it (the default) a `kill -9` loses nothing (the page cache outlives the process), and a
power cut loses the entries not yet written back: the restart finds them short or not
matching their digest and asks their clients again. docs/checkpoints.md has what fsync
costs per update (bench/round_log_fsync.py measures it).
"""

from __future__ import annotations

import asyncio
import base64
import hashlib
import json
import logging
import os
from collections.abc import AsyncIterator, Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from fedstream.common.proto.v1 import coordinator_pb2 as pb
from fedstream.server.spool import UploadSpool
from fedstream.server.updates import VerifiedUpdate

log = logging.getLogger(__name__)

READ_BYTES = 1 << 20
"""Bytes of a logged update read at a time when it is taken again."""


@dataclass(frozen=True)
class LoggedUpdate:
    """One entry of the log: its header and where its bytes are."""

    header: Mapping[str, Any]
    path: Path

    @property
    def client(self) -> str:
        return str(self.header["client"])

    @property
    def manifest(self) -> pb.Manifest:
        return pb.Manifest.FromString(base64.b64decode(self.header["manifest"]))

    async def chunks(self) -> AsyncIterator[memoryview]:
        """The logged bytes, a block at a time, read off the event loop."""
        with open(self.path, "rb", buffering=0) as f:
            while True:
                block = await asyncio.to_thread(f.read, READ_BYTES)
                if not block:
                    return
                yield memoryview(block)


@dataclass(frozen=True)
class PendingRound:
    """The round a restart resumes into: as it was opened, with its logged updates."""

    number: int
    attempt: int
    selected: frozenset[str]
    updates: list[LoggedUpdate]


def _stem(number: int, attempt: int, client: str) -> str:
    who = hashlib.sha256(client.encode()).hexdigest()[:20]
    return f"r{number:05d}-a{attempt}-{who}"


class RoundLog:
    """The log of one run directory. `run` names the run in every header."""

    def __init__(self, run_dir: Path, run: Mapping[str, Any], fsync: bool = False) -> None:
        self.directory = run_dir / "round-log"
        self.directory.mkdir(parents=True, exist_ok=True)
        self.run = dict(run)
        self.fsync = fsync

    # ---- writing ------------------------------------------------------------------------

    def begin(self, number: int, attempt: int, model_version: int, selected: Iterable[str]) -> None:
        """Round `number`'s try `attempt` is open: drop what another try of it logged
        (earlier rounds' entries wait for their checkpoint to be on disk)."""
        for path in self.directory.glob(f"r{number:05d}-a*"):
            if not path.name.startswith(f"r{number:05d}-a{attempt}-"):
                path.unlink(missing_ok=True)
        state = {
            "round": number,
            "attempt": attempt,
            "model_version": model_version,
            "selected": sorted(selected),
        }
        self._write_json(_round_file(self.directory, number), state)

    def append(
        self,
        number: int,
        attempt: int,
        model_version: int,
        update: VerifiedUpdate,
        manifest: pb.Manifest,
    ) -> LoggedUpdate:
        """Log `update` (its source a verified spool) before it is acknowledged."""
        spool = update.source
        if not isinstance(spool, UploadSpool):
            raise TypeError(f"only a spooled update can be logged, not {type(spool).__name__}")
        stem = _stem(number, attempt, update.client)
        data = self.directory / f"{stem}.update"
        partial = data.with_suffix(".update.tmp")
        fd = os.open(partial, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        try:
            spool.copy_to(fd)
            if self.fsync:
                os.fsync(fd)
        finally:
            os.close(fd)
        partial.replace(data)
        header = {
            "run": self.run,
            "round": number,
            "attempt": attempt,
            "model_version": model_version,
            "client": update.client,
            "num_examples": update.num_examples,
            "metrics": dict(update.metrics),
            "norm": update.norm,
            "nbytes": spool.bytes_written,
            "sha256": spool.sha256,
            "manifest": base64.b64encode(manifest.SerializeToString(deterministic=True)).decode(),
        }
        self._write_json(data.with_suffix(".json"), header)
        return LoggedUpdate(header, data)

    def forget(self, entry: LoggedUpdate) -> None:
        """Drop one entry (its update was refused after all, or failed its checks)."""
        entry.path.with_suffix(".json").unlink(missing_ok=True)
        entry.path.unlink(missing_ok=True)

    def committed(self, round_number: int) -> None:
        """The checkpoint of round `round_number` is on disk: its entries, and those of
        every earlier round, go. Called in the checkpoint's sync thread: a failure to
        delete is logged, never raised into the next checkpoint."""
        try:
            for path in self.directory.iterdir():
                number = _round_of(path)
                if number is not None and number <= round_number:
                    path.unlink(missing_ok=True)
        except OSError as exc:
            log.warning("round log: entries up to round %d not removed: %s", round_number, exc)

    def _write_json(self, path: Path, value: Mapping[str, Any]) -> None:
        tmp = path.with_suffix(".json.tmp")
        with open(tmp, "w") as f:
            f.write(json.dumps(value))
            if self.fsync:
                f.flush()
                os.fsync(f.fileno())
        tmp.replace(path)
        if self.fsync:
            dir_fd = os.open(self.directory, os.O_RDONLY)
            try:
                os.fsync(dir_fd)
            finally:
                os.close(dir_fd)

    # ---- reading ------------------------------------------------------------------------

    def pending(self, number: int, model_version: int) -> PendingRound | None:
        """Round `number` as logged, when it trains `model_version`: its try, selection
        and the entries whose header names it; None when the log holds no such round.
        Entries of other rounds, tries or versions are dropped, saying so."""
        stale = [p for p in self.directory.iterdir() if (_round_of(p) or 0) > number]
        for path in stale:  # rounds past the one resumed: their model version is gone
            path.unlink(missing_ok=True)
        self.committed(number - 1)
        state = _read_json(_round_file(self.directory, number))
        if state is None:
            return None
        if state.get("round") != number or state.get("model_version") != model_version:
            log.info(
                "round log holds round %d against model version %s, not %d: nothing is "
                "taken from it",
                number,
                state.get("model_version"),
                model_version,
            )
            self.committed(number)
            return None
        attempt = int(state["attempt"])
        updates: list[LoggedUpdate] = []
        for path in sorted(self.directory.glob(f"r{number:05d}-a{attempt}-*.json")):
            header = _read_json(path)
            data = path.with_suffix(".update")
            expected = {"round": number, "attempt": attempt, "model_version": model_version}
            if (
                header is None
                or not data.is_file()
                or any(header.get(k) != v for k, v in expected.items())
                or not isinstance(header.get("client"), str)
            ):
                log.warning("round log entry %s is incomplete or not this round's; dropped", path)
                path.unlink(missing_ok=True)
                data.unlink(missing_ok=True)
                continue
            updates.append(LoggedUpdate(header, data))
        return PendingRound(number, attempt, frozenset(state.get("selected", [])), updates)


def _round_file(directory: Path, number: int) -> Path:
    return directory / f"round-{number:05d}.json"


def _round_of(path: Path) -> int | None:
    """The round a file of the log belongs to, by its name."""
    name = path.name.removeprefix("round-").removeprefix("r")
    digits = name[:5]
    return int(digits) if len(digits) == 5 and digits.isdigit() else None


def _read_json(path: Path) -> dict[str, Any] | None:
    try:
        value = json.loads(path.read_text())
    except (OSError, ValueError):
        return None
    return value if isinstance(value, dict) else None
