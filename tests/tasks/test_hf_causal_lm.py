"""hf-causal-lm without a network: options, a local model directory, a site's own text,
and what LoRA leaves to exchange."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from fedstream.common.wire.manifest import Manifest
from fedstream.tasks import TaskError, exchanged_names, load_task

pytest.importorskip("transformers")
pytest.importorskip("peft")

from fedstream.tasks.hf_causal_lm import HFCausalLMTask  # noqa: E402

TINY = {"n_layer": "1", "n_embd": "32", "n_head": "2", "block_size": "16"}
ROUND = {"local_steps": 2, "batch_size": 4}


def hf(options: dict[str, str], seed: int = 0) -> HFCausalLMTask:
    task = load_task("hf-causal-lm", options, seed)
    assert isinstance(task, HFCausalLMTask)
    return task


def loss(task: HFCausalLMTask, model: torch.nn.Module) -> float:
    return task.evaluate(model).metrics["loss"]


def layout(options: dict[str, str]) -> Manifest:
    task = load_task("hf-causal-lm", options)
    model = task.build_model()
    return Manifest.of_model(model.state_dict(), exchanged_names(task, model))


@pytest.mark.parametrize("arch", ["gpt2", "llama"])
def test_default_sizes_are_a_few_hundred_thousand_parameters_and_lora_sends_20x_less(
    arch: str,
) -> None:
    model = load_task("hf-causal-lm", {"arch": arch}).build_model()
    assert 300_000 <= sum(p.numel() for p in model.parameters()) <= 500_000
    full, lora = layout({"arch": arch}), layout({"arch": arch, "lora": "1"})
    print(f"{arch}: {full.total_bytes:,} bytes full, {lora.total_bytes:,} with LoRA")
    assert full.total_bytes >= 20 * lora.total_bytes
    assert lora.names and all(".lora_" in name for name in lora.names)


def test_the_same_seed_builds_the_same_model_on_every_process() -> None:
    first = load_task("hf-causal-lm", {**TINY, "lora": "1"}, seed=3).build_model().state_dict()
    second = load_task("hf-causal-lm", {**TINY, "lora": "1"}, seed=3).build_model().state_dict()
    assert first.keys() == second.keys()
    assert all(torch.equal(first[k], second[k]) for k in first)


def test_a_model_directory_is_the_base_and_an_adapter_export_names_it(tmp_path: Path) -> None:
    task = hf({**TINY, "arch": "llama"}, seed=1)
    model = task.build_model()
    task.save_pretrained(model, tmp_path / "pretrained", merge_adapters=False)
    options = {"model_dir": str(tmp_path / "pretrained"), "block_size": "16"}
    loaded = hf(options)
    assert loss(loaded, loaded.build_model()) == loss(task, model)

    adapted = hf({**options, "lora": "1", "lora_targets": "q_proj"})
    peft_model = adapted.build_model()
    assert {n.split(".")[-4] for n in exchanged_names(adapted, peft_model)} == {"q_proj"}
    adapted.save_pretrained(peft_model, tmp_path / "adapter", merge_adapters=False)
    config = json.loads((tmp_path / "adapter" / "adapter_config.json").read_text())
    assert config["base_model_name_or_path"] == str((tmp_path / "pretrained").resolve())
    assert not (tmp_path / "adapter" / "base").exists()


def test_a_sites_own_text_file_trains_and_holds_out_its_tail(tmp_path: Path) -> None:
    text = tmp_path / "notes.txt"
    text.write_text("the quick brown fox jumps over the lazy dog. " * 40)
    task = hf({**TINY, "text": str(text)})
    task.load_data(5, 7)  # the partition does not choose anything of a site's own file
    model = task.build_model()
    before = loss(task, model)
    for round_ in range(3):
        task.train(model, {**ROUND, "round": round_, "lr": 1e-2})
    assert loss(task, model) < before


@pytest.mark.parametrize(
    ("options", "message"),
    [
        ({"arch": "banana"}, "arch must be gpt2 or llama, got 'banana'"),
        ({"n_embd": "wide"}, "n_embd='wide' is not an integer"),
        ({"lora_rank": "0"}, "lora_rank >= 1"),
        ({"init_range": "0"}, "init_range > 0"),
    ],
)
def test_bad_options_are_task_errors(options: dict[str, str], message: str) -> None:
    with pytest.raises(TaskError, match=message):
        load_task("hf-causal-lm", options)


def test_missing_files_are_task_errors(tmp_path: Path) -> None:
    with pytest.raises(TaskError, match="text .*missing.txt"):
        load_task("hf-causal-lm", {**TINY, "text": str(tmp_path / "missing.txt")}).load_data(0, 1)
    with pytest.raises(TaskError, match="model_dir"):
        load_task("hf-causal-lm", {"model_dir": str(tmp_path / "nothing")}).build_model()
