"""FedYogi: Yogi on the server over the clients' mean delta.

Reddi, Charles, Zaheer, Garrett, Rush, Konečný, Kumar, McMahan, "Adaptive Federated
Optimization", ICLR 2021 (arXiv:2003.00295), Algorithm 2:

    m <- beta1 * m + (1 - beta1) * delta
    v <- v - (1 - beta2) * delta^2 * sign(v - delta^2)
    w <- w + lr * m / (sqrt(v) + tau)

v changes additively, not multiplicatively as in Adam, so it grows slowly after a run of
small updates; v starts at tau^2.
"""

from __future__ import annotations

import torch

from fedstream.server.strategies.server_optimizer import AdaptiveServerOptimizer


class FedYogi(AdaptiveServerOptimizer):
    def second_moment(self, v: torch.Tensor, delta: torch.Tensor) -> torch.Tensor:
        square = delta.square()
        return v - (1 - self.beta2) * square * torch.sign(v - square)
