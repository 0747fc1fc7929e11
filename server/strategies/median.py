"""Coordinate-wise median.

Yin, Chen, Ramchandran, Bartlett, "Byzantine-Robust Distributed Learning: Towards
Optimal Statistical Rates", ICML 2018.

With client k's delta_k (k = 1..N) sorted coordinate by coordinate into
x_(1) <= ... <= x_(N):

    w <- w + med_k delta_k,   med = x_((N+1)/2) for odd N,
                                    (x_(N/2) + x_(N/2+1)) / 2 for even N

(the mean of the two middle values for even N; torch.median would return the lower one).
Unweighted by design: a client's claimed number of examples does not move the median.
The round's spools are read block by block in lockstep (`robust.lockstep`) and each block
of the median is added to the model as it is made: memory is the model and N blocks.

With `--robust-optimizer fedavgm|fedadam|...` the aggregate is that server optimiser's
pseudo-gradient instead of the step itself (`robust.HoldingStrategy.apply_step`).
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping, Sequence

import torch

from fedstream.server.strategies.robust import Block, HoldingStrategy, lockstep
from fedstream.server.updates import VerifiedUpdate


def coordinate_median(rows: torch.Tensor) -> torch.Tensor:
    """The median of each column of `rows` (N x L); for even N the mean of the two
    middle values. Selected with `kthvalue`, which allocates a row of values and indices,
    where sorting would allocate N rows of values and N of int64 indices (3N blocks)."""
    n = rows.shape[0]
    upper = rows.kthvalue(n // 2 + 1, dim=0).values
    if n % 2:
        return upper
    return upper.add_(rows.kthvalue(n // 2, dim=0).values).div_(2)


def median_blocks(updates: Sequence[VerifiedUpdate]) -> Iterator[Block]:
    """The coordinate-wise median of the updates, block by block."""
    for name, start, rows in lockstep(updates):
        yield name, start, coordinate_median(rows)


class Median(HoldingStrategy):
    """w <- w + coordinate-wise median of the deltas."""

    def aggregate(
        self, updates: Sequence[VerifiedUpdate], global_tensors: Mapping[str, torch.Tensor]
    ) -> None:
        self.apply_blocks(global_tensors, median_blocks(updates))
