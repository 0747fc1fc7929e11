"""What the robust strategies (median, trimmed mean, Krum, geometric median) share: the
round's updates read in lockstep, one block of each at a time.

They set `holds_updates`, so `aggregate` gets every verified update of the round with its
spool still readable. `lockstep` walks all their `blocks()` together and hands back, for
each block position, an N x L matrix (row k: client k's block) in the accumulator dtype;
`HoldingStrategy.apply_blocks` adds each block of the aggregate to the model as it is
made. The coordinator's memory is the model and N blocks (and a model-sized step where a
server optimiser follows), never N models.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator, Mapping, Sequence

import torch

from fedstream.server.strategies.base import Strategy, accumulator_dtype, add_in_place
from fedstream.server.strategies.server_optimizer import ServerOptimizer
from fedstream.server.updates import VerifiedUpdate

Block = tuple[str, int, torch.Tensor]
"""(tensor name, start element, flat values): a block of an update or of a step."""


def lockstep(updates: Sequence[VerifiedUpdate], reuse: bool = False) -> Iterator[Block]:
    """(tensor name, start, rows) for each block position of the updates, in manifest
    order; rows[k] is update k's block, copied out of its (reused) buffer. Each position's
    rows are the caller's to reorder or overwrite in place: a fresh tensor, or with `reuse`
    one buffer refilled at every position (a pass that is done with each position's rows
    before taking the next then allocates nothing per block, where fresh blocks of a few
    MiB each cost the kernel a page fault per page).

    Raises ValueError when the updates' blocks do not line up (same tensor, start and
    length at every position, and the same number of blocks).
    """
    if not updates:
        raise ValueError("no updates to aggregate")
    streams = [update.blocks() for update in updates]
    buffer = torch.empty(0)
    for first in streams[0]:
        length = first.values.numel()
        dtype = accumulator_dtype(first.values.dtype)
        if not reuse:
            rows = torch.empty(len(updates), length, dtype=dtype)
        else:
            if buffer.dtype != dtype or buffer.numel() < len(updates) * length:
                buffer = torch.empty(len(updates) * length, dtype=dtype)
            rows = buffer[: len(updates) * length].view(len(updates), length)
        rows[0].copy_(first.values)
        for k, stream in enumerate(streams[1:], start=1):
            block = next(stream, None)
            if block is None or (block.name, block.start, block.values.numel()) != (
                first.name,
                first.start,
                length,
            ):
                raise ValueError(
                    f"the update of {updates[k].client} does not line up with that of "
                    f"{updates[0].client} at {first.name}[{first.start}:{first.start + length}]"
                )
            rows[k].copy_(block.values)
        yield first.name, first.start, rows
    for k, stream in enumerate(streams[1:], start=1):
        if next(stream, None) is not None:
            raise ValueError(f"the update of {updates[k].client} has more blocks than the others")


def zeros_like_model(global_tensors: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """A model-sized buffer of zeros in each tensor's accumulator dtype."""
    return {
        name: torch.zeros(t.shape, dtype=accumulator_dtype(t.dtype))
        for name, t in global_tensors.items()
    }


def flat_slice(
    tensors: Mapping[str, torch.Tensor], name: str, start: int, length: int
) -> torch.Tensor:
    """Elements start .. start + length of tensor `name`, flattened, as a view."""
    return tensors[name].view(-1)[start : start + length]


class HoldingStrategy(Strategy):
    """A strategy that reads all of its round's updates at the end: nothing to prepare,
    nothing to fold as updates arrive.

    Its robust aggregate is the step: w <- w + step, or, given a `server_step` (FedAvgM,
    FedAdam, FedYogi, FedAdagrad: `--robust-optimizer`), that optimiser's move with the
    robust aggregate as its pseudo-gradient in place of the mean delta. The optimiser's
    slots are then this strategy's state across rounds, in the checkpoint.
    """

    holds_updates = True
    server_step: ServerOptimizer | None = None

    def begin_round(self, global_tensors: Mapping[str, torch.Tensor]) -> None:
        """Nothing to prepare: the round keeps the spools, `aggregate` reads them."""

    def apply_step(
        self, global_tensors: Mapping[str, torch.Tensor], step: dict[str, torch.Tensor]
    ) -> None:
        """Move the model by the round's robust aggregate `step` (consumed)."""
        if self.server_step is None:
            add_in_place(global_tensors, step)
        else:
            self.server_step.apply(global_tensors, step)

    def apply_blocks(
        self, global_tensors: Mapping[str, torch.Tensor], blocks: Iterable[Block]
    ) -> None:
        """Move the model by a step given block by block, (tensor name, start, values).

        With no server optimiser each block is added to the model as it comes, so the
        round holds no model-sized step: the coordinator's memory is the model and N
        blocks. An optimiser needs the whole pseudo-gradient, so then the blocks are
        gathered into a step first. A failure part-way leaves the model part-moved; it
        is never committed, since nothing between here and the checkpoint catches it.
        """
        if self.server_step is not None:
            step = zeros_like_model(global_tensors)
            for name, start, values in blocks:
                flat_slice(step, name, start, values.numel()).copy_(values)
            self.server_step.apply(global_tensors, step)
            return
        for name, start, values in blocks:
            flat_slice(global_tensors, name, start, values.numel()).add_(values)

    def state_tensors(self) -> dict[str, torch.Tensor]:
        return {} if self.server_step is None else self.server_step.state_tensors()

    def load_state_tensors(self, tensors: Mapping[str, torch.Tensor]) -> None:
        if self.server_step is not None:
            self.server_step.load_state_tensors(tensors)
