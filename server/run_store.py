"""The run directory: one atomic checkpoint per round, metrics as JSON lines, a plot.

    RUN_DIR/checkpoints/round_00003.safetensors   global model after round 3, with the
                                                  task, its options, the seed, the metrics
                                                  history and the strategy's state
    RUN_DIR/metrics.jsonl                         one JSON object per round
    RUN_DIR/metrics.png                           the metrics per round
    RUN_DIR/coordinator.lock                      held (flock) by the one coordinator
                                                  running the directory; holds its pid

The checkpoint is the single source of truth: it is written atomically, and on resume
metrics.jsonl is rewritten from the history it carries, so a crash at any point leaves a
consistent run directory. A round's record is committed with its checkpoint
(`commit_round`); what arrives after it, the federated evaluation of that round's model,
is added to the record in metrics.jsonl at once (`add_to_record`) and reaches the
checkpoints from the next round on (a resume also takes it back from metrics.jsonl).

A round's checkpoint is complete and in place when `save` returns, so `kill -9` of the
coordinator loses at most the round in flight. Waiting for the disk (fsync of the file
and of the directory) happens in a background thread while the next round runs, and
only then are older checkpoints deleted; the next `save` first waits for it. So at most
one checkpoint is ever not yet on disk, and a power cut can cost at most that one: the
resume finds it unreadable and carries on from the one before, which is still there.
A resume likewise passes over a checkpoint whose model is not finite or not the model's
layout, saying why.

Metrics are strict JSON, readable by any parser: a value that is not a finite number
(NaN, an infinity: a diverged loss) is written as null, in metrics.jsonl and in the
checkpoint's history alike.
"""

from __future__ import annotations

import concurrent.futures
import fcntl
import json
import logging
import math
import os
import re
import subprocess
import sys
import time
from collections.abc import Mapping
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

log = logging.getLogger(__name__)

CHECKPOINT_FORMAT = "fedstream-round/1"
ORIGIN_KEYS = ("init_weights", "init_sha256")
"""Checkpoint metadata of a run started from a weights file: its path and SHA-256."""
_NAME = re.compile(r"round_(\d{5,})\.safetensors")

PLOT_INTERVAL_S = 30.0
"""Seconds between redraws of metrics.png while rounds run; the last round is always drawn."""


class RunDirLocked(FedstreamError):
    """Another coordinator is running the run directory: two would overwrite each
    other's checkpoints and metrics."""


def strict_json(obj: Any) -> str:
    """`obj` as strict JSON: every float that is not finite becomes null."""
    return json.dumps(_finite(obj), allow_nan=False)


def _finite(obj: Any) -> Any:
    if isinstance(obj, float):
        return obj if math.isfinite(obj) else None
    if isinstance(obj, Mapping):
        return {k: _finite(v) for k, v in obj.items()}
    if isinstance(obj, list | tuple):
        return [_finite(v) for v in obj]
    return obj


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


@dataclass
class Resumed:
    round: int
    model: dict[str, torch.Tensor]
    strategy_state: dict[str, torch.Tensor]
    history: list[dict[str, Any]]


class RunStore:
    """The run directory of one coordinator: RunDirLocked when another one holds it,
    until `close`."""

    def __init__(
        self, run_dir: Path, identity: RunIdentity, keep: int = 3, run_id: str = ""
    ) -> None:
        self.run_dir = run_dir
        self.identity = identity
        self.keep = keep
        self.history: list[dict[str, Any]] = []
        """One record per completed round, oldest first: the run's metrics."""
        self.origin: dict[str, str] = {}
        """Where the run's starting weights came from (ORIGIN_KEYS), when not from the task."""
        self._last_plot = -math.inf
        self._plot_pending = False
        self.run_id = run_id
        """The coordinator's run id (its clients re-join when it changes), for the plot's
        title."""
        self.checkpoint_dir = run_dir / "checkpoints"
        self.metrics_path = run_dir / "metrics.jsonl"
        self.plot_path = run_dir / "metrics.png"
        self.checkpoint_dir.mkdir(parents=True, exist_ok=True)
        self._lock = _lock(run_dir)
        self._syncer = concurrent.futures.ThreadPoolExecutor(1, "checkpoint-sync")
        self._syncing: concurrent.futures.Future[None] | None = None

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
        self._syncing = self._syncer.submit(self._settle, path)
        return path

    def commit_round(
        self,
        round_number: int,
        model: Mapping[str, torch.Tensor],
        strategy_state: Mapping[str, torch.Tensor],
        record: dict[str, Any],
    ) -> None:
        """Checkpoint round `round_number` with its record, then log the record."""
        self.history.append(record)
        self.save(round_number, model, strategy_state, self.history)
        self.append_metrics(record)
        self.plot(force=False)

    def add_to_record(self, round_number: int, values: Mapping[str, Any]) -> None:
        """Add `values` to the committed record of round `round_number`."""
        for record in reversed(self.history):
            if record["round"] == round_number:
                record.update(values)
                self.rewrite_metrics(self.history)
                return
        raise KeyError(f"round {round_number} has no record")

    def finish(self) -> None:
        """At the end of the run: draw what is not drawn yet, and wait for the disk."""
        if self._plot_pending:
            self.plot(force=True)
        self.wait_on_disk()

    def _settle(self, path: Path) -> None:
        """Put `path` on disk, then delete the checkpoints it makes redundant."""
        sync_to_disk(path)
        for _, old in self.checkpoints()[: -self.keep]:
            old.unlink(missing_ok=True)

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

    def last_committed(self) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
        """The model and strategy state of the newest checkpoint this run wrote (to take
        back an aggregate that may not be committed)."""
        round_number = self.history[-1]["round"] if self.history else 0
        tensors, _ = load_checkpoint(self.checkpoint_path(round_number))
        model = {k: v for k, v in tensors.items() if not k.startswith(STRATEGY_PREFIX)}
        state = {
            k[len(STRATEGY_PREFIX) :]: v
            for k, v in tensors.items()
            if k.startswith(STRATEGY_PREFIX)
        }
        return model, state

    def resume(self, expected: Manifest | None = None) -> Resumed | None:
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
            history = self._with_logged_additions(json.loads(metadata["history"]))
            self.rewrite_metrics(history)
            self.history = history
            self.origin = {k: metadata[k] for k in ORIGIN_KEYS if k in metadata}
            return Resumed(round_number, model, state, history)
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
        )
        if theirs != self.identity:
            raise ConfigError(
                f"run directory {self.run_dir} holds a different run ({theirs}); "
                f"this one is {self.identity}: use another --run-dir"
            )

    def _with_logged_additions(self, history: list[dict[str, Any]]) -> list[dict[str, Any]]:
        """`history` with what `add_to_record` logged to metrics.jsonl after the checkpoint
        was written (the same round's record, recognised by its time, holding more keys)."""
        logged: dict[Any, dict[str, Any]] = {}
        if self.metrics_path.exists():
            for line in self.metrics_path.read_text().splitlines():
                try:
                    record = json.loads(line)
                except ValueError:
                    continue
                if isinstance(record, dict):
                    logged[record.get("round")] = record
        for record in history:
            later = logged.get(record["round"])
            if later is not None and later.get("time") == record.get("time"):
                record.update({k: v for k, v in later.items() if k not in record})
        return history

    def append_metrics(self, record: Mapping[str, Any]) -> None:
        with open(self.metrics_path, "a") as f:
            f.write(strict_json(record) + "\n")

    def rewrite_metrics(self, history: list[dict[str, Any]]) -> None:
        tmp = self.metrics_path.with_suffix(".jsonl.tmp")
        tmp.write_text("".join(strict_json(r) + "\n" for r in history))
        tmp.replace(self.metrics_path)

    def plot_title(self) -> str:
        run = f"run {self.run_id}" if self.run_id else f"run {self.run_dir.name}"
        return f"{run} · task {self.identity.task}"

    def plot(self, force: bool = True) -> None:
        """The metrics per round, bytes moved and round times, into metrics.png.

        Drawn by a child process from metrics.jsonl, so the daemon's memory and GIL stay
        out of it; a failed plot is logged, never fatal. Unless `force`, at most every
        PLOT_INTERVAL_S: drawing costs about a CPU-second, which short rounds would
        otherwise pay every time.
        """
        now = time.monotonic()
        if not force and now - self._last_plot < PLOT_INTERVAL_S:
            self._plot_pending = True
            return
        self._last_plot = now
        self._plot_pending = False
        command = [sys.executable, "-m", "fedstream.common.plot"]
        done = subprocess.run(
            [*command, str(self.metrics_path), str(self.plot_path), self.plot_title()],
            capture_output=True,
            text=True,
            check=False,
        )
        if done.returncode != 0:
            log.warning("plotting metrics failed: %s", done.stderr.strip()[-500:])


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
    is not finite."""
    try:
        expected.require_same_tensors(Manifest.from_tensors(model))
    except InvalidManifest as exc:
        raise InvalidCheckpoint(f"{path} does not hold this model: {exc}") from None
    for name, tensor in model.items():
        if not is_finite(tensor):
            raise InvalidCheckpoint(f"{path}: model tensor {name!r} holds NaN or infinite values")
