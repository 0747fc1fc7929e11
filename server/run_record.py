"""The run's record: one JSON line per round in metrics.jsonl, and a plot of it.

    RUN_DIR/metrics.jsonl                         one JSON object per round
    RUN_DIR/metrics.png                           the metrics per round

Metrics are strict JSON, readable by any parser: a value that is not a finite number
(NaN, an infinity: a diverged loss) is written as null, in metrics.jsonl and in the
checkpoint's history alike.
"""

from __future__ import annotations

import json
import logging
import math
import subprocess
import sys
import time
from collections.abc import Mapping
from pathlib import Path
from typing import Any

log = logging.getLogger(__name__)

PLOT_INTERVAL_S = 30.0
"""Seconds between redraws of metrics.png while rounds run; the last round is always drawn."""


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


class RunRecord:
    """metrics.jsonl and metrics.png of one run directory."""

    def __init__(self, run_dir: Path) -> None:
        self.metrics_path = run_dir / "metrics.jsonl"
        self.plot_path = run_dir / "metrics.png"
        self._last_plot = -math.inf
        self.plot_pending = False
        """A round is logged that the plot does not show yet."""

    def with_logged_additions(self, history: list[dict[str, Any]]) -> list[dict[str, Any]]:
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

    def plot(self, title: str, force: bool = True) -> None:
        """The metrics per round, bytes moved and round times, into metrics.png under
        `title`.

        Drawn by a child process from metrics.jsonl, so the daemon's memory and GIL stay
        out of it; a failed plot is logged, never fatal. Unless `force`, at most every
        PLOT_INTERVAL_S: drawing costs about a CPU-second, which short rounds would
        otherwise pay every time.
        """
        now = time.monotonic()
        if not force and now - self._last_plot < PLOT_INTERVAL_S:
            self.plot_pending = True
            return
        self._last_plot = now
        self.plot_pending = False
        command = [sys.executable, "-m", "fedstream.common.plot"]
        done = subprocess.run(
            [*command, str(self.metrics_path), str(self.plot_path), title],
            capture_output=True,
            text=True,
            check=False,
        )
        if done.returncode != 0:
            log.warning("plotting metrics failed: %s", done.stderr.strip()[-500:])
