from __future__ import annotations

import pytest
import torch

from fedstream.client import held_model
from fedstream.client.held_model import HeldModel
from fedstream.common.errors import WireError
from fedstream.common.tensor_codec import Manifest, iter_chunks


def _state() -> dict[str, torch.Tensor]:
    generator = torch.Generator().manual_seed(0)
    return {
        "a": torch.randn(3, 1000, generator=generator),
        "b": torch.randn(7, generator=generator).to(torch.bfloat16),
        "c": torch.randn(513, generator=generator, dtype=torch.float64),
        "empty": torch.zeros(0, 4),
    }


def _held(state: dict[str, torch.Tensor], chunk: int) -> HeldModel:
    held = HeldModel(Manifest.from_tensors(state), version=3)
    for piece in iter_chunks(list(state.values()), chunk):
        held.write(piece)
    return held


@pytest.mark.parametrize("chunk", [1, 1000, 4096, 1 << 20])
def test_load_and_deltas_are_bit_exact_whatever_the_blocks(monkeypatch, chunk: int) -> None:
    monkeypatch.setattr(held_model, "BLOCK_BYTES", 1000)
    glob = _state()
    held = _held(glob, chunk)
    assert held.complete
    local = {name: torch.empty_like(t) for name, t in glob.items()}
    held.load_into(local)
    for name, tensor in glob.items():
        assert torch.equal(local[name].view(torch.uint8), tensor.view(torch.uint8)), name
    for tensor in local.values():
        tensor.add_(1)
    flat = torch.cat([d.view(torch.uint8).reshape(-1) for d in held.deltas(local)])
    want = torch.cat([(local[n] - glob[n]).view(torch.uint8).reshape(-1) for n in glob])
    assert torch.equal(flat, want)
    held.close()


def test_write_past_the_end_is_refused_and_writes_nothing() -> None:
    state = {"a": torch.ones(4)}
    held = HeldModel(Manifest.from_tensors(state), version=0)
    held.write(bytes(12))
    with pytest.raises(WireError):
        held.write(bytes(8))
    assert held.bytes_written == 12 and not held.complete
    with pytest.raises(WireError):
        held.load_into({"a": torch.empty(4)})
