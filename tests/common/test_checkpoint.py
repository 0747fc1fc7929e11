"""Tests of checkpoint I/O: round trips, tensor order, and atomic replacement."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import safetensors.torch
import torch

from fedstream.common.checkpoint import (
    load_checkpoint,
    read_checkpoint_metadata,
    save_checkpoint,
    sync_to_disk,
    write_json_atomic,
)
from fedstream.common.errors import InvalidCheckpoint
from fedstream.common.wire.manifest import DTYPES
from fedstream.common.wire.stream import tensor_bytes


def random_bits(dtype: torch.dtype, shape: tuple[int, ...], seed: int) -> torch.Tensor:
    """Arbitrary bit patterns of `dtype` (NaNs and -0.0 included); 0/1 bytes for bool."""
    gen = torch.Generator().manual_seed(seed)
    numel = torch.Size(shape).numel()
    high = 2 if dtype == torch.bool else 256
    raw = torch.randint(0, high, (numel * dtype.itemsize,), dtype=torch.uint8, generator=gen)
    return raw.view(dtype).reshape(shape)


def every_dtype() -> dict[str, torch.Tensor]:
    """One tensor per wire dtype, named so that sorted order differs from insertion order."""
    state = {
        f"{chr(ord('z') - i)}.{name.lower()}": random_bits(dtype, (3, 4), seed=i)
        for i, (name, dtype) in enumerate(DTYPES.items())
    }
    state["m.scalar"] = torch.tensor(-0.0, dtype=torch.bfloat16)
    state["b.empty"] = torch.empty(0, 7, dtype=torch.float16)
    state["k.transposed"] = random_bits(torch.float32, (5, 3), seed=99).t()
    return state


def assert_bit_exact(got: dict[str, torch.Tensor], want: dict[str, torch.Tensor]) -> None:
    assert list(got) == list(want)
    for name, tensor in want.items():
        assert got[name].dtype == tensor.dtype, name
        assert got[name].shape == tensor.shape, name
        assert bytes(tensor_bytes(got[name])) == bytes(tensor_bytes(tensor.contiguous())), name


def test_round_trip_keeps_every_dtype_bit_exact_in_order(tmp_path: Path) -> None:
    state = every_dtype()
    metadata = {"round": "7", "task": "charlm", "model_args": json.dumps({"n_layer": 2})}
    path = tmp_path / "global.safetensors"

    save_checkpoint(path, state, metadata)
    tensors, loaded_metadata = load_checkpoint(path)

    assert list(state) != sorted(state)
    assert_bit_exact(tensors, state)
    assert loaded_metadata == metadata
    assert read_checkpoint_metadata(path) == metadata


def test_checkpoint_is_a_plain_safetensors_file(tmp_path: Path) -> None:
    state = every_dtype()
    path = tmp_path / "global.safetensors"
    save_checkpoint(path, state, {"round": "1"})

    plain = safetensors.torch.load_file(path)

    assert_bit_exact({name: plain[name] for name in state}, state)


def test_a_plain_safetensors_file_loads_in_file_order(tmp_path: Path) -> None:
    path = tmp_path / "plain.safetensors"
    safetensors.torch.save_file({"b": torch.ones(2), "a": torch.zeros(1)}, path, {"k": "v"})

    tensors, metadata = load_checkpoint(path)

    assert sorted(tensors) == ["a", "b"]
    assert metadata == {"k": "v"}


def test_tied_weights_are_saved_as_separate_tensors(tmp_path: Path) -> None:
    embedding = torch.randn(6, 4)
    state = {"wte.weight": embedding, "lm_head.weight": embedding, "bias": torch.zeros(4)}
    path = tmp_path / "tied.safetensors"

    save_checkpoint(path, state, {})
    tensors, _ = load_checkpoint(path)

    assert_bit_exact(tensors, state)


def test_saving_replaces_the_old_file_and_leaves_no_temp_files(tmp_path: Path) -> None:
    path = tmp_path / "global.safetensors"
    save_checkpoint(path, {"w": torch.zeros(3)}, {"round": "1"})

    save_checkpoint(path, {"w": torch.ones(3)}, {"round": "2"})

    tensors, metadata = load_checkpoint(path)
    assert torch.equal(tensors["w"], torch.ones(3))
    assert metadata == {"round": "2"}
    assert [p.name for p in tmp_path.iterdir()] == [path.name]


def test_an_unsynced_save_is_complete_and_in_place_before_it_is_synced(tmp_path: Path) -> None:
    path = tmp_path / "global.safetensors"
    save_checkpoint(path, {"w": torch.zeros(3)}, {"round": "1"})

    save_checkpoint(path, every_dtype(), {"round": "2"}, sync=False)

    tensors, metadata = load_checkpoint(path)  # another process would read the same
    assert_bit_exact(tensors, every_dtype())
    assert metadata == {"round": "2"}
    sync_to_disk(path)
    assert [p.name for p in tmp_path.iterdir()] == [path.name]


@pytest.mark.parametrize("keep", [0, 7, 100, -1])
def test_a_checkpoint_cut_short_is_reported_as_unreadable(tmp_path: Path, keep: int) -> None:
    path = tmp_path / "round_00002.safetensors"
    save_checkpoint(path, every_dtype(), {"round": "2"})
    whole = path.read_bytes()
    path.write_bytes(whole[:keep] if keep >= 0 else whole[:-1])

    with pytest.raises(InvalidCheckpoint, match="round_00002.safetensors is not a readable"):
        load_checkpoint(path)


def test_a_failed_save_keeps_the_old_checkpoint(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    path = tmp_path / "global.safetensors"
    old = {"w": torch.arange(4.0)}
    save_checkpoint(path, old, {"round": "1"})

    def write_half_then_fail(tensors: object, filename: str | Path, metadata: object) -> None:
        Path(filename).write_bytes(b"\x08\x00\x00\x00partial")
        raise OSError("disk full")

    monkeypatch.setattr(safetensors.torch, "save_file", write_half_then_fail)
    with pytest.raises(OSError, match="disk full"):
        save_checkpoint(path, {"w": torch.ones(4)}, {"round": "2"})

    tensors, metadata = load_checkpoint(path)
    assert_bit_exact(tensors, old)
    assert metadata == {"round": "1"}
    assert [p.name for p in tmp_path.iterdir()] == [path.name]


def test_metadata_must_be_strings_and_not_the_reserved_key(tmp_path: Path) -> None:
    path = tmp_path / "global.safetensors"
    with pytest.raises(TypeError, match="str to str"):
        save_checkpoint(path, {"w": torch.zeros(1)}, {"round": 3})  # type: ignore[dict-item]
    with pytest.raises(ValueError, match="reserved"):
        save_checkpoint(path, {"w": torch.zeros(1)}, {"__order__": "[]"})
    assert not path.exists()


def test_a_corrupt_saved_order_is_reported(tmp_path: Path) -> None:
    path = tmp_path / "odd.safetensors"
    safetensors.torch.save_file({"a": torch.zeros(1)}, path, {"__order__": '["a", "b"]'})

    with pytest.raises(InvalidCheckpoint, match="does not list"):
        load_checkpoint(path)


def test_write_json_atomic_round_trip_and_failure(tmp_path: Path) -> None:
    path = tmp_path / "state.json"
    write_json_atomic(path, {"round": 3, "history": [0.5, 0.25]})
    write_json_atomic(path, {"round": 4, "history": [0.5, 0.25, 0.125]})

    with pytest.raises(TypeError):
        write_json_atomic(path, {"bad": object()})

    assert json.loads(path.read_text()) == {"round": 4, "history": [0.5, 0.25, 0.125]}
    assert [p.name for p in tmp_path.iterdir()] == [path.name]
