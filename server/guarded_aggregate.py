"""A round's aggregate into the global model, within the safeguards (`safeguards.py`), and
its checkpoint with the round's record.

Outliers are left out, updates clipped and claims capped first; then the strategy
aggregates. A result that is not finite, or whose scale exploded against the last model's
(`influence.scale_exploded`), is taken back (the model and the strategy's state as the
last checkpoint holds them) and made again without the update of largest norm, until one
may be committed or no update is left: such a model is never committed.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable
from typing import Any

from fedstream.common.memory import peak_rss_bytes
from fedstream.server import fold_corrections
from fedstream.server.finite import all_finite
from fedstream.server.global_model import GlobalModel
from fedstream.server.influence import model_norm, model_size, scale_exploded, step_scale
from fedstream.server.phases import OpenRound
from fedstream.server.run_store import RunStore
from fedstream.server.safeguards import Review, Safeguards
from fedstream.server.strategies import Strategy
from fedstream.server.strategies.base import MeanOfUpdates
from fedstream.server.updates import VerifiedUpdate
from fedstream.tasks import EvalResult, Task

log = logging.getLogger(__name__)


class GuardedAggregate:
    """The strategy's aggregate of a round, behind the safeguards."""

    def __init__(
        self,
        strategy: Strategy,
        safeguards: Safeguards,
        model: GlobalModel,
        store: RunStore,
        task: Task,
    ) -> None:
        self.task = task
        """Evaluates each new global model on the coordinator's own data, if it has any."""
        self.strategy = strategy
        self.safeguards = safeguards
        self.model = model
        self.store = store
        self.model_norm = model_norm(model.tensors)
        """The L2 norm of the last committed model (or the starting one)."""
        self.model_size = model_size(model.tensors)
        self.review: Review | None = None
        """The review of the round being committed."""
        self.folded: list[tuple[VerifiedUpdate, float]] = []
        """The round's updates a weighted mean folded as they arrived, with their weights."""
        if store.history and "clip_reference" in store.history[-1]:
            safeguards.clip.reference = float(store.history[-1]["clip_reference"])

    def folds_on_arrival(self, selected: int) -> bool:
        """Whether the strategy is handed each update as it arrives in a round of
        `selected` clients. A weighted mean always is, its sum corrected after the review
        (`server/fold_corrections.py`); any other strategy that folds updates is handed
        the kept ones after the review instead when the safeguards may change what it
        would fold (`Safeguards.may_reweigh`), so that each spool is folded once."""
        return (
            self.strategy.holds_updates
            or isinstance(self.strategy, MeanOfUpdates)
            or not self.safeguards.may_reweigh(selected)
        )

    def begin_round(self) -> None:
        """The strategy starts a round (or an attempt at one) from the global model."""
        self.folded.clear()
        self.strategy.begin_round(self.model.tensors)

    def abort_round(self) -> None:
        """The round's attempt ends without a commit: nothing of it stays folded."""
        self.folded.clear()
        self.strategy.abort_round()

    async def arrived(self, update: VerifiedUpdate, selected: int) -> None:
        """An update verified whole in a round of `selected` clients: refused when over
        the absolute norm bound, else handed to the strategy now if it folds on arrival."""
        self.safeguards.check_arrival(update)
        if self.folds_on_arrival(selected):
            await asyncio.to_thread(self.strategy.accept, update)
            if isinstance(self.strategy, MeanOfUpdates):
                weight = self.strategy.weight(update.client, update.num_examples)
                self.folded.append((update, weight))

    @property
    def keeps_updates(self) -> bool:
        """Whether the round must keep its updates' spools until it is aggregated."""
        return self.strategy.holds_updates or self.safeguards.holds_updates

    def into_model(self, open_round: OpenRound) -> bool:
        """The round's aggregate into the global model; False when no update is left
        that gives a finite one (the round is to be run again)."""
        if not self.safeguards.enabled:
            self.strategy.aggregate(open_round.updates, self.model.tensors)
            return True
        review = self.safeguards.review(
            open_round.number, open_round.updates, open_round.safeguarded
        )
        try:
            return self._aggregate_reviewed(open_round, review)
        finally:
            review.close()

    def _aggregate_reviewed(self, open_round: OpenRound, review: Review) -> bool:
        folded = self.folds_on_arrival(len(open_round.selected))
        first = True
        while review.kept:
            if not self.strategy.holds_updates and not (first and self._folded(review, folded)):
                review.ready_to_read()
                self.strategy.abort_round()
                self.strategy.begin_round(self.model.tensors)
                for update in review.kept:
                    self.strategy.accept(update)
            first = False
            if self.strategy.holds_updates:
                review.ready_to_read()
            self.strategy.aggregate(review.kept, self.model.tensors)
            why = self._refusal(review)
            if why is None:
                self.review = review
                return True
            self._take_back()
            self.safeguards.leave_out_largest(open_round.number, review, why)
        return False

    def _folded(self, review: Review, folded: bool) -> bool:
        """Whether the strategy's state, as folded on arrival, is the reviewed round's
        (after correcting it, for a weighted mean, where that beats rebuilding it)."""
        if not isinstance(self.strategy, MeanOfUpdates):
            return folded and not review.changed
        correction = fold_corrections.plan(self.folded, review, self.strategy)
        if correction is None:
            log.info("the round's sum is folded again from its %d kept updates", len(review.kept))
            return False
        fold_corrections.apply(correction, self.strategy)
        if correction.terms:
            log.info("the round's sum is corrected: %d updates read back", len(correction.terms))
        return True

    def _refusal(self, review: Review) -> str | None:
        """Why the aggregate just made may not be committed; None when it may (and then
        its norm is the new `model_norm`)."""
        if not all_finite(self.model.tensors):
            return "the aggregate was not finite"
        norm = model_norm(self.model.tensors)
        step = step_scale(self.safeguards.clip.reference, self.model_norm, self.model_size)
        if scale_exploded(norm, self.model_norm, step):
            return (
                f"the aggregate's L2 norm {norm:.4g} exploded from the last model's "
                f"{self.model_norm:.4g} (the run's step scale {step:.4g})"
            )
        self.model_norm = norm
        return None

    async def commit(
        self, open_round: OpenRound, now: Callable[[], float]
    ) -> dict[str, Any] | None:
        """Aggregate the round into the next global model, then checkpoint it with its
        record (aggregate -> checkpoint -> metrics -> next); the record, or None when no
        finite aggregate could be made (the round is to be run again)."""
        try:
            committed = await asyncio.to_thread(self.into_model, open_round)
        finally:
            open_round.release_updates()
        if not committed:
            return None
        self.model.version = open_round.number
        evaluation = await asyncio.to_thread(self.task.evaluate, self.model.module)
        return await asyncio.to_thread(self.checkpoint, open_round, evaluation, now())

    def checkpoint(
        self, open_round: OpenRound, evaluation: EvalResult | None, now: float
    ) -> dict[str, Any]:
        """The aggregated round's record (its counts, the safeguards' and the strategy's,
        the coordinator's own evaluation), checkpointed with the model it made."""
        record = open_round.record(self.model.version, now)
        record["coordinator_peak_rss_mb"] = round(peak_rss_bytes() / 2**20, 1)
        review, self.review = self.review, None
        if self.safeguards.enabled:
            record.update(open_round.safeguarded)
            if review is not None and review.clip_bound is not None:
                record["clip_bound"] = review.clip_bound
            if review is not None and review.clip_scale is not None:
                record["clip_reference"] = review.clip_scale
            if review is not None and review.clip_radius is not None:
                record["clip_radius"] = review.clip_radius
        record.update(self.strategy.round_metrics(open_round.number))
        if evaluation is not None:
            record.update({f"eval_{k}": v for k, v in sorted(evaluation.metrics.items())})
        self.store.commit_round(
            open_round.number, self.model.tensors, self.strategy.state_tensors(), record
        )
        if review is not None:
            self.safeguards.committed(review)
        return record

    def _take_back(self) -> None:
        """The global model and the strategy's state as the last checkpoint holds them."""
        model, state = self.store.last_committed()
        self.model.load(model)
        self.strategy.load_state_tensors(state)
