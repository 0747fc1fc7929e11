"""hf-causal-lm over real gRPC: GPT-2 and Llama, fully and through PEFT LoRA adapters.

Each run is a coordinator and two clients on loopback for 3 rounds; the final checkpoint
is loaded into a fresh model, saved with the task's `save_pretrained` and read back with
`from_pretrained`, which must give the loss the run logged.

The held-out loss falls every round, by at least `MARGIN`, fully and with LoRA: the
seeded random base is initialised with std `init_range` 0.1, not transformers' 0.02,
whose frozen output layer would cap LoRA's logits (see `INIT_RANGE`).
"""

from __future__ import annotations

import json
from itertools import pairwise
from pathlib import Path

import pytest
import torch

from fedstream.common.checkpoint import load_checkpoint
from fedstream.tasks import load_task

from .conftest import ClientThread, client_config

pytest.importorskip("transformers")
pytest.importorskip("peft")

from peft import PeftModel  # noqa: E402
from transformers import AutoModelForCausalLM  # noqa: E402

from fedstream.tasks.hf_causal_lm import HFCausalLMTask  # noqa: E402

ROUND = {"local_steps": "5", "batch_size": "8"}
"""Short rounds: the default model sizes (a few hundred thousand parameters) learn the
byte statistics of the text within them."""
MARGIN = 0.05
"""The least fall of the held-out loss in a round; the smallest measured is 0.11 (GPT-2,
full, round 3)."""


def hf_task(options: dict[str, str], partition: int | None = None) -> HFCausalLMTask:
    task = load_task("hf-causal-lm", options)
    assert isinstance(task, HFCausalLMTask)
    if partition is not None:
        task.load_data(partition, 8)
    return task


def federate(coordinator, run_dir: Path, options: dict[str, str]) -> list[dict]:
    """Three rounds of `options`' model with two clients; the run's metrics records."""
    running = coordinator(
        task=hf_task(options), rounds=3, min_clients=2, round_config=ROUND, run_dir=run_dir
    )
    clients = [ClientThread(client_config(running.address, p), hf_task(options, p)) for p in (0, 1)]
    assert [c.join(240) for c in clients] == [0, 0]
    running.wait_done(60)
    lines = (run_dir / "metrics.jsonl").read_text().splitlines()
    return [json.loads(line) for line in lines]


def from_checkpoint(task: HFCausalLMTask, run_dir: Path) -> torch.nn.Module:
    """The task's model with the run's last checkpoint loaded (the exchanged tensors)."""
    model = task.build_model()
    saved, _ = load_checkpoint(run_dir / "checkpoints" / "round_00003.safetensors")
    state = model.state_dict()
    with torch.no_grad():
        for name, tensor in saved.items():
            state[name].copy_(tensor)
    return model


def loss(task: HFCausalLMTask, model: torch.nn.Module) -> float:
    return task.evaluate(model).metrics["loss"]


@pytest.mark.slow
@pytest.mark.parametrize("arch", ["gpt2", "llama"])
def test_full_and_lora_runs_learn_and_reload_with_from_pretrained(
    coordinator, tmp_path: Path, arch: str
) -> None:
    full_options, lora_options = {"arch": arch}, {"arch": arch, "lora": "1"}
    start = loss(hf_task(full_options), hf_task(full_options).build_model())
    full = federate(coordinator, tmp_path / "full", full_options)
    lora = federate(coordinator, tmp_path / "lora", lora_options)

    for name, records in (("full", full), ("lora", lora)):
        losses = [start] + [r["eval_loss"] for r in records]
        print(f"{arch} {name}: eval_loss {losses}; bytes/round {records[0]}")
        assert [r["round"] for r in records] == [1, 2, 3]
        assert all(later < earlier - MARGIN for earlier, later in pairwise(losses))
    assert all(r["bytes_down"] >= 20 * lora[0]["bytes_down"] for r in full)
    assert all(r["bytes_up"] >= 20 * lora[0]["bytes_up"] for r in full)

    task = hf_task(full_options)
    model = from_checkpoint(task, tmp_path / "full")
    assert loss(task, model) == pytest.approx(full[-1]["eval_loss"], abs=1e-5)
    task.save_pretrained(model, tmp_path / "full-out", merge_adapters=False)
    reloaded = AutoModelForCausalLM.from_pretrained(tmp_path / "full-out")
    assert loss(task, reloaded) == pytest.approx(full[-1]["eval_loss"], abs=1e-5)

    task = hf_task(lora_options)
    model = from_checkpoint(task, tmp_path / "lora")
    assert loss(task, model) == pytest.approx(lora[-1]["eval_loss"], abs=1e-5)
    task.save_pretrained(model, tmp_path / "merged", merge_adapters=True)
    merged = AutoModelForCausalLM.from_pretrained(tmp_path / "merged")
    assert not any("lora" in name for name in merged.state_dict())
    assert loss(task, merged) == pytest.approx(lora[-1]["eval_loss"], abs=1e-4)
    task.save_pretrained(model, tmp_path / "adapter", merge_adapters=False)
    assert (tmp_path / "adapter" / "adapter_config.json").exists()
    base = AutoModelForCausalLM.from_pretrained(tmp_path / "adapter" / "base")
    adapted = PeftModel.from_pretrained(base, tmp_path / "adapter")
    assert loss(task, adapted) == pytest.approx(lora[-1]["eval_loss"], abs=1e-5)


def test_gpt2s_tied_embedding_travels_once_and_stays_tied_on_the_client(
    coordinator, tmp_path: Path
) -> None:
    options = {"arch": "gpt2", "n_layer": "1", "n_embd": "32", "n_head": "2", "block_size": "16"}
    running = coordinator(
        task=hf_task(options), rounds=1, min_clients=2, round_config=ROUND, run_dir=tmp_path
    )
    clients = [ClientThread(client_config(running.address, p), hf_task(options, p)) for p in (0, 1)]
    assert [c.join(120) for c in clients] == [0, 0]
    running.wait_done(30)

    manifest = running.coordinator.model.manifest
    assert [(t.name, t.source) for t in manifest.ties] == [
        ("lm_head.weight", "transformer.wte.weight")
    ]
    assert "lm_head.weight" not in manifest.names
    state = hf_task(options).build_model().state_dict()
    every_tensor = sum(t.numel() * t.element_size() for t in state.values())
    embedding = state["transformer.wte.weight"]
    assert manifest.total_bytes == every_tensor - embedding.numel() * embedding.element_size()
    record = json.loads((tmp_path / "metrics.jsonl").read_text())
    assert record["bytes_down"] == 2 * manifest.total_bytes
    assert record["bytes_up"] == 2 * manifest.total_bytes
    trained = clients[0].client.model.state_dict()
    assert trained["lm_head.weight"].data_ptr() == trained["transformer.wte.weight"].data_ptr()
    assert clients[0].client.layout == manifest
