"""Aggregation strategies: one module per strategy, each citing its paper.

`build_strategy` turns the coordinator's flags into a strategy; the server learning rate
and momentum default per strategy (None in the config means "this strategy's default").
"""

from __future__ import annotations

from collections.abc import Callable

from fedstream.common.config import ConfigError
from fedstream.server.config import ServerConfig
from fedstream.server.strategies.base import DeltaBlock, DeltaStream, Strategy
from fedstream.server.strategies.fedadagrad import FedAdagrad
from fedstream.server.strategies.fedadam import FedAdam
from fedstream.server.strategies.fedavg import FedAvg
from fedstream.server.strategies.fedavgm import FedAvgM
from fedstream.server.strategies.fedsgd import FedSGD
from fedstream.server.strategies.fedyogi import FedYogi
from fedstream.server.strategies.mean import Mean


def _or(value: float | None, default: float) -> float:
    return default if value is None else value


def _client_weights(c: ServerConfig) -> dict[str, float]:
    return {name: float(weight) for name, weight in c.client_weight.items()}


STRATEGIES: dict[str, Callable[[ServerConfig], Strategy]] = {
    "mean": lambda c: Mean(),
    "fedavg": lambda c: FedAvg(_client_weights(c)),
    "fedsgd": lambda c: FedSGD(
        c.server_optimizer,
        lr=_or(c.server_lr, 0.1),
        momentum=_or(c.server_momentum, 0.0),
        beta1=c.beta1,
        beta2=c.beta2,
        eps=c.tau,
    ),
    "fedavgm": lambda c: FedAvgM(lr=_or(c.server_lr, 1.0), momentum=_or(c.server_momentum, 0.9)),
    "fedadam": lambda c: FedAdam(_or(c.server_lr, 0.01), c.beta1, c.beta2, c.tau),
    "fedyogi": lambda c: FedYogi(_or(c.server_lr, 0.01), c.beta1, c.beta2, c.tau),
    "fedadagrad": lambda c: FedAdagrad(_or(c.server_lr, 0.01), c.beta1, c.beta2, c.tau),
}
"""Strategy name (the `--strategy` flag) -> its construction from the server config."""


def build_strategy(config: ServerConfig) -> Strategy:
    """The strategy `config.strategy` names, with its hyper-parameters from `config`."""
    if config.strategy not in STRATEGIES:
        raise ConfigError(
            f"strategy {config.strategy!r} is unknown: use one of {', '.join(STRATEGIES)}"
        )
    return STRATEGIES[config.strategy](config)


__all__ = [
    "STRATEGIES",
    "DeltaBlock",
    "DeltaStream",
    "FedAdagrad",
    "FedAdam",
    "FedAvg",
    "FedAvgM",
    "FedSGD",
    "FedYogi",
    "Mean",
    "Strategy",
    "build_strategy",
]
