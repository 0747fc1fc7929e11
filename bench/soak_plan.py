"""The soak's disturbances, drawn once from its seed (bench/soak.py runs them).

Each disturbance is tied to the round in flight when it fires: `kill -9` of one client
(started again, under the same identity, after a short pause), `kill -9` of the
coordinator (started again on the same run directory and port) once `after_updates` of
the round's updates are booked, or a connection cut by the fault proxy once it has carried
`nbytes` towards the client. The coordinator is never killed between the two rounds whose
memory the soak compares, so one coordinator life holds both (docs/benchmarks.md).
"""

from __future__ import annotations

import random
from dataclasses import asdict, dataclass
from typing import Any

KILL_CLIENT = "kill-client"
KILL_COORDINATOR = "kill-coordinator"
CUT = "cut"


@dataclass(frozen=True)
class Disturbance:
    kind: str
    round: int
    """Fired while this round is in flight (or at once, if the run is already past it)."""
    delay_s: float
    """Seconds after the round was first seen in flight (a kill of the coordinator fires
    at `after_updates` booked updates instead, or at this delay if they never come)."""
    client: int = -1
    """A kill of a client: which one (its partition)."""
    restart_after_s: float = 0.0
    """A kill: seconds before the process is started again."""
    after_updates: int = 0
    """A kill of the coordinator: booked updates of the round it waits for."""
    nbytes: int = 0
    """A cut: bytes towards the client after which the proxy resets the connection."""

    def as_dict(self) -> dict[str, Any]:
        return {k: v for k, v in asdict(self).items() if v not in (-1, 0, 0.0) or k == "round"}


@dataclass(frozen=True)
class PlanShape:
    rounds: int
    clients: int
    client_kills: int
    coordinator_kills: int
    cuts: int
    memory_rounds: tuple[int, int]
    """The rounds whose coordinator memory is compared (5 and 50)."""


def coordinator_kill_rounds(shape: PlanShape) -> list[int]:
    """Rounds a coordinator kill may hit: from 2 up to the first memory round, and after the
    second but before the last (all rounds from 2 but the last when the memory window does
    not fit the run): after the last round nothing is left to disturb."""
    first, last = shape.memory_rounds
    every = list(range(2, shape.rounds))
    if last > shape.rounds:
        return every
    return [r for r in every if r <= first or r > last]


def make_plan(shape: PlanShape, seed: int) -> list[Disturbance]:
    """The disturbances of a soak, in firing order; the same seed gives the same plan."""
    rng = random.Random(seed)
    plan: list[Disturbance] = []
    candidates = coordinator_kill_rounds(shape)
    for number in rng.sample(candidates, min(shape.coordinator_kills, len(candidates))):
        plan.append(
            Disturbance(
                KILL_COORDINATOR,
                number,
                delay_s=round(rng.uniform(0.5, 3.0), 2),
                restart_after_s=round(rng.uniform(0.5, 2.0), 2),
                after_updates=rng.randint(1, max(1, shape.clients - 1)),
            )
        )
    for _ in range(shape.client_kills):
        plan.append(
            Disturbance(
                KILL_CLIENT,
                rng.randint(1, shape.rounds),
                delay_s=round(rng.uniform(0.0, 1.5), 2),
                client=rng.randrange(shape.clients),
                restart_after_s=round(rng.uniform(0.5, 3.0), 2),
            )
        )
    for _ in range(shape.cuts):
        plan.append(
            Disturbance(
                CUT,
                rng.randint(1, shape.rounds),
                delay_s=round(rng.uniform(0.0, 1.5), 2),
                nbytes=rng.randint(1 << 10, 256 << 10),
            )
        )
    return sorted(plan, key=lambda d: (d.round, d.delay_s))
