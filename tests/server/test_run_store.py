"""The run store's checkpoints: written before the next round, on disk behind it.

A round's checkpoint must be complete and in place when `save` returns (`kill -9` loses
at most the round in flight); the disk is waited for in the background, and the older
checkpoints are only deleted once the newer one is on disk, so a power cut before then
leaves a checkpoint to resume from.
"""

from __future__ import annotations

import threading
from pathlib import Path

import pytest
import torch

from fedstream.common.errors import InvalidCheckpoint
from fedstream.server import run_store
from fedstream.server.run_store import RunIdentity, RunStore

IDENTITY = RunIdentity("synthetic", {"params": "16"}, 0, "fedavg")


def model(value: float) -> dict[str, torch.Tensor]:
    return {"w": torch.full((4,), value), "b": torch.full((2,), -value)}


def saved_rounds(store: RunStore) -> list[int]:
    return [number for number, _ in store.checkpoints()]


def test_older_checkpoints_stay_until_the_newer_one_is_on_disk(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    disk = threading.Event()
    synced: list[str] = []

    def slow_disk(path: Path) -> None:
        assert disk.wait(timeout=30)
        synced.append(path.name)

    monkeypatch.setattr(run_store, "sync_to_disk", slow_disk)
    store = RunStore(tmp_path, IDENTITY, keep=1)
    store.save(0, model(0.0), {}, [])
    disk.set()
    store.wait_on_disk()
    disk.clear()

    store.save(1, model(1.0), {}, [{"round": 1}])

    assert saved_rounds(store) == [0, 1]  # round 1 not yet on disk: round 0 stays
    resumed = RunStore(tmp_path, IDENTITY, keep=1).resume()
    assert resumed is not None and resumed.round == 1  # yet complete for a restart
    assert torch.equal(resumed.model["w"], model(1.0)["w"])
    disk.set()
    store.close()
    assert saved_rounds(store) == [1]
    assert synced == ["round_00000.safetensors", "round_00001.safetensors"]


def test_resume_passes_over_a_newest_checkpoint_that_never_reached_the_disk(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    store = RunStore(tmp_path, IDENTITY, keep=2)
    store.save(1, model(1.0), {}, [{"round": 1, "loss": 0.5}])
    store.save(2, model(2.0), {}, [{"round": 1, "loss": 0.5}, {"round": 2, "loss": 0.4}])
    store.close()
    newest = store.checkpoint_path(2)
    newest.write_bytes(newest.read_bytes()[:100])  # what a power cut can leave

    resumed = RunStore(tmp_path, IDENTITY, keep=2).resume()

    assert resumed is not None and resumed.round == 1
    assert torch.equal(resumed.model["w"], model(1.0)["w"])
    assert resumed.history == [{"round": 1, "loss": 0.5}]
    assert (tmp_path / "metrics.jsonl").read_text().splitlines() == ['{"round": 1, "loss": 0.5}']
    assert "round_00002.safetensors is not a readable safetensors file" in caplog.text


def test_an_only_checkpoint_that_is_unreadable_stops_the_resume(tmp_path: Path) -> None:
    store = RunStore(tmp_path, IDENTITY, keep=1)
    store.save(3, model(3.0), {}, [])
    store.close()
    store.checkpoint_path(3).write_bytes(b"\x00" * 64)

    with pytest.raises(InvalidCheckpoint, match="round_00003.safetensors"):
        RunStore(tmp_path, IDENTITY, keep=1).resume()
