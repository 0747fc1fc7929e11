"""A strategy built from the strategy flags (`StrategyConfig`).

Each strategy's hyper-parameter defaults are class attributes of its class (`default_lr`,
`default_momentum`), documented where declared; a flag left unset (None) passes None to
the constructor, which takes the class default. `--help` lists the same class attributes
(`catalog.class_defaults`), so the help cannot drift from the code.
"""

from __future__ import annotations

from collections.abc import Callable

from fedstream.server.aggregation_config import StrategyConfig
from fedstream.server.strategies.base import Strategy
from fedstream.server.strategies.catalog import require_robust, strategy_class
from fedstream.server.strategies.diloco import DiLoCo
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


def _client_weights(c: StrategyConfig) -> dict[str, float]:
    return {name: float(weight) for name, weight in c.client_weight.items()}


BUILDERS: dict[str, Callable[[StrategyConfig], Strategy]] = {
    "mean": lambda c: Mean(),
    "fedavg": lambda c: FedAvg(_client_weights(c)),
    "fedsgd": lambda c: FedSGD(
        c.server_optimizer,
        lr=c.server_lr,
        momentum=c.server_momentum,
        beta1=c.beta1,
        beta2=c.beta2,
        eps=c.tau,
    ),
    "fedavgm": lambda c: FedAvgM(c.server_lr, c.server_momentum),
    "diloco": lambda c: DiLoCo(c.server_lr, c.server_momentum),
    "fedadam": lambda c: FedAdam(c.server_lr, c.beta1, c.beta2, c.tau),
    "fedyogi": lambda c: FedYogi(c.server_lr, c.beta1, c.beta2, c.tau),
    "fedadagrad": lambda c: FedAdagrad(c.server_lr, c.beta1, c.beta2, c.tau),
    "median": lambda c: Median(),
    "trimmed-mean": lambda c: TrimmedMean(c.trim_fraction),
    "krum": lambda c: Krum(c.krum_byzantine, c.krum_select),
    "geomedian": lambda c: GeometricMedian(c.geomedian_iterations),
}
"""Strategy name -> its construction from the strategy flags (`catalog.STRATEGIES` has
the same names)."""


def build_strategy(config: StrategyConfig) -> Strategy:
    """The strategy `config.strategy` names, with its hyper-parameters from `config`."""
    strategy_class(config.strategy)  # ConfigError for a name that is not a choice
    strategy = BUILDERS[config.strategy](config)
    require_robust(config.strategy, config.robust_optimizer)
    if isinstance(strategy, HoldingStrategy) and config.robust_optimizer != "none":
        optimizer = BUILDERS[config.robust_optimizer](config)
        assert isinstance(optimizer, ServerOptimizer)
        strategy.server_step = optimizer
    return strategy
