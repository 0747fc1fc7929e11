"""The safe defaults around every strategy (server/safeguards.py), through the round
state machine: a non-finite aggregate never committed, an outlier left out, an absolute
norm bound refused on arrival, a claim of examples capped, each counted in metrics.jsonl."""

from __future__ import annotations

import asyncio
import json
from pathlib import Path

import pytest
import torch

from fedstream.common.checkpoint import load_checkpoint
from fedstream.server.aggregation_config import SafeguardsConfig
from fedstream.server.errors import UpdateTooLarge
from fedstream.server.safeguards import MIN_FOR_OUTLIERS, Safeguards
from fedstream.server.strategies import FedAdam, FedAvg, Median
from fedstream.server.updates import DeltaBlock, InMemoryBlocks, VerifiedUpdate

from .conftest import TinyModel
from .test_coordinator import REAL_DEADLINE_S, Harness, no_network, run

__all__ = ["no_network"]

START = TinyModel(0).state_dict()["w"]


def records(h: Harness) -> list[dict[str, object]]:
    return [json.loads(line) for line in h.coordinator.store.metrics_path.read_text().splitlines()]


def final_w(h: Harness, round_number: int = 1) -> torch.Tensor:
    return load_checkpoint(h.checkpoint(round_number))[0]["w"]


def test_an_overflowing_update_is_left_out_and_the_checkpoint_stays_finite(tmp_path: Path) -> None:
    """Two updates of 3e38 (finite in float32) sum to +inf: the aggregate is taken back and
    made again without the larger one, then the other; two honest updates remain. With
    two honest updates of three the outlier rule alone would catch one; here two attackers
    make the median norm theirs, so only the finiteness check saves the round."""

    async def scenario() -> None:
        h = Harness(tmp_path, min_clients=4, outlier_factor=0, claim_cap_factor=0, clip_factor=0)
        running, _ = await h.start("a", "b", "c", "d")
        await h.upload("a", 0, value=0.5, num_examples=10)
        await h.upload("b", 1, value=0.5, num_examples=10)
        await h.upload("c", 2, value=3e38, num_examples=10)
        await h.upload("d", 3, value=2.9e38, num_examples=10)
        await asyncio.wait_for(running, REAL_DEADLINE_S)
        w = final_w(h)
        torch.testing.assert_close(w, START + 0.5, rtol=0, atol=1e-6)
        (record,) = records(h)
        assert record["refused_overflow"] == 2 and record["refused_outlier"] == 0

    run(scenario)


def test_without_safeguards_the_same_round_commits_an_infinite_model(tmp_path: Path) -> None:
    async def scenario() -> None:
        h = Harness(tmp_path, min_clients=4, safeguards=False)
        running, _ = await h.start("a", "b", "c", "d")
        await h.upload("a", 0, value=0.5)
        await h.upload("b", 1, value=0.5)
        await h.upload("c", 2, value=3e38)
        await h.upload("d", 3, value=2.9e38)
        await asyncio.wait_for(running, REAL_DEADLINE_S)
        assert not torch.isfinite(final_w(h)).all()
        assert "refused_overflow" not in records(h)[0]

    run(scenario)


def test_a_round_with_no_finite_aggregate_is_run_again_and_round_0_is_kept(
    tmp_path: Path,
) -> None:
    async def scenario() -> None:
        h = Harness(tmp_path, min_clients=2, outlier_factor=0, claim_cap_factor=0, clip_factor=0)
        running, first = await h.start("a", "b")
        await h.upload("a", 0, value=3e38)
        await h.upload("b", 1, value=3e38)
        await h.until(
            lambda: h.coordinator.round is not None and h.coordinator.round.attempt == 2,
            "round 1 to be run again",
        )
        assert first.updates and all(u.released for u in first.updates)
        torch.testing.assert_close(h.coordinator.model.tensors["w"], START)
        await h.upload("a", 0, value=0.25)
        await h.upload("b", 1, value=0.25)
        await asyncio.wait_for(running, REAL_DEADLINE_S)
        torch.testing.assert_close(final_w(h), START + 0.25, rtol=0, atol=1e-6)
        assert records(h)[0]["attempt"] == 2

    run(scenario)


def fedadam() -> FedAdam:
    return FedAdam(0.1, 0.9, 0.99, 1e-3)


def test_an_overflow_taken_back_restores_the_server_optimiser_state(tmp_path: Path) -> None:
    """FedAdam's moments move in `aggregate`: after a taken-back aggregate they must be
    those of the last checkpoint, so the attacked run ends where FedAdam driven by hand
    over the honest updates alone does."""
    result: list[torch.Tensor] = []

    async def scenario() -> None:
        h = Harness(
            tmp_path,
            fedadam(),
            min_clients=3,
            rounds=2,
            outlier_factor=0,
            claim_cap_factor=0,
            clip_factor=0,
        )
        running, _ = await h.start("a", "b", "c")
        for round_number in (1, 2):
            await h.until_round(round_number)
            await h.upload("a", 0, round_number, value=0.5, num_examples=10)
            await h.upload("b", 1, round_number, value=0.25, num_examples=10)
            big = 3.3e38 if round_number == 2 else 0.25
            await h.upload("c", 2, round_number, value=big, num_examples=10)
        await asyncio.wait_for(running, REAL_DEADLINE_S)
        result.append(final_w(h, 2))
        assert records(h)[1]["refused_overflow"] == 1

    run(scenario)
    by_hand = fedadam()
    model = {"w": START.clone()}
    for values in ([0.5, 0.25, 0.25], [0.5, 0.25]):
        by_hand.begin_round(model)
        for k, value in enumerate(values):
            block = DeltaBlock("w", 0, torch.full((START.numel(),), value))
            by_hand.accept(VerifiedUpdate.in_memory(f"c{k}", 10, [block]))
        by_hand.aggregate([], model)
    torch.testing.assert_close(result[0], model["w"], rtol=0, atol=1e-6)


def test_an_outlier_is_left_out_and_logged_by_name(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    async def scenario() -> None:
        h = Harness(tmp_path, min_clients=3)
        running, _ = await h.start("a", "b", "c")
        await h.upload("a", 0, value=0.5)
        await h.upload("b", 1, value=0.5)
        await h.upload("c", 2, value=50.0)  # 100 x the others' norm
        await asyncio.wait_for(running, REAL_DEADLINE_S)
        torch.testing.assert_close(final_w(h), START + 0.5, rtol=0, atol=1e-6)
        assert records(h)[0]["refused_outlier"] == 1

    run(scenario)
    assert any("update from c left out as an outlier" in r.getMessage() for r in caplog.records)


def test_an_update_within_the_outlier_factor_is_kept(tmp_path: Path) -> None:
    async def scenario() -> None:
        h = Harness(tmp_path, min_clients=3, clip_factor=0)  # kept whole, not clipped
        running, _ = await h.start("a", "b", "c")
        for name, partition in (("a", 0), ("b", 1), ("c", 2)):
            await h.upload(name, partition, value=[0.5, 0.5, 4.5][partition], num_examples=10)
        await asyncio.wait_for(running, REAL_DEADLINE_S)
        torch.testing.assert_close(final_w(h), START + 5.5 / 3, rtol=0, atol=1e-5)
        assert records(h)[0]["refused_outlier"] == 0

    run(scenario)


def test_a_huge_claim_is_capped_at_the_factor_times_the_median_claim(tmp_path: Path) -> None:
    """A step of 1.0 claiming 10^12 examples against two of 0 claiming 10: weighed as
    the median claim, 10 (the default factor 1), it moves the model by 10 / 30, not by ~1;
    with a factor of 3, by 30 / 50."""

    async def scenario(factor: float, moved: float) -> None:
        h = Harness(tmp_path / str(factor), min_clients=3, claim_cap_factor=factor)
        running, _ = await h.start("a", "b", "c")
        await h.upload("a", 0, value=0.0, num_examples=10)
        await h.upload("b", 1, value=0.0, num_examples=10)
        await h.upload("c", 2, value=1.0, num_examples=10**12)
        await asyncio.wait_for(running, REAL_DEADLINE_S)
        torch.testing.assert_close(final_w(h), START + moved, rtol=0, atol=1e-6)
        assert records(h)[0]["capped_examples"] == 1

    run(lambda: scenario(1.0, 10 / 30))
    run(lambda: scenario(3.0, 30 / 50))


def test_max_examples_caps_every_claim(tmp_path: Path) -> None:
    async def scenario() -> None:
        h = Harness(tmp_path, min_clients=2, max_examples=10, claim_cap_factor=0)
        running, _ = await h.start("a", "b")
        await h.upload("a", 0, value=0.0, num_examples=10)
        await h.upload("b", 1, value=1.0, num_examples=30)
        await asyncio.wait_for(running, REAL_DEADLINE_S)
        torch.testing.assert_close(final_w(h), START + 0.5, rtol=0, atol=1e-6)
        assert records(h)[0]["capped_examples"] == 1

    run(scenario)


class CountingFedAvg(FedAvg):
    """FedAvg that records the clients whose updates it folds, in order."""

    def __init__(self) -> None:
        super().__init__()
        self.folded: list[str] = []

    def accept(self, update: VerifiedUpdate) -> None:
        self.folded.append(update.client)
        super().accept(update)


def test_a_round_the_safeguards_reweigh_is_folded_on_arrival_and_corrected(
    tmp_path: Path,
) -> None:
    """Claims of 10, 20 and 30: the third is weighed as the median claim, 20. Each update
    is folded once, as it arrives; the review's cap is a correction of the sum, not a
    second fold of the round."""

    async def scenario() -> None:
        strategy = CountingFedAvg()
        h = Harness(tmp_path, strategy, min_clients=3)
        running, _ = await h.start("a", "b", "c")
        await h.upload("b", 1, value=0.0)
        await h.upload("a", 0, value=0.0)
        assert strategy.folded == ["b", "a"]
        await h.upload("c", 2, value=1.0)
        await asyncio.wait_for(running, REAL_DEADLINE_S)
        assert strategy.folded == ["b", "a", "c"]
        torch.testing.assert_close(final_w(h), START + 20 / 50, rtol=0, atol=1e-6)
        assert records(h)[0]["capped_examples"] == 1

    run(scenario)


def test_a_round_the_safeguards_cannot_reweigh_folds_each_update_on_arrival(
    tmp_path: Path,
) -> None:
    """With two updates the outlier rule does not apply; with the claim cap and clipping
    off (nor --max-examples set) each update is folded as it arrives, as without
    safeguards."""

    async def scenario() -> None:
        strategy = CountingFedAvg()
        h = Harness(tmp_path, strategy, min_clients=2, claim_cap_factor=0, clip_factor=0)
        running, _ = await h.start("a", "b")
        await h.upload("a", 0, value=0.0)
        assert strategy.folded == ["a"]
        await h.upload("b", 1, value=1.0)
        await asyncio.wait_for(running, REAL_DEADLINE_S)
        assert strategy.folded == ["a", "b"]
        torch.testing.assert_close(final_w(h), START + 20 / 30, rtol=0, atol=1e-6)

    run(scenario)


def test_max_update_norm_refuses_on_arrival_and_the_round_carries_on(tmp_path: Path) -> None:
    async def scenario() -> None:
        h = Harness(tmp_path, min_clients=2, max_update_norm=1.0)
        running, open_round = await h.start("a", "b")
        await h.upload("a", 0, value=0.1)
        with pytest.raises(UpdateTooLarge, match="L2 norm .* is over the bound 1"):
            await h.upload("b", 1, value=10.0)
        assert open_round.reported == {"a"}
        await h.upload("b", 1, value=0.2)
        await asyncio.wait_for(running, REAL_DEADLINE_S)
        record = records(h)[0]
        assert record["refused_max_norm"] == 1 and record["rejected_uploads"] == 1

    run(scenario)


def test_holding_strategies_get_the_reviewed_updates(tmp_path: Path) -> None:
    """The median of (0.5, 0.5, 1e6) is 0.5 anyway; with the outlier left out the median
    of two is their mean, which the checkpoint shows."""

    async def scenario() -> None:
        h = Harness(tmp_path, Median(), min_clients=3, clip_factor=0)
        running, _ = await h.start("a", "b", "c")
        await h.upload("a", 0, value=0.25)
        await h.upload("b", 1, value=0.75)
        await h.upload("c", 2, value=1e6)
        await asyncio.wait_for(running, REAL_DEADLINE_S)
        torch.testing.assert_close(final_w(h), START + 0.5, rtol=0, atol=1e-6)

    run(scenario)


def updates_with(norms: list[float], claims: list[int]) -> list[VerifiedUpdate]:
    return [
        VerifiedUpdate(f"c{k}", n, {}, 0, InMemoryBlocks([]), norm)
        for k, (norm, n) in enumerate(zip(norms, claims, strict=True))
    ]


def test_the_outlier_rule_needs_three_updates() -> None:
    guard = Safeguards(SafeguardsConfig(claim_cap_factor=0, clip_factor=0))
    counts = dict.fromkeys(("refused_outlier",), 0)
    two = guard.review(1, updates_with([1.0, 1e9], [1, 1]), dict(counts))
    assert len(two.kept) == 2 and not two.changed
    three = guard.review(1, updates_with([1.0, 1.0, 1e9], [1, 1, 1])[:MIN_FOR_OUTLIERS], counts)
    assert [u.client for u in three.kept] == ["c0", "c1"] and three.changed


PULLED = 0.5 - 0.25**2 / 4.5
"""-4 pulled to within 0.25 of the centre 0.5: 0.5 - 4.5 (0.25 / 4.5)^2."""


@pytest.mark.parametrize(("strategy", "want"), [(Median, PULLED), (FedAvg, (1.0 + PULLED) / 3)])
def test_a_centred_update_is_read_from_its_spool_with_the_rounds_centre(
    tmp_path: Path, strategy: type[Median] | type[FedAvg], want: float
) -> None:
    """Updates of 0.375, 0.625 and -4 everywhere (exact in bfloat16 too), equal claims:
    the centre is the mean of the two nearest the median, 0.5; the radius twice the low
    median distance, 0.25 a weight; -4 is pulled to `PULLED`. Read from real spools (the
    centre written from the core's spools before any update is read, or the sum corrected
    without it), the aggregate is that update's median or mean with the others."""

    async def scenario() -> None:
        h = Harness(tmp_path, strategy(), min_clients=3)
        running, _ = await h.start("a", "b", "c")
        await h.upload("a", 0, value=0.375, num_examples=10)
        await h.upload("b", 1, value=0.625, num_examples=10)
        await h.upload("c", 2, value=-4.0, num_examples=10)
        await asyncio.wait_for(running, REAL_DEADLINE_S)
        assert records(h)[0]["centred"] == 1
        torch.testing.assert_close(final_w(h), START + want, rtol=0, atol=1e-6)

    run(scenario)
