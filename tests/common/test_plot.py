"""metrics.png: titled with the run and its task, train and eval of a metric on one panel,
bytes and round time on their own, every round drawn (round 0 included), no empty cell."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
from matplotlib.lines import Line2D

from fedstream.common.plot import grid, main, metrics_figure
from fedstream.server.run_store import RunIdentity, RunStore

MIB = 1 << 20


def history(rounds: range, *, accuracy: bool = True) -> list[dict[str, Any]]:
    records: list[dict[str, Any]] = []
    for n in rounds:
        record: dict[str, Any] = {"round": n, "eval_loss": 2.0 / (n + 1)}
        if accuracy:
            record["eval_accuracy"] = 0.5 + n / 20
        if n > 0:  # round 0 is the initial model's evaluation: no training, nothing moved
            record |= {
                "train_loss": 2.5 / (n + 1),
                "duration_s": 1.0 + n,
                "bytes_down": 3 * 8 * MIB,
                "bytes_up": 3 * 8 * MIB,
                "updates": 3,
                "fed_eval_loss": 2.2 / (n + 1),
                "fed_eval_clients": 3,  # a count, not a metric: no panel
            }
            if accuracy:
                record["train_accuracy"] = 0.4 + n / 20
        records.append(record)
    return records


def xs(line: Line2D) -> list[float]:
    return list(np.asarray(line.get_xdata()).tolist())


def ys(line: Line2D) -> list[float]:
    return list(np.asarray(line.get_ydata()).tolist())


def test_the_figure_has_a_panel_per_metric_and_for_bytes_and_time() -> None:
    figure = metrics_figure(history(range(0, 4)), "run 0123abcd · task digits")

    assert "0123abcd" in figure.get_suptitle() and "digits" in figure.get_suptitle()
    titles = [ax.get_title() for ax in figure.axes]
    assert titles == ["accuracy", "loss", "bytes per round", "round time"]
    loss = figure.axes[1]
    lines = {line.get_label(): line for line in loss.get_lines()}
    assert set(lines) == {"train", "eval", "fed_eval"}
    assert xs(lines["eval"]) == [0, 1, 2, 3]  # round 0 included
    assert xs(lines["train"]) == [1, 2, 3]
    moved = {line.get_label(): ys(line) for line in figure.axes[2].get_lines()}
    assert moved == {"down": [24.0] * 3, "up": [24.0] * 3}
    assert figure.axes[2].get_ylabel() == "MiB"  # KiB for a model under a MiB
    assert ys(figure.axes[3].get_lines()[0]) == [2.0, 3.0, 4.0]
    for ax in figure.axes:
        assert ax.get_lines() and all(xs(line) for line in ax.get_lines())


def test_no_grid_cell_is_left_empty() -> None:
    for count in range(1, 9):
        cells = grid(count)
        width = max(span.stop for _, span in cells)
        rows = cells[-1][0] + 1
        covered = sorted(
            (row, column) for row, span in cells for column in range(*span.indices(width))
        )
        assert covered == [(row, column) for row in range(rows) for column in range(width)], count

    # Three panels without round 0 (loss, bytes, round time): one full row, from round 1.
    figure = metrics_figure(history(range(1, 3), accuracy=False), "t")
    assert len(figure.axes) == 3
    assert xs(figure.axes[0].get_lines()[0])[0] == 1
    # Four panels: the fourth spans the whole second row.
    figure = metrics_figure(history(range(0, 3)), "t")
    spec = figure.axes[3].get_subplotspec()
    assert spec is not None
    assert spec.colspan.start == 0 and spec.colspan.stop == spec.get_gridspec().ncols


def test_the_coordinator_plots_with_the_run_id_and_task_in_the_title(tmp_path: Path) -> None:
    store = RunStore(tmp_path / "run", RunIdentity("digits", {}, 0, "fedavg"))
    try:
        store.run_id = "0123abcd"
        title = store.plot_title()
        assert title == "run 0123abcd · task digits"
        metrics = tmp_path / "metrics.jsonl"
        metrics.write_text("".join(json.dumps(r) + "\n" for r in history(range(0, 3))))
        out = tmp_path / "metrics.png"
        assert main([str(metrics), str(out), title]) == 0
        assert out.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    finally:
        store.close()
