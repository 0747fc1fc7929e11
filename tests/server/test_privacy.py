"""Central differential privacy (server/strategies/private.py): clipping, the noise's
scale, the accounting, and epsilon in metrics.jsonl and the checkpoint's metadata."""

from __future__ import annotations

import asyncio
import json
import math
from pathlib import Path

import pytest
import torch

from fedstream.common.checkpoint import load_checkpoint
from fedstream.common.config import ConfigError
from fedstream.server.aggregation_config import PrivacyConfig
from fedstream.server.config import ServerConfig
from fedstream.server.strategies import FedAvg, Median
from fedstream.server.strategies.private import (
    DifferentiallyPrivate,
    clip_factor,
    epsilon_spent,
    with_privacy,
)
from fedstream.server.updates import DeltaBlock, VerifiedUpdate

from .test_coordinator import REAL_DEADLINE_S, Harness, no_network, run

__all__ = ["no_network"]


def update(client: str, values: torch.Tensor, num_examples: int = 10) -> VerifiedUpdate:
    return VerifiedUpdate.in_memory(client, num_examples, [DeltaBlock("w", 0, values)])


def aggregate(strategy: DifferentiallyPrivate, updates: list[VerifiedUpdate]) -> torch.Tensor:
    model = {"w": torch.zeros(next(updates[0].blocks()).values.numel())}
    strategy.begin_round(model)
    for u in updates:
        strategy.accept(u)
    strategy.aggregate(updates, model)
    return model["w"]


def test_clip_factor_brings_a_norm_down_to_the_clip_and_leaves_smaller_ones() -> None:
    assert clip_factor(10.0, 2.0) == 0.2
    assert clip_factor(2.0, 2.0) == 1.0
    assert clip_factor(0.5, 2.0) == 1.0


def test_clipped_updates_weigh_equally_whatever_their_claims() -> None:
    """Without noise: (clip(3,4 -> norm 5) + (0.3, 0.4)) / 2 with C = 1, claims ignored."""
    dp = DifferentiallyPrivate(FedAvg(), clip=1.0, noise_multiplier=0.0)
    big = update("a", torch.tensor([3.0, 4.0]), num_examples=10**12)
    small = update("b", torch.tensor([0.3, 0.4]), num_examples=1)
    step = aggregate(dp, [big, small])
    torch.testing.assert_close(step, torch.tensor([(0.6 + 0.3) / 2, (0.8 + 0.4) / 2]))
    assert dp.clipped == 1
    assert dp.round_metrics(1)["dp_clipped"] == 1


def test_the_noise_on_the_mean_has_standard_deviation_z_c_over_n() -> None:
    z, c, n, size = 1.5, 2.0, 4, 400_000
    dp = DifferentiallyPrivate(FedAvg(), clip=c, noise_multiplier=z, seed=1)
    step = aggregate(dp, [update(f"c{k}", torch.zeros(size)) for k in range(n)])
    expected = z * c / n
    assert abs(float(step.std()) / expected - 1) < 0.01
    assert abs(float(step.mean())) < 5 * expected / math.sqrt(size)


def test_epsilon_grows_with_rounds_shrinks_with_noise_and_is_within_the_rdp_bound() -> None:
    delta = 1e-5
    eps = [epsilon_spent(1.0, 1.0, rounds, delta) for rounds in (1, 4, 16)]
    assert eps[0] < eps[1] < eps[2]
    assert epsilon_spent(2.0, 1.0, 4, delta) < eps[1]
    assert epsilon_spent(1.0, 0.1, 4, delta) < eps[1]  # sampling amplifies privacy
    assert epsilon_spent(0.0, 1.0, 4, delta) == math.inf
    # The Gaussian mechanism's RDP is r * a / (2 z^2) at order a; the classic conversion
    # eps = min_a (rdp(a) + log(1/delta) / (a - 1)) bounds what the accountant reports.
    z, r = 1.0, 4
    classic = min(r * a / (2 * z * z) + math.log(1 / delta) / (a - 1) for a in range(2, 256))
    assert 0.5 * classic < eps[1] <= classic


def test_dp_needs_a_mean_based_strategy() -> None:
    with pytest.raises(ConfigError, match="mean-based strategy"):
        with_privacy(Median(), PrivacyConfig(dp_clip=1.0), 1.0)
    assert isinstance(
        with_privacy(FedAvg(), PrivacyConfig(dp_clip=1.0), 1.0), DifferentiallyPrivate
    )
    plain = FedAvg()
    assert with_privacy(plain, PrivacyConfig(), 1.0) is plain


def test_epsilon_is_in_each_round_record_and_the_checkpoint_metadata(tmp_path: Path) -> None:
    async def scenario() -> None:
        strategy = with_privacy(FedAvg(), PrivacyConfig(dp_clip=0.5, dp_noise_multiplier=1.0), 1.0)
        h = Harness(tmp_path, strategy, min_clients=2, rounds=2)
        running, _ = await h.start("a", "b")
        for round_number in (1, 2):
            await h.until_round(round_number)
            await h.upload("a", 0, round_number, value=1.0)
            await h.upload("b", 1, round_number, value=0.01)
        await asyncio.wait_for(running, REAL_DEADLINE_S)
        lines = h.coordinator.store.metrics_path.read_text().splitlines()
        records = [json.loads(line) for line in lines]
        assert [r["dp_clipped"] for r in records] == [1, 1]
        assert records[0]["dp_epsilon"] < records[1]["dp_epsilon"]
        assert records[1]["dp_epsilon"] == pytest.approx(epsilon_spent(1.0, 1.0, 2, 1e-5))
        _, metadata = load_checkpoint(h.checkpoint(2))
        assert json.loads(metadata["dp_epsilon"]) == records[1]["dp_epsilon"]
        assert json.loads(metadata["dp_delta"]) == 1e-5

    run(scenario)


def test_a_robust_strategy_with_dp_is_refused_by_the_config() -> None:
    config = ServerConfig(strategy="krum", dp_clip=1.0)
    with pytest.raises(ConfigError, match="dp_clip needs a mean-based strategy"):
        config.validate()
    ServerConfig(strategy="fedadam", dp_clip=1.0, dp_noise_multiplier=0.5).validate()
