"""Geometric median by the smoothed Weiszfeld algorithm (Robust Federated Aggregation).

Pillutla, Kakade, Harchaoui, "Robust Aggregation for Federated Learning", IEEE Transactions
on Signal Processing, 2022 (Algorithm 2).

The aggregate is z ~ argmin_z sum_k alpha_k ||z - delta_k||, alpha_k = n_k / sum_j n_j
(each client's examples, as RFA weighs them; claimed examples are bounded at intake).
From z = 0 (the current global model: no move), each of T iterations is

    beta_k <- alpha_k / max(nu, ||z - delta_k||)
    z      <- sum_k beta_k delta_k / sum_k beta_k

and then w <- w + z. nu (`smoothing`) keeps a delta that sits on z from dividing by zero.
Starting from 0 rather than from the mean keeps a huge outlier from dragging the start
point far away (from the mean each iteration would only shrink its pull by about N).

Each iteration is two passes over the round's spools, block by block in lockstep: the
distances to z (float64), then the new z written over the old one. Memory is the global
model, z (float32, float64 for float64 models) and N blocks: 2x the model.

With `--robust-optimizer fedavgm|fedadam|...` the aggregate is that server optimiser's
pseudo-gradient instead of the step itself (`robust.HoldingStrategy.apply_step`).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import ClassVar

import torch

from fedstream.server.strategies.robust import (
    HoldingStrategy,
    flat_slice,
    lockstep,
    zeros_like_model,
)
from fedstream.server.updates import VerifiedUpdate


class GeometricMedian(HoldingStrategy):
    """w <- w + the (smoothed Weiszfeld) geometric median of the deltas."""

    default_iterations: ClassVar[int] = 4
    """Weiszfeld iterations T (two passes over the spools each) when none is given."""
    smoothing: ClassVar[float] = 1e-6
    """nu: the smallest distance a weight divides by."""

    def __init__(self, iterations: int | None = None) -> None:
        self.iterations = self.default_iterations if iterations is None else iterations
        if self.iterations < 1:
            raise ValueError(f"geomedian needs at least one iteration, got {self.iterations}")

    def distances(
        self, updates: Sequence[VerifiedUpdate], estimate: Mapping[str, torch.Tensor]
    ) -> torch.Tensor:
        """||z - delta_k|| for each update k (float64), summed block by block."""
        squared = torch.zeros(len(updates), dtype=torch.float64)
        for name, start, rows in lockstep(updates):
            z = flat_slice(estimate, name, start, rows.shape[1]).double()
            squared += (rows.double() - z).square().sum(dim=1)
        return squared.sqrt()

    def aggregate(
        self, updates: Sequence[VerifiedUpdate], global_tensors: Mapping[str, torch.Tensor]
    ) -> None:
        examples = torch.tensor([u.num_examples for u in updates], dtype=torch.float64)
        alpha = examples / examples.sum() if examples.sum() > 0 else torch.ones_like(examples)
        estimate = zeros_like_model(global_tensors)
        for _ in range(self.iterations):
            beta = alpha / self.distances(updates, estimate).clamp(min=self.smoothing)
            beta /= beta.sum()
            for name, start, rows in lockstep(updates):
                z = flat_slice(estimate, name, start, rows.shape[1])
                z.copy_(beta.to(rows.dtype) @ rows)
        self.apply_step(global_tensors, estimate)
