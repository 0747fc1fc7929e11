"""DiLoCo's inner optimiser over real gRPC: a charlm client with `keep_optimizer=1` carries
its AdamW moments from round to round through the real client loop, and a client restarted
against a resumed coordinator starts them afresh and trains on."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from fedstream.tasks import load_task
from fedstream.tasks.charlm import CharLMTask

from .conftest import ClientThread, client_config

SMALL = {"n_layer": "1", "n_head": "2", "n_embd": "16", "block_size": "16"}
STEPS = 3
FLAGS: dict[str, Any] = {
    "strategy": "diloco",
    "min_clients": 2,
    "round_config": {"local_steps": str(STEPS), "batch_size": "4"},
}


def charlm(partition: int) -> CharLMTask:
    task = load_task("charlm", {**SMALL, "keep_optimizer": "1"})
    assert isinstance(task, CharLMTask)
    task.load_data(partition, 4)
    return task


def run_sites(address: str) -> list[CharLMTask]:
    """Two charlm clients (as two fresh client processes) through to the run's end."""
    tasks = [charlm(p) for p in (0, 1)]
    threads = [ClientThread(client_config(address, p, num_partitions=4), tasks[p]) for p in (0, 1)]
    assert [t.join(120) for t in threads] == [0, 0]
    return tasks


def steps_taken(task: CharLMTask) -> set[int]:
    return {int(state["step"]) for state in task.inner_state.values()}


@pytest.mark.slow
def test_kept_adamw_survives_rounds_and_a_restart_starts_it_afresh(
    coordinator, tmp_path: Path
) -> None:
    run_dir = tmp_path / "run"
    first = coordinator(charlm(0), rounds=2, run_dir=run_dir, **FLAGS)
    sites = run_sites(first.address)
    first.wait_done(60)
    assert [steps_taken(task) for task in sites] == [{2 * STEPS}, {2 * STEPS}]

    resumed = coordinator(charlm(0), rounds=3, run_dir=run_dir, **FLAGS)
    assert resumed.coordinator.completed == 2
    restarted = run_sites(resumed.address)
    resumed.wait_done(60)
    assert resumed.coordinator.completed == 3
    assert [steps_taken(task) for task in restarted] == [{STEPS}, {STEPS}]
