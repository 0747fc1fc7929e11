"""Folding each update as it arrives, corrected after the round's review.

A strategy that is a weighted mean of the round's updates (`MeanOfUpdates`: FedAvg, the
server optimisers, DiLoCo) folds each verified update into its running sum as it arrives,
with the weight of its claim, so that folding overlaps the other clients' uploads. The
review (`server/safeguards.py`) may then change the round: leave an update out, cap a
claim, pull an update towards the round's centre c, clip it. Each of these is linear in
the updates. Kept update k becomes y_k = s_k (c + t_k (x_k - c)), with c the mean of the
centre's core C, and is weighed a'_k instead of the a_k it was folded with. So the sum the
strategy must hold differs from the one it folded by

    sum_k a'_k y_k - sum_j a_j x_j = sum_j beta_j x_j
    beta_j = a'_j s_j t_j - a_j + [j in C] / |C| * sum_k a'_k s_k (1 - t_k)

(a'_j = 0 for an update left out). The correction reads back only the updates with
beta_j != 0, in lockstep, and adds sum_j beta_j x_j block by block: one pass over those
spools, however many of them changed.

A correction is exact up to float32 rounding of what passed through the sum: an update of
norm 1e30 folded and taken out again leaves about 1e30 x 6e-8 of noise behind. So the
strategy's sum is rebuilt instead, folding the kept updates afresh from the round's spools,
when the mass folded and corrected, sum_j (a_j + |beta_j|) ||x_j||, is over REBUILD_RATIO
times the mass of the result, sum_k a'_k ||y_k|| (the relative error of a correction is
then at most about REBUILD_RATIO x float32's epsilon, 1e-5), or is not finite; and whenever
rebuilding reads no more spools than correcting would, since it is exact.
"""

from __future__ import annotations

import math
from collections import defaultdict
from collections.abc import Iterator, Sequence
from dataclasses import dataclass

import torch

from fedstream.server.safeguards import Move, Review
from fedstream.server.strategies.base import MeanOfUpdates
from fedstream.server.strategies.robust import lockstep
from fedstream.server.updates import DeltaBlock, VerifiedUpdate

REBUILD_RATIO = 100.0
"""The most the mass through the running sum may outweigh the result's before the sum is
rebuilt rather than corrected (module docstring)."""


@dataclass(frozen=True)
class Correction:
    """What turns the sum folded on arrival into the reviewed round's sum."""

    terms: list[tuple[VerifiedUpdate, float]]
    """(x_j as it arrived, beta_j) for every beta_j != 0."""
    weight: float
    """sum_k a'_k - sum_j a_j: the change of the sum's total weight."""


def plan(
    folded: Sequence[tuple[VerifiedUpdate, float]], review: Review, strategy: MeanOfUpdates
) -> Correction | None:
    """The correction from the `folded` (update, weight) pairs to the `review`'s round; None
    when the strategy's sum is better rebuilt (module docstring)."""
    beta: dict[str, float] = defaultdict(float)
    arrived = {update.client: update for update, _ in folded}
    through = 0.0
    for update, weight in folded:
        beta[update.client] -= weight
        through += weight * update.norm
    pulled = result = 0.0
    weight_change = -sum(weight for _, weight in folded)
    for update in review.kept:
        move = review.moves.get(update.client, Move(norm=update.norm))
        weight = strategy.weight(update.client, update.num_examples)
        beta[update.client] += weight * move.scale * move.keep
        pulled += weight * move.scale * (1 - move.keep)
        result += weight * move.norm
        weight_change += weight
    core = review.centre.core if review.centre is not None and pulled else []
    for update in core:
        beta[update.client] += pulled / len(core)
    terms = []
    for client, coefficient in beta.items():
        if coefficient:
            update = arrived.get(client) or review.originals[client]
            terms.append((update, coefficient))
            through += abs(coefficient) * update.norm
    if not terms:
        return Correction([], weight_change)
    rebuild_reads = len(review.kept) + len(core)
    exact_enough = math.isfinite(through) and through <= REBUILD_RATIO * result
    if len(terms) >= rebuild_reads or not exact_enough:
        return None
    return Correction(terms, weight_change)


def apply(correction: Correction, strategy: MeanOfUpdates) -> None:
    """Add the correction to the strategy's running sum: one pass over its updates'
    spools in lockstep."""
    strategy.running.correct(_combined(correction.terms), correction.weight)


def _combined(terms: Sequence[tuple[VerifiedUpdate, float]]) -> Iterator[DeltaBlock]:
    """sum_j beta_j x_j, block by block, in one reused buffer (each block is added to the
    sum before the next is made)."""
    if not terms:
        return
    coefficients = torch.tensor([beta for _, beta in terms], dtype=torch.float64)
    buffer = torch.empty(0)
    for name, start, rows in lockstep([update for update, _ in terms], reuse=True):
        if buffer.dtype != rows.dtype or buffer.numel() < rows.shape[1]:
            buffer = torch.empty(rows.shape[1], dtype=rows.dtype)
        block = buffer[: rows.shape[1]]
        torch.mv(rows.T, coefficients.to(rows.dtype), out=block)
        yield DeltaBlock(name, start, block)
