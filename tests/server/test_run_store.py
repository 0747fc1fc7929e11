"""The run store's checkpoints: written before the next round, on disk behind it.

A round's checkpoint must be complete and in place when `save` returns (`kill -9` loses
at most the round in flight); the disk is waited for in the background, and the older
checkpoints are only deleted once the newer one is on disk, so a power cut before then
leaves a checkpoint to resume from.
"""

from __future__ import annotations

import json
import math
import threading
from pathlib import Path

import pytest
import torch

from fedstream.common.checkpoint import load_checkpoint, read_checkpoint_metadata
from fedstream.common.config import ConfigError
from fedstream.common.errors import InvalidCheckpoint
from fedstream.common.wire.manifest import Manifest
from fedstream.server import checkpoints
from fedstream.server.run_store import RunIdentity, RunStore, strict_json

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

    monkeypatch.setattr(checkpoints, "sync_to_disk", slow_disk)
    store = RunStore(tmp_path, IDENTITY, keep=1)
    store.save(0, model(0.0), {}, [])
    disk.set()
    store.wait_on_disk()
    disk.clear()

    store.save(1, model(1.0), {}, [{"round": 1}])

    assert saved_rounds(store) == [0, 1]  # round 1 not yet on disk: round 0 stays
    tensors, _ = load_checkpoint(store.checkpoint_path(1))  # yet complete for a restart
    assert torch.equal(tensors["w"], model(1.0)["w"])
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


def resumed_from(tmp_path: Path, expected: Manifest | None = None) -> int:
    store = RunStore(tmp_path, IDENTITY, keep=3)
    try:
        resumed = store.resume(expected)
        assert resumed is not None
        return resumed.round
    finally:
        store.close()


def three_rounds(tmp_path: Path, newest: dict[str, torch.Tensor]) -> None:
    store = RunStore(tmp_path, IDENTITY, keep=3)
    store.save(1, model(1.0), {}, [{"round": 1}])
    store.save(2, model(2.0), {}, [{"round": 1}, {"round": 2}])
    store.save(3, newest, {}, [{"round": 1}, {"round": 2}, {"round": 3}])
    store.close()


@pytest.mark.parametrize("bad", [math.nan, math.inf, -math.inf])
def test_resume_passes_over_a_checkpoint_whose_model_is_not_finite(
    tmp_path: Path, caplog: pytest.LogCaptureFixture, bad: float
) -> None:
    broken = model(3.0)
    broken["b"][1] = bad
    three_rounds(tmp_path, broken)

    assert resumed_from(tmp_path, Manifest.from_tensors(model(0.0))) == 2
    assert "round_00003.safetensors: model tensor 'b' holds NaN or infinite values" in caplog.text
    assert (tmp_path / "metrics.jsonl").read_text().splitlines() == ['{"round": 1}', '{"round": 2}']


def test_resume_passes_over_a_checkpoint_of_another_layout(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    three_rounds(tmp_path, {"w": torch.zeros(5), "b": torch.zeros(2)})

    assert resumed_from(tmp_path, Manifest.from_tensors(model(0.0))) == 2
    assert "round_00003.safetensors does not hold this model" in caplog.text
    assert "expected shape [4], got [5]" in caplog.text


def test_without_an_expected_layout_the_newest_readable_checkpoint_is_resumed(
    tmp_path: Path,
) -> None:
    three_rounds(tmp_path, {"w": torch.zeros(5), "b": torch.zeros(2)})
    assert resumed_from(tmp_path) == 3


def test_no_usable_checkpoint_stops_the_resume_naming_each(tmp_path: Path) -> None:
    store = RunStore(tmp_path, IDENTITY, keep=3)
    store.save(1, {"w": torch.full((4,), math.nan), "b": torch.zeros(2)}, {}, [])
    store.save(2, model(2.0), {}, [])
    store.close()
    store.checkpoint_path(2).write_bytes(b"\x00" * 64)

    with pytest.raises(InvalidCheckpoint) as stopped:
        resumed_from(tmp_path, Manifest.from_tensors(model(0.0)))
    message = str(stopped.value)
    assert message.startswith(f"no usable checkpoint in {tmp_path / 'checkpoints'}")
    assert "round_00002.safetensors is not a readable safetensors file" in message
    assert "round_00001.safetensors: model tensor 'w' holds NaN" in message


def test_another_runs_checkpoint_is_a_config_error_not_passed_over(tmp_path: Path) -> None:
    three_rounds(tmp_path, model(3.0))
    other = RunStore(tmp_path, RunIdentity("digits", {}, 0, "fedavg"))
    try:
        with pytest.raises(ConfigError, match="holds a different run"):
            other.resume()
    finally:
        other.close()


def test_metrics_are_strict_json_with_null_for_non_finite_values(tmp_path: Path) -> None:
    store = RunStore(tmp_path, IDENTITY, keep=1)
    record = {"round": 1, "loss": math.nan, "eval": {"loss": math.inf, "acc": [0.5, -math.inf]}}
    try:
        store.commit_round(1, model(1.0), {}, record)
        store.add_to_record(1, {"eval_loss": math.nan})
    finally:
        store.close()
    strict = {
        "round": 1,
        "loss": None,
        "eval": {"loss": None, "acc": [0.5, None]},
        "eval_loss": None,
    }

    def reject_constants(name: str) -> None:
        raise AssertionError(f"{name} in strict JSON")

    lines = (tmp_path / "metrics.jsonl").read_text().splitlines()
    assert [json.loads(line, parse_constant=reject_constants) for line in lines] == [strict]
    history = read_checkpoint_metadata(store.checkpoint_path(1))["history"]
    assert json.loads(history, parse_constant=reject_constants)[0]["loss"] is None


def test_appended_metrics_are_strict_json(tmp_path: Path) -> None:
    store = RunStore(tmp_path, IDENTITY)
    try:
        store.append_metrics({"round": 2, "loss": math.nan, "n": 3})
    finally:
        store.close()
    assert (tmp_path / "metrics.jsonl").read_text() == '{"round": 2, "loss": null, "n": 3}\n'
    assert strict_json([math.inf, (1.5, "x")]) == '[null, [1.5, "x"]]'
