"""A server optimiser over the pseudo-gradient: the shared frame of FedAvgM and the
adaptive methods of Reddi et al., "Adaptive Federated Optimization", ICLR 2021.

Each round the example-weighted mean of the client deltas,

    delta = sum_k n_k * delta_k / sum_k n_k,

is the pseudo-gradient (the negative of a gradient: a direction to move in). A subclass
turns it into the next weights in `step`, keeping per-tensor optimiser slots (momentum,
second moments) that live in the checkpoint, so a resumed run continues exactly.
"""

from __future__ import annotations

from abc import abstractmethod
from collections.abc import Mapping
from typing import ClassVar

import torch

from fedstream.server.strategies.base import MeanOfUpdates


class ServerOptimizer(MeanOfUpdates):
    """Example-weighted mean delta in, optimiser step out; slots saved as `slot/tensor`."""

    def __init__(self) -> None:
        super().__init__()
        self.slots: dict[str, torch.Tensor] = {}

    def slot(self, slot: str, name: str, like: torch.Tensor, initial: float = 0.0) -> torch.Tensor:
        """The optimiser slot `slot` of tensor `name`, created filled with `initial`."""
        key = f"{slot}/{name}"
        if key not in self.slots:
            self.slots[key] = torch.full_like(like, initial)
        return self.slots[key]

    @abstractmethod
    def step(self, name: str, weights: torch.Tensor, delta: torch.Tensor) -> torch.Tensor:
        """The next value of tensor `name` (in the accumulator dtype) from its pseudo-gradient."""

    def apply(
        self, global_tensors: Mapping[str, torch.Tensor], mean: dict[str, torch.Tensor]
    ) -> None:
        for name, target in global_tensors.items():
            delta = mean[name]
            target.copy_(self.step(name, target.to(delta.dtype), delta))

    def state_tensors(self) -> dict[str, torch.Tensor]:
        return dict(self.slots)

    def load_state_tensors(self, tensors: Mapping[str, torch.Tensor]) -> None:
        self.slots = {key: tensor.clone() for key, tensor in tensors.items()}


class AdaptiveServerOptimizer(ServerOptimizer):
    """Reddi et al. (2021), Algorithm 2, with m_{-1} = 0 and v_{-1} = tau^2:

        m <- beta1 * m + (1 - beta1) * delta
        v <- second_moment(v, delta)            (per method: Adagrad, Adam, Yogi)
        w <- w + lr * m / (sqrt(v) + tau)

    Parameters: `lr` (the server learning rate eta; None takes `default_lr`), `beta1`,
    `beta2` (unused by FedAdagrad) and `tau` (the adaptivity: larger is closer to
    momentum SGD).
    """

    default_lr: ClassVar[float] = 0.01
    """Server learning rate (eta) when none is given, for FedAdam, FedYogi and FedAdagrad
    alike."""

    def __init__(self, lr: float | None, beta1: float, beta2: float, tau: float) -> None:
        super().__init__()
        self.lr = self.default_lr if lr is None else lr
        self.beta1 = beta1
        self.beta2 = beta2
        self.tau = tau

    @abstractmethod
    def second_moment(self, v: torch.Tensor, delta: torch.Tensor) -> torch.Tensor:
        """The method's update of the second-moment estimate v."""

    def step(self, name: str, weights: torch.Tensor, delta: torch.Tensor) -> torch.Tensor:
        m = self.slot("m", name, delta)
        v = self.slot("v", name, delta, initial=self.tau**2)
        m.copy_(self.beta1 * m + (1 - self.beta1) * delta)
        v.copy_(self.second_moment(v, delta))
        return weights + self.lr * m / (v.sqrt() + self.tau)
