"""Aggregation strategies: one module per strategy, each citing its paper.

The choices by name and the rules on combining them are in catalog.py; `build.py` turns
the coordinator's strategy flags into a strategy, and `private.py` wraps one in central
DP. The server learning rate and momentum default per strategy, on each strategy's class.
Nothing here imports the coordinator's transport (tests/test_layering.py).
"""

from __future__ import annotations

from fedstream.server.strategies.base import DeltaBlock, DeltaStream, Strategy
from fedstream.server.strategies.catalog import STRATEGIES, NamedStrategy, class_defaults
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
from fedstream.server.strategies.trimmed_mean import TrimmedMean

__all__ = [
    "STRATEGIES",
    "DeltaBlock",
    "DeltaStream",
    "DiLoCo",
    "FedAdagrad",
    "FedAdam",
    "FedAvg",
    "FedAvgM",
    "FedSGD",
    "FedYogi",
    "GeometricMedian",
    "Krum",
    "Mean",
    "Median",
    "NamedStrategy",
    "Strategy",
    "TrimmedMean",
    "class_defaults",
]
