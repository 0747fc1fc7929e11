"""`fedstream export` from a run directory written by the run store: the task's whole model,
its non-exchanged tensors restored, adapters merged when asked, strategy state dropped."""

from __future__ import annotations

import textwrap
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from fedstream.cli import main
from fedstream.server.run_store import RunIdentity, RunStore
from fedstream.tasks import load_task

TASK_MODULE = '''
import torch
from torch import nn

from fedstream.tasks import Task


class Adapted(nn.Module):
    """A frozen linear layer, batch norm, and a trainable additive adapter on the weight."""

    def __init__(self) -> None:
        super().__init__()
        self.base = nn.Linear(3, 3)
        self.norm = nn.BatchNorm1d(3)
        self.delta = nn.Parameter(torch.zeros(3, 3))

    def forward(self, x):
        return self.norm(x @ (self.base.weight + self.delta).T + self.base.bias)


class Plain(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.base = nn.Linear(3, 3)
        self.norm = nn.BatchNorm1d(3)


class AdapterTask(Task):
    """Only `delta` travels; the base and the batch norm are the task's own."""

    def build_model(self):
        torch.manual_seed(self.seed)
        return Adapted()

    def load_data(self, partition, num_partitions):
        pass

    def train(self, model, config):
        raise NotImplementedError

    def exchanged_parameters(self, model):
        return ["delta"]

    def merge_adapters(self, model):
        plain = Plain()
        with torch.no_grad():
            plain.base.weight.copy_(model.base.weight + model.delta)
            plain.base.bias.copy_(model.base.bias)
        plain.norm.load_state_dict(model.norm.state_dict())
        return plain
'''


@pytest.fixture
def run_dir(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """A run of `adaptertask:AdapterTask` (seed 3) whose round 2 set delta to 0.5."""
    (tmp_path / "adaptertask.py").write_text(textwrap.dedent(TASK_MODULE))
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.chdir(tmp_path)
    store = RunStore(tmp_path / "run", RunIdentity("adaptertask:AdapterTask", {}, 3, "fedadam"))
    moments = {"m/delta": torch.ones(3, 3)}
    store.save(0, {"delta": torch.zeros(3, 3)}, moments, [])
    store.save(2, {"delta": torch.full((3, 3), 0.5)}, moments, [{"round": 2}])
    store.close()
    return tmp_path / "run"


def test_export_restores_what_never_travelled_and_drops_the_strategy(run_dir: Path) -> None:
    assert main(["export", "run", "--out", "model.safetensors"]) == 0
    state = load_file("model.safetensors")
    assert not any(name.startswith("strategy/") for name in state)
    model = load_task("adaptertask:AdapterTask", seed=3).build_model()
    built = {k: v.clone() for k, v in model.state_dict().items()}
    model.load_state_dict(state, strict=True)
    assert torch.equal(state["delta"], torch.full((3, 3), 0.5))
    assert torch.equal(state["base.weight"], built["base.weight"])  # the seed's, not zeros
    assert state["norm.num_batches_tracked"].dtype == torch.int64

    assert main(["export", "run", "--round", "0", "--out", "first.pt"]) == 0
    assert torch.equal(torch.load("first.pt")["delta"], torch.zeros(3, 3))


def test_merge_adapters_gives_the_tasks_merged_model(run_dir: Path) -> None:
    assert main(["export", "run", "--out", "merged.pt", "--merge-adapters"]) == 0
    state = torch.load("merged.pt")
    assert "delta" not in state
    built = load_task("adaptertask:AdapterTask", seed=3).build_model().state_dict()
    assert torch.allclose(state["base.weight"], built["base.weight"] + 0.5)


def test_refusals_are_one_line(run_dir: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["export", "run", "--out", "model-dir"]) == 2
    err = capsys.readouterr().err
    assert "has no pretrained directory format: export to a file ending in .pt" in err
    assert main(["export", "run", "--round", "1", "--out", "x.pt"]) == 2
    assert "has no checkpoint of round 1 (it has 0, 2)" in capsys.readouterr().err
    assert main(["export", "run"]) == 2
    assert "--out PATH is required" in capsys.readouterr().err
