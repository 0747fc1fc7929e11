"""Strategies by name: the `--strategy` choices, and their construction from the flags.

Each strategy's hyper-parameter defaults are class attributes of its class (`default_lr`,
`default_momentum`), documented where declared; a flag left unset (None) passes None to
the constructor, which takes the class default. `--help` lists the same class attributes
(`class_defaults`), so the help cannot drift from the code.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING

from fedstream.common.config import ConfigError
from fedstream.server.strategies.base import Strategy
from fedstream.server.strategies.fedadagrad import FedAdagrad
from fedstream.server.strategies.fedadam import FedAdam
from fedstream.server.strategies.fedavg import FedAvg
from fedstream.server.strategies.fedavgm import FedAvgM
from fedstream.server.strategies.fedsgd import FedSGD
from fedstream.server.strategies.fedyogi import FedYogi
from fedstream.server.strategies.geometric_median import GeometricMedian
from fedstream.server.strategies.krum import Krum
from fedstream.server.strategies.mean import Mean
from fedstream.server.strategies.median import Median
from fedstream.server.strategies.robust import HoldingStrategy
from fedstream.server.strategies.server_optimizer import ServerOptimizer
from fedstream.server.strategies.trimmed_mean import TrimmedMean

if TYPE_CHECKING:
    # Only a type: server/config.py imports this package to list the strategies in --help.
    from fedstream.server.aggregation_config import StrategyConfig


@dataclass(frozen=True)
class NamedStrategy:
    """One `--strategy` choice: its class, which holds its defaults, and how it is built
    from the strategy flags."""

    cls: type[Strategy]
    build: Callable[[StrategyConfig], Strategy]


def _client_weights(c: StrategyConfig) -> dict[str, float]:
    return {name: float(weight) for name, weight in c.client_weight.items()}


STRATEGIES: dict[str, NamedStrategy] = {
    "mean": NamedStrategy(Mean, lambda c: Mean()),
    "fedavg": NamedStrategy(FedAvg, lambda c: FedAvg(_client_weights(c))),
    "fedsgd": NamedStrategy(
        FedSGD,
        lambda c: FedSGD(
            c.server_optimizer,
            lr=c.server_lr,
            momentum=c.server_momentum,
            beta1=c.beta1,
            beta2=c.beta2,
            eps=c.tau,
        ),
    ),
    "fedavgm": NamedStrategy(FedAvgM, lambda c: FedAvgM(c.server_lr, c.server_momentum)),
    "fedadam": NamedStrategy(FedAdam, lambda c: FedAdam(c.server_lr, c.beta1, c.beta2, c.tau)),
    "fedyogi": NamedStrategy(FedYogi, lambda c: FedYogi(c.server_lr, c.beta1, c.beta2, c.tau)),
    "fedadagrad": NamedStrategy(
        FedAdagrad, lambda c: FedAdagrad(c.server_lr, c.beta1, c.beta2, c.tau)
    ),
    "median": NamedStrategy(Median, lambda c: Median()),
    "trimmed-mean": NamedStrategy(TrimmedMean, lambda c: TrimmedMean(c.trim_fraction)),
    "krum": NamedStrategy(Krum, lambda c: Krum(c.krum_byzantine, c.krum_select)),
    "geomedian": NamedStrategy(GeometricMedian, lambda c: GeometricMedian(c.geomedian_iterations)),
}
"""Strategy name (the `--strategy` flag) -> its class and its construction from the flags."""

ROBUST_OPTIMIZERS = ("none", "fedavgm", "fedadam", "fedyogi", "fedadagrad")
"""`--robust-optimizer` choices: the server optimisers a robust aggregate can drive."""


def build_strategy(config: StrategyConfig) -> Strategy:
    """The strategy `config.strategy` names, with its hyper-parameters from `config`."""
    if config.strategy not in STRATEGIES:
        raise ConfigError(
            f"strategy {config.strategy!r} is unknown: use one of {', '.join(STRATEGIES)}"
        )
    strategy = STRATEGIES[config.strategy].build(config)
    if config.robust_optimizer != "none":
        if not isinstance(strategy, HoldingStrategy):
            raise ConfigError(
                f"robust_optimizer steps a robust strategy's aggregate; {config.strategy} "
                "is not one (median, trimmed-mean, krum, geomedian)"
            )
        optimizer = STRATEGIES[config.robust_optimizer].build(config)
        assert isinstance(optimizer, ServerOptimizer)
        strategy.server_step = optimizer
    return strategy


def class_defaults(attribute: str) -> str:
    """`"fedsgd 0.1, fedavgm 1, ..."`: the class attribute `attribute` of every strategy
    that declares one, for the `--help` of the flag it is the default of."""
    return ", ".join(
        f"{name} {value:g}"
        for name, named in STRATEGIES.items()
        if (value := getattr(named.cls, attribute, None)) is not None
    )
