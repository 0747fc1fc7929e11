"""Centred clipping: every update pulled to within a radius of the round's centre, so
that its *direction* is bounded as well as its length.

Clipping the norm alone (`server/influence.py`) leaves an insider the whole clip bound to
spend in the one direction that hurts most, the negative of the honest mean: on digits
(5 clients, 20 rounds, seed 0, in process) one such insider of five at the median norm
still took FedAvg from 95.6% to 88.3%. Karimireddy, He, Jaggi ("Learning from History for
Byzantine Robust Optimization", ICML 2021) clip each update's distance to a centre
instead. Here, with 3 or more updates in a round:

    centre c_r   the mean of the N // 2 + 1 updates nearest the coordinate-wise median:
                 a majority, honest while most of the round is, and unlike the median
                 itself not dragged a rank towards a colluding minority in every
                 coordinate (with 2 identical insiders of 5 the median moved that way cost
                 median and trimmed mean 50-25 points)
    radius rho_r RADIUS_FACTOR x clip_factor x the low median of the d_k = ||x_k - c_r||
    update k     c_r + t_k (x_k - c_r), t_k = min(1, rho_r / d_k)^2

An update within the radius is left as it is; one beyond it is pulled in, and the further
it was the closer it ends: its distance from the centre becomes rho_r^2 / d_k
(a redescending influence, as of Hampel's M-estimators), so an update far outside the
round counts for almost nothing, and one that stays just inside the radius is worth no
more than a diverse honest one. A round of two has no majority to centre on (the median
of two is their mean, equally far from both) and relies on the norm clip.

Measured in process on digits (5 clients, 20 rounds): with RADIUS_FACTOR 2 the honest
FedAvg run is 95.6% (the norm clip alone 95.6%, neither 96.4%); one scaled sign-flip
insider (-9.5 x the median norm along the honest mean) 92.2%; two of them against median
90.0% and trimmed mean 91.9%. A factor of 1 pulls in half the honest updates of a
non-IID round (honest FedAvg 92.2%); 3 let two insiders take median to 83.9%.

Cost: one pass over the round's spools in lockstep (N blocks in memory at a time), which
yields the coordinate-wise median m and the inner products of the differences D_k = x_k - m
with each other and with m (`around_median`). Everything about the centre follows from
them without reading an update again (`centre`), as does the norm of a centred update;
working relative to the median keeps the float32 products accurate at the scale of the
distances, not of the updates. The centre itself is written to a temporary file, one more pass
over the core, only when a strategy reads a centred update block by block
(`CentredBlocks`); a strategy that folds updates as they arrive corrects its sum with a
linear combination of the updates instead (`server/fold_corrections.py`) and never needs
it. Memory stays the model and N blocks.
"""

from __future__ import annotations

import math
import os
import tempfile
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import BinaryIO

import torch

from fedstream.server.strategies.median import coordinate_median
from fedstream.server.strategies.robust import lockstep
from fedstream.server.updates import BlockSource, DeltaBlock, VerifiedUpdate

RADIUS_FACTOR = 2.0
"""rho_r is this many times clip_factor times the low median distance to the centre
(measured against 1 and 3 in the module docstring)."""


MIN_RELATIVE_DISTANCE = 1e-3
"""A distance to the centre under this share of the furthest update's distance to the
median is taken as 0: the pass's inner products are float32 sums of a block each, good
to about 1e-6 of the squares they add, so updates that agree to that precision are one
point (and no update of a round of equal ones is centred)."""


class CentreFile:
    """The round's centre, in lockstep's blocks, in a temporary file written from the
    core's spools by `write`, only where a centred update is to be read block by block.
    It must be written before any of the round's updates is being read: a spool is read
    through one file position, so the core's spools cannot be read while another reader
    is partway through one of them."""

    def __init__(self, core: Sequence[VerifiedUpdate]) -> None:
        self.core = list(core)
        self.file: BinaryIO | None = None

    def write(self) -> BinaryIO:
        """The centre, written unless it is already."""
        if self.file is None:
            file = tempfile.TemporaryFile(prefix="centre-", buffering=0)  # noqa: SIM115 (closed by close)
            try:
                for _, _, rows in lockstep(self.core):
                    file.write(rows.mean(dim=0).contiguous().numpy().tobytes())
            except BaseException:
                file.close()
                raise
            self.file = file
        return self.file

    def read(self, offset: int, count: int, dtype: torch.dtype) -> torch.Tensor:
        """`count` elements of `dtype` from byte `offset`."""
        size = count * torch.empty((), dtype=dtype).element_size()
        if self.file is None:
            raise RuntimeError("the round's centre is read before it was written")
        data = os.pread(self.file.fileno(), size, offset)
        if len(data) != size:
            raise ValueError(f"the centre file ends at {offset + len(data)}, wanted {size}")
        return torch.frombuffer(bytearray(data), dtype=dtype)

    def close(self) -> None:
        if self.file is not None:
            self.file.close()
            self.file = None


@dataclass
class Centre:
    """What the pass over the round's updates learns about them and their centre."""

    file: CentreFile
    core: list[int]
    """The indices of the updates whose mean is the centre."""
    distances: list[float]
    """||x_k - c||, in the updates' order."""
    dots: list[float]
    """<x_k, c>."""
    centre_square: float
    """||c||^2."""

    def norm_after(self, k: int, norms: Sequence[float], keep: float) -> float:
        """||c + t (x_k - c)|| for t = `keep`, from the update's norm `norms[k]`: no pass."""
        t = keep
        square = (
            (1 - t) ** 2 * self.centre_square
            + 2 * t * (1 - t) * self.dots[k]
            + t**2 * norms[k] ** 2
        )
        return math.sqrt(max(square, 0.0))


@dataclass
class AroundMedian:
    """What one pass learns about the updates x_k relative to their coordinate-wise median
    m, with D_k = x_k - m (float64 sums of float32 block products)."""

    gram: torch.Tensor
    """G[i, j] = <D_i, D_j>: its diagonal is each update's squared distance to m."""
    to_median: torch.Tensor
    """e_k = <D_k, m>."""
    median_square: float
    """||m||^2."""

    def distances(self) -> list[float]:
        """||x_k - m||."""
        return [math.sqrt(max(float(s), 0.0)) for s in self.gram.diagonal()]


def around_median(updates: Sequence[VerifiedUpdate]) -> AroundMedian:
    """One pass over `updates` in lockstep, in two reused buffers: the coordinate-wise
    median m of each block, then the differences D_k = x_k - m in place, their inner
    products with each other and with m. Measured against the same pass in float64 over
    fresh blocks, it takes about a third of the time (bench/NOTES.md)."""
    n = len(updates)
    gram = torch.zeros(n, n, dtype=torch.float64)
    to_median = torch.zeros(n, dtype=torch.float64)
    median_square = 0.0
    scratch = torch.empty(0)
    for _, _, rows in lockstep(updates, reuse=True):
        if scratch.dtype != rows.dtype or scratch.numel() < rows.numel():
            scratch = torch.empty(rows.numel(), dtype=rows.dtype)
        middle = coordinate_median(scratch[: rows.numel()].view_as(rows).copy_(rows))
        differences = rows.sub_(middle)
        gram += (differences @ differences.T).double()
        to_median += (differences @ middle).double()
        median_square += float(middle @ middle)
    return AroundMedian(gram, to_median, median_square)


def core(distances: Sequence[float]) -> list[int]:
    """The indices of the N // 2 + 1 updates nearest the median (ties: the lower index):
    a majority, so honest whenever most of the round is."""
    nearest = sorted(range(len(distances)), key=lambda k: (distances[k], k))
    return sorted(nearest[: len(distances) // 2 + 1])


def centre(updates: Sequence[VerifiedUpdate]) -> Centre:
    """One pass over `updates` (`around_median`); the centre c = m + mean over the `core`
    of D_j then follows from the pass's inner products (module docstring):
    ||x_k - c||^2 = G_kk - 2 <D_k, Dc> + ||Dc||^2, <x_k, c> = ||m||^2 + <m, Dc> + e_k +
    <D_k, Dc> and ||c||^2 = ||m||^2 + 2 <m, Dc> + ||Dc||^2, with Dc the core's mean D."""
    seen = around_median(updates)
    chosen = core(seen.distances())
    index = torch.tensor(chosen)
    with_core = seen.gram[:, index].mean(dim=1)  # <D_k, Dc>
    core_square = float(seen.gram[index][:, index].mean())  # ||Dc||^2
    median_core = float(seen.to_median[index].mean())  # <m, Dc>
    squares = seen.gram.diagonal() - 2 * with_core + core_square
    floor = MIN_RELATIVE_DISTANCE**2 * float(seen.gram.diagonal().max())
    distances = [math.sqrt(float(s)) if s > floor else 0.0 for s in squares]
    dots = seen.median_square + median_core + seen.to_median + with_core
    centre_square = seen.median_square + 2 * median_core + core_square
    return Centre(
        CentreFile([updates[k] for k in chosen]), chosen, distances, dots.tolist(), centre_square
    )


class CentredBlocks:
    """An update's blocks as c + t (x - c) = t x + (1 - t) c, c the round's centre."""

    def __init__(self, source: BlockSource, centre: CentreFile, keep: float) -> None:
        self.source = source
        self.centre = centre
        self.keep = keep
        """t, the share of the update's distance to the centre it keeps."""

    def blocks(self) -> Iterator[DeltaBlock]:
        offset = 0
        for block in self.source.blocks():
            values = block.values
            wide = torch.float64 if values.dtype == torch.float64 else torch.float32
            middle = self.centre.read(offset, values.numel(), wide)
            offset += middle.numel() * middle.element_size()
            if not values.is_floating_point():
                yield block
                continue
            moved = middle.mul_(1 - self.keep).add_(values.to(wide), alpha=self.keep)
            yield DeltaBlock(block.name, block.start, moved.to(values.dtype))

    def discard(self) -> None:
        self.source.discard()
