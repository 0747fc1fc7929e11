"""The `--strategy` choices by name, and the rules on combining them, each written once.

`server/aggregation_config.py` applies the rules when the configuration is validated
(`fedstream server` refuses a bad combination before it starts); the builders
(`build.py`, `private.py`) apply the same functions, so a strategy built from settings
that were never validated cannot be wrong either.
"""

from __future__ import annotations

from dataclasses import dataclass

from fedstream.common.config import ConfigError
from fedstream.server.strategies.base import MeanOfUpdates, Strategy
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
from fedstream.server.strategies.trimmed_mean import TrimmedMean


@dataclass(frozen=True)
class NamedStrategy:
    """One `--strategy` choice: its class, which holds its hyper-parameters' defaults."""

    cls: type[Strategy]


STRATEGIES: dict[str, NamedStrategy] = {
    "mean": NamedStrategy(Mean),
    "fedavg": NamedStrategy(FedAvg),
    "fedsgd": NamedStrategy(FedSGD),
    "fedavgm": NamedStrategy(FedAvgM),
    "diloco": NamedStrategy(DiLoCo),
    "fedadam": NamedStrategy(FedAdam),
    "fedyogi": NamedStrategy(FedYogi),
    "fedadagrad": NamedStrategy(FedAdagrad),
    "median": NamedStrategy(Median),
    "trimmed-mean": NamedStrategy(TrimmedMean),
    "krum": NamedStrategy(Krum),
    "geomedian": NamedStrategy(GeometricMedian),
}
"""Strategy name (the `--strategy` flag) -> its class."""

ROBUST_OPTIMIZERS = ("none", "fedavgm", "fedadam", "fedyogi", "fedadagrad")
"""`--robust-optimizer` choices: the server optimisers a robust aggregate can drive."""


def strategy_class(name: str) -> type[Strategy]:
    """The class of strategy `name`; ConfigError naming the choices when there is none."""
    if name not in STRATEGIES:
        raise ConfigError(f"strategy {name!r} is unknown: use one of {', '.join(STRATEGIES)}")
    return STRATEGIES[name].cls


def require_robust(strategy: str, robust_optimizer: str) -> None:
    """ConfigError unless `robust_optimizer` is none or `strategy` is a robust one (its
    aggregate is what the optimiser steps by)."""
    if robust_optimizer != "none" and not issubclass(strategy_class(strategy), HoldingStrategy):
        raise ConfigError(
            f"robust_optimizer needs a robust strategy (median, trimmed-mean, krum, "
            f"geomedian), not {strategy}"
        )


def require_mean_based(cls: type[Strategy]) -> None:
    """ConfigError unless `cls` aggregates a mean: central DP's noise is calibrated to a
    mean's sensitivity."""
    if not issubclass(cls, MeanOfUpdates):
        name = next((n for n, named in STRATEGIES.items() if named.cls is cls), cls.__name__)
        raise ConfigError(
            f"dp_clip needs a mean-based strategy (the noise is calibrated to a mean), not {name}"
        )


def class_defaults(attribute: str) -> str:
    """`"fedsgd 0.1, fedavgm 1, ..."`: the class attribute `attribute` of every strategy
    that declares one, for the `--help` of the flag it is the default of."""
    return ", ".join(
        f"{name} {value:g}"
        for name, named in STRATEGIES.items()
        if (value := getattr(named.cls, attribute, None)) is not None
    )
