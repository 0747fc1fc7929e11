"""robust.md and robust.png from the runs of `bench.robust` (one dict a run)."""

from __future__ import annotations

import math
from collections.abc import Sequence
from pathlib import Path
from typing import Any

HONEST = "none"
Result = dict[str, Any]


def final(result: Result) -> float:
    return float(result["accuracy"][-1]) if result["accuracy"] else math.nan


def find(results: Sequence[Result], strategy: str, attack: str, malicious: int) -> Result | None:
    for result in results:
        if (result["strategy"], result["attack"], result["malicious"]) == (
            strategy,
            attack,
            malicious,
        ):
            return result
    return None


def cell(result: Result | None, rounds: int) -> str:
    """A table cell: final accuracy in %, with what went wrong beside it."""
    if result is None:
        return "-"
    if not result["accuracy"]:
        return "no round"
    notes = []
    if result["checkpoint_finite"] is False:
        notes.append("non-finite")
    if result["rounds_completed"] < rounds:
        notes.append(f"{result['rounds_completed']}/{rounds} rounds")
    elif any(code != 0 for code in result["exit_codes"].values()):
        notes.append("a process failed")
    accuracy = final(result)
    text = "nan" if math.isnan(accuracy) else f"{100 * accuracy:.1f}"
    return f"{text} ({', '.join(notes)})" if notes else text


def table(
    results: Sequence[Result],
    strategies: Sequence[str],
    attacks: Sequence[str],
    malicious: int,
    rounds: int,
) -> str:
    """Attack x strategy -> final accuracy (%) with `malicious` attackers; the first row is
    each strategy's honest run."""
    lines = [
        "| attack | " + " | ".join(strategies) + " |",
        "|---|" + "---|" * len(strategies),
    ]
    for attack in [HONEST, *attacks]:
        m = 0 if attack == HONEST else malicious
        cells = [cell(find(results, label, attack, m), rounds) for label in strategies]
        name = "none (honest run)" if attack == HONEST else attack
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def worst_gaps(
    results: Sequence[Result], strategies: Sequence[str], attacks: Sequence[str], malicious: int
) -> str:
    """Each strategy's worst final accuracy under attack, in points from the honest
    reference (fedavg, nobody attacking), then from its own honest run."""
    reference = find(results, "fedavg", HONEST, 0)
    if reference is None or not reference["accuracy"]:
        return "no honest reference run"
    base = final(reference)
    against_fedavg, against_own = [], []
    for label in strategies:
        finals = [
            final(r)
            for attack in attacks
            if (r := find(results, label, attack, malicious)) is not None
        ]
        if not finals:
            continue
        worst = -math.inf if any(math.isnan(a) for a in finals) else min(finals)
        missing = "" if len(finals) == len(attacks) else f" ({len(finals)}/{len(attacks)} run)"
        against_fedavg.append(f"{label} {100 * (worst - base):+.1f}{missing}")
        own = find(results, label, HONEST, 0)
        if own is not None and own["accuracy"]:
            against_own.append(f"{label} {100 * (worst - final(own)):+.1f}{missing}")
    return (
        f"worst case vs the honest reference ({100 * base:.1f}%), points: "
        + ", ".join(against_fedavg)
        + "\n\nworst case vs each strategy's own honest run, points: "
        + ", ".join(against_own)
    )


def plot(
    results: Sequence[Result],
    strategies: Sequence[str],
    attacks: Sequence[str],
    malicious: Sequence[int],
    path: Path,
) -> None:
    """One heat map a number of attackers: attack x strategy, coloured by final accuracy."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = [HONEST, *attacks]
    fig, axes = plt.subplots(
        1, len(malicious), figsize=(1.3 * len(strategies) * len(malicious) + 2, 4.5), squeeze=False
    )
    for ax, m in zip(axes[0], malicious, strict=True):
        grid = [
            [
                final(r) if (r := find(results, s, a, 0 if a == HONEST else m)) else math.nan
                for s in strategies
            ]
            for a in rows
        ]
        image = ax.imshow(grid, vmin=0.0, vmax=1.0, cmap="RdYlGn", aspect="auto")
        for i, row in enumerate(grid):
            for j, value in enumerate(row):
                text = "-" if math.isnan(value) else f"{100 * value:.0f}"
                ax.text(j, i, text, ha="center", va="center", fontsize=8)
        ax.set_xticks(range(len(strategies)), strategies, rotation=30, ha="right", fontsize=8)
        ax.set_yticks(range(len(rows)), ["honest" if a == HONEST else a for a in rows])
        ax.set_title(f"digits, {m} malicious of 5: final accuracy (%)")
    fig.colorbar(image, ax=axes[0].tolist(), shrink=0.8)
    fig.savefig(path, dpi=110, bbox_inches="tight")
    plt.close(fig)
