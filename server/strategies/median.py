"""Coordinate-wise median.

Yin, Chen, Ramchandran, Bartlett, "Byzantine-Robust Distributed Learning: Towards
Optimal Statistical Rates", ICML 2018.

With client k's delta_k (k = 1..N) sorted coordinate by coordinate into
x_(1) <= ... <= x_(N):

    w <- w + med_k delta_k,   med = x_((N+1)/2) for odd N,
                                    (x_(N/2) + x_(N/2+1)) / 2 for even N

(the mean of the two middle values for even N; torch.median would return the lower one).
Unweighted by design: a client's claimed number of examples does not move the median.
The round's spools are read block by block in lockstep (`robust.lockstep`): memory is the
model, the aggregate (float32, float64 for float64 models) and N blocks.

With `--robust-optimizer fedavgm|fedadam|...` the aggregate is that server optimiser's
pseudo-gradient instead of the step itself (`robust.HoldingStrategy.apply_step`).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import torch

from fedstream.server.strategies.robust import (
    HoldingStrategy,
    flat_slice,
    lockstep,
    zeros_like_model,
)
from fedstream.server.updates import VerifiedUpdate


def coordinate_median(rows: torch.Tensor) -> torch.Tensor:
    """The median of each column of `rows` (N x L); for even N the mean of the two
    middle values."""
    ordered = rows.sort(dim=0).values
    n = rows.shape[0]
    if n % 2:
        return ordered[n // 2]
    return (ordered[n // 2 - 1] + ordered[n // 2]) / 2


def median_step(
    updates: Sequence[VerifiedUpdate], global_tensors: Mapping[str, torch.Tensor]
) -> dict[str, torch.Tensor]:
    """The coordinate-wise median of the updates, shaped like the model."""
    step = zeros_like_model(global_tensors)
    for name, start, rows in lockstep(updates):
        flat_slice(step, name, start, rows.shape[1]).copy_(coordinate_median(rows))
    return step


class Median(HoldingStrategy):
    """w <- w + coordinate-wise median of the deltas."""

    def aggregate(
        self, updates: Sequence[VerifiedUpdate], global_tensors: Mapping[str, torch.Tensor]
    ) -> None:
        self.apply_step(global_tensors, median_step(updates, global_tensors))
