"""`fedstream export` of an hf-causal-lm run: the directory it writes reloads with
transformers' `from_pretrained` (merged) or PEFT's (adapters on their base) and scores
the loss of the run's checkpoint."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from fedstream.cli import main
from fedstream.common.wire.manifest import Manifest
from fedstream.server.run_store import RunIdentity, RunStore
from fedstream.tasks import Task, exchanged_names, load_task

pytest.importorskip("transformers")
pytest.importorskip("peft")

from peft import PeftModel  # noqa: E402
from transformers import AutoModelForCausalLM  # noqa: E402

OPTIONS = {"arch": "gpt2", "lora": "1"}


def loss(task: Task, model: torch.nn.Module) -> float:
    result = task.evaluate(model)
    assert result is not None
    return result.metrics["loss"]


def test_export_writes_a_merged_model_and_an_adapter_directory(tmp_path: Path) -> None:
    """A round-1 checkpoint whose adapters moved (random values, as training would):
    the merged export and the adapter export both score what the run's model scores."""
    task = load_task("hf-causal-lm", OPTIONS, 0)
    task.load_data(0, 8)
    model = task.build_model()
    names = exchanged_names(task, model)
    generator = torch.Generator().manual_seed(1)
    state = model.state_dict()
    with torch.no_grad():
        for name in names:
            state[name].add_(0.05 * torch.randn(state[name].shape, generator=generator))
    exchanged = {name: state[name] for name in Manifest.of_model(state, names).names}
    store = RunStore(tmp_path / "run", RunIdentity("hf-causal-lm", OPTIONS, 0, "fedavg"))
    store.save(1, exchanged, {}, [{"round": 1}])
    store.close()
    expected = loss(task, model)

    assert main(["export", str(tmp_path / "run"), "--out", str(tmp_path / "merged"),
                 "--merge-adapters"]) == 0  # fmt: skip
    merged = AutoModelForCausalLM.from_pretrained(tmp_path / "merged")
    assert not any("lora" in name for name in merged.state_dict())
    assert loss(task, merged) == pytest.approx(expected, abs=1e-4)

    assert main(["export", str(tmp_path / "run"), "--out", str(tmp_path / "adapter")]) == 0
    base = AutoModelForCausalLM.from_pretrained(tmp_path / "adapter" / "base")
    adapted = PeftModel.from_pretrained(base, tmp_path / "adapter")
    assert loss(task, adapted) == pytest.approx(expected, abs=1e-5)
