"""Krum and Multi-Krum.

Blanchard, El Mhamdi, Guerraoui, Stainer, "Machine Learning with Adversaries: Byzantine
Tolerant Gradient Descent", NeurIPS 2017.

With N deltas of which at most f are Byzantine, and i -> j meaning delta_j is one of the
N - f - 2 deltas nearest to delta_i (j != i, squared Euclidean distance):

    score_i = sum_{i -> j} ||delta_i - delta_j||^2
    S       = the m indices of lowest score (ties: the lower index)
    w      <- w + (1/m) sum_{i in S} delta_i

m = 1 is Krum, m > 1 Multi-Krum; m is capped at N - f (no more than the honest count).
Unweighted by design: a client's claimed number of examples does not move the selection
or the mean.

Two passes over the round's spools, block by block in lockstep: the first accumulates the
N x N matrix of pairwise squared distances (float64), the second averages the selected
updates and adds each block of their mean to the model as it is made. Memory is the
model, N blocks and N^2 floats.

Krum needs N >= 2f + 3. With f left unset (`--krum-byzantine`), it follows N: each round
tolerates the most its N allows, f = floor((N - 3) / 2) (1 at N = 5, 2 at N = 7); a
fixed default of 1 tolerated one attacker whatever the federation's size. A round that
closes with fewer reports (a deadline, say) falls
back to the coordinate-wise median of the reports (`median.py`, robust to any minority),
with a logged warning, rather than losing the round.

With `--robust-optimizer fedavgm|fedadam|...` the aggregate is that server optimiser's
pseudo-gradient instead of the step itself (`robust.HoldingStrategy.apply_blocks`).
"""

from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence
from typing import ClassVar

import torch

from fedstream.server.strategies.median import median_blocks
from fedstream.server.strategies.robust import HoldingStrategy, lockstep
from fedstream.server.updates import VerifiedUpdate

log = logging.getLogger(__name__)


def pairwise_squared_distances(updates: Sequence[VerifiedUpdate]) -> torch.Tensor:
    """The N x N matrix ||delta_i - delta_j||^2 (float64), summed block by block; each
    pair's differences are formed once, for both halves of the symmetric matrix."""
    n = len(updates)
    distances = torch.zeros(n, n, dtype=torch.float64)
    for _, _, rows in lockstep(updates):
        wide = rows.double()
        difference = torch.empty_like(wide)
        for i in range(n - 1):
            later = difference[: n - i - 1]
            torch.sub(wide[i + 1 :], wide[i], out=later)
            squared = later.square_().sum(dim=1)
            distances[i, i + 1 :] += squared
            distances[i + 1 :, i] += squared
    return distances


def krum_scores(distances: torch.Tensor, byzantine: int) -> torch.Tensor:
    """score_i: the sum of the squared distances from i to its N - f - 2 nearest others."""
    n = distances.shape[0]
    others = distances.masked_fill(torch.eye(n, dtype=torch.bool), torch.inf)
    return others.sort(dim=1).values[:, : n - byzantine - 2].sum(dim=1)


class Krum(HoldingStrategy):
    """w <- w + the mean of the m updates of lowest Krum score."""

    default_byzantine: ClassVar[int | None] = None
    """f, the number of Byzantine clients tolerated (a round needs N >= 2f + 3); None:
    the most a round of N tolerates (`tolerated`)."""
    default_select: ClassVar[int] = 1
    """m, the number of updates averaged: 1 is Krum, more is Multi-Krum."""

    def __init__(self, byzantine: int | None = None, select: int | None = None) -> None:
        self.byzantine = self.default_byzantine if byzantine is None else byzantine
        self.select = self.default_select if select is None else select
        if (self.byzantine is not None and self.byzantine < 0) or self.select < 1:
            raise ValueError(
                f"krum needs f >= 0 and m >= 1, got f={self.byzantine} m={self.select}"
            )

    def tolerated(self, n: int) -> int:
        """f for a round of `n` updates: the one given, else floor((n - 3) / 2) (at least 0)."""
        if self.byzantine is not None:
            return self.byzantine
        return max(0, (n - 3) // 2)

    def selected(self, updates: Sequence[VerifiedUpdate]) -> list[int]:
        """The indices of the m updates of lowest score (first pass over the spools)."""
        f = self.tolerated(len(updates))
        scores = krum_scores(pairwise_squared_distances(updates), f)
        m = min(self.select, len(updates) - f)
        return sorted(torch.argsort(scores, stable=True)[:m].tolist())

    def aggregate(
        self, updates: Sequence[VerifiedUpdate], global_tensors: Mapping[str, torch.Tensor]
    ) -> None:
        f = self.tolerated(len(updates))
        if len(updates) < 2 * f + 3:
            log.warning(
                "krum with f=%d needs at least %d updates, the round has %d: "
                "taking their coordinate-wise median instead",
                f,
                2 * f + 3,
                len(updates),
            )
            self.apply_blocks(global_tensors, median_blocks(updates))
            return
        chosen = [updates[i] for i in self.selected(updates)]
        self.apply_blocks(
            global_tensors,
            ((name, start, rows.mean(dim=0)) for name, start, rows in lockstep(chosen)),
        )
