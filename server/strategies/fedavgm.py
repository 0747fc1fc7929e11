"""FedAvgM: Federated Averaging with server momentum.

Hsu, Qi, Brown, "Measuring the Effects of Non-Identical Data Distribution for Federated
Visual Classification", 2019 (arXiv:1909.06335); also the SGD-with-momentum server
optimiser of Reddi et al., "Adaptive Federated Optimization", ICLR 2021.

With delta the example-weighted mean of the client deltas:

    v <- momentum * v + delta
    w <- w + lr * v

lr = 1 and momentum = 0 is plain FedAvg.
"""

from __future__ import annotations

import torch

from fedstream.server.strategies.server_optimizer import ServerOptimizer


class FedAvgM(ServerOptimizer):
    """Parameters: `lr` (server learning rate) and `momentum` (beta)."""

    def __init__(self, lr: float, momentum: float) -> None:
        super().__init__()
        self.lr = lr
        self.momentum = momentum

    def step(self, name: str, weights: torch.Tensor, delta: torch.Tensor) -> torch.Tensor:
        v = self.slot("v", name, delta)
        v.copy_(self.momentum * v + delta)
        return weights + self.lr * v
