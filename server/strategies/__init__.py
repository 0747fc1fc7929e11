"""Aggregation strategies: one module per strategy, each citing its paper."""

from fedstream.server.strategies.base import Strategy
from fedstream.server.strategies.fedavg import FedAvg

STRATEGIES: dict[str, type[Strategy]] = {"fedavg": FedAvg}

__all__ = ["STRATEGIES", "FedAvg", "Strategy"]
