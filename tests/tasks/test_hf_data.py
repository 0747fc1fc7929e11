"""A site's data files for hf-causal-lm: formats, loss masks, held-out splits, training
options, and one-line errors for files that cannot be read."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from fedstream.tasks import TaskError, load_task

pytest.importorskip("transformers")
pytest.importorskip("peft")
datasets = pytest.importorskip("datasets")

from fedstream.tasks.hf_causal_lm import HFCausalLMTask  # noqa: E402
from fedstream.tasks.hf_data import IGNORE  # noqa: E402
from fedstream.tasks.hf_training import learning_rate  # noqa: E402

from .llm_fixtures import prompt_records, write_jsonl  # noqa: E402

TINY = {"arch": "llama", "n_layer": "1", "n_embd": "32", "n_head": "2", "block_size": "32"}
ROUND = {"local_steps": 3, "batch_size": 4, "lr": 1e-2}


def hf(options: dict[str, str]) -> HFCausalLMTask:
    task = load_task("hf-causal-lm", options)
    assert isinstance(task, HFCausalLMTask)
    return task


def trains(task: HFCausalLMTask) -> tuple[float, float]:
    """(held-out loss before, after) three short rounds."""
    task.load_data(0, 1)
    model = task.build_model()
    before = task.evaluate(model).metrics["loss"]
    for round_number in (1, 2, 3):
        result = task.train(model, {**ROUND, "round": round_number})
        assert result.metrics["tokens_per_s"] > 0
    return before, task.evaluate(model).metrics["loss"]


def test_prompt_response_rows_carry_loss_on_the_response_only(tmp_path: Path) -> None:
    data = write_jsonl(tmp_path / "qa.jsonl", [{"prompt": "Q? ", "response": "yes"}] * 4)
    task = hf({**TINY, "data": str(data), "eval_fraction": "0.25"})
    task.load_data(0, 1)
    rows = task._rows
    assert rows is not None and len(rows) == 3 and task._eval_rows is not None
    row_targets = rows.targets[0].tolist()
    assert bytes(t for t in row_targets if t != IGNORE) == b"yes"  # byte tokens
    assert row_targets[:3] == [IGNORE] * 3 and row_targets[6:] == [IGNORE] * 27  # padding
    assert rows.mask[0].tolist() == [1] * 6 + [0] * 27


def test_a_chat_file_trains_with_loss_on_the_assistants_turns(
    model_dir: Path, tmp_path: Path
) -> None:
    conversations = [
        {
            "messages": [
                {"role": "user", "content": r["prompt"]},
                {"role": "assistant", "content": r["response"]},
            ]
        }  # fmt: skip
        for r in prompt_records(0, 3)
    ]
    data = write_jsonl(tmp_path / "chat.jsonl", conversations)
    task = hf({"model_dir": str(model_dir), "lora": "1", "data": str(data), "max_seq_len": "64"})
    before, after = trains(task)
    assert after < before - 0.1
    assert task._rows is not None
    first = task._rows.targets[0]
    text = task.tokenizer.decode(first[first != IGNORE])
    assert isinstance(text, str)
    assert text.startswith(conversations[0]["messages"][1]["content"][:20])
    assert "Explain" not in text  # the user's turn carries no loss


def test_a_parquet_file_and_a_saved_dataset_train(tmp_path: Path) -> None:
    records = datasets.Dataset.from_list(prompt_records(1, 3))
    records.to_parquet(str(tmp_path / "site.parquet"))
    records.save_to_disk(str(tmp_path / "saved"))
    for path in (tmp_path / "site.parquet", tmp_path / "saved"):
        before, after = trains(hf({**TINY, "data": str(path)}))
        assert after < before - 0.1


def test_plain_text_packs_and_csv_reads(tmp_path: Path) -> None:
    (tmp_path / "notes.txt").write_text("".join(f"line {i} of the notes\n" for i in range(60)))
    task = hf({**TINY, "data": str(tmp_path / "notes.txt")})
    task.load_data(0, 1)
    assert task._rows is not None and bool((task._rows.mask[:-1] == 1).all())  # packed
    (tmp_path / "qa.csv").write_text("prompt,response\n" + "a,b\n" * 10)
    task = hf({**TINY, "data": str(tmp_path / "qa.csv")})
    task.load_data(0, 1)
    assert task._rows is not None and len(task._rows) == 9


@pytest.mark.parametrize(
    ("name", "content", "message"),
    [
        ("gone.jsonl", None, r"data .*gone.jsonl: no such file"),
        (
            "bad.jsonl",
            '{"prompt": "a", "response": "b"}\n{"prompt": oops}\n',
            r"bad.jsonl: record 2 \(line 2\) is not JSON",
        ),
        (
            "short.jsonl",
            '{"prompt": "a", "response": "b"}\n{"prompt": "c"}\n',
            r"short.jsonl: record 2 has no field 'response'",
        ),
        (
            "list.jsonl",
            '{"prompt": "a", "response": "b"}\n[1, 2]\n',
            r"list.jsonl: record 2 \(line 2\) is not a JSON object",
        ),
        (
            "other.jsonl",
            '{"question": "a"}\n{"question": "b"}\n',
            r"other.jsonl: record 1 has none of the fields 'messages'",
        ),
        (
            "chat.jsonl",
            '{"messages": [{"role": "user", "content": "hi"}]}\n' * 2,
            r"chat.jsonl: chat messages need a tokenizer with a chat template",
        ),
        ("data.xml", "<a/>", r"data.xml: use a file ending in .jsonl"),
        ("broken.csv", 'prompt,response\na,b\n"c,d\n', r"broken.csv: .*EOF inside string"),
    ],  # fmt: skip
)
def test_bad_data_files_are_one_line_errors(
    tmp_path: Path, name: str, content: str | None, message: str
) -> None:
    if content is not None:
        (tmp_path / name).write_text(content)
    with pytest.raises(TaskError, match=message) as caught:
        hf({**TINY, "data": str(tmp_path / name)}).load_data(0, 1)
    assert "\n" not in str(caught.value)


def test_the_schedule_warms_up_and_decays_across_rounds() -> None:
    config = {"lr": 1.0, "warmup_steps": 4, "total_rounds": 3, "local_steps": 10}
    rates = [learning_rate(config, step, 0.0) for step in range(30)]
    assert rates[:4] == [0.25, 0.5, 0.75, 1.0]
    assert all(a >= b for a, b in zip(rates[4:], rates[5:], strict=False))
    assert rates[-1] == pytest.approx(0.1, abs=0.01)
    assert learning_rate({"lr": 2.0}, 1000, 0.0) == 2.0


@pytest.mark.slow
def test_options_bf16_accumulation_checkpointing_and_a_kept_optimizer(tmp_path: Path) -> None:
    data = write_jsonl(tmp_path / "qa.jsonl", prompt_records(2, 3))
    options = {**TINY, "data": str(data), "lora": "1", "precision": "bf16", "grad_accum": "2",
               "grad_checkpointing": "1", "keep_optimizer": "1"}  # fmt: skip
    task = hf(options)
    before, after = trains(task)
    assert after < before
    fresh = task.build_model()  # a new model object: the moments follow the names
    names = {n for n, p in fresh.named_parameters() if p.requires_grad}
    assert set(task.trainer.saved) == names
    assert all(float(s["step"]) == 9 for s in task.trainer.saved.values())
    task.train(fresh, {**ROUND, "round": 4})
    assert all(float(s["step"]) == 12 for s in task.trainer.saved.values())
    with pytest.raises(TaskError, match="precision must be bf16, fp16 or fp32"):
        hf({**TINY, "precision": "fp8"})


def test_the_held_out_split_is_the_same_on_every_load(tmp_path: Path) -> None:
    data = write_jsonl(tmp_path / "qa.jsonl", prompt_records(0, 3))
    first, second = hf({**TINY, "data": str(data)}), hf({**TINY, "data": str(data)})
    for task in (first, second):
        task.load_data(0, 1)
    assert first._eval_rows is not None and second._eval_rows is not None
    assert torch.equal(first._eval_rows.ids, second._eval_rows.ids)
    result = first.evaluate_local(first.build_model())
    assert result is not None and result.metrics["perplexity"] > 1
    assert json.dumps(result.metrics)
