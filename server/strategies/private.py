"""Central differential privacy around a mean-based strategy: the Gaussian mechanism of
DP-FedAvg.

McMahan, Ramage, Talwar, Zhang, "Learning Differentially Private Recurrent Language
Models", ICLR 2018 (fixed clipping, as Flower's server-side DP).

Each of the round's n updates is clipped to L2 norm C and they weigh equally; Gaussian
noise goes on their sum before it is divided:

    delta_k' = delta_k * min(1, C / ||delta_k||)
    mean     = (sum_k delta_k' + N(0, (z * C)^2 I)) / n

so one client's whole update moves the sum by at most C, and the noise is z times that.
The mean then goes to the wrapped strategy's `apply` (FedAvg's step, or a server
optimiser's pseudo-gradient). Claimed example counts are not used: a weight by examples
would let one client's influence exceed C.

The privacy spent is accounted by Google's dp-accounting (its RDP accountant), treating
each round as a Poisson-sampled Gaussian mechanism with sampling rate q = `--fraction`
(an approximation: the coordinator selects a fixed fraction rather than sampling each
client independently) and reported as epsilon at `--dp-delta`. This is client-level DP
only with respect to the coordinator's output: the coordinator itself sees every update.
"""

from __future__ import annotations

import os
from collections.abc import Iterator, Mapping, Sequence

import torch

from fedstream.common.round_config import ConfigScalar
from fedstream.server.aggregation_config import PrivacyConfig
from fedstream.server.strategies.base import MeanOfUpdates, Strategy
from fedstream.server.strategies.catalog import require_mean_based
from fedstream.server.updates import DeltaBlock, VerifiedUpdate


def clip_factor(norm: float, clip: float) -> float:
    """min(1, C / ||delta||): the scale that brings an update's norm down to C."""
    return 1.0 if norm <= clip else clip / norm


def clipped_blocks(update: VerifiedUpdate, factor: float) -> Iterator[DeltaBlock]:
    """The update's blocks scaled by `factor` (new tensors: the spool's buffer is reused)."""
    for block in update.blocks():
        values = block.values * factor if factor != 1.0 else block.values
        yield DeltaBlock(block.name, block.start, values)


class DifferentiallyPrivate(Strategy):
    """A mean-based strategy with its updates clipped and its sum noised."""

    def __init__(
        self,
        inner: MeanOfUpdates,
        clip: float,
        noise_multiplier: float,
        *,
        sampling_rate: float = 1.0,
        delta: float = 1e-5,
        seed: int | None = None,
    ) -> None:
        self.inner = inner
        self.clip = clip
        self.noise_multiplier = noise_multiplier
        self.sampling_rate = sampling_rate
        self.delta = delta
        self.clipped = 0
        """Updates of the round so far whose norm was over the clip."""
        self.generator = torch.Generator()
        self.generator.manual_seed(
            seed if seed is not None else int.from_bytes(os.urandom(8), "little") >> 1
        )

    def configure_round(
        self, round_number: int, base: Mapping[str, ConfigScalar]
    ) -> dict[str, ConfigScalar]:
        return self.inner.configure_round(round_number, base)

    def begin_round(self, global_tensors: Mapping[str, torch.Tensor]) -> None:
        self.clipped = 0
        self.inner.begin_round(global_tensors)

    def accept(self, update: VerifiedUpdate) -> None:
        factor = clip_factor(update.norm, self.clip)
        self.clipped += factor < 1.0
        self.inner.running.add(1.0, clipped_blocks(update, factor))

    def aggregate(
        self, updates: Sequence[VerifiedUpdate], global_tensors: Mapping[str, torch.Tensor]
    ) -> None:
        count = self.inner.running.weight
        std = self.noise_multiplier * self.clip / count if count else 0.0
        mean = self.inner.running.take()
        if std:
            for tensor in mean.values():
                tensor.add_(torch.randn(tensor.shape, generator=self.generator), alpha=std)
        self.inner.apply(global_tensors, mean)

    def abort_round(self) -> None:
        self.clipped = 0
        self.inner.abort_round()

    def round_metrics(self, round_number: int) -> dict[str, float]:
        """Updates clipped this round, and the epsilon spent by rounds 1..round_number."""
        spent = epsilon_spent(self.noise_multiplier, self.sampling_rate, round_number, self.delta)
        return {"dp_clipped": self.clipped, "dp_epsilon": spent, "dp_delta": self.delta}

    def state_tensors(self) -> dict[str, torch.Tensor]:
        return self.inner.state_tensors()

    def load_state_tensors(self, tensors: Mapping[str, torch.Tensor]) -> None:
        self.inner.load_state_tensors(tensors)


def with_privacy(strategy: Strategy, config: PrivacyConfig, sampling_rate: float) -> Strategy:
    """`strategy` under central DP when `--dp-clip` is given; ConfigError for a strategy
    that is not a mean (the noise is calibrated to a mean's sensitivity)."""
    if config.dp_clip is None:
        return strategy
    require_mean_based(type(strategy))
    assert isinstance(strategy, MeanOfUpdates)
    return DifferentiallyPrivate(
        strategy,
        config.dp_clip,
        config.dp_noise_multiplier,
        sampling_rate=sampling_rate,
        delta=config.dp_delta,
    )


def epsilon_spent(
    noise_multiplier: float, sampling_rate: float, rounds: int, delta: float
) -> float:
    """Epsilon at `delta` after `rounds` rounds of the Gaussian mechanism with noise
    multiplier z, each sampling clients at `sampling_rate` (dp-accounting's RDP
    accountant); infinite without noise."""
    if noise_multiplier <= 0:
        return float("inf")
    import dp_accounting  # slow to import; only DP runs need it
    from dp_accounting.rdp import rdp_privacy_accountant

    event = dp_accounting.SelfComposedDpEvent(
        dp_accounting.PoissonSampledDpEvent(
            sampling_rate, dp_accounting.GaussianDpEvent(noise_multiplier)
        ),
        rounds,
    )
    accountant = rdp_privacy_accountant.RdpAccountant()
    accountant.compose(event)
    return float(accountant.get_epsilon(delta))
