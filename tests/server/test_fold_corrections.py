"""Folding on arrival, corrected after the review (`server/fold_corrections.py`): the
corrected sum is the sum folded afresh from the kept updates, it reads back only the
updates the review changed, and an update too large to take back out exactly makes the
round fold again instead."""

from __future__ import annotations

import math

import pytest
import torch

from fedstream.server import fold_corrections
from fedstream.server.aggregation_config import SafeguardsConfig
from fedstream.server.centred_clip import centre
from fedstream.server.safeguards import Review, Safeguards
from fedstream.server.strategies.fedavg import FedAvg
from fedstream.server.updates import DeltaBlock, VerifiedUpdate

SIZE = 3000
BLOCK = 1000


def update(client: str, values: torch.Tensor, examples: int) -> VerifiedUpdate:
    blocks = [DeltaBlock("w", s, values[s : s + BLOCK].clone()) for s in range(0, SIZE, BLOCK)]
    return VerifiedUpdate.in_memory(client, examples, blocks)


def counters() -> dict[str, int]:
    return {"refused_outlier": 0, "capped_examples": 0, "refused_overflow": 0}


def folded_then_corrected(
    updates: list[VerifiedUpdate], review: Review
) -> tuple[torch.Tensor, fold_corrections.Correction | None]:
    """The model after FedAvg folded `updates` on arrival and the review corrected it
    (or, where the plan says so, after folding the kept ones again)."""
    strategy = FedAvg()
    model = {"w": torch.zeros(SIZE)}
    strategy.begin_round(model)
    folded = []
    for u in updates:
        strategy.accept(u)
        folded.append((u, strategy.weight(u.client, u.num_examples)))
    correction = fold_corrections.plan(folded, review, strategy)
    if correction is None:
        return rebuilt(review), None
    fold_corrections.apply(correction, strategy)
    strategy.aggregate(review.kept, model)
    return model["w"], correction


def rebuilt(review: Review) -> torch.Tensor:
    review.ready_to_read()
    strategy = FedAvg()
    model = {"w": torch.zeros(SIZE)}
    strategy.begin_round(model)
    for u in review.kept:
        strategy.accept(u)
    strategy.aggregate(review.kept, model)
    return model["w"]


@pytest.mark.parametrize("seed", range(12))
def test_a_corrected_fold_equals_folding_the_kept_updates_afresh(seed: int) -> None:
    """Random rounds of 3 to 7 updates with unequal claims, a far update, outliers:
    whatever the review leaves out, caps, centres or clips, the corrected sum is the sum
    of the reviewed updates to float32 precision."""
    gen = torch.Generator().manual_seed(seed)
    n = 3 + seed % 5
    honest = torch.randn(SIZE, generator=gen)
    updates = []
    for k in range(n):
        values = honest + 0.5 * torch.randn(SIZE, generator=gen)
        if k == 0 and seed % 2:
            values = -4 * honest  # inside the outlier rule, far from the centre
        if k == 1 and seed % 3 == 0:
            values = 30 * honest  # an outlier, left out
        examples = int(torch.randint(5, 60, (1,), generator=gen))
        updates.append(update(f"c{k}", values, examples))
    review = Safeguards(SafeguardsConfig()).review(1, updates, counters())
    centred = any(move.keep < 1 for move in review.moves.values())
    rebuild_reads = len(review.kept) + (len(review.centre.core) if centred else 0)
    try:
        got, correction = folded_then_corrected(updates, review)
        want = rebuilt(review)
    finally:
        review.close()
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5 * float(want.abs().max()))
    if correction is not None:
        assert len(correction.terms) < rebuild_reads


def test_a_capped_claim_reads_back_only_its_own_update() -> None:
    """Claims of 10, 20 and 30 with clipping off: only the third is weighed anew, so the
    correction reads back one spool, and its weight falls by 10."""
    updates = [update(f"c{k}", torch.full((SIZE,), 0.1 * (k + 1)), 10 * (k + 1)) for k in range(3)]
    review = Safeguards(SafeguardsConfig(clip_factor=0)).review(1, updates, counters())
    got, correction = folded_then_corrected(updates, review)
    assert correction is not None
    assert [(u.client, beta) for u, beta in correction.terms] == [("c2", -10.0)]
    assert correction.weight == -10.0
    torch.testing.assert_close(got, rebuilt(review), rtol=1e-6, atol=1e-7)


def test_an_unchanged_round_reads_nothing_back() -> None:
    updates = [update(f"c{k}", torch.full((SIZE,), 0.1), 10) for k in range(3)]
    review = Safeguards(SafeguardsConfig()).review(1, updates, counters())
    _, correction = folded_then_corrected(updates, review)
    assert correction is not None and correction.terms == [] and correction.weight == 0


def test_an_update_too_large_to_take_back_out_makes_the_round_fold_again() -> None:
    """A 1e30 update left out as an outlier: subtracting it again from a float32 sum
    would leave noise of 1e23 where the honest mean should be, so the plan rebuilds, and
    the model is the honest updates' mean exactly."""
    honest = [update(f"c{k}", torch.full((SIZE,), 0.25 * (k + 1)), 10) for k in range(3)]
    insider = update("x", torch.full((SIZE,), 1e30), 10)
    updates = [*honest, insider]
    review = Safeguards(SafeguardsConfig(clip_factor=0)).review(1, updates, counters())
    assert [u.client for u in review.kept] == ["c0", "c1", "c2"]
    got, correction = folded_then_corrected(updates, review)
    assert correction is None
    torch.testing.assert_close(got, torch.full((SIZE,), 0.5), rtol=0, atol=1e-6)


def test_the_centre_from_the_gram_matrix_is_the_mean_of_its_core() -> None:
    """Distances and inner products that follow from one pass's Gram matrix match the
    centre computed explicitly, in float64."""
    gen = torch.Generator().manual_seed(7)
    rows = [torch.randn(SIZE, generator=gen) * (k + 1) for k in range(5)]
    updates = [update(f"c{k}", r, 10) for k, r in enumerate(rows)]
    found = centre(updates)
    try:
        middle = torch.stack([rows[k] for k in found.core]).double().mean(dim=0)
        for k, r in enumerate(rows):
            assert math.isclose(
                found.distances[k], float((r.double() - middle).norm()), rel_tol=1e-5
            )
            assert math.isclose(found.dots[k], float(r.double() @ middle), rel_tol=1e-5)
        assert math.isclose(found.centre_square, float(middle @ middle), rel_tol=1e-5)
        with pytest.raises(RuntimeError, match="before it was written"):
            found.file.read(0, BLOCK, torch.float32)
        found.file.write()
        written = found.file.read(0, BLOCK, torch.float32)
        torch.testing.assert_close(written, middle[:BLOCK].float())
    finally:
        found.file.close()
