"""Coordinate-wise trimmed mean.

Yin, Chen, Ramchandran, Bartlett, "Byzantine-Robust Distributed Learning: Towards
Optimal Statistical Rates", ICML 2018.

With client k's delta_k (k = 1..N) sorted coordinate by coordinate into
x_(1) <= ... <= x_(N), and t = floor(b * N) for the trim fraction b:

    w <- w + (1 / (N - 2t)) * sum_{j = t+1}^{N-t} x_(j)

(per coordinate the t largest and the t smallest values are dropped, the rest averaged).
b < 1/2 keeps at least one value for any N (2 floor(bN) <= 2bN < N); b = 0 is the mean.
With b left unset (`default_trim_fraction`, 0.2), a round of 3 or more updates trims at
least one at each end (t = max(1, floor(0.2 N))): one insider of five is always trimmed,
where the former default of 0.1 trimmed nothing below N = 10 (issue #23); a b given
with --trim-fraction is taken as it is.
Unweighted by design: a client's claimed number of examples does not move the result.
The round's spools are read block by block in lockstep (`robust.lockstep`), each block
sorted in place (`median.sort_columns`) and its trimmed mean added to the model as it is
made: memory is the model and N blocks.

With `--robust-optimizer fedavgm|fedadam|...` the aggregate is that server optimiser's
pseudo-gradient instead of the step itself (`robust.HoldingStrategy.apply_blocks`).
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import ClassVar

import torch

from fedstream.server.strategies.median import sort_columns
from fedstream.server.strategies.robust import HoldingStrategy, lockstep
from fedstream.server.updates import VerifiedUpdate


def trimmed_mean(rows: torch.Tensor, trim: int) -> torch.Tensor:
    """The mean of each column of `rows` (N x L, consumed) without its `trim` largest and
    `trim` smallest values."""
    n = rows.shape[0]
    if trim == 0:
        return rows.mean(dim=0)
    return sort_columns(rows)[trim : n - trim].mean(dim=0)


class TrimmedMean(HoldingStrategy):
    """w <- w + coordinate-wise b-trimmed mean of the deltas."""

    default_trim_fraction: ClassVar[float] = 0.2
    """Fraction b of the updates dropped at each end, per coordinate, when none is given
    (then at least one at each end from N = 3: the module docstring)."""

    def __init__(self, trim_fraction: float | None = None) -> None:
        self.at_least_one = trim_fraction is None
        self.trim_fraction = self.default_trim_fraction if trim_fraction is None else trim_fraction
        if not 0 <= self.trim_fraction < 0.5:
            raise ValueError(
                f"trim fraction must be in [0, 0.5) so that a value is left, "
                f"got {self.trim_fraction}"
            )

    def trim(self, n: int) -> int:
        """t, the values dropped at each end of a coordinate in a round of `n` updates."""
        trim = math.floor(self.trim_fraction * n)
        if self.at_least_one and n >= 3:
            return max(1, trim)
        return trim

    def aggregate(
        self, updates: Sequence[VerifiedUpdate], global_tensors: Mapping[str, torch.Tensor]
    ) -> None:
        trim = self.trim(len(updates))
        self.apply_blocks(
            global_tensors,
            ((name, start, trimmed_mean(rows, trim)) for name, start, rows in lockstep(updates)),
        )
