"""Top-k with 2-bit values: top-k's indices, each kept value as a sign and one bit of size.

The k = ceil(fraction * n) largest-magnitude elements are chosen as by `topk`
(SparseLoCo, Sarfi et al. 2025: top-k of 1-3% with 2-bit values and error feedback).
The kept values, in index order, go in blocks of BLOCK, and each value as a 2-bit code:
bit 0 its sign (1: negative), bit 1 whether its magnitude lies above the middle of its
block's range, (lo + hi) / 2 (lo, hi: the block's smallest and largest kept magnitude).
A block travels with two float32 levels, the mean magnitude of its lower and of its
upper group, and a value decodes as its sign times its group's level: a kept element
keeps its sign and is off by at most (hi - lo) / 2 of its block (each group and its mean
lie in one half of the range), each level is its group's least-squares value, and a
block of equal magnitudes decodes to them up to float32 rounding of their mean. The
dropped elements decode as zero, as for top-k. Clients carry the error into their next
update (error feedback). About 4.3 bytes per kept element (a 4-byte index, a quarter
byte of code, 8 bytes of levels per 256) against top-k's 8 for float32. Parts, in stream order:

    NAME::indices  I32 [k] (I64 when n >= 2^31), strictly increasing, each below n
    NAME::scales   F32 [ceil(k / BLOCK), 2]: the levels, finite, 0 <= lower <= upper
    NAME::values   U8  [ceil(k / 4)]: value 4i + j in bits 2j, 2j + 1 of byte i; the
                   bits after the last value are 0
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
import torch.nn.functional as F

from fedstream.common.codecs.topk import TopK, check_indices, index_dtype
from fedstream.common.errors import WireError
from fedstream.common.wire.manifest import TensorEntry

BLOCK = 256
"""Kept values sharing one (lo, hi) pair."""
SHIFTS = (0, 2, 4, 6)


class TopK2(TopK):
    name = "topk2"

    def layout(self, entry: TensorEntry) -> tuple[TensorEntry, ...]:
        k = self.k(entry.numel)
        return (
            TensorEntry(f"{entry.name}::indices", index_dtype(entry.numel), (k,)),
            TensorEntry(f"{entry.name}::scales", torch.float32, (math.ceil(k / BLOCK), 2)),
            TensorEntry(f"{entry.name}::values", torch.uint8, (math.ceil(k / 4),)),
        )

    def encode(self, tensor: torch.Tensor) -> tuple[torch.Tensor, ...]:
        indices, kept = super().encode(tensor)
        values = kept.float()
        k = values.numel()
        pad = -k % BLOCK
        magnitudes = F.pad(values.abs(), (0, pad), value=math.nan).view(-1, BLOCK)
        lo = magnitudes.nan_to_num(math.inf).amin(dim=1)
        hi = magnitudes.nan_to_num(0.0).amax(dim=1)
        upper = magnitudes > ((lo + hi) / 2).unsqueeze(1)  # NaN (padding) compares False
        lower = ~magnitudes.isnan() & ~upper
        levels = []
        for group in (lower, upper):
            count = group.sum(dim=1)
            total = torch.where(group, magnitudes, 0.0).sum(dim=1)
            levels.append(total / count.clamp_min(1))
        levels[1] = torch.where(upper.any(dim=1), levels[1], levels[0])
        codes = (values < 0).to(torch.uint8) | (upper.view(-1)[:k].to(torch.uint8) << 1)
        codes = F.pad(codes, (0, -k % 4)).view(-1, 4)
        packed = torch.zeros(codes.shape[0], dtype=torch.uint8)
        for j, shift in enumerate(SHIFTS):
            packed |= codes[:, j] << shift
        return indices, torch.stack(levels, dim=1), packed

    def decode(
        self, parts: Sequence[torch.Tensor], dtype: torch.dtype, shape: tuple[int, ...]
    ) -> torch.Tensor:
        indices, scales, packed = parts
        numel = math.prod(shape)
        k = self.k(numel)
        if indices.numel() != k or packed.numel() != math.ceil(k / 4):
            raise WireError(
                f"topk2: {indices.numel()} indices, {packed.numel()} value bytes "
                f"where {k} values are kept"
            )
        indices = check_indices(indices, numel)
        if tuple(scales.shape) != (math.ceil(k / BLOCK), 2):
            raise WireError(f"topk2: scales of shape {tuple(scales.shape)} for {k} values")
        lower, upper = scales[:, 0], scales[:, 1]
        if not (
            bool(torch.isfinite(scales).all()) and bool(((lower >= 0) & (lower <= upper)).all())
        ):
            raise WireError("topk2: levels must be finite with 0 <= lower <= upper")
        packed = packed.to(torch.uint8)
        codes = torch.stack([(packed >> shift) & 3 for shift in SHIFTS], dim=1).view(-1)
        if bool(codes[k:].any()):
            raise WireError("topk2: the bits after the last value must be 0")
        codes = codes[:k].long()
        magnitudes = scales.float()[torch.arange(k) // BLOCK, codes >> 1]
        values = torch.where((codes & 1).bool(), -magnitudes, magnitudes)
        out = torch.zeros(numel, dtype=dtype)
        out[indices] = values.to(dtype)
        return out.reshape(shape)
