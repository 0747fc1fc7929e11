"""The robust strategies (median, trimmed mean, Krum, geometric median) against whole-tensor
computations done here independently, their block-wise reading of the round's spools, and
one round of the real coordinator with --strategy median."""

from __future__ import annotations

import asyncio
import math
from pathlib import Path

import pytest
import torch

from fedstream.common.checkpoint import load_checkpoint
from fedstream.common.config import ConfigError
from fedstream.server.aggregation_config import StrategyConfig
from fedstream.server.strategies import (
    STRATEGIES,
    DeltaBlock,
    GeometricMedian,
    Krum,
    Median,
    Strategy,
    TrimmedMean,
)
from fedstream.server.strategies.base import MeanOfUpdates
from fedstream.server.strategies.build import build_strategy
from fedstream.server.strategies.median import sort_columns
from fedstream.server.updates import VerifiedUpdate

from .conftest import TinyModel
from .test_coordinator import REAL_DEADLINE_S, Harness, no_network, run

__all__ = ["no_network"]  # the sockets guard of test_coordinator.py, applied here too

Model = dict[str, torch.Tensor]


def model(dtype: torch.dtype = torch.float32) -> Model:
    g = torch.Generator().manual_seed(0)
    return {
        "w": torch.randn(3, 4, generator=g).to(dtype),
        "b": torch.randn(5, generator=g).to(dtype),
        "h": torch.randn(2, 3, 2, generator=g).to(torch.bfloat16),
    }


def deltas(n: int, seed: int = 1) -> list[Model]:
    g = torch.Generator().manual_seed(seed)
    return [
        {name: torch.randn(t.shape, generator=g).to(t.dtype) for name, t in model().items()}
        for _ in range(n)
    ]


def blocks(update: Model, size: int) -> list[DeltaBlock]:
    """The update cut into blocks of `size` elements, the way a spool streams it."""
    out = []
    for name, tensor in update.items():
        flat = tensor.reshape(-1)
        out += [DeltaBlock(name, s, flat[s : s + size]) for s in range(0, flat.numel(), size)]
    return out


def verified(
    ups: list[Model], size: int = 3, examples: list[int] | None = None
) -> list[VerifiedUpdate]:
    counts = examples or [10] * len(ups)
    return [
        VerifiedUpdate.in_memory(f"c{k}", n, blocks(u, size))
        for k, (u, n) in enumerate(zip(ups, counts, strict=True))
    ]


def aggregate(
    strategy: Strategy, ups: list[Model], size: int = 3, examples: list[int] | None = None
) -> Model:
    """One round: the new global model minus the old one (in float64)."""
    assert strategy.holds_updates
    start = model()
    new = {n: t.clone() for n, t in start.items()}
    updates = verified(ups, size, examples)
    strategy.begin_round(new)
    for update in updates:
        strategy.accept(update)
    strategy.aggregate(updates, new)
    return {n: new[n].double() - start[n].double() for n in start}


def stacked(ups: list[Model], name: str) -> torch.Tensor:
    """N x numel of tensor `name`, in float64."""
    return torch.stack([u[name].double().reshape(-1) for u in ups])


def expect_step(
    strategy: Strategy, ups: list[Model], step: dict[str, torch.Tensor], size: int = 3
) -> None:
    """The strategy moves the model by `step` (flat, float64), up to the model's dtype."""
    got = aggregate(strategy, ups, size)
    start = model()
    for name, tensor in start.items():
        want = (tensor.double() + step[name].reshape(tensor.shape)).to(
            tensor.dtype
        ).double() - tensor.double()
        tol = 1e-2 if tensor.dtype == torch.bfloat16 else 1e-5
        torch.testing.assert_close(got[name], want, rtol=tol, atol=tol)


def median_reference(ups: list[Model]) -> dict[str, torch.Tensor]:
    return {name: stacked(ups, name).quantile(0.5, dim=0) for name in ups[0]}  # midpoint for even N


@pytest.mark.parametrize("n", [1, 2, 3, 4, 5, 6])
def test_median_is_the_coordinate_median_and_the_middle_pair_mean_for_even_n(n: int) -> None:
    ups = deltas(n)
    expect_step(Median(), ups, median_reference(ups))


@pytest.mark.parametrize("n", [1, 2, 3, 4, 7, 8, 33])
def test_sort_columns_matches_torch_sort_with_ties(n: int) -> None:
    g = torch.Generator().manual_seed(n)
    rows = torch.randint(-3, 4, (n, 1000), generator=g).float()  # many ties per column
    rows[:, 0] = 2.0  # a column of equal values
    expected = rows.sort(dim=0).values
    torch.testing.assert_close(sort_columns(rows.clone()), expected, rtol=0, atol=0)


def test_median_with_ties() -> None:
    ups = [
        {name: torch.full_like(t, v) for name, t in model().items()} for v in (1.0, 1.0, 2.0, 5.0)
    ]
    expect_step(
        Median(),
        ups,
        {name: torch.full((t.numel(),), 1.5, dtype=torch.float64) for name, t in model().items()},
    )
    ups = [
        {name: torch.full_like(t, v) for name, t in model().items()} for v in (2.0, 2.0, 2.0, 7.0)
    ]
    expect_step(
        Median(),
        ups,
        {name: torch.full((t.numel(),), 2.0, dtype=torch.float64) for name, t in model().items()},
    )


def trimmed_reference(ups: list[Model], fraction: float) -> dict[str, torch.Tensor]:
    t = math.floor(fraction * len(ups))
    out = {}
    for name in ups[0]:
        rows = stacked(ups, name).numpy().copy()
        rows.sort(axis=0)
        out[name] = torch.from_numpy(rows[t : len(ups) - t].mean(axis=0))
    return out


@pytest.mark.parametrize(
    ("n", "fraction"), [(5, 0.1), (5, 0.2), (6, 0.25), (7, 0.45), (4, 0.0), (10, 0.3)]
)
def test_trimmed_mean_drops_floor_bn_at_each_end(n: int, fraction: float) -> None:
    ups = deltas(n)
    expect_step(TrimmedMean(fraction), ups, trimmed_reference(ups, fraction))


def test_trimmed_mean_refuses_a_fraction_that_leaves_no_value() -> None:
    with pytest.raises(ValueError, match="0.5"):
        TrimmedMean(0.5)
    with pytest.raises(ConfigError, match="trim_fraction"):
        StrategyConfig(strategy="trimmed-mean", trim_fraction=0.5).validate()
    assert TrimmedMean().trim_fraction == 0.2


def test_trimmed_mean_by_default_trims_at_least_one_from_three_updates() -> None:
    default = TrimmedMean()
    assert [default.trim(n) for n in (2, 3, 4, 5, 9, 10, 15)] == [0, 1, 1, 1, 1, 2, 3]
    assert [TrimmedMean(0.1).trim(n) for n in (3, 5, 10)] == [0, 0, 1]


def test_krum_f_follows_the_round_unless_given() -> None:
    assert [Krum().tolerated(n) for n in (2, 3, 5, 7, 8, 11)] == [0, 0, 1, 2, 2, 4]
    assert [Krum(1).tolerated(n) for n in (5, 11)] == [1, 1]


def flat(update: Model) -> torch.Tensor:
    return torch.cat([t.double().reshape(-1) for t in update.values()])


def krum_reference(ups: list[Model], f: int, m: int) -> dict[str, torch.Tensor]:
    """Brute force: every pairwise distance of the whole flattened updates."""
    n = len(ups)
    vectors = [flat(u) for u in ups]
    scores = []
    for i in range(n):
        d = sorted(float(((vectors[i] - vectors[j]) ** 2).sum()) for j in range(n) if j != i)
        scores.append(sum(d[: n - f - 2]))
    chosen = sorted(range(n), key=lambda i: (scores[i], i))[:m]
    return {name: stacked([ups[i] for i in chosen], name).mean(dim=0) for name in ups[0]}


@pytest.mark.parametrize(
    ("n", "f", "m"), [(5, 1, 1), (7, 2, 1), (6, 1, 3), (9, 3, 2), (3, 0, 1), (8, 2, 6)]
)
def test_krum_and_multi_krum_select_the_lowest_scores(n: int, f: int, m: int) -> None:
    ups = deltas(n)
    expect_step(Krum(f, m), ups, krum_reference(ups, f, m))


def test_krum_at_its_largest_f_picks_the_honest_cluster() -> None:
    honest = [{n: torch.full_like(t, 0.01 * k) for n, t in model().items()} for k in range(4)]
    attackers = [{n: torch.full_like(t, 50.0 + k) for n, t in model().items()} for k in range(3)]
    ups = honest + attackers  # N = 7 = 2f + 3 with f = 2
    want = krum_reference(ups, 2, 1)
    expect_step(Krum(2, 1), ups, want)
    assert all(float(v.abs().max()) < 0.05 for v in want.values())


def test_krum_with_too_few_updates_takes_the_median(caplog: pytest.LogCaptureFixture) -> None:
    ups = deltas(4)  # f = 1 needs 5
    expect_step(Krum(1, 1), ups, median_reference(ups))
    assert "coordinate-wise median" in caplog.text


def test_multi_krum_selects_at_most_n_minus_f() -> None:
    ups = deltas(5)
    expect_step(Krum(1, 10), ups, krum_reference(ups, 1, 4))


def weiszfeld_reference(
    ups: list[Model], examples: list[int], iterations: int
) -> dict[str, torch.Tensor]:
    """Smoothed Weiszfeld on the whole flattened updates, from z = 0."""
    x = torch.stack([flat(u) for u in ups])
    alpha = torch.tensor(examples, dtype=torch.float64)
    alpha /= alpha.sum()
    z = torch.zeros(x.shape[1], dtype=torch.float64)
    for _ in range(iterations):
        beta = alpha / (x - z).norm(dim=1).clamp(min=1e-6)
        z = (beta[:, None] * x).sum(0) / beta.sum()
    out, offset = {}, 0
    for name, t in ups[0].items():
        out[name] = z[offset : offset + t.numel()]
        offset += t.numel()
    return out


@pytest.mark.parametrize(("n", "iterations"), [(1, 1), (4, 4), (5, 3), (6, 10)])
def test_geomedian_is_smoothed_weiszfeld_with_example_weights(n: int, iterations: int) -> None:
    ups = deltas(n)
    examples = [5 * (k + 1) for k in range(n)]
    got = aggregate(GeometricMedian(iterations), ups, 3, examples)
    want = weiszfeld_reference(ups, examples, iterations)
    for name, tensor in model().items():
        expected = (tensor.double() + want[name].reshape(tensor.shape)).to(
            tensor.dtype
        ).double() - tensor.double()
        tol = 1e-2 if tensor.dtype == torch.bfloat16 else 1e-5
        torch.testing.assert_close(got[name], expected, rtol=tol, atol=tol)


def test_geomedian_converges_to_the_geometric_median() -> None:
    # three collinear points weighed equally: the geometric median is the middle one
    ups = [{n: torch.full_like(t, v) for n, t in model().items()} for v in (-1.0, 0.25, 3.0)]
    got = aggregate(GeometricMedian(60), ups)
    for name in ("w", "b"):
        torch.testing.assert_close(got[name], torch.full_like(got[name], 0.25), rtol=0, atol=1e-4)


ROBUST = [Median(), TrimmedMean(0.2), Krum(1, 1), Krum(1, 3), GeometricMedian()]


@pytest.mark.parametrize("strategy", ROBUST, ids=lambda s: type(s).__name__)
def test_block_wise_reading_equals_whole_tensors(strategy: Strategy) -> None:
    ups = deltas(6, seed=3)
    results = [aggregate(strategy, ups, size) for size in (1, 3, 7, 1000)]
    for other in results[1:]:
        for name in results[0]:
            torch.testing.assert_close(other[name], results[0][name], rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("strategy", ROBUST, ids=lambda s: type(s).__name__)
def test_one_huge_outlier_is_ignored(strategy: Strategy) -> None:
    honest = deltas(5, seed=4)
    outlier = {n: torch.full_like(t, 1e30) for n, t in model().items()}
    outlier["h"] = torch.full_like(outlier["h"], 1e30)  # bf16 holds 1e30 too
    got = aggregate(strategy, [*honest[:3], outlier, *honest[3:]])
    for name in got:
        bound = max(float(u[name].double().abs().max()) for u in honest)
        assert torch.isfinite(got[name]).all()
        assert float(got[name].abs().max()) <= bound + 0.05, name


def test_blocks_that_do_not_line_up_are_refused() -> None:
    ups = deltas(3)
    updates = verified(ups[:2], 3) + [VerifiedUpdate.in_memory("odd", 10, blocks(ups[2], 4))]
    target = model()
    with pytest.raises(ValueError, match="odd"):
        Median().aggregate(updates, target)
    short = verified(ups[:2], 3) + [VerifiedUpdate.in_memory("short", 10, blocks(ups[2], 3)[:-1])]
    with pytest.raises(ValueError, match="short"):
        Median().aggregate(short, target)


def test_float64_models_aggregate_in_float64() -> None:
    start = {"w": torch.zeros(4, dtype=torch.float64)}
    values = [1.0 + 1e-12, 1.0 + 3e-12, 1.0 + 2e-12]
    updates = [
        VerifiedUpdate.in_memory(
            f"c{k}", 1, [DeltaBlock("w", 0, torch.full((4,), v, dtype=torch.float64))]
        )
        for k, v in enumerate(values)
    ]
    for strategy in ROBUST[:2]:
        new = {"w": start["w"].clone()}
        strategy.aggregate(updates, new)
        torch.testing.assert_close(
            new["w"], torch.full((4,), 1.0 + 2e-12, dtype=torch.float64), rtol=0, atol=1e-15
        )


def test_the_flags_build_each_robust_strategy() -> None:
    cases = {
        "median": Median,
        "trimmed-mean": TrimmedMean,
        "krum": Krum,
        "geomedian": GeometricMedian,
    }
    for name, cls in cases.items():
        assert STRATEGIES[name].cls is cls
        assert isinstance(build_strategy(StrategyConfig(strategy=name)), cls)
    c = StrategyConfig(strategy="krum", krum_byzantine=2, krum_select=3)
    c.validate()
    krum = build_strategy(c)
    assert isinstance(krum, Krum) and (krum.byzantine, krum.select) == (2, 3)
    geo = build_strategy(StrategyConfig(strategy="geomedian", geomedian_iterations=7))
    assert isinstance(geo, GeometricMedian) and geo.iterations == 7
    for bad in (
        {"krum_byzantine": -1},
        {"krum_select": 0},
        {"geomedian_iterations": 0},
        {"trim_fraction": -0.1},
    ):
        with pytest.raises(ConfigError):
            StrategyConfig(**bad).validate()  # type: ignore[arg-type]


def test_a_median_round_through_the_coordinator(tmp_path: Path) -> None:
    async def scenario() -> None:
        strategy = build_strategy(StrategyConfig(strategy="median"))
        # the median itself, not the safeguards (which would leave 1e30 out first)
        h = Harness(tmp_path, strategy=strategy, min_clients=4, safeguards=False)
        running, open_round = await h.start("a", "b", "c", "d")
        for name, value in (("a", 0.5), ("b", 1.0), ("c", 1e30), ("d", 0.25)):
            await h.upload(name, "abcd".index(name), value=value)
        await asyncio.wait_for(running, REAL_DEADLINE_S)
        assert all(update.released for update in open_round.updates)
        final, _ = load_checkpoint(h.checkpoint(1))
        start = TinyModel(0).state_dict()["w"]
        # median of 0.25, 0.5, 1 and 1e30: the mean of the middle pair, 0.75
        torch.testing.assert_close(final["w"], start + 0.75, rtol=0, atol=1e-6)

    run(scenario)


@pytest.mark.parametrize("n", [5, 6])
def test_ties_everywhere_agree_with_the_references(n: int) -> None:
    g = torch.Generator().manual_seed(7)
    ups = [
        {name: torch.randint(0, 3, t.shape, generator=g).to(t.dtype) for name, t in model().items()}
        for _ in range(n)
    ]
    ups[1] = {name: t.clone() for name, t in ups[0].items()}  # two identical updates: tied scores
    expect_step(Median(), ups, median_reference(ups))
    expect_step(TrimmedMean(0.2), ups, trimmed_reference(ups, 0.2))
    expect_step(Krum(1, 1), ups, krum_reference(ups, 1, 1))
    expect_step(Krum(1, 2), ups, krum_reference(ups, 1, 2))


@pytest.mark.parametrize("optimizer", ["fedavgm", "fedadam"])
def test_a_robust_aggregate_drives_a_server_optimiser_as_its_pseudo_gradient(
    optimizer: str,
) -> None:
    """Two rounds of median + optimiser equal the optimiser stepped by hand with the
    coordinate-wise median as its delta, slots carried in the strategy's state."""
    config = StrategyConfig(strategy="median", robust_optimizer=optimizer, server_lr=0.5)
    robust = build_strategy(config)
    by_hand = build_strategy(StrategyConfig(strategy=optimizer, server_lr=0.5))
    assert isinstance(by_hand, MeanOfUpdates)
    got = model()
    want = model()
    for seed in (1, 2):
        ups = deltas(5, seed)
        updates = verified(ups)
        robust.begin_round(got)
        robust.aggregate(updates, got)
        median = {name: m.reshape(want[name].shape) for name, m in median_reference(ups).items()}
        by_hand.apply(want, {name: m.float() for name, m in median.items()})
    for name in want:
        tol = 1e-2 if want[name].dtype == torch.bfloat16 else 1e-5
        torch.testing.assert_close(got[name].double(), want[name].double(), rtol=tol, atol=tol)
    assert robust.state_tensors().keys() == by_hand.state_tensors().keys() != set()


def test_robust_optimizer_needs_a_robust_strategy() -> None:
    with pytest.raises(ConfigError, match="robust_optimizer needs a robust strategy"):
        StrategyConfig(strategy="fedavg", robust_optimizer="fedadam").validate()
    StrategyConfig(strategy="krum", robust_optimizer="fedadam").validate()
