"""FedAdagrad: Adagrad on the server over the clients' mean delta.

Reddi, Charles, Zaheer, Garrett, Rush, Konečný, Kumar, McMahan, "Adaptive Federated
Optimization", ICLR 2021 (arXiv:2003.00295), Algorithm 2:

    m <- beta1 * m + (1 - beta1) * delta
    v <- v + delta^2
    w <- w + lr * m / (sqrt(v) + tau)

beta2 plays no part; v starts at tau^2.
"""

from __future__ import annotations

import torch

from fedstream.server.strategies.server_optimizer import AdaptiveServerOptimizer


class FedAdagrad(AdaptiveServerOptimizer):
    def second_moment(self, v: torch.Tensor, delta: torch.Tensor) -> torch.Tensor:
        return v + delta.square()
