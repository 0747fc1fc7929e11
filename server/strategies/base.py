"""The Strategy interface, cut for streaming aggregation.

The coordinator never holds more than one update at a time: each verified upload is
folded into the strategy's running state as it arrives (`fold`), and the round is
finished into the next global model in place (`finish_round`). Whatever the strategy
carries from round to round (optimiser moments, say) goes into the checkpoint through
`state_tensors`, so a resumed run continues exactly.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Iterable, Mapping
from dataclasses import dataclass

import torch

from fedstream.common.round_config import Scalar


@dataclass(frozen=True)
class DeltaBlock:
    """A run of elements of one tensor of an update (local minus global).

    `values` is 1-D and holds elements `start .. start + len(values)` of the flattened
    tensor `name`. It may live in a reused buffer: use it before taking the next block.
    """

    name: str
    start: int
    values: torch.Tensor

    def target(self, tensors: Mapping[str, torch.Tensor]) -> torch.Tensor:
        """The matching elements of a same-shaped tensor in `tensors`, as a flat view."""
        return tensors[self.name].view(-1)[self.start : self.start + self.values.numel()]


DeltaStream = Iterable[DeltaBlock]
"""An update, block by block, in manifest order."""


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
        if not self.sums:
            self.sums = {
                name: torch.zeros(shape, dtype=dt) for name, (shape, dt) in self.like.items()
            }
        for block in update:
            block.target(self.sums).add_(block.values, alpha=weight)
        self.weight += weight

    def take(self) -> dict[str, torch.Tensor]:
        """The weighted mean (computed in place over the sums, which are then dropped)."""
        if self.weight <= 0:
            raise ValueError("finish_round with no weight folded")
        mean = {name: total.div_(self.weight) for name, total in self.sums.items()}
        self.clear()
        return mean

    def clear(self) -> None:
        self.sums = {}
        self.weight = 0.0


class Strategy(ABC):
    """Turns a round's updates into the next global model."""

    def configure_round(self, round_number: int, base: Mapping[str, Scalar]) -> dict[str, Scalar]:
        """The settings sent to every selected client for this round."""
        return {**base, "round": round_number}

    @abstractmethod
    def begin_round(self, global_tensors: Mapping[str, torch.Tensor]) -> None:
        """Prepare running state for a round that starts from `global_tensors`."""

    @abstractmethod
    def fold(self, client: str, num_examples: int, delta: DeltaStream) -> None:
        """Add one verified update to the running state."""

    @abstractmethod
    def finish_round(self, global_tensors: Mapping[str, torch.Tensor]) -> None:
        """Write the next global model into `global_tensors`, in place."""

    def abort_round(self) -> None:  # noqa: B027 (optional hook; most strategies need nothing)
        """Drop the running state of a round that will not be finished."""

    def state_tensors(self) -> dict[str, torch.Tensor]:
        """State carried across rounds, for the checkpoint."""
        return {}

    def load_state_tensors(self, tensors: Mapping[str, torch.Tensor]) -> None:  # noqa: B027
        """Restore what `state_tensors` returned (stateless strategies have nothing)."""


class MeanOfUpdates(Strategy):
    """Strategies whose round is a weighted mean of the clients' updates: the weight of each
    client is `weight(client, num_examples)`; the mean goes to `apply`."""

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

    def fold(self, client: str, num_examples: int, delta: DeltaStream) -> None:
        self.running.add(self.weight(client, num_examples), delta)

    def finish_round(self, global_tensors: Mapping[str, torch.Tensor]) -> None:
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
