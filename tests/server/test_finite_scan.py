from __future__ import annotations

import pytest
import torch

from fedstream.common.tensor_codec import Manifest, iter_chunks
from fedstream.server.spool import FiniteScan


def _state() -> dict[str, torch.Tensor]:
    return {
        "half": torch.ones(5, dtype=torch.float16),
        "ints": torch.full((3,), -1, dtype=torch.int32),  # all-ones bits: NaN if misread
        "bf": torch.ones(7, dtype=torch.bfloat16),
        "f32": torch.ones(2, 3),
        "f64": torch.ones(4, dtype=torch.float64),
    }


def _scan(state: dict[str, torch.Tensor], chunk: int) -> str | None:
    scan = FiniteScan(Manifest.from_tensors(state))
    for piece in iter_chunks(list(state.values()), chunk):
        scan.feed(memoryview(bytes(piece)))
    return scan.bad


@pytest.mark.parametrize("chunk", [1, 3, 5, 64, 1 << 20])
def test_finite_stream_passes_whatever_the_cuts(chunk: int) -> None:
    assert _scan(_state(), chunk) is None


@pytest.mark.parametrize("chunk", [1, 3, 5, 64, 1 << 20])
@pytest.mark.parametrize("name", ["half", "bf", "f32", "f64"])
@pytest.mark.parametrize("value", [float("nan"), float("inf"), float("-inf")])
def test_non_finite_value_names_its_tensor(chunk: int, name: str, value: float) -> None:
    state = _state()
    state[name].view(-1)[-1] = value
    assert _scan(state, chunk) == name
