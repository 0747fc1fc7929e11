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

from typing import ClassVar

import torch

from fedstream.server.strategies.server_optimizer import ServerOptimizer


class FedAvgM(ServerOptimizer):
    """Parameters: `lr` (server learning rate) and `momentum` (beta); None takes the
    class default."""

    default_lr: ClassVar[float] = 1.0
    """Server learning rate when none is given: 1, FedAvg's full step."""
    default_momentum: ClassVar[float] = 0.9
    """Server momentum (beta) when none is given."""

    def __init__(self, lr: float | None = None, momentum: float | None = None) -> None:
        super().__init__()
        self.lr = self.default_lr if lr is None else lr
        self.momentum = self.default_momentum if momentum is None else momentum

    def step(self, name: str, weights: torch.Tensor, delta: torch.Tensor) -> torch.Tensor:
        v = self.slot("v", name, delta)
        v.copy_(self.momentum * v + delta)
        return weights + self.lr * v
