"""The run directory: its checkpoints (`checkpoints.py`) and its record (`run_record.py`).

The checkpoint is the single source of truth: it is written atomically, and on resume
metrics.jsonl is rewritten from the history it carries, so a crash at any point leaves a
consistent run directory. A round's record is committed with its checkpoint
(`commit_round`); what arrives after it, the federated evaluation of that round's model,
is added to the record in metrics.jsonl at once (`add_to_record`) and reaches the
checkpoints from the next round on (a resume also takes it back from metrics.jsonl).
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from fedstream.common.wire.manifest import Manifest
from fedstream.server.checkpoints import (
    CHECKPOINT_FORMAT,
    Checkpoints,
    RunDirLocked,
    RunIdentity,
    list_checkpoints,
)
from fedstream.server.run_record import RunRecord, strict_json

__all__ = [
    "CHECKPOINT_FORMAT",
    "Resumed",
    "RunDirLocked",
    "RunIdentity",
    "RunStore",
    "list_checkpoints",
    "strict_json",
]
"""The checkpoints' names are re-exported: `fedstream export` and the tests read a run
directory through this module."""


@dataclass
class Resumed:
    round: int
    model: dict[str, torch.Tensor]
    strategy_state: dict[str, torch.Tensor]
    history: list[dict[str, Any]]


class RunStore(Checkpoints):
    """The run directory of one coordinator: its checkpoints, and the run's record of
    rounds (`history`) written beside them."""

    def __init__(
        self, run_dir: Path, identity: RunIdentity, keep: int = 3, run_id: str = ""
    ) -> None:
        super().__init__(run_dir, identity, keep)
        self.history: list[dict[str, Any]] = []
        """One record per completed round, oldest first: the run's metrics."""
        self.run_id = run_id
        """The coordinator's run id (its clients re-join when it changes), for the plot's
        title."""
        self.record = RunRecord(run_dir)

    @property
    def metrics_path(self) -> Path:
        return self.record.metrics_path

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
                self.record.rewrite_metrics(self.history)
                return
        raise KeyError(f"round {round_number} has no record")

    def append_metrics(self, record: Mapping[str, Any]) -> None:
        self.record.append_metrics(record)

    def finish(self) -> None:
        """At the end of the run: draw what is not drawn yet, and wait for the disk."""
        if self.record.plot_pending:
            self.plot(force=True)
        self.wait_on_disk()

    def resume(self, expected: Manifest | None = None) -> Resumed | None:
        """The newest usable checkpoint (`Checkpoints.newest`), its history completed by
        what metrics.jsonl logged after it and written back there; None when there is none."""
        newest = self.newest(expected)
        if newest is None:
            return None
        history = self.record.with_logged_additions(json.loads(newest.metadata["history"]))
        self.record.rewrite_metrics(history)
        self.history = history
        return Resumed(newest.round, newest.model, newest.strategy_state, history)

    def last_committed(self) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
        """The model and strategy state of the newest checkpoint this run wrote (to take
        back an aggregate that may not be committed)."""
        return self.model_and_state(self.history[-1]["round"] if self.history else 0)

    def plot_title(self) -> str:
        run = f"run {self.run_id}" if self.run_id else f"run {self.run_dir.name}"
        return f"{run} · task {self.identity.task}"

    def plot(self, force: bool = True) -> None:
        """metrics.png, at most every PLOT_INTERVAL_S unless `force` (`RunRecord.plot`)."""
        self.record.plot(self.plot_title(), force)
