"""Raw spools: scanned for NaN and infinity as chunks arrive, read back exactly, and their
files reused from one upload to the next."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from fedstream.common.errors import NonFiniteValues, WireError
from fedstream.common.wire.manifest import Manifest
from fedstream.common.wire.stream import iter_chunks
from fedstream.server.spool import SpoolFiles, UploadSpool

DTYPES = [torch.float32, torch.bfloat16, torch.float16, torch.float64]


def model(dtype: torch.dtype) -> dict[str, torch.Tensor]:
    generator = torch.Generator().manual_seed(1)
    return {
        "ids": torch.full((9,), -1, dtype=torch.int32),  # all 0xFF bytes: NaN if read as float
        "w": torch.randn(41, generator=generator).to(dtype),
        "empty": torch.zeros(0, dtype=dtype),
        "b": torch.randn(3, 5, generator=generator).to(dtype),
    }


def spool_of(files: SpoolFiles, tensors: dict[str, torch.Tensor], chunk: int) -> UploadSpool:
    spool = UploadSpool(files, "u", Manifest.from_tensors(tensors))
    for piece in iter_chunks(list(tensors.values()), chunk):
        spool.write(memoryview(piece))
    spool.finish()
    return spool


def read_back(spool: UploadSpool) -> dict[str, torch.Tensor]:
    parts: dict[str, list[torch.Tensor]] = {}
    for block in spool.blocks(block_bytes=64):
        parts.setdefault(block.name, []).append(block.values.clone())
    return {name: torch.cat(blocks) for name, blocks in parts.items()}


@settings(max_examples=60, deadline=None)
@given(
    dtype=st.sampled_from(DTYPES),
    chunk=st.integers(1, 300),
    tensor=st.sampled_from(["w", "b"]),
    index=st.integers(0, 14),
    bad=st.sampled_from([float("nan"), float("inf"), float("-inf")]),
)
def test_a_non_finite_value_is_caught_wherever_chunks_split_it(
    tmp_path_factory: pytest.TempPathFactory,
    dtype: torch.dtype,
    chunk: int,
    tensor: str,
    index: int,
    bad: float,
) -> None:
    tensors = model(dtype)
    tensors[tensor].view(-1)[index] = bad
    with pytest.raises(NonFiniteValues, match=f"'{tensor}'"):
        spool_of(SpoolFiles(tmp_path_factory.mktemp("spool")), tensors, chunk)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("chunk", [1, 3, 7, 1 << 20])
def test_finite_updates_pass_and_read_back_bit_for_bit(
    tmp_path: Path, dtype: torch.dtype, chunk: int
) -> None:
    tensors = model(dtype)
    spool = spool_of(SpoolFiles(tmp_path), tensors, chunk)
    spool.verify_finite()
    got = read_back(spool)
    for name, tensor in tensors.items():
        if tensor.numel():
            assert torch.equal(got[name], tensor.view(-1)), name


def test_a_reused_file_holds_only_the_newest_update(tmp_path: Path) -> None:
    files = SpoolFiles(tmp_path)
    first = spool_of(files, {"w": torch.arange(1000, dtype=torch.float32)}, 256)
    first.discard()
    second = spool_of(files, {"w": torch.full((10,), 7.0)}, 256)  # gets the same file
    assert read_back(second)["w"].tolist() == [7.0] * 10
    second.discard()
    assert len(list(tmp_path.iterdir())) == 0  # anonymous: nothing left in the directory


def test_a_short_update_in_a_reused_file_is_still_short(tmp_path: Path) -> None:
    files = SpoolFiles(tmp_path)
    spool_of(files, {"w": torch.ones(100)}, 64).discard()
    spool = UploadSpool(files, "u", Manifest.from_tensors({"w": torch.ones(100)}))
    spool.write(memoryview(bytes(40)))
    with pytest.raises(WireError, match="ended after 40 of 400"):
        spool.finish()
