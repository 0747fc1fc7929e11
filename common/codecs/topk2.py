"""Top-k with 2-bit values: top-k's indices, each kept value as a sign and one bit of size.

The k = ceil(fraction * n) largest-magnitude elements are chosen as by `topk`
(SparseLoCo, Sarfi et al. 2025: top-k of 1-3% with 2-bit values and error feedback).
The kept values, in index order, go in blocks of BLOCK; a block travels as two float32
magnitudes, lo and hi (its smallest and largest |value|), and each value as a 2-bit
code: bit 0 its sign (1: negative), bit 1 whether |value| lies above (lo + hi) / 2.
It decodes as +-(lo + (hi - lo) / 4) or +-(lo + 3 (hi - lo) / 4): a kept element is off
by at most (hi - lo) / 4 of its block and keeps its sign, a block of equal magnitudes is
exact, and the dropped elements decode as zero, as for top-k. Clients carry the error
into their next update (error feedback). About 4.3 bytes per kept element (a 4-byte
index, a quarter byte of code, 8 bytes of magnitudes per 256) against top-k's 8 for
float32. Parts, in stream order:

    NAME::indices  I32 [k] (I64 when n >= 2^31), strictly increasing, each below n
    NAME::scales   F32 [ceil(k / BLOCK), 2]: lo, hi with 0 <= lo <= hi, finite
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
        magnitudes = values.abs()
        pad = -k % BLOCK
        lo = F.pad(magnitudes, (0, pad), value=math.inf).view(-1, BLOCK).amin(dim=1)
        hi = F.pad(magnitudes, (0, pad)).view(-1, BLOCK).amax(dim=1)
        middle = ((lo + hi) / 2).repeat_interleave(BLOCK)[:k]
        codes = (values < 0).to(torch.uint8) | ((magnitudes > middle).to(torch.uint8) << 1)
        codes = F.pad(codes, (0, -k % 4)).view(-1, 4)
        packed = torch.zeros(codes.shape[0], dtype=torch.uint8)
        for j, shift in enumerate(SHIFTS):
            packed |= codes[:, j] << shift
        return indices, torch.stack((lo, hi), dim=1), packed

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
        lo, hi = scales[:, 0].float(), scales[:, 1].float()
        if scales.numel() and not bool(
            (torch.isfinite(scales).all(dim=1) & (lo >= 0) & (hi >= lo)).all()
        ):
            raise WireError("topk2: magnitudes must be finite with 0 <= lo <= hi")
        packed = packed.to(torch.uint8)
        codes = torch.stack([(packed >> shift) & 3 for shift in SHIFTS], dim=1).view(-1)
        if bool(codes[k:].any()):
            raise WireError("topk2: the bits after the last value must be 0")
        codes = codes[:k]
        lo_k = lo.repeat_interleave(BLOCK)[:k]
        step = (hi - lo).repeat_interleave(BLOCK)[:k]
        magnitudes = lo_k + step * (0.25 + 0.5 * (codes >> 1).float())
        values = torch.where((codes & 1).bool(), -magnitudes, magnitudes)
        out = torch.zeros(numel, dtype=dtype)
        out[indices] = values.to(dtype)
        return out.reshape(shape)
