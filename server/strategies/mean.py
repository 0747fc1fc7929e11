"""Simple mean: every client's update counts the same, whatever its number of examples.

The unweighted special case of McMahan et al., "Communication-Efficient Learning of Deep
Networks from Decentralized Data", AISTATS 2017 (their FedAvg weights by examples). With
K clients reporting delta_k = w_k - w:

    w <- w + (1 / K) * sum_k delta_k
"""

from __future__ import annotations

from collections.abc import Mapping

import torch

from fedstream.server.strategies.base import MeanOfUpdates, add_in_place


class Mean(MeanOfUpdates):
    """Unweighted mean of client deltas."""

    def weight(self, client: str, num_examples: int) -> float:
        return 1.0

    def apply(
        self, global_tensors: Mapping[str, torch.Tensor], mean: dict[str, torch.Tensor]
    ) -> None:
        add_in_place(global_tensors, mean)
