"""Liveness: a round that cannot be aggregated ends the run instead of running forever.

A round is run again when it closes with too few updates or when no model it could make
may be committed (every update left out, or every aggregate not finite or exploded:
`server/guarded_aggregate.py`). Clients that are slow or gone are the coordinator's
ordinary weather: such a round is run again for as long as it takes, with a fresh
selection. But a round whose updates are refused (an upload rejected and too few left,
or no committable aggregate from those that arrived) fails for a reason that running it
again does not remove: a dead model every honest client trains into non-finite values, an
insider that makes every aggregate explode. So:

    an attempt *fails* when the round had updates refused or left out and committed
    nothing; after `--max-round-attempts` (5) failed attempts of the same round,
    the run ends with `RoundStalled`: the coordinator logs why each attempt failed, keeps
    the last committed model (its checkpoint is the newest on disk), and exits non-zero.

An attempt ends when every selected client has reported or is excused: a client that
sent `REFUSALS_PER_ATTEMPT` (3) refused updates in it (`server/phases.py`), so a round
whose clients keep sending what is refused fails its attempts at once, not at their
deadlines.

No rule relaxes a bound to let such a round through: a bound loose enough to admit what
was refused admits the attack it was refusing. A restart with the same run directory
resumes from the last committed model, and may run the round with other flags.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from fedstream.common.errors import FedstreamError

if TYPE_CHECKING:
    from fedstream.server.phases import OpenRound

log = logging.getLogger(__name__)


class RoundStalled(FedstreamError):
    """A round failed `--max-round-attempts` times: the run ends."""


@dataclass
class RoundLiveness:
    """The failed attempts of the round in flight (module docstring)."""

    max_attempts: int
    round_number: int = 0
    failures: list[str] = field(default_factory=list)

    def attempt_ended(self, open_round: OpenRound, enough_reports: bool) -> None:
        """An attempt of `open_round` committed nothing, with `enough_reports` (every
        aggregate refused) or without."""
        counts = open_round.safeguarded
        refused = open_round.rejected + counts["refused_outlier"] + counts["refused_overflow"]
        self.failed(open_round.number, enough_reports, refused, open_round.progress())

    def failed(self, round_number: int, enough_reports: bool, refused: int, progress: str) -> None:
        """An attempt of `round_number` committed nothing: with `enough_reports` (every
        aggregate refused) or without, `refused` uploads rejected or updates left out.
        RoundStalled once `max_attempts` attempts of the round have failed."""
        if round_number != self.round_number:
            self.round_number, self.failures = round_number, []
        if enough_reports:
            why = f"no committable aggregate from {progress} updates ({refused} left out)"
        elif refused:
            why = f"{progress} updates after {refused} refused"
        else:
            return  # too few clients reported, none refused: ordinary weather
        self.failures.append(why)
        log.warning(
            "round %d: attempt failed (%d of %d allowed): %s",
            round_number,
            len(self.failures),
            self.max_attempts,
            why,
        )
        if len(self.failures) >= self.max_attempts:
            message = (
                f"round {round_number} could not be aggregated in {len(self.failures)} "
                f"attempts ({'; '.join(self.failures)}); the run ends, keeping the "
                f"model of round {round_number - 1} (--max-round-attempts)"
            )
            log.error("%s", message)
            raise RoundStalled(message)
