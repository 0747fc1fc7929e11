"""charlm-lora: the base comes from a charlm checkpoint and stays frozen; adapters train."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from fedstream.common.checkpoint import save_checkpoint
from fedstream.tasks import TaskError, exchanged_names, load_task

SMALL = {"n_layer": "1", "n_embd": "32", "n_head": "2", "block_size": "16"}


def charlm_checkpoint(path: Path, seed: int, task: str = "charlm") -> dict[str, torch.Tensor]:
    """A round checkpoint as a charlm run writes it (model, strategy state, metadata)."""
    state = load_task("charlm", SMALL, seed).build_model().state_dict()
    save_checkpoint(path, {**state, "strategy/m": torch.zeros(2)}, {"task": task, "round": "3"})
    return state


def test_base_checkpoint_is_loaded_and_training_moves_only_adapters(tmp_path: Path) -> None:
    base = charlm_checkpoint(tmp_path / "round_00003.safetensors", seed=5)
    task = load_task("charlm-lora", {**SMALL, "base": str(tmp_path / "round_00003.safetensors")})
    model = task.build_model()
    state = model.state_dict()
    torch.testing.assert_close(state["h.0.attn.c_attn.base.weight"], base["h.0.attn.c_attn.weight"])
    torch.testing.assert_close(state["wte.weight"], base["wte.weight"])
    # B starts at zero: the adapted model computes exactly what the base model does
    plain = load_task("charlm", SMALL, 5).build_model()
    tokens = torch.randint(0, 256, (2, 16))
    torch.testing.assert_close(model(tokens), plain(tokens))

    names = exchanged_names(task, model)
    assert names and all(".lora_" in name for name in names)
    assert len(names) == 2 * 4  # A and B on four projections of the one block
    before = {k: v.clone() for k, v in state.items()}
    task.load_data(0, 2)
    task.train(model, {"local_steps": 2, "batch_size": 4})
    after = model.state_dict()
    moved = {k for k in after if not torch.equal(after[k], before[k])}
    assert moved and moved <= set(names)


def test_without_a_base_the_seeded_random_base_is_the_same_everywhere() -> None:
    first = load_task("charlm-lora", SMALL, seed=3).build_model().state_dict()
    second = load_task("charlm-lora", SMALL, seed=3).build_model().state_dict()
    assert all(torch.equal(first[k], second[k]) for k in first)


def test_full_charlm_moves_over_20x_the_bytes_of_its_adapters() -> None:
    task = load_task("charlm-lora")
    model = task.build_model()
    state = model.state_dict()
    adapters = sum(state[k].numel() * state[k].element_size() for k in exchanged_names(task, model))
    full = load_task("charlm").build_model().state_dict()
    assert sum(t.numel() * t.element_size() for t in full.values()) >= 20 * adapters


def test_a_base_that_does_not_fit_is_refused(tmp_path: Path) -> None:
    charlm_checkpoint(tmp_path / "a.safetensors", seed=0)
    wider = {**SMALL, "n_embd": "64", "base": str(tmp_path / "a.safetensors")}
    with pytest.raises(TaskError, match="does not fit"):
        load_task("charlm-lora", wider).build_model()
    charlm_checkpoint(tmp_path / "b.safetensors", seed=0, task="digits")
    with pytest.raises(TaskError, match="'digits' checkpoint"):
        load_task("charlm-lora", {**SMALL, "base": str(tmp_path / "b.safetensors")}).build_model()
    with pytest.raises(TaskError, match="base"):
        load_task("charlm-lora", {**SMALL, "base": str(tmp_path / "none")}).build_model()
