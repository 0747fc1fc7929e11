"""The soak's markdown summary (OUT/soak.md): its checks, then one line per round."""

from __future__ import annotations

from typing import Any


def _asked(again: dict[str, list[str]]) -> str:
    return "; ".join(f"{client}: {', '.join(whys)}" for client, whys in sorted(again.items()))


def markdown(result: dict[str, Any], lines: list[str]) -> str:
    settings = result["settings"]
    head = [
        "# Soak",
        "",
        f"{settings['rounds']} rounds of digits, {settings['clients']} clients, seed "
        f"{settings['seed']}: {result['seconds']:.0f} s disturbed, "
        f"{result['twin']['seconds']:.0f} s for the undisturbed twin. "
        f"{'Passed' if result['ok'] else 'Failed'}.",
        "",
        "```",
        *lines,
        "```",
        "",
        "| round | attempt | updates / selected | uploaded | from log | opened | missing | "
        "asked again | acknowledged, then trained again | disturbances | problems |",
        "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |",
    ]
    rows = [
        f"| {r['round']} | {r['attempt']} | {r['updates']} / {r['selected']} | "
        f"{len(r['uploaded'])} | {r['from_log']} | {r['opens']} | {', '.join(r['missing'])} | "
        f"{_asked(r['asked_again'])} | {', '.join(r['retrained_after_restart'])} | "
        f"{', '.join(r['disturbances'])} | {'; '.join(r['problems'])} |"
        for r in result["rounds"]
    ]
    return "\n".join([*head, *rows]) + "\n"
