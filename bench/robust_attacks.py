"""Dishonest participants of issue #12: `digits` whose training returns an attack.

Started as real client processes through the CLI a user types:

    fedstream client --task bench.robust_attacks:AdversarialDigits --task-opt attack=overflow

Task option `attack` (default `none`: plain digits) names what the client sends in every
round instead of its honest update. The client still trains honestly first, so each attack
is shaped by the update it replaces:

    sign-flip   -10 x the honest update
    scale       100 x the honest update
    noise       Gaussian noise whose L2 norm is 10 x the honest update's
    constant    0.05 in every weight, claiming 10^12 examples
    overflow    1e30 in every weight, claiming 10^12 examples (overflows a float32 sum)

The client uploads `local - global`, so `train` leaves `global + attack` in the model. The
model itself is digits' (same `build_model`), so the Join's model digest is the
coordinator's. The coordinator compares the task *name* in a Join, not only the digest, so
the coordinator and the honest clients run this same class without `attack`: it is then
`digits` exactly (the coordinator only builds and evaluates the model).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping

import torch
from torch import nn

from fedstream.tasks import ConfigScalar, TaskError, TrainResult
from fedstream.tasks.digits import DigitsTask
from fedstream.tasks.task import exchanged_names
from fedstream.tasks.training import config_int, derive_seed

HUGE_CLAIM = 10**12
"""The example count the constant and overflow attacks claim (under the wire's 2^40 cap)."""

Deltas = dict[str, torch.Tensor]


def _norm(deltas: Deltas) -> torch.Tensor:
    return torch.stack([d.double().pow(2).sum() for d in deltas.values()]).sum().sqrt()


def sign_flip(honest: Deltas, generator: torch.Generator) -> Deltas:
    return {name: -10.0 * d for name, d in honest.items()}


def scale(honest: Deltas, generator: torch.Generator) -> Deltas:
    return {name: 100.0 * d for name, d in honest.items()}


def noise(honest: Deltas, generator: torch.Generator) -> Deltas:
    drawn = {name: torch.randn(d.shape, generator=generator) for name, d in honest.items()}
    factor = 10.0 * _norm(honest) / _norm(drawn)
    return {name: (factor * d).to(honest[name].dtype) for name, d in drawn.items()}


def constant(honest: Deltas, generator: torch.Generator) -> Deltas:
    return {name: torch.full_like(d, 0.05) for name, d in honest.items()}


def overflow(honest: Deltas, generator: torch.Generator) -> Deltas:
    return {name: torch.full_like(d, 1e30) for name, d in honest.items()}


Attack = Callable[[Deltas, torch.Generator], Deltas]

ATTACKS: dict[str, tuple[Attack, int | None]] = {
    "sign-flip": (sign_flip, None),
    "scale": (scale, None),
    "noise": (noise, None),
    "constant": (constant, HUGE_CLAIM),
    "overflow": (overflow, HUGE_CLAIM),
}
"""Attack name -> (the update it sends given the honest one, the example count it claims
instead of the honest one, or None to claim the honest count)."""


class AdversarialDigits(DigitsTask):
    """digits; with option `attack` (one of ATTACKS), a client that attacks every round."""

    site_options = frozenset({"attack"})
    """Only the attacker sets it, and it does not shape the model."""

    def __init__(self, options: Mapping[str, str] | None = None, seed: int = 0) -> None:
        super().__init__(options, seed)
        self.attack = self.option("attack", "none")
        if self.attack != "none" and self.attack not in ATTACKS:
            raise TaskError(f"unknown attack {self.attack!r}: use none or one of {list(ATTACKS)}")

    def train(self, model: nn.Module, config: Mapping[str, ConfigScalar]) -> TrainResult:
        if self.attack == "none":
            return super().train(model, config)
        state = model.state_dict()
        names = exchanged_names(self, model)
        start = {name: state[name].detach().clone() for name in names}
        result = super().train(model, config)
        honest = {name: state[name].detach() - start[name] for name in names}
        generator = torch.Generator().manual_seed(
            derive_seed(self.seed, self.partition, config_int(config, "round", 0))
        )
        attack, claim = ATTACKS[self.attack]
        sent = attack(honest, generator)
        with torch.no_grad():
            for name in names:
                state[name].copy_(start[name] + sent[name])
        return TrainResult(
            num_examples=result.num_examples if claim is None else claim,
            metrics=result.metrics,
        )
