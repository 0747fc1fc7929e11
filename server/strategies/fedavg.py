"""Federated Averaging.

McMahan, Moore, Ramage, Hampson, Agüera y Arcas, "Communication-Efficient Learning of
Deep Networks from Decentralized Data", AISTATS 2017.

With client k reporting delta_k = w_k - w and weight a_k:

    w <- w + sum_k a_k * delta_k / sum_k a_k

a_k is n_k, the client's number of examples (the paper's rule), or, when the operator
assigns weights to client identities (`--client-weight NAME=W`), that importance W
(clients without one weigh `default_weight`). The weighted sum is the only state: one
float32 (or float64) copy of the model, whatever the number of clients.
"""

from __future__ import annotations

from collections.abc import Mapping

import torch

from fedstream.server.strategies.base import MeanOfUpdates, add_in_place


class FedAvg(MeanOfUpdates):
    """Weighted mean of client deltas: by examples, or by operator-assigned weights."""

    def __init__(
        self, client_weights: Mapping[str, float] | None = None, default_weight: float = 1.0
    ) -> None:
        super().__init__()
        self.client_weights = dict(client_weights or {})
        self.default_weight = default_weight

    def weight(self, client: str, num_examples: int) -> float:
        if not self.client_weights:
            return float(num_examples)
        return self.client_weights.get(client, self.default_weight)

    def apply(
        self, global_tensors: Mapping[str, torch.Tensor], mean: dict[str, torch.Tensor]
    ) -> None:
        add_in_place(global_tensors, mean)
