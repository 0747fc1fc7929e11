"""Safe defaults around every strategy: how far one update may move the model, and how
much one client's claimed number of examples may weigh.

A verified update is finite and has the model's layout, which is not enough: one insider
could send 1e30 in every weight (the float32 sum overflows and the model becomes +inf), or
a harmless-looking step that claims 10^12 examples (the others' weights vanish). So, for
every strategy unless `--no-safeguards`:

- an update whose L2 norm is over `--max-update-norm` is refused as it arrives;
- with `MIN_FOR_OUTLIERS` or more updates in the round, one whose norm is over
  `--outlier-factor` (10) times the round's median norm is left out of the aggregate: the
  median is the norm of an honest update as long as most of the round is honest (a
  median of 0 gives no scale, and the rule is skipped);
- with 3 or more updates, every update left is pulled to within a radius of the round's
  centre, the mean of its majority nearest the coordinate-wise median
  (`server/centred_clip.py`): its direction is bounded, not only its length;
- then every update is clipped to the round's clip bound (`--clip-factor` (1) times the
  round's low median norm, grown by at most a factor a round: `server/influence.py`), so no
  update, an insider's just inside the outlier rule included, moves the model further
  than a typical one, in rounds of two as well;
- a claim of examples is capped at `--max-examples`, and (with 2 or more updates) at
  `--claim-cap-factor` (1) times the round's low median claim (in a round of two, the
  smaller claim), so no single claim outweighs a typical client. Measured on digits with
  1 of 3 clients stepping 0.05 in every weight while claiming 10^12 examples, accuracy
  after 4 rounds was 0.84 with a factor of 1, 0.75 with 2 and 0.38 with 3; with equal
  honest shares the cap changes nothing. Where sites legitimately differ in size, the
  cap moves FedAvg towards a plain
  mean: raise the factor, or set `--max-examples`;
- the new global model is checked finite, and its scale against the last one's
  (`influence.scale_exploded`), before it is committed; when it fails, the model and the
  strategy's state go back to the last checkpoint, the update of largest norm is left out
  and the round aggregated again; with no update left, the round is run again, and a
  round that fails so `--max-round-attempts` times ends the run (`server/liveness.py`).

Every decision is logged with the client's identity and counted in the round's line of
metrics.jsonl (`refused_max_norm`, `refused_outlier`, `refused_overflow`,
`capped_examples`, `centred`, `clipped`, with the round's `clip_bound`, `clip_reference`
and `clip_radius`). A
claim capped to the median claim is routine where honest shares
differ in size (the stock digits split does so every round), so it is logged at INFO; a
claim over `--max-examples` or over `SUSPICIOUS_CLAIM_FACTOR` times the median is a
WARNING, as every refused or left-out update is.
"""

from __future__ import annotations

import dataclasses
import logging
import math
import statistics
from collections.abc import Iterator, Sequence
from dataclasses import dataclass

from fedstream.server.aggregation_config import SafeguardsConfig
from fedstream.server.centred_clip import RADIUS_FACTOR, CentredBlocks, CentreFile
from fedstream.server.centred_clip import centre as centre_of
from fedstream.server.errors import UpdateTooLarge
from fedstream.server.influence import ClipBound
from fedstream.server.updates import BlockSource, DeltaBlock, VerifiedUpdate

log = logging.getLogger(__name__)

MIN_FOR_OUTLIERS = 3
"""Updates a round needs before one can be judged against the others' median norm or
claim: with two, the median is their mean and says nothing about which one is wrong."""

SUSPICIOUS_CLAIM_FACTOR = 10.0
"""A claim this many times the round's median claim or more is logged as a WARNING when
capped. Honest digits splits (Dirichlet 0.5, 3 to 20 partitions, 20 seeds) reach 3.3 times
the median at most; the outlier rule's default factor for norms is the same 10."""


@dataclass
class Review:
    """What the safeguards made of a round's verified updates."""

    kept: list[VerifiedUpdate]
    """The updates that go into the aggregate, claims capped."""
    counts: dict[str, int]
    """Each of the round's safeguard counters (`phases.SAFEGUARD_COUNTERS`) so far."""
    changed: bool = False
    """True when an update was left out, clipped or its claim capped: a strategy that
    folded the round's updates as they arrived must fold the kept ones again."""
    clip_bound: float | None = None
    """C_r, the norm every kept update was clipped to; None when nothing was clipped to
    a bound (clipping off, or no scale)."""
    clip_scale: float | None = None
    """The scale C_r was taken from (`ClipBound.scale`): the run's next reference."""
    clip_radius: float | None = None
    """rho_r, the distance to the round's centre every kept update was pulled within
    (`centred_clip`); None when no update was centred."""
    centre: CentreFile | None = None
    """The round's centre, while centred updates read it."""
    originals: dict[str, VerifiedUpdate] = dataclasses.field(default_factory=dict)
    """Each reviewed update as it arrived, by client."""
    moves: dict[str, Move] = dataclasses.field(default_factory=dict)
    """How each kept update that was centred or clipped moved, by client."""

    def close(self) -> None:
        """Free the round's centre file (after the aggregate)."""
        if self.centre is not None:
            self.centre.close()
            self.centre = None

    def ready_to_read(self) -> None:
        """Write the round's centre if a kept update is centred: before any of the kept
        updates' blocks are read (`CentreFile`)."""
        if self.centre is not None and any(move.keep < 1 for move in self.moves.values()):
            self.centre.write()

    def leave_out(self, update: VerifiedUpdate, counter: str) -> None:
        self.kept.remove(update)
        self.counts[counter] += 1
        self.changed = True


@dataclass(frozen=True)
class Move:
    """A kept update x made s (c + t (x - c)): pulled towards the round's centre c, keeping
    the share t of its distance, then scaled by s (clipped)."""

    keep: float = 1.0
    scale: float = 1.0
    norm: float = 0.0
    """Its L2 norm afterwards."""


class ScaledBlocks:
    """An update's blocks, each multiplied by `factor` as it is read (the update clipped)."""

    def __init__(self, source: BlockSource, factor: float) -> None:
        self.source = source
        self.factor = factor

    def blocks(self) -> Iterator[DeltaBlock]:
        for block in self.source.blocks():
            if block.values.is_floating_point():
                yield DeltaBlock(block.name, block.start, block.values * self.factor)
            else:
                yield block

    def discard(self) -> None:
        self.source.discard()


class Safeguards:
    """The rules of the module docstring, for one run."""

    def __init__(self, config: SafeguardsConfig) -> None:
        self.enabled = config.safeguards
        self.outlier_factor = config.outlier_factor
        self.max_update_norm = config.max_update_norm
        self.max_examples = config.max_examples
        self.claim_cap_factor = config.claim_cap_factor
        self.clip = ClipBound(config.clip_factor)
        self.max_round_attempts = config.max_round_attempts

    @property
    def holds_updates(self) -> bool:
        """Whether the round must keep every verified spool until it is committed (to
        aggregate again without an update)."""
        return self.enabled

    def may_reweigh(self, updates: int) -> bool:
        """Whether `review` may leave out an update of a round of at most `updates` updates
        or change its weight. A strategy that folds updates as they arrive then folds the
        round's updates once it is reviewed instead: with the default claim cap, unequal
        claims re-weigh almost every round, and folding each update on arrival and again
        after the review made the aggregate of a round of 4 clients at 100M parameters
        take 1.2-5.1 s instead of 0.2-0.7 s (bench/NOTES.md)."""
        if not self.enabled:
            return False
        if self.max_examples is not None or self.clip.factor:
            return True
        if self.claim_cap_factor and updates >= 2:
            return True
        return bool(self.outlier_factor) and updates >= MIN_FOR_OUTLIERS

    def check_arrival(self, update: VerifiedUpdate) -> None:
        """InvalidUpdate when the update's norm is over the absolute bound."""
        if not self.enabled or self.max_update_norm is None:
            return
        if not update.norm <= self.max_update_norm:
            log.warning(
                "update from %s refused: L2 norm %.4g is over --max-update-norm %.4g",
                update.client,
                update.norm,
                self.max_update_norm,
            )
            raise UpdateTooLarge(
                f"update L2 norm {update.norm:.4g} is over the bound {self.max_update_norm:.4g}"
            )

    def review(
        self, round_number: int, updates: Sequence[VerifiedUpdate], counts: dict[str, int]
    ) -> Review:
        """The updates to aggregate: outliers left out, claims capped; `counts` (the
        round's counters, refusals on arrival included) counts on."""
        review = Review(list(updates), counts, originals={u.client: u for u in updates})
        if not self.enabled:
            return review
        counts.setdefault("clipped", 0)
        counts.setdefault("centred", 0)
        self._leave_out_outliers(round_number, review)
        self._bound_influence(round_number, review)
        self._cap_claims(round_number, review)
        return review

    def committed(self, review: Review) -> None:
        """The reviewed round was committed: its clip scale is the run's new reference."""
        self.clip.committed(review.clip_scale)

    def leave_out_largest(self, round_number: int, review: Review, why: str) -> VerifiedUpdate:
        """After an aggregate that may not be committed (`why`): the update of largest
        norm (as it was sent) leaves the round."""
        worst = max(review.kept, key=lambda u: u.norm)
        review.leave_out(worst, "refused_overflow")
        log.warning(
            "round %d: %s; leaving out the update of %s "
            "(L2 norm %.4g, the largest) and aggregating again",
            round_number,
            why,
            worst.client,
            worst.norm,
        )
        return worst

    def _leave_out_outliers(self, round_number: int, review: Review) -> None:
        if not self.outlier_factor or len(review.kept) < MIN_FOR_OUTLIERS:
            return
        median = statistics.median(u.norm for u in review.kept)
        if median == 0:  # most of the round did not move: no scale to judge the rest by
            return
        bound = self.outlier_factor * median
        for update in [u for u in review.kept if u.norm > bound]:
            review.leave_out(update, "refused_outlier")
            log.warning(
                "round %d: update from %s left out as an outlier: L2 norm %.4g is over "
                "%g x the round's median norm %.4g",
                round_number,
                update.client,
                update.norm,
                self.outlier_factor,
                median,
            )

    def _bound_influence(self, round_number: int, review: Review) -> None:
        """Each kept update pulled towards the round's centre (`centred_clip`, with 3 or
        more updates), then clipped to the round's clip bound (`influence`)."""
        norms = [u.norm for u in review.kept]
        bound, why = self.clip.bound(norms)
        review.clip_scale, _ = self.clip.scale(norms)
        review.clip_bound = bound
        keep = [1.0] * len(norms)
        after = list(norms)
        if self.clip.factor and len(norms) >= MIN_FOR_OUTLIERS:
            centre = centre_of(review.kept)
            review.centre = centre.file
            radius = RADIUS_FACTOR * self.clip.factor * statistics.median_low(centre.distances)
            if radius > 0:
                review.clip_radius = radius
                for k, distance in enumerate(centre.distances):
                    if distance > radius:
                        keep[k] = (radius / distance) ** 2
                        after[k] = centre.norm_after(k, norms, keep[k])
        moved = []
        for k, update in enumerate(review.kept):
            source, scale = update.source, 1.0
            if keep[k] < 1 and review.centre is not None:
                source = CentredBlocks(source, review.centre, keep[k])
                review.counts["centred"] += 1
            if bound is not None and after[k] > bound:
                scale = bound / after[k]
                source = ScaledBlocks(source, scale)
                review.counts["clipped"] += 1
            if source is not update.source:
                review.moves[update.client] = Move(keep[k], scale, after[k] * scale)
                # its measured norm stays: the largest is the one left out after an overflow
                review.kept[k] = dataclasses.replace(update, source=source)
                moved.append(
                    f"{update.client} ({update.norm:.4g} -> {min(after[k], bound or math.inf):.4g})"
                )
        if moved:
            review.changed = True
            radius_text = "-" if review.clip_radius is None else f"{review.clip_radius:.4g}"
            log.info(
                "round %d: centred within %s of the round's centre, clipped to %s (%s): %s",
                round_number,
                radius_text,
                "-" if bound is None else f"{bound:.4g}",
                why,
                ", ".join(moved),
            )

    def _cap_claims(self, round_number: int, review: Review) -> None:
        caps = {}
        if self.max_examples is not None:
            caps["--max-examples"] = self.max_examples
        suspicious_from = 0.0  # with no relative cap, every capped claim is suspicious
        if self.claim_cap_factor and len(review.kept) >= 2:
            median = statistics.median_low(u.num_examples for u in review.kept)
            caps[f"{self.claim_cap_factor:g} x the round's low median claim"] = max(
                1, int(self.claim_cap_factor * median)
            )
            suspicious_from = SUSPICIOUS_CLAIM_FACTOR * median
        if not caps:
            return
        why, cap = min(caps.items(), key=lambda item: item[1])
        for i, update in enumerate(review.kept):
            if update.num_examples > cap:
                suspicious = update.num_examples >= suspicious_from or (
                    update.num_examples > caps.get("--max-examples", update.num_examples)
                )
                log.log(
                    logging.WARNING if suspicious else logging.INFO,
                    "round %d: %s claims %d examples; weighed as %d (%s)",
                    round_number,
                    update.client,
                    update.num_examples,
                    cap,
                    why,
                )
                review.kept[i] = dataclasses.replace(update, num_examples=cap)
                review.counts["capped_examples"] += 1
                review.changed = True
