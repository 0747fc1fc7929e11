"""The soak's accounting (bench/soak_ledger.py) and its plan (bench/soak_plan.py), on
made-up logs: what `make soak` concludes from what its processes wrote."""

from __future__ import annotations

from typing import Any

from bench.soak_ledger import COORDINATOR, Fired, Line, account, memory, parse, totals
from bench.soak_plan import CUT, KILL_CLIENT, KILL_COORDINATOR, PlanShape, make_plan

SITES = [f"site-{i}" for i in range(5)]


class Logs:
    """Log lines in the processes' own formats, each stamped one tick after the last."""

    def __init__(self) -> None:
        self.lines: list[Line] = []
        self.fired: list[Fired] = []
        self.now = 1000.0

    def _add(self, source: str, life: int, text: str) -> None:
        self.now += 1.0
        self.lines.append(Line(self.now, source, life, text))

    def open(self, number: int, life: int = 1) -> None:
        self._add(
            COORDINATOR, life, f"server INFO c: round {number}/60 started: 5 of 5 clients selected"
        )

    def book(self, number: int, site: str, life: int = 1) -> None:
        self._add(
            COORDINATOR,
            life,
            f"server INFO c: round {number}: update from {site} (9 examples, 1/5 reported)",
        )

    def train(self, number: int, site: str, life: int = 1) -> None:
        text = f"{site} INFO s: round {number}: trained on 143 examples in 0.4s (loss=0.1)"
        self._add(site, life, text)

    def ack(self, number: int, site: str, life: int = 1) -> None:
        text = f"{site} INFO l: round {number}: update accepted (booked for round {number})"
        self._add(site, life, text)

    def fire(self, kind: str, number: int, target: str = "") -> None:
        self.now += 1.0
        self.fired.append(Fired(self.now, kind, number, target))

    def clean_round(self, number: int, life: int = 1, sites: list[str] = SITES) -> None:
        self.open(number, life)
        for site in sites:
            self.train(number, site)
            self.book(number, site, life)
            self.ack(number, site)


def record(number: int, updates: int = 5, **more: Any) -> dict[str, Any]:
    return {"round": number, "attempt": 1, "clients_selected": 5, "updates": updates, **more}


def test_undisturbed_rounds_are_accounted_for_with_every_update_uploaded() -> None:
    logs = Logs()
    logs.clean_round(1)
    logs.clean_round(2)
    accounts = account([record(1), record(2)], 2, parse(logs.lines), logs.fired)
    assert [a.problems for a in accounts] == [[], []]
    assert [a.uploaded for a in accounts] == [SITES, SITES]
    assert totals(accounts)["from_log"] == 0
    assert totals(accounts)["trainings"] == 10


def test_a_round_run_again_after_a_coordinator_restart_counts_who_was_asked_again() -> None:
    """Today's coordinator: the restarted one opens the round again and every client
    trains again, those whose update the killed one had acknowledged included."""
    logs = Logs()
    logs.open(1)
    for site in SITES[:2]:
        logs.train(1, site)
        logs.book(1, site)
        logs.ack(1, site)
    logs.train(1, "site-2")
    logs.fire(KILL_COORDINATOR, 1)
    logs.clean_round(1, life=2)
    (acc,) = account([record(1)], 1, parse(logs.lines), logs.fired)
    assert acc.problems == []
    assert acc.opens == 2 and acc.lives == [1, 2]
    assert acc.uploaded == SITES and acc.from_log == 0
    assert acc.asked_again == {s: ["coordinator restarted"] for s in SITES[:3]}
    assert acc.retrained_after_restart == SITES[:2]


def test_updates_a_restarted_coordinator_took_from_the_round_log_are_inferred() -> None:
    logs = Logs()
    logs.open(1)
    for site in SITES[:3]:
        logs.train(1, site)
        logs.book(1, site)
        logs.ack(1, site)
    logs.fire(KILL_COORDINATOR, 1)
    logs.clean_round(1, life=2, sites=SITES[3:])
    (acc,) = account([record(1)], 1, parse(logs.lines), logs.fired)
    assert acc.problems == []
    assert (acc.from_log, acc.from_log_source) == (3, "inferred")
    assert acc.uploaded == SITES[3:]
    assert acc.retrained_after_restart == [] and acc.asked_again == {}


def test_a_metrics_key_counting_updates_from_the_log_is_used_and_checked() -> None:
    logs = Logs()
    logs.open(1)
    logs.train(1, "site-0")
    logs.book(1, "site-0")
    logs.fire(KILL_COORDINATOR, 1)
    logs.clean_round(1, life=2, sites=SITES[1:])
    (acc,) = account([record(1, updates_from_log=1)], 1, parse(logs.lines), logs.fired)
    assert (acc.from_log, acc.from_log_source, acc.problems) == (1, "updates_from_log", [])
    (flag,) = account([record(1, resumed=True)], 1, parse(logs.lines), logs.fired)
    assert (flag.from_log, flag.from_log_source) == (1, "inferred")
    (wrong,) = account([record(1, updates_from_log=2)], 1, parse(logs.lines), logs.fired)
    assert wrong.problems == ["4 uploaded + 2 from the log != 5 booked"]


def test_updates_counted_beyond_what_was_uploaded_or_acknowledged_are_a_problem() -> None:
    logs = Logs()
    logs.clean_round(1, sites=SITES[:3])
    (acc,) = account([record(1)], 1, parse(logs.lines), logs.fired)
    assert "and only 0 acknowledged before it" in acc.problems[0]


def test_training_again_with_no_disturbance_and_a_missing_update_are_problems() -> None:
    logs = Logs()
    logs.clean_round(1, sites=SITES[:4])
    logs.train(1, "site-0")
    logs.train(1, "site-4")
    (acc,) = account([record(1, updates=4)], 1, parse(logs.lines), logs.fired)
    assert acc.asked_again == {"site-0": ["unexplained"]}
    assert acc.missing == ["site-4"]
    assert acc.problems == [
        "site-0 trained the round again with no disturbance",
        "site-4's update is missing with no disturbance",
    ]


def test_a_client_killed_explains_its_missing_update_and_its_training_again() -> None:
    logs = Logs()
    logs.open(1)
    logs.train(1, "site-4")
    logs.fire(KILL_CLIENT, 1, "site-4")
    logs.train(1, "site-4", life=2)
    for site in SITES[:4]:
        logs.train(1, site)
        logs.book(1, site)
    (acc,) = account([record(1, updates=4)], 1, parse(logs.lines), logs.fired)
    assert acc.problems == []
    assert acc.asked_again == {"site-4": ["client killed"]}
    assert acc.missing == ["site-4"]


def test_a_round_without_its_record_or_with_an_update_nobody_trained_is_a_problem() -> None:
    logs = Logs()
    logs.open(1)
    logs.book(1, "site-0")
    (acc, missing) = account([record(1, updates=1)], 2, parse(logs.lines), logs.fired)
    assert "booked updates their clients never trained: ['site-0']" in acc.problems
    assert missing.problems == ["no record in metrics.jsonl"]


def test_memory_compares_the_two_rounds_within_one_coordinator_life() -> None:
    samples = [(5, 1, 500.0), (6, 2, 400.0), (50, 2, 420.0), (5, 2, 410.0)]
    same = memory(samples, 5, 50, 0.05)
    assert same["ok"] and same["life"] == 2 and same["same_life_as_asked"]
    assert same["change"] == round(420 / 410 - 1, 4)
    grown = memory([(5, 1, 400.0), (50, 1, 430.0)], 5, 50, 0.05)
    assert not grown["ok"]


def test_memory_without_a_life_holding_both_rounds_says_which_it_compared() -> None:
    samples = [(r, 1, 400.0) for r in range(1, 10)] + [(r, 2, 410.0) for r in range(10, 52)]
    fallback = memory(samples, 5, 50, 0.05)
    assert not fallback["same_life_as_asked"]
    assert (fallback["life"], fallback["first_round"], fallback["last_round"]) == (2, 14, 51)


def test_the_plan_follows_its_seed_and_spares_the_memory_window() -> None:
    shape = PlanShape(60, 5, client_kills=12, coordinator_kills=3, cuts=20, memory_rounds=(5, 50))
    plan = make_plan(shape, seed=7)
    assert plan == make_plan(shape, seed=7) != make_plan(shape, seed=8)
    kinds = [d.kind for d in plan]
    assert (kinds.count(KILL_CLIENT), kinds.count(KILL_COORDINATOR), kinds.count(CUT)) == (
        12,
        3,
        20,
    )
    assert all(2 <= d.round <= 5 or 50 < d.round < 60 for d in plan if d.kind == KILL_COORDINATOR)
    assert all(0 <= d.client < 5 for d in plan if d.kind == KILL_CLIENT)
