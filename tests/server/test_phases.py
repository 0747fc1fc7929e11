"""The open phases' bookkeeping on its own: selection, the checks of a report, booking."""

from __future__ import annotations

import math

import pytest
import torch

from fedstream.common.wire.manifest import Manifest
from fedstream.server.calls import EvaluationClaim, TrainWork, UpdateClaim
from fedstream.server.errors import InvalidUpdate, NotSelected, WrongRound
from fedstream.server.phases import (
    MAX_EXAMPLES,
    MAX_METRICS,
    OpenEvaluation,
    OpenRound,
    select_clients,
)
from fedstream.server.updates import (
    DeltaBlock,
    EvaluationReport,
    InMemoryBlocks,
    VerifiedUpdate,
)

LIVE = [f"c{i}" for i in range(10)]


def open_round(**overrides: object) -> OpenRound:
    settings: dict = {
        "number": 3,
        "attempt": 1,
        "model_version": 2,
        "selected": frozenset({"a", "b"}),
        "config": {"lr": 0.1},
        "started": 100.0,
        "deadline": 130.0,
    }
    settings.update(overrides)
    return OpenRound(**settings)


def claim(**overrides: object) -> UpdateClaim:
    settings: dict = {
        "round": 3,
        "model_version": 2,
        "num_examples": 10,
        "metrics": {"loss": 0.5},
        "manifest": Manifest.from_tensors({"w": torch.zeros(2)}).to_proto(),
    }
    settings.update(overrides)
    return UpdateClaim(**settings)


def test_selection_is_repeatable_per_round_and_fresh_across_rounds() -> None:
    first = select_clients(LIVE, 0.3, 2, seed=7, round_number=1, attempt=1)
    assert first == select_clients(list(reversed(LIVE)), 0.3, 2, 7, 1, 1)
    assert len(first) == math.ceil(0.3 * len(LIVE))
    draws = {select_clients(LIVE, 0.3, 2, 7, r, a) for r in range(1, 6) for a in (1, 2)}
    assert len(draws) > 1


def test_selection_takes_at_least_min_clients_and_at_most_all() -> None:
    assert len(select_clients(LIVE, 0.01, 4, 0, 1, 1)) == 4
    assert select_clients(LIVE[:3], 1.0, 5, 0, 1, 1) == frozenset(LIVE[:3])


@pytest.mark.parametrize(
    ("client", "fields", "error", "message"),
    [
        ("a", {"round": 4}, WrongRound, "not the open round"),
        ("a", {"model_version": 1}, WrongRound, "model version 1"),
        ("z", {}, NotSelected, "not selected"),
        ("a", {"num_examples": 0}, InvalidUpdate, "num_examples"),
        ("a", {"num_examples": MAX_EXAMPLES + 1}, InvalidUpdate, "num_examples"),
        ("a", {"metrics": {"loss": math.nan}}, InvalidUpdate, "loss"),
        ("a", {"metrics": {f"m{i}": 1.0 for i in range(MAX_METRICS + 1)}}, InvalidUpdate, "limit"),
    ],
    ids=["round", "version", "not-selected", "no-examples", "too-many", "nan-metric", "metrics"],
)
def test_an_update_the_round_cannot_take_is_refused(
    client: str, fields: dict, error: type[Exception], message: str
) -> None:
    with pytest.raises(error, match=message):
        open_round().check_update(client, claim(**fields))


def test_a_closed_round_refuses_updates_and_owes_nothing() -> None:
    closed = open_round(accepting=False)
    with pytest.raises(WrongRound):
        closed.check_update("a", claim())
    with pytest.raises(WrongRound, match="closed while the update arrived"):
        closed.check_accepting()
    assert not closed.owes("a")


def test_booking_counts_the_update_and_the_record_says_so() -> None:
    phase = open_round()
    phase.check_update("a", claim())
    phase.book(VerifiedUpdate("a", 10, {"loss": 0.5}, 64, InMemoryBlocks([])))
    blocks = [DeltaBlock("w", 0, torch.zeros(2))]
    phase.book(VerifiedUpdate.in_memory("b", 30, blocks, {"loss": 1.0}))
    assert not phase.owes("a") and not phase.owes("b") and phase.reported == {"a", "b"}
    record = phase.record(model_version=3, now=112.5)
    assert record["round"] == 3 and record["model_version"] == 3
    assert record["duration_s"] == 12.5 and record["updates"] == 2
    assert record["num_examples"] == 40 and record["bytes_up"] == 64
    assert record["train_loss"] == pytest.approx((0.5 * 10 + 1.0 * 30) / 40)
    phase.release_updates()
    assert all(u.released for u in phase.updates)


def test_the_work_of_a_phase_carries_its_remaining_time() -> None:
    work = open_round().work(model_version=2, now=125.0)
    assert work == TrainWork(3, 2, 5.0, {"lr": 0.1})
    assert open_round().work(model_version=2, now=200.0).deadline_seconds == 0.0


@pytest.mark.parametrize(
    ("report", "error", "message"),
    [
        (EvaluationClaim(2, 3, 5, {}), WrongRound, "round 2"),
        (EvaluationClaim(3, 2, 5, {}), WrongRound, "model version 2"),
        (EvaluationClaim(3, 3, 0, {"loss": 1.0}), InvalidUpdate, "0 evaluated examples"),
        (EvaluationClaim(3, 3, MAX_EXAMPLES + 1, {}), InvalidUpdate, "num_examples"),
    ],
    ids=["round", "version", "metrics-without-examples", "too-many"],
)
def test_an_evaluation_report_is_checked_against_the_evaluation(
    report: EvaluationClaim, error: type[Exception], message: str
) -> None:
    evaluation = OpenEvaluation(number=3, selected=frozenset({"a"}), deadline=10.0)
    with pytest.raises(error, match=message):
        evaluation.check_report("a", report)


def test_an_evaluation_books_reports_of_its_selected_clients_only() -> None:
    evaluation = OpenEvaluation(number=3, selected=frozenset({"a"}), deadline=10.0)
    with pytest.raises(NotSelected):
        evaluation.check_report("b", EvaluationClaim(3, 3, 5, {}))
    evaluation.check_report("a", EvaluationClaim(3, 3, 5, {"loss": 0.2}))
    evaluation.book(EvaluationReport("a", 5, {"loss": 0.2}))
    assert not evaluation.owes("a") and evaluation.reports[0].metrics == {"loss": 0.2}
