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

Two more (issue #23) are omniscient: the data is public and training seeded, so the
attacker trains every partition's honest update from the same global model first:

    scaled-sign-flip  the negative of the honest mean update, scaled to 0.95 x the outlier
                      factor (10) x the median honest norm: just inside the outlier rule
    little-is-enough  Baruch, Baruch, Goldberg, "A Little Is Enough: Circumventing Defenses
                      For Distributed Learning", NeurIPS 2019: the honest mean less z_max
                      standard deviations per coordinate, z_max = Phi^-1((n - s) / n) with
                      s = floor(n / 2 + 1) - m for n clients of which m attack (m = 1)

The client uploads `local - global`, so `train` leaves `global + attack` in the model. The
model itself is digits' (same `build_model`), so the Join's model digest is the
coordinator's. The coordinator compares the task *name* in a Join, not only the digest, so
the coordinator and the honest clients run this same class without `attack`: it is then
`digits` exactly (the coordinator only builds and evaluates the model).
"""

from __future__ import annotations

import copy
import statistics
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


OUTLIER_FACTOR = 10.0
"""The coordinator's default --outlier-factor, which scaled-sign-flip stays just inside."""
ASSUMED_ATTACKERS = 1
"""m in little-is-enough's z_max: the attacker assumes it is alone."""


def mean_of(updates: list[Deltas]) -> Deltas:
    return {name: torch.stack([u[name] for u in updates]).mean(dim=0) for name in updates[0]}


def scaled_sign_flip(honest: list[Deltas]) -> Deltas:
    mean = mean_of(honest)
    median = statistics.median(float(_norm(u)) for u in honest)
    factor = 0.95 * OUTLIER_FACTOR * median / float(_norm(mean))
    return {name: -factor * d for name, d in mean.items()}


def little_is_enough(honest: list[Deltas]) -> Deltas:
    n = len(honest)
    s = n // 2 + 1 - ASSUMED_ATTACKERS
    z = float(torch.distributions.Normal(0.0, 1.0).icdf(torch.tensor((n - s) / n)))
    stacked = {name: torch.stack([u[name] for u in honest]) for name in honest[0]}
    return {name: d.mean(dim=0) - z * d.std(dim=0) for name, d in stacked.items()}


OMNISCIENT: dict[str, Callable[[list[Deltas]], Deltas]] = {
    "scaled-sign-flip": scaled_sign_flip,
    "little-is-enough": little_is_enough,
}
"""Attack name -> the update it sends given every partition's honest update."""

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
        if self.attack != "none" and self.attack not in ATTACKS | OMNISCIENT:
            raise TaskError(
                f"unknown attack {self.attack!r}: use none or one of {list(ATTACKS | OMNISCIENT)}"
            )
        self.num_partitions = 1

    def load_data(self, partition: int, num_partitions: int) -> None:
        super().load_data(partition, num_partitions)
        self.num_partitions = num_partitions

    def honest_updates(
        self, model: nn.Module, names: list[str], config: Mapping[str, ConfigScalar]
    ) -> list[Deltas]:
        """Every partition's honest update from `model`'s weights, trained as its client
        would (same data, same seed)."""
        updates = []
        for partition in range(self.num_partitions):
            plain = {k: v for k, v in self.options.items() if k != "attack"}
            other = DigitsTask(plain, self.seed)
            other.load_data(partition, self.num_partitions)
            trained = copy.deepcopy(model)
            other.train(trained, config)
            after = trained.state_dict()
            before = model.state_dict()
            updates.append({name: after[name].detach() - before[name] for name in names})
        return updates

    def train(self, model: nn.Module, config: Mapping[str, ConfigScalar]) -> TrainResult:
        if self.attack == "none":
            return super().train(model, config)
        state = model.state_dict()
        names = exchanged_names(self, model)
        if self.attack in OMNISCIENT:
            start = {name: state[name].detach().clone() for name in names}
            sent = OMNISCIENT[self.attack](self.honest_updates(model, names, config))
            result = super().train(model, config)
            with torch.no_grad():
                for name in names:
                    state[name].copy_(start[name] + sent[name])
            return result
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


ALL_ATTACKS = [*ATTACKS, *OMNISCIENT]
"""Every attack's name, in the order the report lists them."""
