"""DiLoCo's outer step: Nesterov momentum on the averaged pseudo-gradient.

Douillard et al., "DiLoCo: Distributed Low-Communication Training of Language Models",
2023 (arXiv:2311.08105), Algorithm 1 with OuterOpt = Nesterov (outer lr 0.7, momentum
0.9). The paper's outer gradient is g = old - mean(local) = -delta, stepped by PyTorch's
SGD with `nesterov=True`:

    b <- mu * b + g;   w <- w - lr * (g + mu * b)

fedstream's delta is local minus global (a direction to move in), so with v = -b the
same step reads

    v <- mu * v + delta;   w <- w + lr * (delta + mu * v)

which is FedAvgM's update with the Nesterov look-ahead. `v` is saved in the checkpoint
as `strategy/v/NAME`, so a resumed run continues exactly. The inner side of the recipe
is the clients': H local steps of AdamW per round (`local_steps`), the optimiser's
state kept across rounds (`keep_optimizer=1` of hf-causal-lm); see docs/strategies.md.
"""

from __future__ import annotations

from typing import ClassVar

import torch

from fedstream.server.strategies.fedavgm import FedAvgM


class DiLoCo(FedAvgM):
    """FedAvgM with Nesterov momentum and the DiLoCo paper's outer defaults."""

    default_lr: ClassVar[float] = 0.7
    """The paper's outer learning rate."""
    default_momentum: ClassVar[float] = 0.9
    """The paper's outer Nesterov momentum."""

    def step(self, name: str, weights: torch.Tensor, delta: torch.Tensor) -> torch.Tensor:
        v = self.slot("v", name, delta)
        v.copy_(self.momentum * v + delta)
        return weights + self.lr * (delta + self.momentum * v)
