"""A PNG of per-round metrics, for run directories and reports."""

from __future__ import annotations

import json
import math
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

PLOTTED_PREFIXES = ("eval_", "train_")


def plot_metrics(history: Sequence[dict[str, Any]], path: Path, title: str = "") -> None:
    """One panel per eval_*/train_* metric against the round number."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.ticker import MaxNLocator

    keys = sorted(
        {
            k
            for r in history
            for k, v in r.items()
            if k.startswith(PLOTTED_PREFIXES) and isinstance(v, (int, float))
        }
    )
    if not keys:
        keys = ["duration_s"]
    cols = min(3, len(keys))
    rows = math.ceil(len(keys) / cols)
    fig, axes = plt.subplots(rows, cols, figsize=(4.5 * cols, 3.2 * rows), squeeze=False)
    for ax, key in zip(axes.flat, keys, strict=False):
        points = [(r["round"], r[key]) for r in history if isinstance(r.get(key), (int, float))]
        ax.plot([p[0] for p in points], [p[1] for p in points], marker="o")
        ax.set_title(key)
        ax.set_xlabel("round")
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        ax.grid(alpha=0.3)
    for ax in list(axes.flat)[len(keys) :]:
        ax.axis("off")
    if title:
        fig.suptitle(title)
    fig.tight_layout()
    tmp = path.with_suffix(".tmp.png")
    fig.savefig(tmp, dpi=100)
    plt.close(fig)
    tmp.replace(path)


def main(argv: Sequence[str]) -> int:
    """`python -m fedstream.common.plot METRICS.jsonl OUT.png`.

    The coordinator plots through this in a child process: matplotlib then never loads
    into the long-running daemon (35 MiB it would keep) nor holds its GIL while drawing.
    """
    metrics, out = Path(argv[0]), Path(argv[1])
    history = [json.loads(line) for line in metrics.read_text().splitlines() if line.strip()]
    plot_metrics(history, out)
    return 0


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]))
