"""Top-k sparsification: only the k largest-magnitude elements of a delta travel.

k = ceil(fraction * n), at least 1 for a non-empty tensor. The kept elements are exact;
the rest decode as zero, so the error is exactly the dropped elements, each no larger
in magnitude than the smallest kept one. Clients carry that error into their next
update (error feedback: Stich et al., "Sparsified SGD with Memory", NeurIPS 2018), so
nothing is lost for good, only delayed. Parts, in stream order:

    NAME::indices  I32 [k] (I64 when n >= 2^31), strictly increasing, each below n
    NAME::values   the model tensor's dtype [k]
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch

from fedstream.common.codecs.base import Codec
from fedstream.common.errors import WireError
from fedstream.common.wire.manifest import TensorEntry


def index_dtype(numel: int) -> torch.dtype:
    return torch.int32 if numel < 2**31 else torch.int64


def check_indices(indices: torch.Tensor, numel: int) -> torch.Tensor:
    """`indices` as int64; WireError unless strictly increasing and each below `numel`."""
    indices = indices.long()
    if indices.numel() and (
        int(indices[0]) < 0
        or int(indices[-1]) >= numel
        or not bool((indices[1:] > indices[:-1]).all())
    ):
        raise WireError(f"top-k indices must be strictly increasing and within 0..{numel - 1}")
    return indices


class TopK(Codec):
    name = "topk"
    error_feedback = True

    def __init__(self, fraction: float) -> None:
        if not 0.0 < fraction <= 1.0:
            raise ValueError(f"top-k fraction must be in (0, 1], got {fraction}")
        self.fraction = fraction

    def k(self, numel: int) -> int:
        """Elements kept of a tensor of `numel` elements."""
        return min(numel, max(1, math.ceil(self.fraction * numel)))

    def layout(self, entry: TensorEntry) -> tuple[TensorEntry, ...]:
        k = self.k(entry.numel)
        return (
            TensorEntry(f"{entry.name}::indices", index_dtype(entry.numel), (k,)),
            TensorEntry(f"{entry.name}::values", entry.dtype, (k,)),
        )

    def encode(self, tensor: torch.Tensor) -> tuple[torch.Tensor, ...]:
        flat = tensor.reshape(-1)
        k = self.k(flat.numel())
        indices = flat.abs().float().topk(k, sorted=False).indices.sort().values
        return indices.to(index_dtype(flat.numel())), flat[indices].contiguous()

    def decode(
        self, parts: Sequence[torch.Tensor], dtype: torch.dtype, shape: tuple[int, ...]
    ) -> torch.Tensor:
        indices, values = parts
        numel = math.prod(shape)
        indices = check_indices(indices, numel)
        out = torch.zeros(numel, dtype=dtype)
        out[indices] = values.to(dtype)
        return out.reshape(shape)
