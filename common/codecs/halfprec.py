"""fp16 and bf16: the delta rounded to a 16-bit float, half the bytes of float32.

Exact for every value the target type represents (and for a model already in that
type). Otherwise round-to-nearest: a relative error of at most 2^-11 (fp16) or 2^-8
(bf16) for values in the type's normal range, and an absolute error of at most half the
smallest subnormal (2^-25 for fp16) below it. Values beyond the largest finite value
(65504 for fp16) saturate to it instead of becoming infinite.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import ClassVar

import torch

from fedstream.common.codecs.base import Codec
from fedstream.common.wire.manifest import TensorEntry


class HalfPrecision(Codec):
    """A cast to `target`, saturating at its largest finite value."""

    target: ClassVar[torch.dtype]

    def layout(self, entry: TensorEntry) -> tuple[TensorEntry, ...]:
        return (TensorEntry(entry.name, self.target, entry.shape),)

    def encode(self, tensor: torch.Tensor) -> tuple[torch.Tensor, ...]:
        if tensor.dtype == self.target:
            return (tensor,)
        limit = torch.finfo(self.target).max
        return (tensor.clamp(-limit, limit).to(self.target),)

    def decode(
        self, parts: Sequence[torch.Tensor], dtype: torch.dtype, shape: tuple[int, ...]
    ) -> torch.Tensor:
        return parts[0].to(dtype).reshape(shape)


class Float16(HalfPrecision):
    name = "fp16"
    target = torch.float16


class BFloat16(HalfPrecision):
    name = "bf16"
    target = torch.bfloat16
