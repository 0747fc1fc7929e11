"""charlm's `keep_optimizer`: the inner AdamW's state outlives a round on a client (DiLoCo's
inner optimiser, docs/low-communication.md), and a restarted client starts it afresh."""

from __future__ import annotations

from collections.abc import Mapping

import torch
import torch.nn.functional as F
from torch import nn

from fedstream.tasks import ConfigScalar, load_task
from fedstream.tasks.charlm import CharLMTask

SMALL = {"n_layer": "1", "n_head": "2", "n_embd": "16", "block_size": "16"}
ROUND: dict[str, ConfigScalar] = {"local_steps": 3, "batch_size": 4, "lr": 1e-2}


def task(keep: bool) -> CharLMTask:
    loaded = load_task("charlm", {**SMALL, "keep_optimizer": "1" if keep else "0"}, seed=0)
    assert isinstance(loaded, CharLMTask)
    loaded.load_data(0, 4)
    return loaded


def next_round(task: CharLMTask, weights: nn.Module, round_number: int) -> nn.Module:
    """What a client does each round: the global weights into a model, then train."""
    model = task.build_model()
    model.load_state_dict(weights.state_dict())
    task.train(model, {**ROUND, "round": round_number})
    return model


def uninterrupted(task: CharLMTask, rounds: int) -> nn.Module:
    """The same batches through one AdamW that never stops: what a kept state must equal."""
    model = task.build_model()
    optimizer = torch.optim.AdamW(model.parameters(), lr=float(ROUND["lr"]))
    for round_number in range(1, rounds + 1):
        config: Mapping[str, ConfigScalar] = {**ROUND, "round": round_number}
        for x, y in task._batches(config):
            loss = F.cross_entropy(model(x).flatten(0, 1), y.flatten())
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            nn.utils.clip_grad_norm_(model.parameters(), 1.0)
            optimizer.step()
    return model


def same(a: nn.Module, b: nn.Module) -> bool:
    return all(
        torch.equal(x, y)
        for x, y in zip(a.state_dict().values(), b.state_dict().values(), strict=True)
    )


def test_the_inner_adamw_state_survives_a_round() -> None:
    kept = task(keep=True)
    model = kept.build_model()
    for round_number in (1, 2):
        model = next_round(kept, model, round_number)
    names = {name for name, _ in model.named_parameters()}
    assert set(kept.inner_state) == names
    assert all(float(state["step"]) == 6 for state in kept.inner_state.values())
    assert same(model, uninterrupted(kept, rounds=2))
    fresh = task(keep=False)
    other = fresh.build_model()
    for round_number in (1, 2):
        other = next_round(fresh, other, round_number)
    assert fresh.inner_state == {}
    assert not same(model, other)  # a fresh AdamW each round takes other steps


def test_a_restarted_client_starts_its_adamw_afresh() -> None:
    before = task(keep=True)
    start = next_round(before, before.build_model(), 1)
    restarted = task(keep=True)  # a new client process builds its task anew
    assert restarted.inner_state == {}
    after_restart = next_round(restarted, start, 2)
    assert all(float(state["step"]) == 3 for state in restarted.inner_state.values())
    never_kept = task(keep=False)
    assert same(after_restart, next_round(never_kept, start, 2))


def test_keep_optimizer_is_a_site_option() -> None:
    assert "keep_optimizer" not in task(keep=True).agreed_options()
    assert task(keep=True).agreed_options() == task(keep=False).agreed_options()
