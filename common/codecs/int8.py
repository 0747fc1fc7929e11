"""int8 with per-block absmax scales: about a quarter of float32's bytes.

Each run of BLOCK consecutive elements (of the flattened tensor) gets one float32 scale,
its largest magnitude over 127; an element travels as round(x / scale) in -127..127.
Decoding multiplies back, so every element is off by at most scale / 2 (half a
quantisation step) of its block, and a block of zeros is exact. Parts, in stream order:

    NAME::scales  F32 [ceil(n / BLOCK)]
    NAME::values  I8  [n]
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
import torch.nn.functional as F

from fedstream.common.codecs.base import Codec
from fedstream.common.wire.manifest import TensorEntry

BLOCK = 256
"""Elements sharing one scale: 1/64 of a byte of scale per element."""


class Int8(Codec):
    name = "int8"

    def layout(self, entry: TensorEntry) -> tuple[TensorEntry, ...]:
        blocks = math.ceil(entry.numel / BLOCK)
        return (
            TensorEntry(f"{entry.name}::scales", torch.float32, (blocks,)),
            TensorEntry(f"{entry.name}::values", torch.int8, (entry.numel,)),
        )

    def encode(self, tensor: torch.Tensor) -> tuple[torch.Tensor, ...]:
        flat = tensor.reshape(-1).float()
        n = flat.numel()
        blocks = F.pad(flat, (0, -n % BLOCK)).view(-1, BLOCK)
        scales = blocks.abs().amax(dim=1) / 127.0
        safe = torch.where(scales > 0, scales, torch.ones_like(scales))
        values = torch.round(blocks / safe.unsqueeze(1)).clamp_(-127, 127).to(torch.int8)
        return scales, values.view(-1)[:n].contiguous()

    def decode(
        self, parts: Sequence[torch.Tensor], dtype: torch.dtype, shape: tuple[int, ...]
    ) -> torch.Tensor:
        scales, values = parts
        n = values.numel()
        padded = F.pad(values.float(), (0, -n % BLOCK)).view(-1, BLOCK)
        decoded = (padded * scales.unsqueeze(1)).view(-1)[:n]
        return decoded.to(dtype).reshape(shape)
