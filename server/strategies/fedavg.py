"""Federated Averaging.

McMahan, Moore, Ramage, Hampson, Agüera y Arcas, "Communication-Efficient Learning of
Deep Networks from Decentralized Data", AISTATS 2017.

With client k reporting delta_k = w_k - w and n_k examples:

    w <- w + sum_k n_k * delta_k / sum_k n_k

The weighted sum is the only state: one float32 (or float64) copy of the model,
whatever the number of clients.
"""

from __future__ import annotations

from collections.abc import Mapping

import torch

from fedstream.server.strategies.base import DeltaStream, Strategy, accumulator_dtype


class FedAvg(Strategy):
    """Example-weighted mean of client deltas."""

    def __init__(self) -> None:
        self._sum: dict[str, torch.Tensor] = {}
        self._weight = 0.0

    def begin_round(self, global_tensors: Mapping[str, torch.Tensor]) -> None:
        self._sum = {
            name: torch.zeros(t.shape, dtype=accumulator_dtype(t.dtype))
            for name, t in global_tensors.items()
        }
        self._weight = 0.0

    def fold(self, client: str, num_examples: int, delta: DeltaStream) -> None:
        for block in delta:
            block.target(self._sum).add_(block.values, alpha=float(num_examples))
        self._weight += num_examples

    def finish_round(self, global_tensors: Mapping[str, torch.Tensor]) -> None:
        if self._weight <= 0:
            raise ValueError("finish_round with no examples folded")
        for name, target in global_tensors.items():
            total = self._sum.pop(name)
            total.div_(self._weight).add_(target)
            target.copy_(total)
        self._weight = 0.0

    def abort_round(self) -> None:
        self._sum = {}
        self._weight = 0.0
