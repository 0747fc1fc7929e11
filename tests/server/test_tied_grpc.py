"""Tied tensors over real gRPC: the shared tensor travels once, and a client whose model
is tied differently is refused at its Join."""

from __future__ import annotations

import json

import torch

from fedstream.common.checkpoint import load_checkpoint

from .conftest import ClientThread, TinyModel, TinyTask, client_config


class TiedTask(TinyTask):
    """TinyTask with an embedding `emb` that the output layer `head` shares (or not)."""

    tied = True

    def build_model(self) -> torch.nn.Module:
        model = TinyModel(self.seed)
        model.emb = torch.nn.Parameter(torch.zeros(64, 32))
        model.head = model.emb if self.tied else torch.nn.Parameter(torch.zeros(64, 32))
        return model


class UntiedTask(TiedTask):
    tied = False


def test_the_shared_tensor_travels_once_and_a_differently_tied_client_is_refused(
    coordinator, tmp_path
) -> None:
    running = coordinator(  # FedAvg as the claims and updates are made: no cap, no clip
        task=TiedTask({}, 0), rounds=1, min_clients=2, claim_cap_factor=0, clip_factor=0
    )
    untied = ClientThread(client_config(running.address, 7, name="untied"), UntiedTask({}, 0))
    assert untied.join(60) == 2  # refused at the Join: its model digest differs
    tied = []
    for partition in (0, 1):
        task = TiedTask({}, 0)
        task.load_data(partition, 8)
        tied.append(ClientThread(client_config(running.address, partition), task))
    assert [c.join(60) for c in tied] == [0, 0]
    running.wait_done(30)

    manifest = running.coordinator.model.manifest
    assert [(t.name, t.source) for t in manifest.ties] == [("head", "emb")]
    untied_bytes = sum(
        t.numel() * t.element_size()
        for t in UntiedTask({}, 0).build_model().state_dict().values()
        if t.is_floating_point()
    )
    assert manifest.total_bytes == untied_bytes - 64 * 32 * 4
    record = json.loads((tmp_path / "run" / "metrics.jsonl").read_text())
    assert record["bytes_down"] == 2 * manifest.total_bytes
    saved, _ = load_checkpoint(tmp_path / "run" / "checkpoints" / "round_00001.safetensors")
    assert "head" not in saved
    # FedAvg of +0.125 (10 examples) and +0.25 (20 examples), on the one shared tensor
    torch.testing.assert_close(saved["emb"], torch.full((64, 32), 0.125 * 10 / 30 + 0.25 * 20 / 30))
    server = running.coordinator.model.module
    assert server.head is server.emb
