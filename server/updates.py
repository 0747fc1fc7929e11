"""What a strategy sees of a round: whole verified updates and evaluation reports.

An update reaches a strategy only once it is complete and verified (every declared byte
present, every value finite), as a `VerifiedUpdate`: who sent it, the weight it claims,
its metrics, and `blocks()` to read its tensors again, a block at a time, from its spool
on disk. So a strategy can fold each update as it arrives (FedAvg, the server optimisers)
or read all of the round's updates at the end (coordinate-wise median, Krum) in memory
bounded by a block per update, never a model per update.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Iterator, Mapping
from dataclasses import dataclass, field
from typing import Protocol

import torch


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


class BlockSource(Protocol):
    """Where an update's tensors are read back from (its spool, for the coordinator)."""

    def blocks(self) -> Iterator[DeltaBlock]: ...

    def discard(self) -> None: ...


class InMemoryBlocks:
    """An update already in memory, as blocks: for strategies driven without a network
    (the quality bench, tests)."""

    def __init__(self, blocks: Iterable[DeltaBlock]) -> None:
        self._blocks: list[DeltaBlock] | None = list(blocks)

    def blocks(self) -> Iterator[DeltaBlock]:
        if self._blocks is None:
            raise RuntimeError("the update was released")
        return iter(self._blocks)

    def discard(self) -> None:
        self._blocks = None


@dataclass(eq=False)
class VerifiedUpdate:
    """One client's complete, verified update for one round."""

    client: str
    num_examples: int
    metrics: Mapping[str, float]
    nbytes: int
    """Bytes it took on the wire."""
    source: BlockSource = field(repr=False)
    norm: float = math.nan
    """Its L2 norm over its floating tensors, measured while it was verified."""
    released: bool = False

    @classmethod
    def in_memory(
        cls,
        client: str,
        num_examples: int,
        blocks: Iterable[DeltaBlock],
        metrics: Mapping[str, float] | None = None,
    ) -> VerifiedUpdate:
        kept = list(blocks)
        squares = sum(
            float(b.values.double().square().sum()) for b in kept if b.values.is_floating_point()
        )
        return cls(
            client, num_examples, dict(metrics or {}), 0, InMemoryBlocks(kept), math.sqrt(squares)
        )

    def blocks(self) -> Iterator[DeltaBlock]:
        """The update's tensors in manifest order, a block at a time, read afresh on each
        call; a block is valid only until the next one is taken."""
        if self.released:
            raise RuntimeError(f"the update of {self.client} was released after it was folded")
        return self.source.blocks()

    def release(self) -> None:
        """Give its spool back; `blocks()` fails afterwards. Idempotent."""
        if not self.released:
            self.released = True
            self.source.discard()


@dataclass(frozen=True)
class EvaluationReport:
    """One client's federated evaluation of the global model on its own held-out data."""

    client: str
    num_examples: int
    metrics: Mapping[str, float]
