"""Whether tensors hold only finite values: the one check spools, safeguards and resumes use."""

from __future__ import annotations

from collections.abc import Mapping

import torch


def is_finite(tensor: torch.Tensor) -> bool:
    """Whether `tensor` holds no NaN and no infinity (an empty or integer tensor does not).

    NaN propagates into the minimum and maximum, and an infinity is one of them: two
    scalars to check instead of a mask as large as the tensor."""
    if not tensor.is_floating_point() or not tensor.numel():
        return True
    low, high = torch.aminmax(tensor)
    return bool(torch.isfinite(low)) and bool(torch.isfinite(high))


def all_finite(tensors: Mapping[str, torch.Tensor]) -> bool:
    """Whether every tensor of `tensors` `is_finite`."""
    return all(is_finite(tensor) for tensor in tensors.values())
