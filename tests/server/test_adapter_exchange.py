"""Adapter-only exchange over real gRPC: only the task's exchanged tensors travel."""

from __future__ import annotations

import json

import torch

from fedstream.client.loop import FederatedClient
from fedstream.common.checkpoint import load_checkpoint
from fedstream.tasks import load_task

from .conftest import ClientThread, client_config

SMALL = {"n_layer": "1", "n_embd": "32", "n_head": "2", "block_size": "16"}


def lora_task(partition: int = 0):
    task = load_task("charlm-lora", SMALL)
    task.load_data(partition, 8)
    return task


def test_only_adapters_cross_the_wire_and_the_base_stays_put(coordinator, tmp_path) -> None:
    # the harness names every task "tiny" on the wire; the Task objects are charlm-lora
    server_task = lora_task()
    running = coordinator(
        task=server_task,
        rounds=1,
        min_clients=2,
        round_config={"local_steps": "2", "batch_size": "4"},
    )
    base_before = {k: v.clone() for k, v in server_task_state(running).items() if ".lora_" not in k}
    clients = [ClientThread(client_config(running.address, p), lora_task(p)) for p in (0, 1)]
    assert [c.join(60) for c in clients] == [0, 0]
    running.wait_done(30)

    manifest = running.coordinator.model.manifest
    assert manifest.names and all(".lora_" in name for name in manifest.names)
    record = json.loads((tmp_path / "run" / "metrics.jsonl").read_text())
    assert record["bytes_up"] == 2 * manifest.total_bytes
    assert record["bytes_down"] == 2 * manifest.total_bytes
    saved, _ = load_checkpoint(tmp_path / "run" / "checkpoints" / "round_00001.safetensors")
    assert set(saved) == set(manifest.names)
    after = server_task_state(running)
    assert all(torch.equal(after[k], v) for k, v in base_before.items())
    assert any(
        not torch.equal(saved[k], torch.zeros_like(saved[k])) for k in saved if "lora_b" in k
    )
    client: FederatedClient = clients[0].client
    assert client.layout.names == manifest.names


def server_task_state(running) -> dict[str, torch.Tensor]:
    return running.coordinator.model.module.state_dict()
