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
