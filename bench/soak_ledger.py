"""The soak's accounting: every round's updates, attempts and who was asked again.

The soak (bench/soak.py) reads every process's log as it is written and stamps each line
with the time it read it, so the lines of all processes and the disturbances it fired
share one clock. This module turns them, with the coordinator's metrics.jsonl, into one
account per round and the problems found in it; it runs no process.

Where an update of a round comes from: uploaded in the life of the coordinator that
committed the round (its log books it after the round's last opening), or taken from the
round's log by a restarted coordinator (a metrics key says so where the coordinator writes
one; otherwise it is inferred: an update counted in the record but not uploaded in the
committing life, from a client whose upload an earlier life acknowledged).
"""

from __future__ import annotations

import re
from collections import Counter
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from bench.soak_plan import CUT, KILL_CLIENT, KILL_COORDINATOR

COORDINATOR = "coordinator"
SLACK_S = 0.5
"""Lines are stamped when the soak reads them (every 0.1 s): a disturbance up to this long
after a line may still have come first."""

PATTERNS: dict[str, re.Pattern[str]] = {
    "open": re.compile(r"round (\d+)/\d+ started: "),
    "booked": re.compile(r"round (\d+): update from (\S+) \("),
    "done": re.compile(r"round (\d+)/\d+ done in "),
    "trained": re.compile(r"round (\d+): (?:trained|computed the gradient) on \d+ examples"),
    "accepted": re.compile(r"round (\d+): update accepted "),
    "not-accepted": re.compile(r"round (\d+): (?:update not accepted|update refused) "),
    "upload-failed": re.compile(r"round (\d+): upload failed "),
}
COORDINATOR_KINDS = ("open", "booked", "done")
CLIENT_KINDS = ("trained", "accepted", "not-accepted", "upload-failed")

LOG_FIELD_HINTS = ("from_log", "round_log", "resumed", "recovered", "replayed", "restored")
"""Parts of a metrics key that counts a round's updates a restarted coordinator took from
its round's log (none in the coordinator of 2026-12-07, which re-runs the round)."""


@dataclass(frozen=True)
class Line:
    time: float
    source: str
    """COORDINATOR or the client's name."""
    life: int
    """Which start of that process (1, 2, ...) wrote it."""
    text: str


@dataclass(frozen=True)
class Event:
    time: float
    source: str
    life: int
    kind: str
    round: int
    client: str
    """The client: the booked one for the coordinator's lines, the source for a client's."""


@dataclass(frozen=True)
class Fired:
    """A disturbance as it happened."""

    time: float
    kind: str
    round: int
    """The round in flight when it fired."""
    target: str = ""


@dataclass
class RoundAccount:
    round: int
    attempt: int | None = None
    selected: int | None = None
    updates: int | None = None
    refused: int = 0
    rejected_uploads: int = 0
    opens: int = 0
    """Times the round was opened, over every coordinator life."""
    lives: list[int] = field(default_factory=list)
    """Coordinator lives that opened or booked it; the last committed it."""
    uploaded: list[str] = field(default_factory=list)
    """Updates uploaded in the committing life, after the round's last opening."""
    from_log: int = 0
    from_log_source: str = "inferred"
    """The metrics key that counted `from_log`, or `inferred`."""
    trained: dict[str, int] = field(default_factory=dict)
    missing: list[str] = field(default_factory=list)
    """Clients of the run with no update in the round (neither uploaded nor from the log)."""
    asked_again: dict[str, list[str]] = field(default_factory=dict)
    """Client -> why, once for each time it trained the round after the first."""
    retrained_after_restart: list[str] = field(default_factory=list)
    """Clients whose acknowledged update was trained again after a coordinator restart."""
    disturbances: list[str] = field(default_factory=list)
    problems: list[str] = field(default_factory=list)


def parse(lines: Iterable[Line]) -> list[Event]:
    events = []
    for line in lines:
        kinds = COORDINATOR_KINDS if line.source == COORDINATOR else CLIENT_KINDS
        for kind in kinds:
            match = PATTERNS[kind].search(line.text)
            if match is None:
                continue
            client = match.group(2) if kind == "booked" else line.source
            events.append(
                Event(line.time, line.source, line.life, kind, int(match.group(1)), client)
            )
            break
    return sorted(events, key=lambda e: e.time)


def log_field(record: Mapping[str, Any]) -> str | None:
    """The record's key that counts updates taken from the round's log, if it has one."""
    for key, value in record.items():
        count = isinstance(value, int) and not isinstance(value, bool)
        if count and any(hint in key for hint in LOG_FIELD_HINTS):
            return key
    return None


def _why(
    client: str,
    round_number: int,
    start: float,
    end: float,
    events: Sequence[Event],
    fired: Sequence[Fired],
) -> str:
    """Why `client` trained `round_number` again at `end`, its previous training at `start`."""
    window = [f for f in fired if start - SLACK_S <= f.time <= end]
    if any(f.kind == KILL_COORDINATOR for f in window):
        return "coordinator restarted"
    if any(f.kind == KILL_CLIENT and f.target == client for f in window):
        return "client killed"
    between = [e for e in events if start - SLACK_S <= e.time <= end and e.round == round_number]
    if any(e.kind in ("not-accepted", "upload-failed") and e.client == client for e in between):
        return "upload not accepted"
    if any(e.kind == "open" for e in between):
        return "round opened again"
    if any(f.kind == CUT for f in window):
        return "connection cut"
    return "unexplained"


def account(
    records: Sequence[Mapping[str, Any]],
    rounds: int,
    events: Sequence[Event],
    fired: Sequence[Fired],
) -> list[RoundAccount]:
    """One account per round 1..`rounds`, each with the problems found in it."""
    by_round = {int(r["round"]): r for r in records if isinstance(r.get("round"), int)}
    clients = sorted({e.source for e in events if e.source != COORDINATOR})
    accounts = []
    for number in range(1, rounds + 1):
        mine = [e for e in events if e.round == number]
        acc = RoundAccount(
            number,
            disturbances=[f"{f.kind} {f.target}".strip() for f in fired if f.round == number],
        )
        _coordinator_side(acc, [e for e in mine if e.source == COORDINATOR])
        _client_side(acc, [e for e in mine if e.source != COORDINATOR], events, fired)
        record = by_round.get(number)
        if record is None:
            acc.problems.append("no record in metrics.jsonl")
        else:
            _check_record(acc, record, mine)
            _check_missing(acc, clients, [f for f in fired if number - 1 <= f.round <= number])
        accounts.append(acc)
    extra = sorted(set(by_round) - set(range(1, rounds + 1)) - {0})
    if extra and accounts:
        accounts[-1].problems.append(f"metrics.jsonl has rounds beyond the run: {extra}")
    return accounts


def _coordinator_side(acc: RoundAccount, mine: Sequence[Event]) -> None:
    acc.opens = sum(e.kind == "open" for e in mine)
    acc.lives = sorted({e.life for e in mine})
    if not mine:
        return
    last_life = acc.lives[-1]
    in_life = [e for e in mine if e.life == last_life]
    opened = [i for i, e in enumerate(in_life) if e.kind == "open"]
    after = in_life[opened[-1] + 1 :] if opened else in_life
    acc.uploaded = sorted({e.client for e in after if e.kind == "booked"})


def _client_side(
    acc: RoundAccount, mine: Sequence[Event], events: Sequence[Event], fired: Sequence[Fired]
) -> None:
    round_events = [e for e in events if e.round == acc.round]
    for client in sorted({e.client for e in mine}):
        trainings = [e.time for e in mine if e.client == client and e.kind == "trained"]
        acc.trained[client] = len(trainings)
        reasons = [
            _why(client, acc.round, before, after, round_events, fired)
            for before, after in zip(trainings, trainings[1:], strict=False)
        ]
        if reasons:
            acc.asked_again[client] = reasons
        if "unexplained" in reasons:
            acc.problems.append(f"{client} trained the round again with no disturbance")
        acks = [e.time for e in mine if e.client == client and e.kind == "accepted"]
        restarts = [f.time for f in fired if f.kind == KILL_COORDINATOR]
        if any(
            ack < restart <= later + SLACK_S and ack < later
            for ack in acks
            for restart in restarts
            for later in trainings
        ):
            acc.retrained_after_restart.append(client)


def _check_record(acc: RoundAccount, record: Mapping[str, Any], mine: Sequence[Event]) -> None:
    acc.attempt = record.get("attempt")
    acc.selected = record.get("clients_selected")
    acc.updates = record.get("updates")
    acc.rejected_uploads = int(record.get("rejected_uploads", 0) or 0)
    acc.refused = sum(int(record.get(k, 0) or 0) for k in ("refused_outlier", "refused_overflow"))
    if not isinstance(acc.updates, int) or not isinstance(acc.selected, int):
        acc.problems.append("the record has no updates or clients_selected")
        return
    if not 1 <= acc.updates <= acc.selected:
        acc.problems.append(f"{acc.updates} updates from {acc.selected} selected clients")
    key = log_field(record)
    booked = acc.updates + acc.refused
    if key is not None:
        acc.from_log, acc.from_log_source = int(record[key]), key
        if len(acc.uploaded) + acc.from_log != booked:
            acc.problems.append(
                f"{len(acc.uploaded)} uploaded + {acc.from_log} from the log != {booked} booked"
            )
    else:
        acc.from_log = booked - len(acc.uploaded)
        earlier = (
            {e.client for e in mine if e.kind == "booked" and e.life != acc.lives[-1]}
            if acc.lives
            else set()
        )
        candidates = earlier - set(acc.uploaded)
        if acc.from_log < 0:
            acc.problems.append(f"{len(acc.uploaded)} uploads booked but only {booked} counted")
        elif acc.from_log > len(candidates) and acc.lives:
            acc.problems.append(
                f"{acc.from_log} updates counted beyond the {len(acc.uploaded)} uploaded in "
                f"the committing life, and only {len(candidates)} acknowledged before it"
            )
    never_trained = [c for c in acc.uploaded if acc.trained.get(c, 0) == 0]
    if never_trained:
        acc.problems.append(f"booked updates their clients never trained: {never_trained}")
    if isinstance(acc.attempt, int) and acc.opens and acc.attempt > acc.opens:
        acc.problems.append(f"attempt {acc.attempt} but opened {acc.opens} times")


def _check_missing(acc: RoundAccount, clients: Sequence[str], fired: Sequence[Fired]) -> None:
    """Every client of the run left out of a round of all of them had a disturbance in that
    round or the one before (a client killed then may not be back in time)."""
    if acc.selected != len(clients) or acc.updates is None:
        return
    if acc.from_log > 0:
        return  # which clients the log gave is not known without a metrics key naming them
    acc.missing = [c for c in clients if c not in acc.uploaded]
    general = any(f.kind in (CUT, KILL_COORDINATOR) for f in fired)
    for client in acc.missing:
        if not general and not any(f.kind == KILL_CLIENT and f.target == client for f in fired):
            acc.problems.append(f"{client}'s update is missing with no disturbance")


def totals(accounts: Sequence[RoundAccount]) -> dict[str, Any]:
    """The run's sums: updates, uploads, trainings, asked-again reasons, problems."""
    reasons: Counter[str] = Counter(
        why for acc in accounts for whys in acc.asked_again.values() for why in whys
    )
    return {
        "rounds": len(accounts),
        "updates": sum(acc.updates or 0 for acc in accounts),
        "uploaded_in_committing_life": sum(len(acc.uploaded) for acc in accounts),
        "from_log": sum(acc.from_log for acc in accounts),
        "from_log_source": sorted({acc.from_log_source for acc in accounts if acc.from_log}),
        "trainings": sum(sum(acc.trained.values()) for acc in accounts),
        "asked_again": dict(reasons),
        "retrained_after_restart": sum(len(acc.retrained_after_restart) for acc in accounts),
        "rounds_opened_more_than_once": sum(acc.opens > 1 for acc in accounts),
        "missing_updates": sum(len(acc.missing) for acc in accounts),
        "problems": sum(len(acc.problems) for acc in accounts),
    }


def memory(
    samples: Sequence[tuple[int, int, float]], first: int, last: int, tolerance: float
) -> dict[str, Any]:
    """Coordinator RSS at round `last` against round `first`, within one coordinator life.

    `samples` are (round, life, RSS MiB) taken as each round's record appeared. Where no
    life holds both rounds, the longest life's `first`-th sampled round and its last are
    compared, and `same_life_as_asked` says so."""
    by_life: dict[int, dict[int, float]] = {}
    for number, life, mib in samples:
        by_life.setdefault(life, {})[number] = mib
    for life, per_round in sorted(by_life.items()):
        if first in per_round and last in per_round:
            return _compare(life, first, last, per_round, tolerance, True)
    if not by_life:
        return {"ok": False, "why": "no RSS sample"}
    longest, per_round = max(by_life.items(), key=lambda item: len(item[1]))
    ordered = sorted(per_round)
    if len(ordered) < 2:
        return {"ok": False, "why": "no coordinator life lasted two rounds"}
    start = ordered[min(first - 1, len(ordered) - 2)]
    return _compare(longest, start, ordered[-1], per_round, tolerance, False)


def _compare(
    life: int, first: int, last: int, rss: Mapping[int, float], tolerance: float, asked: bool
) -> dict[str, Any]:
    ratio = rss[last] / rss[first]
    return {
        "ok": abs(ratio - 1) <= tolerance,
        "life": life,
        "first_round": first,
        "last_round": last,
        "first_mib": round(rss[first], 1),
        "last_mib": round(rss[last], 1),
        "change": round(ratio - 1, 4),
        "tolerance": tolerance,
        "same_life_as_asked": asked,
    }
