"""--model-dir: a downloaded model is kept with its SHA-256, and loaded only when its
bytes still hash to the digest a task names."""

from __future__ import annotations

import hashlib
from pathlib import Path

import torch

from fedstream.client.held_model import HeldModel
from fedstream.common.wire.manifest import Manifest
from fedstream.common.wire.stream import iter_chunks

TENSORS = {"w": torch.arange(12, dtype=torch.float32).view(3, 4), "b": torch.ones(5)}
MANIFEST = Manifest.from_tensors(TENSORS)
STREAM = b"".join(bytes(c) for c in iter_chunks(list(TENSORS.values()), 1 << 20))
DIGEST = hashlib.sha256(STREAM).hexdigest()


def downloaded(directory: Path) -> HeldModel:
    held = HeldModel(MANIFEST, 4, directory)
    for start in range(0, len(STREAM), 7):
        held.write(STREAM[start : start + 7])
    held.keep()
    return held


def test_a_kept_model_is_loaded_by_its_digest(tmp_path: Path) -> None:
    held = downloaded(tmp_path)
    assert held.sha256 == DIGEST
    held.close()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model.bin", "model.json"]
    kept = HeldModel.kept(tmp_path, MANIFEST, 4, DIGEST)
    assert kept is not None and kept.complete and kept.sha256 == DIGEST
    assert torch.equal(kept.read(MANIFEST.entries[0]), TENSORS["w"])
    kept.close()
    assert (tmp_path / "model.bin").is_file()  # closing a kept model keeps it


def test_another_digest_or_a_changed_file_means_a_download(tmp_path: Path) -> None:
    downloaded(tmp_path).close()
    assert HeldModel.kept(tmp_path, MANIFEST, 4, "0" * 64) is None
    raw = bytearray((tmp_path / "model.bin").read_bytes())
    raw[3] ^= 0x01
    (tmp_path / "model.bin").write_bytes(bytes(raw))
    assert HeldModel.kept(tmp_path, MANIFEST, 4, DIGEST) is None
    assert HeldModel.kept(tmp_path / "none", MANIFEST, 4, DIGEST) is None


def test_a_broken_download_leaves_no_part_behind(tmp_path: Path) -> None:
    held = HeldModel(MANIFEST, 4, tmp_path)
    held.write(STREAM[:10])
    held.close()
    assert list(tmp_path.iterdir()) == []


def test_a_patched_model_is_no_longer_kept_under_its_digest(tmp_path: Path) -> None:
    """A streaming client writes each new global fragment into the model it holds
    (`HeldModel.patch`): the bytes change, so the record that names them goes."""
    downloaded(tmp_path).close()
    kept = HeldModel.kept(tmp_path, MANIFEST, 4, DIGEST)
    assert kept is not None
    fresh = torch.full((5,), 7.0)
    kept.patch(MANIFEST.entries[1], fresh)
    assert torch.equal(kept.read(MANIFEST.entries[1]), fresh)
    assert torch.equal(kept.read(MANIFEST.entries[0]), TENSORS["w"])
    assert kept.sha256 != DIGEST
    assert not (tmp_path / "model.json").exists()
    kept.close()
    assert HeldModel.kept(tmp_path, MANIFEST, 4, DIGEST) is None
