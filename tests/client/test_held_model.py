"""The client's on-disk copy of the global model: written as chunks arrive, read back exactly."""

from __future__ import annotations

import pytest
import torch

from fedstream.client import held_model
from fedstream.client.held_model import HeldModel
from fedstream.common.errors import WireError
from fedstream.common.wire.manifest import Manifest
from fedstream.common.wire.stream import iter_chunks


def model() -> dict[str, torch.Tensor]:
    generator = torch.Generator().manual_seed(0)
    return {
        "emb": torch.randn(37, 11, generator=generator),
        "half": torch.randn(5, 3, generator=generator).to(torch.bfloat16),
        "scalar": torch.tensor(2.5, dtype=torch.float64),
        "empty": torch.zeros(0, 4),
        "bias": torch.randn(13, generator=generator),
    }


def held_copy(tensors: dict[str, torch.Tensor], chunk: int) -> HeldModel:
    held = HeldModel(Manifest.from_tensors(tensors), version=3)
    for piece in iter_chunks(list(tensors.values()), chunk):
        held.write(piece)
    return held


@pytest.mark.parametrize("chunk", [1, 7, 64, 1 << 20])
def test_load_into_reproduces_every_tensor_bit_for_bit(chunk, monkeypatch):
    monkeypatch.setattr(held_model, "BLOCK_ELEMENTS", 6)  # blocks split tensors too
    tensors = model()
    held = held_copy(tensors, chunk)
    out = {k: torch.full_like(v, 99) for k, v in tensors.items()}
    held.load_into(out)
    for name, tensor in tensors.items():
        assert torch.equal(out[name], tensor), name
    held.close()


@pytest.mark.parametrize("block", [None, 1, 5, 1000])
def test_deltas_are_local_minus_global_in_manifest_order(block):
    tensors = model()
    held = held_copy(tensors, 10)
    local = {k: v + 1.5 for k, v in tensors.items()}
    deltas = list(held.deltas(local, block))
    if block is None:
        assert [tuple(d.shape) for d in deltas] == [tuple(v.shape) for v in tensors.values()]
        joined = deltas
    else:
        assert all(d.numel() <= block for d in deltas)
        joined = []
        for tensor in tensors.values():
            take = -(-tensor.numel() // block) if tensor.numel() else 0
            joined.append(torch.cat([d.reshape(-1) for d in deltas[:take]]) if take else None)
            deltas = deltas[take:]
    for (name, tensor), delta in zip(tensors.items(), joined, strict=True):
        if tensor.numel():
            expected = (local[name] - tensor).reshape(-1)
            assert torch.equal(delta.reshape(-1), expected), name
    held.close()


def test_writes_past_the_end_are_refused_and_reads_need_the_whole_model():
    tensors = {"w": torch.arange(4.0)}
    held = HeldModel(Manifest.from_tensors(tensors), version=0)
    held.write(memoryview(bytes(8)))
    with pytest.raises(WireError, match="incomplete"):
        held.load_into({"w": torch.zeros(4)})
    with pytest.raises(WireError, match="overflows"):
        held.write(bytes(9))
    assert held.bytes_written == 8
    held.write(bytes(8))
    assert held.complete
    held.close()


def test_deltas_of_a_fragment_are_its_tensors_alone():
    tensors = model()
    held = held_copy(tensors, 64)
    local = {name: 2 * tensor for name, tensor in tensors.items()}  # exact: delta = global
    fragment = Manifest.from_tensors({n: tensors[n] for n in ("half", "scalar")})
    deltas = list(held.deltas(local, None, fragment))
    assert [tuple(d.shape) for d in deltas] == [(5, 3), ()]
    assert torch.equal(deltas[0], tensors["half"]) and torch.equal(deltas[1], tensors["scalar"])
