"""The peak resident memory fedstream reports is never below the memory in use now."""

from __future__ import annotations

import psutil
import torch

from fedstream.common.memory import peak_rss_bytes


def test_the_peak_is_at_least_the_resident_memory_just_read() -> None:
    process = psutil.Process()
    for step in range(1, 6):
        held = torch.ones(step * 2_000_000)  # new pages each time: the peak must follow
        now = process.memory_info().rss
        assert peak_rss_bytes() >= now
        del held
