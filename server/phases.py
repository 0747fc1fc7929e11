"""The coordinator's phases, one object at a time: waiting for clients, the round in
flight, its aggregation, the federated evaluation after it, and done.

An open phase knows whom it selected, who has reported and what they reported, and
checks a client's report against itself before booking it; the state machine that moves
from phase to phase is `server/coordinator.py`.
"""

from __future__ import annotations

import contextlib
import dataclasses
import math
import random
import statistics
import time
from collections.abc import AsyncIterator, Callable, Iterator, Mapping
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from fedstream.common.errors import NonFiniteValues
from fedstream.common.round_config import ConfigScalar
from fedstream.server.admission.names import BadName, check_metric_name
from fedstream.server.calls import EvaluateWork, TrainWork
from fedstream.server.clock import Changes, Clock
from fedstream.server.errors import (
    InvalidUpdate,
    NotSelected,
    UpdateTooLarge,
    UploadInProgress,
    WrongRound,
)

if TYPE_CHECKING:
    from fedstream.server.calls import EvaluationClaim, UpdateClaim
    from fedstream.server.updates import EvaluationReport, VerifiedUpdate

MAX_EXAMPLES = 1 << 40
REFUSALS_PER_ATTEMPT = 3
"""Refused updates a client may send in one attempt of a round (`OpenRound.refusals`)."""
SAFEGUARD_COUNTERS = ("refused_max_norm", "refused_outlier", "refused_overflow", "capped_examples")
"""What the safeguards (server/safeguards.py) refused or capped in a round, in its record."""
MAX_METRICS = 64
EVAL_CLAIM_FACTOR = 4
"""No evaluation report weighs more than this many times the lower median claim."""


def select_clients(
    live: list[str], fraction: float, min_clients: int, seed: int, round_number: int, attempt: int
) -> frozenset[str]:
    """max(min_clients, ceil(fraction * live)) of the live clients (all when fewer), drawn
    by an RNG seeded with (seed, round, attempt): repeatable for a run, fresh each round."""
    count = min(len(live), max(min_clients, math.ceil(fraction * len(live))))
    rng = random.Random(f"{seed}/{round_number}/{attempt}")
    return frozenset(rng.sample(sorted(live), count))


def check_metrics(metrics: Mapping[str, float]) -> None:
    """InvalidUpdate unless `metrics` is a bounded set of finite, sensibly named numbers."""
    if len(metrics) > MAX_METRICS:
        raise InvalidUpdate(f"{len(metrics)} metrics; the limit is {MAX_METRICS}")
    for key, value in metrics.items():
        try:
            check_metric_name(key)
        except BadName as exc:
            raise InvalidUpdate(str(exc)) from None
        if not math.isfinite(value):
            raise InvalidUpdate(f"metric {key!r} is {value}: metrics must be finite")


@dataclass
class ReportTotals:
    """What the clients of one phase reported: examples, and each metric's
    example-weighted sum (clients may report different metric names)."""

    examples: int = 0
    sums: dict[str, float] = field(default_factory=dict)
    weights: dict[str, float] = field(default_factory=dict)

    def add(self, num_examples: int, metrics: Mapping[str, float]) -> None:
        self.examples += num_examples
        for key, value in metrics.items():
            self.sums[key] = self.sums.get(key, 0.0) + value * num_examples
            self.weights[key] = self.weights.get(key, 0.0) + num_examples

    def means(self, prefix: str) -> dict[str, float]:
        """The example-weighted mean of each metric, as `prefix + name`, by name."""
        return {prefix + key: total / self.weights[key] for key, total in sorted(self.sums.items())}


@dataclass(kw_only=True)
class OpenPhase:
    """What every open phase keeps: whom it selected, until when, and who has reported."""

    number: int
    selected: frozenset[str]
    deadline: float
    hard_end: float = math.inf
    """When the phase ends whatever is still arriving."""
    accepting: bool = True
    reported: set[str] = field(default_factory=set)

    def arriving(self) -> bool:
        """Whether a report is on its way (an upload streaming): waited for past the
        deadline, up to the hard end."""
        return False

    async def until_reported(
        self, clock: Clock, changes: Changes, alive: Callable[[str], bool], every: float
    ) -> str | None:
        """Until every selected client has reported or is gone (`alive` says, checked at
        least `every` seconds), or the deadline has passed with nothing arriving, or the
        hard end; then the phase stops accepting. Which end it reached, None when all
        reported."""
        reached: str | None = None
        while True:
            now = clock.now()
            owed = [name for name in self.selected - self.reported - self.excused() if alive(name)]
            if not owed and not self.arriving():
                break
            if now >= self.hard_end or (now >= self.deadline and not self.arriving()):
                reached = "hard end" if now >= self.hard_end else "deadline"
                break
            next_end = self.deadline if now < self.deadline else self.hard_end
            await changes.wait(max(0.05, min(next_end - now, every)))
        self.accepting = False
        return reached

    def excused(self) -> set[str]:
        """Selected clients the phase no longer waits for, though they did not report."""
        return set()

    def progress(self) -> str:
        """`reported/selected`, for the log."""
        return f"{len(self.reported)}/{len(self.selected)}"

    def owes(self, client: str) -> bool:
        """Whether `client` is selected for this phase and has not yet reported."""
        return self.accepting and client in self.selected and client not in self.reported


@dataclass(kw_only=True)
class OpenRound(OpenPhase):
    """The round in flight: round `number` trains model version `model_version`."""

    attempt: int
    model_version: int
    config: dict[str, ConfigScalar]
    started: float
    uploading: set[str] = field(default_factory=set)
    totals: ReportTotals = field(default_factory=ReportTotals)
    updates: list[VerifiedUpdate] = field(default_factory=list)
    """The verified updates booked, in arrival order; the round owns their spools until
    its aggregate is committed (or the round is abandoned)."""
    rejected: int = 0
    safeguarded: dict[str, int] = field(
        default_factory=lambda: dict.fromkeys(SAFEGUARD_COUNTERS, 0)
    )
    """What the safeguards refused or capped (server/safeguards.py), by counter."""
    bytes_up: int = 0
    bytes_down: int = 0
    updates_from_log: int = 0
    """Updates taken from the round's log after a restart, not uploaded to this process."""
    uploads_resumed: int = 0
    """Uploads that resumed a cut one at its byte offset."""
    awaiting_log: set[str] = field(default_factory=set)
    """Clients whose update the round's log holds from before a restart, until it is
    taken again (or fails its checks): they are not asked for one."""
    refusals: dict[str, int] = field(default_factory=dict)
    """Updates of each client this attempt refused for what they hold (over the norm
    bound, not finite). A client may send a good one after a bad one, but after
    `REFUSALS_PER_ATTEMPT` it is not asked again in this attempt, nor waited for: an
    attempt whose every client keeps sending what is refused ends then and counts towards
    `--max-round-attempts` (`server/liveness.py`), instead of taking the same refusal
    until its deadline."""

    @property
    def num_examples(self) -> int:
        """Training examples behind the updates booked so far."""
        return self.totals.examples

    def check_update(self, client: str, header: UpdateClaim) -> None:
        """The domain error for an update header this round cannot take, if any."""
        if not self.accepting:
            raise WrongRound(f"round {header.round} is not open for updates")
        if header.round != self.number:
            raise WrongRound(f"round {header.round} is not the open round ({self.number})")
        if header.model_version != self.model_version:
            raise WrongRound(
                f"update against model version {header.model_version}; "
                f"the round trains version {self.model_version}"
            )
        if client not in self.selected:
            raise NotSelected(f"client {client} is not selected for round {header.round}")
        if not 1 <= header.num_examples <= MAX_EXAMPLES:
            raise InvalidUpdate(f"num_examples {header.num_examples} is outside 1..{MAX_EXAMPLES}")
        check_metrics(header.metrics)

    def arriving(self) -> bool:
        return bool(self.uploading)

    def excused(self) -> set[str]:
        return {c for c, n in self.refusals.items() if n >= REFUSALS_PER_ATTEMPT}

    def owes(self, client: str) -> bool:
        return super().owes(client) and client not in self.awaiting_log | self.excused()

    @contextlib.contextmanager
    def upload_from(self, client: str) -> Iterator[None]:
        """While `client`'s upload streams: UploadInProgress for a second one, and one
        more rejected upload (and refused norm) when it fails."""
        if client in self.uploading:
            raise UploadInProgress(f"an upload from {client} is already streaming")
        self.uploading.add(client)
        try:
            yield
        except BaseException as exc:
            self.rejected += 1
            if isinstance(exc, UpdateTooLarge):
                self.safeguarded["refused_max_norm"] += 1
            if isinstance(exc, (UpdateTooLarge, NonFiniteValues)):
                self.refusals[client] = self.refusals.get(client, 0) + 1
            raise
        finally:
            self.uploading.discard(client)

    def work(self, model_version: int, now: float) -> TrainWork:
        """What a selected client that owes its update is told to do."""
        return TrainWork(self.number, model_version, max(0.0, self.deadline - now), self.config)

    def check_accepting(self) -> None:
        """WrongRound once the round has closed (an update verified too late)."""
        if not self.accepting:
            raise WrongRound(f"round {self.number} closed while the update arrived")

    async def while_open(self, chunks: AsyncIterator[memoryview]) -> AsyncIterator[memoryview]:
        """An upload's chunks, cut with WrongRound as soon as the round closes."""
        async for chunk in chunks:
            self.check_accepting()
            yield chunk

    def book(self, update: VerifiedUpdate) -> None:
        """Count a verified update the strategy has accepted."""
        self.reported.add(update.client)
        self.updates.append(update)
        self.totals.add(update.num_examples, update.metrics)
        self.bytes_up += update.nbytes

    def release_updates(self) -> None:
        """Give back every booked update's spool."""
        for update in self.updates:
            update.release()

    def record(self, model_version: int, now: float) -> dict[str, Any]:
        """The round's line of metrics.jsonl, as far as the round itself knows it."""
        return {
            "round": self.number,
            "model_version": model_version,
            "time": time.time(),
            "duration_s": round(now - self.started, 3),
            "clients_selected": len(self.selected),
            "updates": len(self.reported),
            "rejected_uploads": self.rejected,
            "attempt": self.attempt,
            "num_examples": self.num_examples,
            "bytes_down": self.bytes_down,
            "bytes_up": self.bytes_up,
            "updates_from_log": self.updates_from_log,
            "uploads_resumed": self.uploads_resumed,
            **self.totals.means("train_"),
        }


@dataclass(kw_only=True)
class OpenEvaluation(OpenPhase):
    """A federated evaluation of model version `number` by the clients of round `number`."""

    reports: list[EvaluationReport] = field(default_factory=list)
    """The reports booked, each weighed by its claim capped (`weigh_claims`)."""
    claimed: list[EvaluationReport] = field(default_factory=list)
    """The reports booked, as claimed."""
    bytes_down: int = 0
    """Model bytes its clients downloaded (those that did not hold the version already):
    the record's `fed_eval_bytes_down`."""

    def work(self, model_version: int, now: float) -> EvaluateWork:
        """What a selected client that owes its report is told to do."""
        return EvaluateWork(self.number, model_version, max(0.0, self.deadline - now))

    def check_report(self, client: str, report: EvaluationClaim) -> None:
        """The domain error for a report this evaluation cannot take, if any."""
        if not self.accepting:
            raise WrongRound(f"no evaluation is open (report for round {report.round})")
        if report.round != self.number:
            raise WrongRound(
                f"evaluation report for round {report.round}; round {self.number} "
                "is being evaluated"
            )
        if report.model_version != self.number:
            raise WrongRound(
                f"evaluation of model version {report.model_version}; the current version "
                f"is {self.number}"
            )
        if client not in self.selected:
            raise NotSelected(
                f"client {client} is not selected for round {report.round}'s evaluation"
            )
        if report.num_examples > MAX_EXAMPLES:
            raise InvalidUpdate(f"num_examples {report.num_examples} is over {MAX_EXAMPLES}")
        if report.num_examples == 0 and report.metrics:
            raise InvalidUpdate("metrics reported for 0 evaluated examples")
        check_metrics(report.metrics)

    def book(self, report: EvaluationReport) -> None:
        self.reported.add(report.client)
        self.claimed.append(report)
        weights = weigh_claims([r.num_examples for r in self.claimed])
        self.reports = [
            r if r.num_examples == w else dataclasses.replace(r, num_examples=w)
            for r, w in zip(self.claimed, weights, strict=True)
        ]


def weigh_claims(claims: list[int]) -> list[int]:
    """The weight of each of an evaluation's claimed example counts: a claim is capped at
    `EVAL_CLAIM_FACTOR` times the lower median claim and at the sum of all the other
    claims, so one client claiming 2^40 examples cannot set the evaluation's result
    (it weighs at most as much as the others together). Honest counts that differ by
    less than that are weighed as claimed; reports of 0 examples count for nothing."""
    counted = [claim for claim in claims if claim]
    if len(counted) < 2:
        return list(claims)
    cap = EVAL_CLAIM_FACTOR * statistics.median_low(counted)
    total = sum(counted)
    return [min(claim, cap, total - claim) if claim else 0 for claim in claims]


@dataclass
class Waiting:
    """Until `needed` clients have joined."""

    needed: int


@dataclass
class Aggregating:
    """The round has closed; its aggregate is being made and committed."""

    round: OpenRound


@dataclass
class Done:
    """Every round is complete; clients are told to stop."""

    completed: int


Phase = Waiting | OpenRound | Aggregating | OpenEvaluation | Done
"""The coordinator is in exactly one of these at a time."""
