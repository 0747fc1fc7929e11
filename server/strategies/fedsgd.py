"""FedSGD: clients send gradients; the coordinator owns the optimiser.

McMahan, Moore, Ramage, Hampson, Agüera y Arcas, "Communication-Efficient Learning of
Deep Networks from Decentralized Data", AISTATS 2017 (FederatedSGD). The round config
tells clients `mode = "gradient"`: each client k returns g_k, the gradient of its loss at
the global weights over its local batches, without stepping. The coordinator averages

    g = sum_k n_k * g_k / sum_k n_k

and steps its own optimiser:

    sgd:   b <- momentum * b + g;  w <- w - lr * b               (torch.optim.SGD, no dampening)
    adam:  t <- t + 1
           m <- beta1 * m + (1 - beta1) * g
           v <- beta2 * v + (1 - beta2) * g^2
           w <- w - lr * (m / (1 - beta1^t)) / (sqrt(v / (1 - beta2^t)) + eps)
                                          (Kingma & Ba, "Adam", ICLR 2015; torch.optim.Adam)

With one client sending its full-batch gradient this is centralised training of that
client's data with the same optimiser.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import ClassVar

import torch

from fedstream.common.round_config import ConfigScalar
from fedstream.server.strategies.server_optimizer import ServerOptimizer

OPTIMIZERS = ("sgd", "adam")


class FedSGD(ServerOptimizer):
    """Parameters: `optimizer` (sgd | adam), `lr`, `momentum` (sgd), `beta1`, `beta2` and
    `eps` (adam); `lr` and `momentum` None take the class defaults."""

    default_lr: ClassVar[float] = 0.1
    """Server learning rate when none is given."""
    default_momentum: ClassVar[float] = 0.0
    """Momentum of the sgd optimiser when none is given: plain SGD."""

    def __init__(
        self,
        optimizer: str,
        lr: float | None = None,
        momentum: float | None = None,
        beta1: float = 0.9,
        beta2: float = 0.999,
        eps: float = 1e-8,
    ) -> None:
        super().__init__()
        if optimizer not in OPTIMIZERS:
            raise ValueError(f"FedSGD optimizer must be one of {OPTIMIZERS}, got {optimizer!r}")
        self.optimizer = optimizer
        self.lr = self.default_lr if lr is None else lr
        self.momentum = self.default_momentum if momentum is None else momentum
        self.beta1 = beta1
        self.beta2 = beta2
        self.eps = eps

    def configure_round(
        self, round_number: int, base: Mapping[str, ConfigScalar]
    ) -> dict[str, ConfigScalar]:
        return {**super().configure_round(round_number, base), "mode": "gradient"}

    def apply(
        self, global_tensors: Mapping[str, torch.Tensor], mean: dict[str, torch.Tensor]
    ) -> None:
        steps = self.slots.setdefault("steps", torch.zeros((), dtype=torch.int64))
        steps.add_(1)
        super().apply(global_tensors, mean)

    def step(self, name: str, weights: torch.Tensor, delta: torch.Tensor) -> torch.Tensor:
        g = delta  # what the clients sent is a gradient, not a delta
        if self.optimizer == "sgd":
            if self.momentum == 0:
                return weights - self.lr * g
            b = self.slot("b", name, g)
            b.copy_(self.momentum * b + g)
            return weights - self.lr * b
        t = int(self.slots["steps"])
        m = self.slot("m", name, g)
        v = self.slot("v", name, g)
        m.copy_(self.beta1 * m + (1 - self.beta1) * g)
        v.copy_(self.beta2 * v + (1 - self.beta2) * g.square())
        m_hat = m / (1 - self.beta1**t)
        v_hat = v / (1 - self.beta2**t)
        return weights - self.lr * m_hat / (v_hat.sqrt() + self.eps)
