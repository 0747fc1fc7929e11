"""`fedstream export` of an hf-causal-lm run: the directory it writes reloads with
transformers' `from_pretrained` (merged) or PEFT's (adapters on their base) and scores
the loss of the run's checkpoint."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from fedstream.cli import main
from fedstream.common.wire.manifest import Manifest
from fedstream.server.run_store import RunIdentity, RunStore
from fedstream.tasks import Task, exchanged_names, load_task

pytest.importorskip("transformers")
pytest.importorskip("peft")

from peft import AutoPeftModelForCausalLM, PeftModel  # noqa: E402
from transformers import AutoModelForCausalLM, AutoTokenizer  # noqa: E402

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


def checkpointed_run(tmp_path: Path, options: dict[str, str]) -> tuple[Task, torch.nn.Module]:
    """A run directory whose round-1 checkpoint holds what travels (a tie once), moved
    away from the seed's model; the task and that model."""
    task = load_task("hf-causal-lm", options, 0)
    model = task.build_model()
    names = exchanged_names(task, model)
    state = model.state_dict()
    generator = torch.Generator().manual_seed(2)
    with torch.no_grad():
        for name in names:
            state[name].add_(0.05 * torch.randn(state[name].shape, generator=generator))
    travelled = {name: state[name] for name in Manifest.of_model(state, names).names}
    store = RunStore(tmp_path / "run", RunIdentity("hf-causal-lm", options, 0, "fedavg"))
    store.save(1, travelled, {}, [{"round": 1}])
    store.close()
    return task, model


@pytest.mark.parametrize("out", ["model.safetensors", "model.pt", "model-dir"])
def test_the_default_gpt2_with_tied_embeddings_exports_in_every_format(
    tmp_path: Path, out: str
) -> None:
    """Issue 19: `tensor 'lm_head.weight' ... is missing` (the tie travels once)."""
    task, model = checkpointed_run(tmp_path, {})
    assert main(["export", str(tmp_path / "run"), "--out", str(tmp_path / out)]) == 0
    if out == "model-dir":
        reloaded = AutoModelForCausalLM.from_pretrained(tmp_path / out)
        tokenizer = AutoTokenizer.from_pretrained(tmp_path / out)
        assert tokenizer("déjà vu")["input_ids"] == list("déjà vu".encode())
        assert loss(task, reloaded) == pytest.approx(loss(task, model), abs=1e-5)
        return
    state = load_file(tmp_path / out) if out.endswith("safetensors") else torch.load(tmp_path / out)
    fresh = task.build_model()
    fresh.load_state_dict(state, strict=True)
    assert fresh.state_dict()["lm_head.weight"].data_ptr() == (
        fresh.state_dict()["transformer.wte.weight"].data_ptr()
    )
    assert loss(task, fresh) == pytest.approx(loss(task, model), abs=1e-6)


def test_an_adapter_directory_names_the_base_the_user_chose_and_survives_a_move(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Issue 19: the adapter config held an absolute path; --base-model chooses what it
    says, here a path relative to where the moved directory is loaded from."""
    task, model = checkpointed_run(tmp_path, OPTIONS)
    out = tmp_path / "export" / "adapter"
    assert main(["export", str(tmp_path / "run"), "--out", str(out), "--base-model",
                 "adapter/base"]) == 0  # fmt: skip
    config = json.loads((out / "adapter_config.json").read_text())
    assert config["base_model_name_or_path"] == "adapter/base"
    moved = tmp_path / "elsewhere"
    (tmp_path / "export").rename(moved)
    monkeypatch.chdir(moved)
    adapted = AutoPeftModelForCausalLM.from_pretrained("adapter")
    assert loss(task, adapted) == pytest.approx(loss(task, model), abs=1e-5)
    assert AutoTokenizer.from_pretrained("adapter")("ok")["input_ids"] == list(b"ok")


def test_a_task_without_a_base_model_refuses_the_flag(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    store = RunStore(tmp_path / "run", RunIdentity("charlm", {}, 0, "fedavg"))
    model = load_task("charlm", {}, 0).build_model()
    store.save(1, dict(model.state_dict()), {}, [{"round": 1}])
    store.close()
    code = main(["export", str(tmp_path / "run"), "--out", str(tmp_path / "d"),
                 "--base-model", "x"])  # fmt: skip
    assert code == 2
    assert "does not name a base model" in capsys.readouterr().err
