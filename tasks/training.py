"""Pieces the built-in tasks share: round config parsing, seeds, FedProx, evaluation mode."""

from __future__ import annotations

import contextlib
import hashlib
from collections.abc import Iterator, Mapping

import torch

from fedstream.tasks import ConfigScalar, TaskError


def config_float(config: Mapping[str, ConfigScalar], key: str, default: float) -> float:
    """`config[key]` as a float, or `default` when the key is absent."""
    return float(config.get(key, default))


def config_int(config: Mapping[str, ConfigScalar], key: str, default: int) -> int:
    """`config[key]` as an int (accepting "2" and 2.0), or `default` when absent."""
    return int(float(config.get(key, default)))


def derive_seed(*parts: int) -> int:
    """A 63-bit seed from integers, stable across processes and Python versions.

    Python's `hash` is stable for ints, but not a documented contract and not well mixed
    (hash((0, 1, 2)) and hash((0, 2, 1)) sit close together), so hash the decimal text.
    """
    text = ",".join(str(int(part)) for part in parts).encode()
    return int.from_bytes(hashlib.blake2b(text, digest_size=8).digest(), "little") >> 1


def check_partition(partition: int, num_partitions: int) -> None:
    """Raise TaskError unless 0 <= partition < num_partitions."""
    if num_partitions < 1 or not 0 <= partition < num_partitions:
        raise TaskError(f"partition {partition} is not in 0..{num_partitions - 1}")


@contextlib.contextmanager
def seeded_rng(seed: int) -> Iterator[None]:
    """Seed torch's global CPU RNG inside the block and restore its state afterwards.

    Modules such as nn.Linear initialise themselves from the global RNG; forking it makes
    `build_model` deterministic without disturbing the caller's random stream.
    """
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        yield


@contextlib.contextmanager
def evaluating(model: torch.nn.Module) -> Iterator[None]:
    """Put `model` in eval mode without gradients, restoring its previous mode afterwards."""
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            yield
    finally:
        model.train(was_training)


class ProximalTerm:
    """FedProx's proximal term mu/2 * ||w - w_start||^2 (Li et al., 2020, arXiv:1812.06127).

    Snapshots the trainable weights when created (at the start of local training) and
    penalises drift from them, which keeps non-IID clients from wandering too far from
    the global model. With mu == 0 it holds no snapshot and costs nothing. The tasks add it
    to the loss they minimise but report the data loss alone, so metrics compare across mu.
    """

    def __init__(self, model: torch.nn.Module, mu: float) -> None:
        self.mu = mu
        self.params = [p for p in model.parameters() if p.requires_grad] if mu > 0 else []
        self.start = [p.detach().clone() for p in self.params]

    def __call__(self) -> torch.Tensor | float:
        if self.mu <= 0:
            return 0.0
        drifts = [(p - p0).pow(2).sum() for p, p0 in zip(self.params, self.start, strict=True)]
        return 0.5 * self.mu * torch.stack(drifts).sum()
