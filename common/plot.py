"""A PNG of per-round metrics, for run directories and reports.

One panel per metric, train and eval of the same metric together (`train_loss`,
`eval_loss` and `fed_eval_loss` on the `loss` panel), then the bytes moved each round
and the round's time, each on its own panel. Every round in the history is drawn, round 0
(the initial model's evaluation) included when there is one. The panels fill their grid:
a last row with fewer panels than the others spreads them over its whole width, so no
cell is empty.
"""

from __future__ import annotations

import json
import math
import sys
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from matplotlib.figure import Figure

PLOTTED_PREFIXES = ("train_", "eval_", "fed_eval_")
"""A metric's series: clients' training, the coordinator's held-out evaluation, the
clients' federated evaluation."""
LEGENDS = {prefix.rstrip("_") for prefix in PLOTTED_PREFIXES}
NOT_METRICS = frozenset({"fed_eval_clients", "fed_eval_examples"})
MAX_COLUMNS = 3
MIB = 1 << 20
SERIES_STYLES: tuple[dict[str, Any], ...] = (
    {"marker": "o", "linestyle": "-"},
    {"marker": "s", "linestyle": "--", "markerfacecolor": "none"},
    {"marker": "^", "linestyle": ":"},
)
"""Train, eval and fed_eval, down and up: told apart where their points coincide."""


@dataclass
class Panel:
    """One plot: its title, the y label, and each series as (label, key, scale)."""

    title: str
    ylabel: str
    series: list[tuple[str, str, float]]
    from_zero: bool = False
    """Whether the y axis starts at 0 (amounts, not scores)."""


def _numeric(value: Any) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool)


def panels(history: Sequence[dict[str, Any]]) -> list[Panel]:
    """The panels `history` has data for, metrics first (by name), then bytes and time."""
    keys = {k for record in history for k, v in record.items() if _numeric(v)}
    found: list[Panel] = []
    names = sorted(
        {
            key.removeprefix(prefix)
            for key in keys - NOT_METRICS
            for prefix in PLOTTED_PREFIXES
            if key.startswith(prefix)
        }
    )
    for name in names:
        series = [
            (prefix.rstrip("_"), prefix + name, 1.0)
            for prefix in PLOTTED_PREFIXES
            if prefix + name in keys
        ]
        found.append(Panel(name, name, series))
    ways = [way for way in ("down", "up") if f"bytes_{way}" in keys]
    if ways:
        largest = max(r.get(f"bytes_{way}") or 0 for r in history for way in ways)
        unit, size = ("MiB", MIB) if largest >= MIB else ("KiB", 1024)
        moved = [(way, f"bytes_{way}", 1 / size) for way in ways]
        found.append(Panel("bytes per round", unit, moved, from_zero=True))
    if "duration_s" in keys:
        found.append(Panel("round time", "seconds", [("duration", "duration_s", 1.0)], True))
    return found


def grid(count: int) -> list[tuple[int, slice]]:
    """Where each of `count` panels goes: (row, span of columns) in a grid of
    `math.lcm(columns, panels in the last row)` columns, every row filled."""
    columns = min(MAX_COLUMNS, count)
    rows = math.ceil(count / columns)
    last = count - columns * (rows - 1)
    width = math.lcm(columns, last)
    cells = []
    for index in range(count):
        row, column = divmod(index, columns)
        span = width // (last if row == rows - 1 else columns)
        cells.append((row, slice(column * span, (column + 1) * span)))
    return cells


def metrics_figure(history: Sequence[dict[str, Any]], title: str = "") -> Figure:
    """The figure of `history`'s metrics (see the module docstring); no panel without data."""
    from matplotlib.figure import Figure
    from matplotlib.ticker import MaxNLocator

    chosen = panels(history)
    if not chosen:
        chosen = [Panel("no metrics yet", "", [])]
    cells = grid(len(chosen))
    rows = cells[-1][0] + 1
    columns = min(MAX_COLUMNS, len(chosen))
    figure = Figure(figsize=(4.8 * columns, 3.4 * rows + (0.5 if title else 0)))
    layout = figure.add_gridspec(rows, max(cell.stop for _, cell in cells))
    for panel, (row, span) in zip(chosen, cells, strict=True):
        ax = figure.add_subplot(layout[row, span])
        for (label, key, scale), style in zip(panel.series, SERIES_STYLES, strict=False):
            points = [(r["round"], r[key] * scale) for r in history if _numeric(r.get(key))]
            ax.plot([p[0] for p in points], [p[1] for p in points], label=label, **style)
        ax.set_title(panel.title)
        ax.set_xlabel("round")
        ax.set_ylabel(panel.ylabel)
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        ax.grid(alpha=0.3)
        if panel.from_zero:
            ax.set_ylim(bottom=0)
        if len(panel.series) > 1 or any(label in LEGENDS for label, _, _ in panel.series):
            ax.legend()
    if title:
        figure.suptitle(title)
    figure.set_layout_engine("tight")
    return figure


def plot_metrics(history: Sequence[dict[str, Any]], path: Path, title: str = "") -> None:
    """`metrics_figure` as a PNG at `path`, replaced whole."""
    figure = metrics_figure(history, title)
    tmp = path.with_suffix(".tmp.png")
    figure.savefig(tmp, dpi=100)
    tmp.replace(path)


def main(argv: Sequence[str]) -> int:
    """`python -m fedstream.common.plot METRICS.jsonl OUT.png [TITLE]`.

    The coordinator plots through this in a child process: matplotlib then never loads
    into the long-running daemon (35 MiB it would keep) nor holds its GIL while drawing.
    """
    metrics, out = Path(argv[0]), Path(argv[1])
    title = argv[2] if len(argv) > 2 else ""
    history = [json.loads(line) for line in metrics.read_text().splitlines() if line.strip()]
    plot_metrics(history, out, title)
    return 0


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]))
