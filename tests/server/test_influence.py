"""Bounded influence (server/influence.py) and liveness (server/liveness.py): the clip
rule, its history, a model whose scale explodes, an absurd checkpoint at resume, and a
round that cannot be aggregated ending the run."""

from __future__ import annotations

import asyncio
import json
import math
from pathlib import Path

import pytest
import torch

from fedstream.common.checkpoint import load_checkpoint
from fedstream.common.wire.manifest import Manifest
from fedstream.server.aggregation_config import SafeguardsConfig
from fedstream.server.influence import ABSURD_WEIGHT, CLIP_GROWTH, ClipBound, absurd
from fedstream.server.liveness import RoundLiveness, RoundStalled
from fedstream.server.run_store import RunStore
from fedstream.server.safeguards import Safeguards
from fedstream.server.updates import DeltaBlock, VerifiedUpdate

from .conftest import TinyModel
from .test_coordinator import REAL_DEADLINE_S, Harness, no_network, run
from .test_run_store import IDENTITY, model, resumed_from

__all__ = ["no_network"]

START = TinyModel(0).state_dict()["w"]


def update(client: str, values: list[float], examples: int = 10) -> VerifiedUpdate:
    return VerifiedUpdate.in_memory(client, examples, [DeltaBlock("w", 0, torch.tensor(values))])


def norm_of(u: VerifiedUpdate) -> float:
    return math.sqrt(sum(float(b.values.double().square().sum()) for b in u.blocks()))


def test_the_clip_bound_is_the_low_median_norm_of_the_round() -> None:
    clip = ClipBound(1.0)
    assert clip.bound([4.0, 1.0, 30.0, 2.0, 3.0])[0] == 3.0
    assert clip.bound([2.0, 1e30])[0] == 2.0  # a round of two: the smaller norm
    assert clip.bound([1.0, 2.0, 3.0, 100.0])[0] == 2.0  # even N: the lower middle norm
    assert ClipBound(2.0).bound([1.0, 3.0, 5.0])[0] == 6.0
    assert ClipBound(0.0).bound([1.0, 3.0, 5.0])[0] is None  # --clip-factor 0: off
    assert clip.bound([0.0, 0.0])[0] is None  # no scale, no history


def test_the_reference_grows_at_most_clip_growth_a_round() -> None:
    """An insider that inflates every norm of every round (a majority, say) raises the
    bound by at most CLIP_GROWTH a committed round, never at once."""
    clip = ClipBound(1.0)
    bounds = []
    for norms in ([1.0, 1.0, 1.0], [1e6, 1e6, 1e6], [1e6, 1e6, 1e6], [1e6, 1e6, 1e6]):
        bound, _ = clip.bound(norms)
        bounds.append(bound)
        clip.committed(clip.scale(norms)[0])
    assert bounds == [1.0, CLIP_GROWTH, CLIP_GROWTH**2, CLIP_GROWTH**3]
    # Honest norms that shrink are followed down at once.
    assert clip.bound([0.25, 0.25, 0.5])[0] == 0.25
    # A round with no scale of its own (every update 0) falls back on the history.
    reference = clip.reference  # the last committed round's scale
    assert reference is not None and reference == CLIP_GROWTH**3
    assert clip.bound([0.0, 0.0])[0] == CLIP_GROWTH * reference


def test_review_clips_every_update_over_the_bound_and_counts_it() -> None:
    guard = Safeguards(SafeguardsConfig())
    updates = [update("a", [3.0, 4.0]), update("c", [-30.0, -40.0])]  # norms 5 and 50
    counts = {"refused_outlier": 0, "capped_examples": 0}
    review = guard.review(1, updates, counts)
    assert review.clip_bound == 5.0 and review.clip_radius is None  # no centre in a pair
    assert [u.client for u in review.kept] == ["a", "c"]
    assert [b.values.tolist() for b in review.kept[1].blocks()] == [[-3.0, -4.0]]
    assert counts["clipped"] == 1 and review.changed
    # The spool itself is untouched: clipping scales the blocks as they are read.
    assert [b.values.tolist() for b in updates[1].blocks()] == [[-30.0, -40.0]]
    review.close()


def test_an_update_far_from_the_majority_is_pulled_to_its_centre() -> None:
    """Honest updates along (1, 1) and one insider along the opposite direction, at the
    honest norm (so the norm clip alone leaves it whole): the centre is the mean of the
    three nearest the coordinate-wise median, the honest ones; the insider ends
    rho^2 / d from it, the honest ones are not moved."""
    guard = Safeguards(SafeguardsConfig())
    honest = [[1.0, 1.2], [1.2, 1.0], [1.0, 1.2], [1.2, 1.0]]  # all of one norm
    updates = [update(f"h{k}", v) for k, v in enumerate(honest)] + [update("x", [-1.2, -1.0])]
    counts: dict[str, int] = {"refused_outlier": 0, "capped_examples": 0}
    review = guard.review(1, updates, counts)
    centre = torch.tensor(honest[:3]).mean(dim=0)  # the three nearest the median (1, 1)
    distances = [float((torch.tensor(v) - centre).norm()) for v in [*honest, [-1.2, -1.0]]]
    radius = 2.0 * sorted(distances)[2]  # RADIUS_FACTOR x the low median distance
    assert review.clip_radius == pytest.approx(radius)
    review.ready_to_read()
    values = [torch.cat([b.values for b in u.blocks()]) for u in review.kept]
    for k in range(4):
        torch.testing.assert_close(values[k], torch.tensor(honest[k]))
    pulled = float((values[4] - centre).norm())
    assert pulled == pytest.approx(radius**2 / distances[4], rel=1e-4)
    assert counts["centred"] == 1 and counts["clipped"] == 0
    review.close()


def test_a_round_of_two_is_bounded_in_norm_and_in_claims() -> None:
    """1e30 everywhere claiming 10^12 examples against an honest update: both weigh as the
    smaller claim, and the huge one is clipped to the honest one's norm."""
    guard = Safeguards(SafeguardsConfig())
    honest, insider = update("honest", [0.3, 0.4], 100), update("insider", [1e30, 1e30], 10**12)
    counts = {"capped_examples": 0}
    review = guard.review(1, [honest, insider], counts)
    assert [u.num_examples for u in review.kept] == [100, 100]
    assert [round(norm_of(u), 6) for u in review.kept] == [0.5, 0.5]
    assert counts == {"capped_examples": 1, "clipped": 1, "centred": 0}


def test_an_exploded_model_is_not_committed_and_the_stalled_round_ends_the_run(
    tmp_path: Path,
) -> None:
    """Two finite updates of 1e29 in every weight (two insiders: equal, so clipping
    cannot tell them from honest ones): the aggregate is finite but its scale has
    exploded, so it is taken back, each update left out in turn, and the round run again;
    after --max-round-attempts such attempts the run ends with RoundStalled, round 0's
    model still the newest on disk."""

    async def scenario() -> None:
        h = Harness(tmp_path, min_clients=2, max_round_attempts=2)
        running, _ = await h.start("a", "b")
        for attempt in (1, 2):

            def is_open(a: int = attempt) -> bool:
                r = h.coordinator.round
                return r is not None and r.attempt == a and r.accepting

            await h.until(is_open, f"attempt {attempt}")
            await h.upload("a", 0, value=1e29)
            await h.upload("b", 1, value=1e29)
        with pytest.raises(RoundStalled, match="round 1 could not be aggregated in 2 attempts"):
            await asyncio.wait_for(running, REAL_DEADLINE_S)
        torch.testing.assert_close(h.coordinator.model.tensors["w"], START)
        assert not h.checkpoint(1).exists()

    run(scenario)


def test_a_step_within_the_history_is_committed(tmp_path: Path) -> None:
    """The explosion rule does not bite an ordinary step, and the round's clip bound and
    reference are in metrics.jsonl."""

    async def scenario() -> None:
        h = Harness(tmp_path, min_clients=2)
        running, _ = await h.start("a", "b")
        await h.upload("a", 0, value=0.25)
        await h.upload("b", 1, value=1e29)
        await asyncio.wait_for(running, REAL_DEADLINE_S)
        w = load_checkpoint(h.checkpoint(1))[0]["w"]
        # 1e29 clipped to the honest norm: 0.25 everywhere, to bf16's rounding of the
        # insider's bf16 tensor (which its norm, and so its scale, includes)
        torch.testing.assert_close(w, START + 0.25, rtol=0, atol=1e-3)
        record = json.loads(h.coordinator.store.metrics_path.read_text().splitlines()[0])
        assert record["clipped"] == 1
        assert record["clip_bound"] == pytest.approx(record["clip_reference"])

    run(scenario)


def test_liveness_counts_only_attempts_with_refusals() -> None:
    liveness = RoundLiveness(max_attempts=2)
    for _ in range(10):  # clients slow or gone: ordinary weather, never the end
        liveness.failed(3, enough_reports=False, refused=0, progress="1/5")
    liveness.failed(3, enough_reports=False, refused=4, progress="1/5")
    liveness.failed(4, enough_reports=True, refused=2, progress="2/2")  # another round
    with pytest.raises(RoundStalled, match=r"round 4 .* 2 attempts .* model of round 3"):
        liveness.failed(4, enough_reports=True, refused=2, progress="2/2")


def test_absurd_values_are_those_beyond_any_trained_weight() -> None:
    assert absurd(torch.full((3,), 1e38))
    assert absurd(torch.tensor([0.0, -2 * ABSURD_WEIGHT]))
    assert not absurd(torch.tensor([65504.0, -1e6]))
    assert not absurd(torch.zeros(3, dtype=torch.int64))


def test_resume_refuses_a_checkpoint_of_absurd_values(tmp_path: Path) -> None:
    store = RunStore(tmp_path, IDENTITY, keep=3)
    store.save(1, model(1e38), {}, [{"round": 1}])
    store.close()
    with pytest.raises(Exception, match="values over 1e\\+15 in magnitude"):
        resumed_from(tmp_path, Manifest.from_tensors(model(0.0)))
