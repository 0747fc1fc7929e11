"""The Strategy interface: configure a round, aggregate its updates; configure an
evaluation, aggregate its reports (the cut of Flower's strategies).

A strategy sees whole verified updates (`server/updates.py`). Each is handed to `accept`
as soon as it is verified; a strategy that folds updates into a running state (FedAvg and
the server optimisers) does its work there, and the update's spool is released as soon as
`accept` returns, so the coordinator's disk holds only the uploads in flight. Where the
safeguards may leave out or re-weigh an update of the round, the round keeps the spools
until it is committed: a weighted mean (`MeanOfUpdates`) still folds each update as it
arrives, and its sum is corrected after the review (`server/fold_corrections.py`); any other
strategy is handed the kept updates once the round is reviewed instead, so that each is
folded once, with its final weight (`GuardedAggregate.folds_on_arrival`). A strategy that needs all
of a round's updates at once (coordinate-wise median, Krum) sets `holds_updates`: the
round then keeps every verified spool until its aggregate is committed, and `aggregate`
reads them block by block. Either way the coordinator's memory is the model, the output
and a block per update, never a model per update.

Whatever the strategy carries from round to round (optimiser moments, say) goes into the
checkpoint through `state_tensors`, so a resumed run continues exactly.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Mapping, Sequence
from typing import ClassVar

import torch

from fedstream.common.round_config import ConfigScalar
from fedstream.server.phases import ReportTotals
from fedstream.server.updates import DeltaBlock, DeltaStream, EvaluationReport, VerifiedUpdate

__all__ = [
    "DeltaBlock",
    "DeltaStream",
    "MeanOfUpdates",
    "RunningMean",
    "Strategy",
    "accumulator_dtype",
    "add_in_place",
]


def accumulator_dtype(dtype: torch.dtype) -> torch.dtype:
    """Sums run in float32, or float64 for float64 models: never in half precision."""
    return torch.float64 if dtype == torch.float64 else torch.float32


class RunningMean:
    """sum_k a_k * x_k / sum_k a_k over streamed updates x_k, in one model's worth of memory.

    The sum is kept in the accumulator dtype of each tensor, so updates of a half-precision
    model never sum in half precision.
    """

    def __init__(self) -> None:
        self.like: dict[str, tuple[torch.Size, torch.dtype]] = {}
        self.sums: dict[str, torch.Tensor] = {}
        self.weight = 0.0

    def reset(self, like: Mapping[str, torch.Tensor]) -> None:
        """Start sums shaped like `like` (the global model), allocated by the first `add`:
        until an update arrives, the round's downloads have the memory to themselves."""
        self.like = {name: (t.shape, accumulator_dtype(t.dtype)) for name, t in like.items()}
        self.sums = {}
        self.weight = 0.0

    def add(self, weight: float, update: DeltaStream) -> None:
        """sum += weight * update, block by block."""
        self._fold(update, weight, weight)

    def correct(self, change: DeltaStream, weight: float) -> None:
        """sum += change (already weighted), total weight += `weight`: a fold corrected
        after the round's review (`server/fold_corrections.py`)."""
        self._fold(change, 1.0, weight)

    def _fold(self, blocks: DeltaStream, alpha: float, weight: float) -> None:
        if not self.sums:
            self.sums = {
                name: torch.zeros(shape, dtype=dt) for name, (shape, dt) in self.like.items()
            }
        for block in blocks:
            block.target(self.sums).add_(block.values, alpha=alpha)
        self.weight += weight

    def take(self) -> dict[str, torch.Tensor]:
        """The weighted mean (computed in place over the sums, which are then dropped)."""
        if self.weight <= 0:
            raise ValueError("aggregate with no weight folded")
        mean = {name: total.div_(self.weight) for name, total in self.sums.items()}
        self.clear()
        return mean

    def clear(self) -> None:
        self.sums = {}
        self.weight = 0.0


class Strategy(ABC):
    """Turns a round's verified updates into the next global model, and the clients'
    evaluation reports into the round's federated metrics."""

    holds_updates: ClassVar[bool] = False
    """True when `aggregate` reads the round's updates at the end: the round then keeps
    every verified spool until its aggregate is committed. False when `accept` folds each
    update as it arrives: its spool is released right after."""

    def configure_round(
        self, round_number: int, base: Mapping[str, ConfigScalar]
    ) -> dict[str, ConfigScalar]:
        """The settings sent to every selected client for this round."""
        return {**base, "round": round_number}

    @abstractmethod
    def begin_round(self, global_tensors: Mapping[str, torch.Tensor]) -> None:
        """Prepare running state for a round that starts from `global_tensors`."""

    def accept(self, update: VerifiedUpdate) -> None:  # noqa: B027 (strategies that hold updates read them in `aggregate`)
        """Take one verified update (fold it into a running state, say): as it arrives, or
        when the round is reviewed (see the module docstring)."""

    @abstractmethod
    def aggregate(
        self, updates: Sequence[VerifiedUpdate], global_tensors: Mapping[str, torch.Tensor]
    ) -> None:
        """Write the next global model into `global_tensors`, in place, from the round's
        updates (their `blocks()` readable only when `holds_updates` is set)."""

    def abort_round(self) -> None:  # noqa: B027 (optional hook; most strategies need nothing)
        """Drop the running state of a round that will not be finished."""

    def round_metrics(self, round_number: int) -> dict[str, float]:
        """What the strategy adds to round `round_number`'s line of metrics.jsonl, once
        its aggregate is made."""
        return {}

    def configure_evaluation(self, round_number: int, candidates: frozenset[str]) -> frozenset[str]:
        """The clients asked to evaluate round `round_number`'s model: by default every
        candidate (the round's selected clients that are still live)."""
        return candidates

    def aggregate_evaluation(self, reports: Sequence[EvaluationReport]) -> dict[str, float]:
        """The round's federated evaluation metrics, as `fed_eval_*`: how many clients
        reported, over how many examples, and each metric's example-weighted mean."""
        totals = ReportTotals()
        for report in reports:
            totals.add(report.num_examples, report.metrics)
        return {
            "fed_eval_clients": len(reports),
            "fed_eval_examples": totals.examples,
            **totals.means("fed_eval_"),
        }

    def state_tensors(self) -> dict[str, torch.Tensor]:
        """State carried across rounds, for the checkpoint."""
        return {}

    def load_state_tensors(self, tensors: Mapping[str, torch.Tensor]) -> None:  # noqa: B027
        """Restore what `state_tensors` returned (stateless strategies have nothing)."""


class MeanOfUpdates(Strategy):
    """Strategies whose round is a weighted mean of the clients' updates: the weight of each
    client is `weight(client, num_examples)`; the mean goes to `apply`. Each update is
    folded into a running sum when it is accepted, so the strategy holds none of them."""

    def __init__(self) -> None:
        self.running = RunningMean()

    def weight(self, client: str, num_examples: int) -> float:
        """The weight a_k of client k's update in the round's mean."""
        return float(num_examples)

    @abstractmethod
    def apply(
        self, global_tensors: Mapping[str, torch.Tensor], mean: dict[str, torch.Tensor]
    ) -> None:
        """Move `global_tensors` (in place) by the round's mean update."""

    def begin_round(self, global_tensors: Mapping[str, torch.Tensor]) -> None:
        self.running.reset(global_tensors)

    def accept(self, update: VerifiedUpdate) -> None:
        self.running.add(self.weight(update.client, update.num_examples), update.blocks())

    def aggregate(
        self, updates: Sequence[VerifiedUpdate], global_tensors: Mapping[str, torch.Tensor]
    ) -> None:
        self.apply(global_tensors, self.running.take())

    def abort_round(self) -> None:
        self.running.clear()


def add_in_place(
    global_tensors: Mapping[str, torch.Tensor], step: Mapping[str, torch.Tensor]
) -> None:
    """w <- w + step, computed in the accumulator dtype and stored in the model's dtype.

    The sum is formed in `step`'s own tensors, which this consumes, so no third
    model-sized tensor is ever allocated.
    """
    for name, target in global_tensors.items():
        target.copy_(step[name].add_(target))
