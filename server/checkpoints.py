"""The run directory's checkpoints: one atomic file per round, the directory's lock, and the
check that a checkpoint belongs to this run.

    RUN_DIR/checkpoints/round_00003.safetensors   global model after round 3, with the
                                                  task, its options, the seed, the metrics
                                                  history and the strategy's state
    RUN_DIR/coordinator.lock                      held (flock) by the one coordinator
                                                  running the directory; holds its pid

A round's checkpoint is complete and in place when `save` returns, so `kill -9` of the
coordinator loses at most the round in flight. Waiting for the disk (fsync of the file
and of the directory) happens in a background thread while the next round runs, and
only then are older checkpoints deleted; the next `save` first waits for it. So at most
one checkpoint is ever not yet on disk, and a power cut can cost at most that one: the
resume finds it unreadable and carries on from the one before, which is still there.
A resume likewise passes over a checkpoint whose model is not finite, holds an absurd
value (a magnitude over `influence.ABSURD_WEIGHT`: no trained model holds one, an
exploded one does), or is not the model's layout, saying why; with none usable left it
refuses to start, in one line.
"""

from __future__ import annotations

import concurrent.futures
import fcntl
import json
import logging
import os
import re
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from fedstream.common.checkpoint import load_checkpoint, save_checkpoint, sync_to_disk
from fedstream.common.config import ConfigError
from fedstream.common.errors import FedstreamError, InvalidCheckpoint, InvalidManifest
from fedstream.common.weights import STRATEGY_PREFIX
from fedstream.common.wire.manifest import Manifest
from fedstream.server.finite import is_finite
from fedstream.server.influence import ABSURD_WEIGHT, absurd
from fedstream.server.run_record import strict_json

log = logging.getLogger(__name__)

CHECKPOINT_FORMAT = "fedstream-round/1"
ORIGIN_KEYS = ("init_weights", "init_sha256")
"""Checkpoint metadata of a run started from a weights file: its path and SHA-256."""
_NAME = re.compile(r"round_(\d{5,})\.safetensors")


class RunDirLocked(FedstreamError):
    """Another coordinator is running the run directory: two would overwrite each
    other's checkpoints and metrics."""


def _lock(run_dir: Path) -> Any:
    """The run directory's lock file, locked for this process; RunDirLocked naming the
    holder's pid when another coordinator holds it. The lock is the open file's (flock):
    it goes with the process however it ends, and a second open of the file conflicts
    even within one process."""
    path = run_dir / "coordinator.lock"
    f = open(path, "a+")  # noqa: SIM115 (held open until close())
    try:
        fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        f.seek(0)
        holder = f.read().strip() or "unknown"
        f.close()
        raise RunDirLocked(
            f"run directory {run_dir} is in use by another coordinator (pid {holder}); "
            "stop it first, or use another --run-dir"
        ) from None
    except BaseException:
        f.close()
        raise
    f.truncate(0)
    f.write(f"{os.getpid()}\n")
    f.flush()
    return f


@dataclass
class RunIdentity:
    """What a checkpoint must agree on to be resumed by a run."""

    task: str
    task_opt: dict[str, str]
    seed: int
    strategy: str
    fragments: int = 1
    """--fragments: which fragment a round synchronises, and so what its strategy state
    and clients' anchors mean, depends on it."""


@dataclass
class Newest:
    """The newest usable checkpoint: its round, model, strategy state and metadata."""

    round: int
    model: dict[str, torch.Tensor]
    strategy_state: dict[str, torch.Tensor]
    metadata: dict[str, str]


class Checkpoints:
    """The checkpoints of one run directory: RunDirLocked when another coordinator holds
    the directory, until `close`."""

    def __init__(self, run_dir: Path, identity: RunIdentity, keep: int = 3) -> None:
        self.run_dir = run_dir
        self.identity = identity
        self.keep = keep
        self.origin: dict[str, str] = {}
        """Where the run's starting weights came from (ORIGIN_KEYS), when not from the task."""
        self.checkpoint_dir = run_dir / "checkpoints"
        self.checkpoint_dir.mkdir(parents=True, exist_ok=True)
        self._lock = _lock(run_dir)
        self._syncer = concurrent.futures.ThreadPoolExecutor(1, "checkpoint-sync")
        self._syncing: concurrent.futures.Future[None] | None = None
        self.on_disk: list[Callable[[int], None]] = []
        """Called (in the sync thread) with each round whose checkpoint is on disk: the
        round's log lets go of its updates then (`round_log.py`)."""

    def checkpoint_path(self, round_number: int) -> Path:
        return self.checkpoint_dir / f"round_{round_number:05d}.safetensors"

    def checkpoints(self) -> list[tuple[int, Path]]:
        return list_checkpoints(self.checkpoint_dir)

    def save(
        self,
        round_number: int,
        model: Mapping[str, torch.Tensor],
        strategy_state: Mapping[str, torch.Tensor],
        history: list[dict[str, Any]],
    ) -> Path:
        tensors = dict(model)
        tensors.update({STRATEGY_PREFIX + k: v for k, v in strategy_state.items()})
        metadata = {
            "format": CHECKPOINT_FORMAT,
            "round": str(round_number),
            "task": self.identity.task,
            "task_opt": json.dumps(self.identity.task_opt, sort_keys=True),
            "seed": str(self.identity.seed),
            "strategy": self.identity.strategy,
            "fragments": str(self.identity.fragments),
            "history": strict_json(history),
            **self.origin,
        }
        last = history[-1] if history else {}
        for key in ("dp_epsilon", "dp_delta"):
            if key in last:
                metadata[key] = strict_json(last[key])
        path = self.checkpoint_path(round_number)
        self.wait_on_disk()
        save_checkpoint(path, tensors, metadata, sync=False)
        self._syncing = self._syncer.submit(self._settle, path, round_number)
        return path

    def _settle(self, path: Path, round_number: int) -> None:
        """Put `path` on disk, then delete the checkpoints (and the round's log) it makes
        redundant."""
        sync_to_disk(path)
        for _, old in self.checkpoints()[: -self.keep]:
            old.unlink(missing_ok=True)
        for call in self.on_disk:
            call(round_number)

    def wait_on_disk(self) -> None:
        """Return once the newest checkpoint is on disk; raise what putting it there raised."""
        syncing, self._syncing = self._syncing, None
        if syncing is not None:
            syncing.result()

    def close(self) -> None:
        """Wait for the disk, then let another coordinator have the directory."""
        try:
            self.wait_on_disk()
            self._syncer.shutdown()
        finally:
            self._lock.close()

    def model_and_state(
        self, round_number: int
    ) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
        """The model and strategy state of round `round_number`'s checkpoint."""
        tensors, _ = load_checkpoint(self.checkpoint_path(round_number))
        model = {k: v for k, v in tensors.items() if not k.startswith(STRATEGY_PREFIX)}
        state = {
            k[len(STRATEGY_PREFIX) :]: v
            for k, v in tensors.items()
            if k.startswith(STRATEGY_PREFIX)
        }
        return model, state

    def newest(self, expected: Manifest | None = None) -> Newest | None:
        """The newest usable checkpoint, checked against this run's identity; None when
        there is none.

        A checkpoint is passed over for the one before it, with a warning saying why,
        when it cannot be read (only the newest can be short of the disk: module
        docstring) or, given the `expected` layout of the model, when its model tensors
        are not that layout or not finite. InvalidCheckpoint naming each path and why
        when none is usable; ConfigError when the newest readable one is another run's.
        """
        found = self.checkpoints()
        if not found:
            return None
        refused: list[str] = []
        for round_number, path in reversed(found):
            try:
                tensors, metadata = load_checkpoint(path)
                self._check_identity(path, metadata)
                model = {k: v for k, v in tensors.items() if not k.startswith(STRATEGY_PREFIX)}
                if expected is not None:
                    _check_model(path, model, expected)
            except InvalidCheckpoint as exc:
                log.warning("%s; trying the checkpoint before it", exc)
                refused.append(str(exc))
                continue
            state = {
                k[len(STRATEGY_PREFIX) :]: v
                for k, v in tensors.items()
                if k.startswith(STRATEGY_PREFIX)
            }
            self.origin = {k: metadata[k] for k in ORIGIN_KEYS if k in metadata}
            return Newest(round_number, model, state, dict(metadata))
        raise InvalidCheckpoint(
            f"no usable checkpoint in {self.checkpoint_dir}: " + "; ".join(refused)
        )

    def _check_identity(self, path: Path, metadata: Mapping[str, str]) -> None:
        if metadata.get("format") != CHECKPOINT_FORMAT:
            raise ConfigError(f"{path} is not a fedstream round checkpoint")
        theirs = RunIdentity(
            metadata["task"],
            json.loads(metadata["task_opt"]),
            int(metadata["seed"]),
            metadata.get("strategy", "fedavg"),
            int(metadata.get("fragments", "1")),
        )
        if theirs != self.identity:
            raise ConfigError(
                f"run directory {self.run_dir} holds a different run ({theirs}); "
                f"this one is {self.identity}: use another --run-dir"
            )


def list_checkpoints(checkpoint_dir: Path) -> list[tuple[int, Path]]:
    """The round checkpoints in `checkpoint_dir`, (round, path), oldest first."""
    if not checkpoint_dir.is_dir():
        return []
    found = []
    for path in checkpoint_dir.iterdir():
        match = _NAME.fullmatch(path.name)
        if match:
            found.append((int(match.group(1)), path))
    return sorted(found)


def _check_model(path: Path, model: Mapping[str, torch.Tensor], expected: Manifest) -> None:
    """InvalidCheckpoint when `model` is not the `expected` layout or holds a value that
    is not finite or is absurd."""
    try:
        expected.require_same_tensors(Manifest.from_tensors(model))
    except InvalidManifest as exc:
        raise InvalidCheckpoint(f"{path} does not hold this model: {exc}") from None
    for name, tensor in model.items():
        if not is_finite(tensor):
            raise InvalidCheckpoint(f"{path}: model tensor {name!r} holds NaN or infinite values")
        if absurd(tensor):
            raise InvalidCheckpoint(
                f"{path}: model tensor {name!r} holds values over {ABSURD_WEIGHT:g} in "
                "magnitude (an exploded model)"
            )
