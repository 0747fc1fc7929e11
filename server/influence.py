"""Bounded influence: how far one update may move the model, and how far a round may.

The outlier rule of `server/safeguards.py` only leaves out an update over 10 times the
round's median norm, so an insider that stays just inside it (the negative of the honest
mean at 9.5 times the median norm) still outweighs four honest clients, and with two
updates in a round there is no median at all. So, unless `--clip-factor 0`, every update
of every round is clipped (scaled down, direction kept) to the round's clip bound

    C_r = clip_factor x min(low median of round r's update norms, CLIP_GROWTH x H_{r-1})

where the low median is the middle norm of an odd count and the lower of the two middle
norms of an even one: the norm of an honest update while most of the round is honest,
and, in a round of two, the smaller of the two, so that neither update can move the model
further than the other. H is the run's reference norm: the scale C_r was taken from,
kept in each round's line of metrics.jsonl (`clip_reference`) and read back at a resume;
H_0 is unknown, so round 1 is bounded by its own updates alone. Through H an insider (or
a majority of one round) can raise the bound by at most CLIP_GROWTH a round, never
ratchet it up at once. The clip factor of 1 clips the larger half of every round to its
median norm: measured on digits (report/robust.md) it costs the honest run little, and
one insider of five then weighs no more than one honest client's median step.

Why the bound is taken when the round is reviewed rather than known when each update
arrives: the review already holds every verified spool (the safeguards' claim cap and
outlier rule need them), and the round's own low median answers a round of two without
any history; a bound known on arrival could come from H alone (CLIP_GROWTH x H), which a
later change can use to fold clipped updates as they arrive.

A committed model is the other half. A strategy that is not a mean of clipped updates (a
server optimiser, say) may still step further, and a round whose every update is huge
(two insiders in a round of two) clips nothing. So a new model whose L2 norm is over
MODEL_GROWTH x (the last model's norm + the run's step scale) is treated like a
non-finite one (`server/guarded_aggregate.py`): never committed. The step scale comes
from the history, not from the round: CLIP_GROWTH x H once a round is committed, before
that the larger of the starting model's norm and a step of 1 in every weight (sqrt of
the number of values: a model that starts at 0, or has large parts that do, such as
LoRA's B, must still take its first step). A finite 1e29 in every weight is caught so,
and so is any model that grows tenfold in one round.
"""

from __future__ import annotations

import math
import statistics
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import torch

CLIP_GROWTH = 2.0
"""The most the clip bound's reference norm may grow from one committed round to the next.
Honest digits updates shrink from about 2 to 0.3-1 over the first rounds, so they never
meet it; an insider that inflates one round's norms moves the bound of the next by at
most this factor."""

MODEL_GROWTH = 10.0
"""A new model whose L2 norm is over this many times (the last model's norm + the round's
step bound) is not committed."""

ABSURD_WEIGHT = 1e15
"""A model value whose magnitude is over this is absurd: no trained weight comes near (a
float16 holds at most 65504), and a checkpoint holding one is refused at resume."""


NORM_CHUNK = 1 << 20
"""Elements of a tensor whose norm is taken at a time: a float64 copy of a whole tensor of
a large model would be 8 bytes an element more of the coordinator's peak memory."""


def model_norm(tensors: Mapping[str, torch.Tensor]) -> float:
    """The L2 norm over the floating tensors of `tensors`: chunk by chunk, each chunk's
    sum of squares in float64."""
    total = 0.0
    for tensor in tensors.values():
        if tensor.is_floating_point() and tensor.numel():
            for chunk in tensor.reshape(-1).split(NORM_CHUNK):
                total += float(torch.linalg.vector_norm(chunk, dtype=torch.float64)) ** 2
    return math.sqrt(total)


@dataclass
class ClipBound:
    """The clip rule of the module docstring, for one run."""

    factor: float
    """--clip-factor; 0 turns clipping off."""
    reference: float | None = None
    """H: the scale of the last committed round's bound; None before the first."""

    def scale(self, norms: Sequence[float]) -> tuple[float | None, str]:
        """The scale of a round whose updates have `norms` (min(low median, CLIP_GROWTH x
        H)), and where it came from; None when there is none (no update, or all of norm 0
        and no history)."""
        low = statistics.median_low(norms) if norms else 0.0
        if self.reference is not None and (low <= 0 or CLIP_GROWTH * self.reference < low):
            return CLIP_GROWTH * self.reference, f"{CLIP_GROWTH:g} x the run's reference norm"
        if low > 0:
            return low, "the round's low median norm"
        return None, "no scale"

    def bound(self, norms: Sequence[float]) -> tuple[float | None, str]:
        """C_r for a round whose updates have `norms`, and why; None when the rule is off
        or has no scale."""
        if not self.factor:
            return None, "off"
        scale, why = self.scale(norms)
        if scale is None:
            return None, why
        return self.factor * scale, f"{self.factor:g} x {why} {scale:.4g}"

    def committed(self, scale: float | None) -> None:
        """A round whose bound had `scale` was committed: it is the new reference."""
        if scale is not None:
            self.reference = scale


def step_scale(reference: float | None, last_norm: float, size: int) -> float:
    """How far the run's history says one round of a model of `size` floating values
    may step (module docstring)."""
    if reference is not None:
        return CLIP_GROWTH * reference
    return max(last_norm, math.sqrt(size))


def model_size(tensors: Mapping[str, torch.Tensor]) -> int:
    """The number of floating values in `tensors`."""
    return sum(t.numel() for t in tensors.values() if t.is_floating_point())


def scale_exploded(new_norm: float, last_norm: float, step: float) -> bool:
    """Whether a model of norm `new_norm` after one of `last_norm`, in a run whose step
    scale is `step`, has exploded (module docstring)."""
    return not new_norm <= MODEL_GROWTH * (last_norm + step)


def absurd(tensor: torch.Tensor) -> bool:
    """Whether a floating `tensor` holds a value of magnitude over ABSURD_WEIGHT."""
    if not tensor.is_floating_point() or not tensor.numel():
        return False
    low, high = torch.aminmax(tensor)
    return not (float(low) >= -ABSURD_WEIGHT and float(high) <= ABSURD_WEIGHT)
