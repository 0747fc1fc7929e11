"""The round state machine: the coordinator as plain Python, driven by the gRPC skin.

    waiting     until at least min_clients have joined
    round r     select clients, publish the round; they pull model version r-1, train and
                push deltas; the round closes when every selected client has reported or
                is gone (silent for three heartbeats), or at the deadline (uploads still
                moving bytes are waited for), and at the latest at twice its timeout
                -> with enough updates: aggregate into version r, checkpoint, metrics;
                   without: the round is run again with a fresh selection
    evaluating  every `eval_every` rounds, after round r is checkpointed: the clients the
                strategy picks pull version r, evaluate it on their own held-out data and
                report; closes when all have reported or at its own deadline; the metrics
                are added to round r's record
    done        every poll is answered Done; the daemon stops once all have heard it

The coordinator is in one phase at a time (`self.phase`, `server/phases.py`). It reads the
time only through its clock, takes and returns plain values (`server/calls.py`), and
raises the domain errors of `server/errors.py`, which the servicer maps to gRPC statuses.
"""

from __future__ import annotations

import asyncio
import dataclasses
import logging
from collections.abc import AsyncIterator, Callable

from fedstream.server.admission.door import Admission
from fedstream.server.admission.sessions import ClientRecord
from fedstream.server.attendance import until_enough_live, until_told_done
from fedstream.server.calls import (
    EvaluationClaim,
    JoinClaim,
    Joined,
    ModelStream,
    NoWork,
    Receipt,
    RunDone,
    TrainWork,
    UpdateClaim,
    Work,
)
from fedstream.server.clock import Changes, Clock
from fedstream.server.config import EvaluationConfig, RoundsConfig, TransportConfig
from fedstream.server.errors import NotSelected, WrongRound
from fedstream.server.global_model import GlobalModel
from fedstream.server.guarded_aggregate import GuardedAggregate
from fedstream.server.intake import UploadIntake
from fedstream.server.liveness import RoundLiveness
from fedstream.server.partial_uploads import PartialUploads
from fedstream.server.phases import (
    Aggregating,
    Done,
    OpenEvaluation,
    OpenRound,
    Phase,
    Waiting,
    select_clients,
)
from fedstream.server.round_log import PendingRound, RoundLog
from fedstream.server.round_uploads import RoundUploads
from fedstream.server.run_store import RunStore
from fedstream.server.safeguards import Safeguards
from fedstream.server.starting_weights import record_round_zero
from fedstream.server.strategies import Strategy
from fedstream.server.updates import EvaluationReport
from fedstream.tasks import BUILTIN_TASKS, Task

log = logging.getLogger(__name__)

HARD_END_TIMEOUTS = 2
"""A multiplier: a round (or an evaluation) ends at the latest this many of its timeouts
after it opened, uploads still arriving or not."""


class Coordinator:
    """The run's rounds over parts built elsewhere (`server/assembly.py`)."""

    def __init__(
        self,
        *,
        task: Task,
        model: GlobalModel,
        strategy: Strategy,
        store: RunStore,
        admission: Admission,
        intake: UploadIntake,
        safeguards: Safeguards,
        aggregation: GuardedAggregate,
        clock: Clock,
        rounds: RoundsConfig,
        evaluation: EvaluationConfig,
        transport: TransportConfig,
        completed: int = 0,
        round_log: RoundLog | None = None,
        partials: PartialUploads | None = None,
    ) -> None:
        self.task = task
        self.model = model
        self.strategy = strategy
        self.store = store
        self.admission = admission
        self.intake = intake
        self.safeguards = safeguards
        self.aggregation = aggregation
        self.clock = clock
        self.rounds = rounds
        self.evaluation_config = evaluation
        self.transport = transport
        self.phase: Phase = Waiting(rounds.min_clients)
        self.completed = completed
        """Rounds done: those of the checkpoint the run resumed from, then each committed."""
        self.base_round_config = {**rounds.published(), **intake.uplink.round_config()}
        self.changes = Changes(clock)
        self.uploads = RoundUploads(
            intake, aggregation, partials or PartialUploads(600.0, 8 << 30), round_log
        )
        """Updates into the round: received or resumed, logged, booked; after a restart,
        taken again from the round's log (`server/round_uploads.py`)."""
        if round_log is not None:
            store.on_disk.append(round_log.committed)
        self.observers: list[Callable[[Phase], None]] = []
        """Called with each phase the coordinator enters (the live state listens)."""
        self.liveness = RoundLiveness(safeguards.max_round_attempts)

    @property
    def run_id(self) -> str:
        return self.store.run_id

    @property
    def round(self) -> OpenRound | None:
        """The round in flight: open, or closed and being aggregated."""
        if isinstance(self.phase, OpenRound):
            return self.phase
        if isinstance(self.phase, Aggregating):
            return self.phase.round
        return None

    @property
    def evaluation(self) -> OpenEvaluation | None:
        return self.phase if isinstance(self.phase, OpenEvaluation) else None

    # ---- life cycle -------------------------------------------------------------------

    async def run(self) -> None:
        """Run rounds until the configured number have completed."""
        if self.store.origin and self.completed == 0 and not self.store.history:
            await record_round_zero(self.task, self.model, self.strategy, self.store, self.clock)
        pending = self.uploads.pending(self.completed + 1, self.model.version)
        while self.completed < self.rounds.rounds:
            number = self.completed + 1
            attempt = pending.attempt if pending is not None else 1
            while True:
                await self._wait_for_clients()
                await asyncio.to_thread(self.model.sha256)  # once per version, off the loop
                open_round = self._open_round(number, attempt, pending)
                if pending is not None:
                    await self.uploads.take_logged(open_round, pending)
                    self.changes.notify()  # a client whose logged update failed is owed
                    pending = None
                enough = await self._close(open_round)
                if not enough:
                    log.warning(
                        "round %d: %s reported, fewer than needed; running it again",
                        number,
                        open_round.progress(),
                    )
                elif await self._commit(open_round):
                    break
                self.aggregation.abort_round()
                open_round.release_updates()
                self.liveness.attempt_ended(open_round, enough)
                attempt += 1
            every = self.evaluation_config.eval_every
            if every and number % every == 0:
                await self._evaluate(open_round)
        await asyncio.to_thread(self.store.finish)
        self._enter(Done(self.completed))
        log.info("run complete: %d rounds", self.completed)

    async def wait_clients_told(self, grace: float) -> None:
        """After the run: clients told it is done (`server/attendance.py`)."""
        await until_told_done(
            self.admission, self.changes, self.clock, self.rounds.min_clients, grace
        )

    def close(self) -> None:
        self.uploads.close()
        self.intake.close()

    # ---- calls from clients ------------------------------------------------------------

    def join(self, claim: JoinClaim) -> Joined:
        record = self.admission.join(claim)  # every check of a Join is admission's
        if self.store.identity.task in BUILTIN_TASKS:
            log.info("client %s joined (partition %d)", record.name, record.partition)
        else:  # a user's own task loads each site's own data: partitions mean nothing
            log.info("client %s joined", record.name)
        self.changes.notify()
        return Joined(
            record, self.run_id, self.transport.max_chunk_bytes, self.transport.heartbeat_seconds
        )

    async def poll(self, client: ClientRecord) -> Work:
        """Work for `client`, waiting up to the poll timeout for some to appear, but at
        most half the client timeout: a client in a held poll sends nothing else, and a
        longer hold would count it gone."""
        hold = min(self.transport.poll_timeout, self.transport.client_timeout / 2)
        deadline = self.clock.now() + hold
        while True:
            work = self._work_for(client)
            if not isinstance(work, NoWork):
                return work
            remaining = deadline - self.clock.now()
            if remaining <= 0:
                return work
            await self.changes.wait(remaining)

    def open_download(
        self, client: ClientRecord, version: int, offset: int, chunk: int, fragment: int | None
    ) -> ModelStream:
        """Model `version` (or one fragment of it, server/fragments.py) from `offset` on."""
        phase = self.phase
        if not isinstance(phase, OpenRound | OpenEvaluation) or not phase.accepting:
            raise WrongRound("no round is open for download")
        if client.name not in phase.selected:
            raise NotSelected(f"client {client.name} is not selected for round {phase.number}")
        chunk = min(chunk or self.transport.chunk_bytes, self.transport.max_chunk_bytes)
        kind = "round" if isinstance(phase, OpenRound) else "evaluation of round"
        still_open = lambda: self.phase is phase and phase.accepting  # noqa: E731
        return self.model.download(
            version, offset, chunk, still_open, f"{kind} {phase.number}", fragment
        )

    def count_download(self, nbytes: int) -> None:
        """Book a finished download to the round or evaluation in flight: a client that
        downloads version r to evaluate it holds r for round r + 1, whose record then shows
        no download, so the evaluation's count goes in round r's record."""
        phase = self.phase
        if isinstance(phase, OpenRound | OpenEvaluation):
            phase.bytes_down += nbytes

    async def receive_upload(
        self, client: ClientRecord, claim: UpdateClaim, chunks: AsyncIterator[memoryview]
    ) -> Receipt:
        open_round = self.round
        if open_round is None:
            raise WrongRound(f"round {claim.round} is not open for updates")
        open_round.check_update(client.name, claim)
        if client.name in open_round.reported | open_round.awaiting_log:
            return Receipt(False, f"update for round {open_round.number} already booked")
        try:
            await self.uploads.receive(open_round, client, claim, chunks)
        finally:
            self.changes.notify()
        client.busy = False
        return Receipt(True, f"booked for round {open_round.number}")

    async def upload_offset(
        self, client: ClientRecord, round_number: int, model_version: int, attempt: int
    ) -> int:
        """Bytes held of `client`'s cut upload for `round_number` (0: start from byte 0).
        A cut stream may not have ended here yet when its client asks: it is waited for
        (`changes`), up to the stall timeout."""
        deadline = self.clock.now() + self.transport.stall_timeout
        while (now := self.clock.now()) < deadline and self.uploads.streaming(self.round, client):
            await self.changes.wait(deadline - now)
        return self.uploads.offset(client.name, self.round, round_number, model_version, attempt)

    def report_evaluation(self, client: ClientRecord, claim: EvaluationClaim) -> Receipt:
        """Book one client's federated evaluation of the current global model."""
        evaluation = self.evaluation
        if evaluation is None:
            raise WrongRound(f"no evaluation is open (report for round {claim.round})")
        evaluation.check_report(client.name, claim)
        if client.name in evaluation.reported:
            return Receipt(False, f"evaluation of round {evaluation.number} already booked")
        evaluation.book(EvaluationReport(client.name, claim.num_examples, dict(claim.metrics)))
        client.busy = False
        self.changes.notify()
        return Receipt(True, f"evaluation booked for round {evaluation.number}")

    def heartbeat(self, client: ClientRecord, round_number: int) -> bool:
        """A client holding a task is alive; whether the phase of `round_number` is open."""
        phase = self.phase
        return (
            isinstance(phase, OpenRound | OpenEvaluation)
            and phase.number == round_number
            and phase.accepting
        )

    # ---- internals -----------------------------------------------------------------------

    def _enter(self, phase: Phase) -> None:
        self.phase = phase
        for observer in self.observers:
            observer(phase)
        self.changes.notify()

    def _work_for(self, client: ClientRecord) -> Work:
        phase = self.phase
        if isinstance(phase, Done):
            client.told_done = True
            self.changes.notify()
            return RunDone(f"run complete: {phase.completed} rounds")
        if isinstance(phase, OpenRound | OpenEvaluation) and phase.owes(client.name):
            client.busy = True
            work = phase.work(self.model.version, self.clock.now())
            if isinstance(work, TrainWork) and isinstance(phase, OpenRound):
                work = dataclasses.replace(work, attempt=phase.attempt)
            return dataclasses.replace(work, model_sha256=self.model.sha256())
        client.busy = False
        return NoWork()

    def _live(self) -> list[str]:
        return [r.name for r in self.admission.live()]

    async def _wait_for_clients(self) -> None:
        """Between rounds: until at least min_clients are live."""
        self._enter(Waiting(self.rounds.min_clients))
        await until_enough_live(self.admission, self.changes, self.rounds.min_clients)

    def _open_round(self, number: int, attempt: int, pending: PendingRound | None) -> OpenRound:
        """Round `number`'s try `attempt`: a fresh selection, or the one `pending` logged
        before a restart (its logged updates are taken again, the others carry on)."""
        live = self._live()
        rounds = self.rounds
        seed = self.store.identity.seed
        selected = select_clients(live, rounds.fraction, rounds.min_clients, seed, number, attempt)
        if pending is not None and pending.selected:
            selected = pending.selected
        logged = {entry.client for entry in pending.updates} if pending is not None else set()
        now = self.clock.now()
        open_round = OpenRound(
            number=number,
            attempt=attempt,
            model_version=self.model.version,
            selected=selected,
            config=self.strategy.configure_round(number, self.base_round_config),
            started=now,
            deadline=now + self.rounds.round_timeout,
            hard_end=now + HARD_END_TIMEOUTS * self.rounds.round_timeout,
            awaiting_log=logged & selected,
        )
        self.aggregation.begin_round()
        self.uploads.begin(open_round)
        self._enter(open_round)
        total = self.rounds.rounds
        log.info(
            "round %d/%d started: %d of %d clients selected",
            number,
            total,
            len(selected),
            len(live),
        )
        return open_round

    async def _close(self, open_round: OpenRound) -> bool:
        """Wait for the round's end; True when it has enough updates to aggregate."""
        await self._until_reported(open_round, "updates")
        self._enter(Aggregating(open_round))
        async with self.intake.readback:  # an update being read back finishes first
            needed = min(self.rounds.min_reports, len(open_round.selected))
            return len(open_round.reported) >= max(1, needed)

    async def _until_reported(self, phase: OpenRound | OpenEvaluation, what: str) -> None:
        every = self.transport.heartbeat_seconds
        reached = await phase.until_reported(self.clock, self.changes, self.admission.alive, every)
        if reached is not None:
            kind = "evaluation" if isinstance(phase, OpenEvaluation) else "round"
            progress = phase.progress()
            log.warning(
                "round %d: %s %s reached with %s %s", phase.number, kind, reached, progress, what
            )
        self.admission.release_tasks()

    async def _commit(self, open_round: OpenRound) -> bool:
        """Aggregate the round into the next global model, checkpoint it with its record,
        and only then let it go on (aggregate -> checkpoint -> metrics -> next).
        False when no finite aggregate could be made: the round is to be run again."""
        record = await self.aggregation.commit(open_round, self.clock.now)
        if record is None:
            log.warning(
                "round %d: no finite aggregate without leaving out every update; running it again",
                open_round.number,
            )
            return False
        self.completed = open_round.number
        shown = {k: v for k, v in record.items() if k.startswith(("eval_", "train_"))}
        metrics = ", ".join(f"{k}={v:.4f}" for k, v in shown.items()) or "no metrics"
        done = f"round {open_round.number}/{self.rounds.rounds} done"
        log.info(
            "%s in %.1fs: %d updates, %s", done, record["duration_s"], record["updates"], metrics
        )
        return True

    async def _evaluate(self, trained: OpenRound) -> None:
        """Clients evaluate the checkpointed model version `trained.number` on their own
        held-out data; the strategy's aggregate of their reports joins the round's record."""
        live = frozenset(self._live())
        await asyncio.to_thread(self.model.sha256)
        now = self.clock.now()
        evaluation = OpenEvaluation(
            number=trained.number,
            selected=self.strategy.configure_evaluation(trained.number, trained.selected & live),
            deadline=now + self.evaluation_config.eval_timeout,
            hard_end=now + HARD_END_TIMEOUTS * self.evaluation_config.eval_timeout,
        )
        self._enter(evaluation)
        await self._until_reported(evaluation, "reports")
        metrics = self.strategy.aggregate_evaluation(evaluation.reports)
        metrics["fed_eval_bytes_down"] = evaluation.bytes_down
        await asyncio.to_thread(self.store.add_to_record, evaluation.number, metrics)
        shown = ", ".join(f"{k}={v:.4f}" for k, v in metrics.items() if isinstance(v, float))
        log.info(
            "round %d evaluated by %d clients: %s",
            evaluation.number,
            len(evaluation.reports),
            shown,
        )
