"""int4 with per-block absmax scales: one eighth of float32's bytes, plus the scales.

Each run of BLOCK consecutive elements (of the flattened tensor) gets one float32
scale, its largest magnitude over 7; an element travels as q = round(x / scale) in
-7..7, stored as the 4-bit code q + 8 (1..15), two to a byte: element 2i in the low
nibble of byte i, element 2i + 1 in the high one. Code 0 is never sent: it pads the
high nibble of the last byte of an odd-length tensor, and anywhere else it is refused.
Decoding multiplies back, so every element is off by at most scale / 2 (half a
quantisation step, 1/14 of its block's largest magnitude) and a block of zeros is exact.
Bytes: n / 2 for the values and 4 per 256 elements for the scales, 12.5% + 0.39% of
float32. Coarse enough that clients carry the error into their next update (error
feedback, as for top-k: Streaming DiLoCo, Douillard et al. 2025, sends 4-bit
pseudo-gradients). Parts, in stream order:

    NAME::scales  F32 [ceil(n / BLOCK)], finite and non-negative
    NAME::values  U8  [ceil(n / 2)]
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
import torch.nn.functional as F

from fedstream.common.codecs.base import Codec
from fedstream.common.errors import WireError
from fedstream.common.wire.manifest import TensorEntry

BLOCK = 256
"""Elements sharing one scale: 1/64 of a byte of scale per element."""
LEVELS = 7
"""The largest |q|: codes 1..15 are q = -7..7."""


def check_scales(scales: torch.Tensor, blocks: int, codec: str) -> None:
    """WireError unless `scales` holds `blocks` finite, non-negative values."""
    if scales.numel() != blocks:
        raise WireError(f"{codec}: {scales.numel()} scales where the tensor has {blocks} blocks")
    if scales.numel() and not bool((torch.isfinite(scales) & (scales >= 0)).all()):
        raise WireError(f"{codec}: scales must be finite and non-negative")


class Int4(Codec):
    name = "int4"
    error_feedback = True

    def layout(self, entry: TensorEntry) -> tuple[TensorEntry, ...]:
        return (
            TensorEntry(f"{entry.name}::scales", torch.float32, (math.ceil(entry.numel / BLOCK),)),
            TensorEntry(f"{entry.name}::values", torch.uint8, (math.ceil(entry.numel / 2),)),
        )

    def encode(self, tensor: torch.Tensor) -> tuple[torch.Tensor, ...]:
        flat = tensor.reshape(-1).float()
        n = flat.numel()
        blocks = F.pad(flat, (0, -n % BLOCK)).view(-1, BLOCK)
        scales = blocks.abs().amax(dim=1) / LEVELS
        safe = torch.where(scales > 0, scales, torch.ones_like(scales))
        q = torch.round(blocks / safe.unsqueeze(1)).clamp_(-LEVELS, LEVELS)
        codes = F.pad((q.view(-1)[:n] + 8).to(torch.uint8), (0, n % 2))
        return scales, codes[0::2] | (codes[1::2] << 4)

    def decode(
        self, parts: Sequence[torch.Tensor], dtype: torch.dtype, shape: tuple[int, ...]
    ) -> torch.Tensor:
        scales, packed = parts
        n = math.prod(shape)
        check_scales(scales, math.ceil(n / BLOCK), self.name)
        if packed.numel() != math.ceil(n / 2):
            raise WireError(f"int4: {packed.numel()} bytes of values for {n} elements")
        packed = packed.to(torch.uint8)
        codes = torch.stack((packed & 15, packed >> 4), dim=1).view(-1)
        if n % 2 and int(codes[n]) != 0:
            raise WireError("int4: the padding nibble after the last element must be 0")
        codes = codes[:n]
        if n and not bool((codes > 0).all()):
            raise WireError("int4: value code 0 is not a value (codes are 1..15)")
        values = F.pad(codes.float() - 8, (0, -n % BLOCK)).view(-1, BLOCK)
        decoded = (values * scales.unsqueeze(1)).view(-1)[:n]
        return decoded.to(dtype).reshape(shape)
