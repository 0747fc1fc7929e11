"""A site's own data for `hf-causal-lm` (`data=PATH`): records read with Hugging Face
`datasets` (offline, in memory), formatted, tokenized and cut into rows of a fixed length.

Files: `.jsonl`/`.json`, `.parquet`, `.csv`, `.txt` (one record a line) or a directory
written by `Dataset.save_to_disk`. Formats (`data_format`, else chosen by the columns):

    chat     `messages_field` (messages): a list of {role, content} rendered by the
             tokenizer's chat template; the loss is on the assistant's turns only
    prompt   `prompt_field` (prompt) and `response_field` (response): the loss is on the
             response (and the end-of-text token) only
    text     `text_field` (text): the loss is on every token

A row is `max_seq_len + 1` tokens: inputs are its first `max_seq_len`, targets its last.
Packed (`pack=1`, the default for text) rows run records end to end; padded rows hold one
record each, cut at the row's length. Targets that carry no loss (prompt, padding) are
IGNORE. Each site holds out `eval_fraction` of its records, chosen by the run's seed.
"""

from __future__ import annotations

import contextlib
import json
import logging
import tempfile
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from transformers import PreTrainedTokenizerBase

from fedstream.tasks.hf_tokens import pad_id
from fedstream.tasks.task import TaskError

try:
    import datasets
except ImportError as exc:
    raise ImportError(f"data=PATH needs datasets: pip install 'fedstream[hf]' ({exc})") from exc

IGNORE = -100
"""The target of a position without loss (torch's cross_entropy ignore_index)."""
BUILDERS = {".jsonl": "json", ".json": "json", ".parquet": "parquet", ".csv": "csv", ".txt": "text"}
FORMATS = ("text", "prompt", "chat")


@dataclass
class DataOptions:
    """How a site's records become rows (see the module docstring)."""

    max_seq_len: int
    data_format: str | None = None
    text_field: str = "text"
    prompt_field: str = "prompt"
    response_field: str = "response"
    messages_field: str = "messages"
    pack: bool | None = None
    eval_fraction: float = 0.1


@dataclass
class Rows:
    """Token rows, (N, max_seq_len + 1) each: ids, targets (IGNORE where no loss) and the
    attention mask (0 on padding)."""

    ids: torch.Tensor
    targets: torch.Tensor
    mask: torch.Tensor

    def __len__(self) -> int:
        return len(self.ids)

    def select(self, index: torch.Tensor) -> Rows:
        return Rows(self.ids[index], self.targets[index], self.mask[index])

    def batch(self, index: torch.Tensor, device: torch.device) -> Batch:
        """Inputs, next-token targets and attention mask of rows `index`."""
        ids, targets, mask = (t[index].to(device) for t in (self.ids, self.targets, self.mask))
        return ids[:, :-1], targets[:, 1:], mask[:, :-1]


Batch = tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]
"""(inputs, targets, attention mask or None when nothing is padded), (B, T) each."""


@contextlib.contextmanager
def _quiet() -> Iterator[None]:
    """datasets logs a failed file at ERROR before raising; the TaskError says it once."""
    logger = logging.getLogger("datasets")
    level = logger.level
    logger.setLevel(logging.CRITICAL)
    try:
        yield
    finally:
        logger.setLevel(level)


def read_records(path: Path) -> datasets.Dataset:
    """The records of `path`, in memory; TaskError naming the file (and the record, where
    it can be found) when it is missing or malformed."""
    if path.is_dir():
        try:
            loaded = datasets.load_from_disk(str(path), keep_in_memory=True)
        except (OSError, ValueError, FileNotFoundError) as exc:
            raise TaskError(f"data {path}: not a save_to_disk directory: {_first(exc)}") from None
        if isinstance(loaded, datasets.DatasetDict):
            if "train" not in loaded and len(loaded) != 1:
                raise TaskError(f"data {path}: splits {sorted(loaded)}, none named 'train'")
            loaded = loaded["train"] if "train" in loaded else next(iter(loaded.values()))
        return loaded
    builder = BUILDERS.get(path.suffix.lower())
    if builder is None:
        kinds = ", ".join(BUILDERS)
        raise TaskError(f"data {path}: use a file ending in {kinds}, or a save_to_disk directory")
    if not path.is_file():
        raise TaskError(f"data {path}: no such file")
    with tempfile.TemporaryDirectory(prefix="fedstream-data-") as cache, _quiet():
        datasets.disable_progress_bars()
        try:
            return datasets.load_dataset(
                builder, data_files=str(path), split="train", cache_dir=cache, keep_in_memory=True
            )
        except Exception as exc:  # noqa: BLE001 (datasets wraps each reader's own errors)
            raise TaskError(f"data {path}: {_diagnose(path, exc)}") from None


def _first(exc: BaseException) -> str:
    text = str(exc).strip()
    return text.splitlines()[0] if text else type(exc).__name__


def _diagnose(path: Path, exc: Exception) -> str:
    """Why a file did not load: the first record that is not a JSON object, for JSON;
    else the reader's own first line."""
    cause = exc.__cause__ or exc
    if path.suffix.lower() in (".jsonl", ".json"):
        try:
            lines = path.read_text(encoding="utf-8").splitlines()
        except (OSError, UnicodeDecodeError) as read_error:
            return _first(read_error)
        with contextlib.suppress(json.JSONDecodeError):
            whole = json.loads("\n".join(lines))
            if not isinstance(whole, list | dict):
                return "not a JSON array or object"
        for number, line in enumerate(lines, 1):
            if not line.strip():
                continue
            try:
                record = json.loads(line)
            except json.JSONDecodeError as bad:
                return f"record {number} (line {number}) is not JSON: {bad.msg}"
            if not isinstance(record, dict):
                return f"record {number} (line {number}) is not a JSON object"
    return _first(cause)


def choose_format(columns: Sequence[str], options: DataOptions, path: Path) -> str:
    """The format asked for, or the first whose fields the records have."""
    fields = {
        "chat": (options.messages_field,),
        "prompt": (options.prompt_field, options.response_field),
        "text": (options.text_field,),
    }
    if options.data_format is not None:
        if options.data_format not in FORMATS:
            raise TaskError(f"data_format must be one of {', '.join(FORMATS)}")
        missing = [name for name in fields[options.data_format] if name not in columns]
        if missing:
            raise TaskError(
                f"data {path}: record 1 has no field {missing[0]!r} (fields: {', '.join(columns)})"
            )
        return options.data_format
    for name in ("chat", "prompt", "text"):
        if all(field in columns for field in fields[name]):
            return name
    raise TaskError(
        f"data {path}: record 1 has none of the fields {options.messages_field!r}, "
        f"{options.prompt_field!r} + {options.response_field!r} or {options.text_field!r} "
        f"(fields: {', '.join(columns)})"
    )


def _texts(records: datasets.Dataset, name: str, path: Path) -> list[str]:
    """Column `name` as strings; TaskError naming the first record without one."""
    values = list(records[name])
    for number, value in enumerate(values, 1):
        if not isinstance(value, str):
            what = "has no field" if value is None else "has a non-text"
            raise TaskError(f"data {path}: record {number} {what} {name!r}")
    return values


def tokenize(
    records: datasets.Dataset, tokenizer: PreTrainedTokenizerBase, options: DataOptions, path: Path
) -> list[tuple[list[int], list[int]]]:
    """Each record as (token ids, targets), targets IGNORE where there is no loss."""
    kind = choose_format(records.column_names, options, path)
    eos = [tokenizer.eos_token_id] if isinstance(tokenizer.eos_token_id, int) else []
    if kind == "text":
        texts = _texts(records, options.text_field, path)
        out = []
        for ids in tokenizer(texts)["input_ids"]:
            out.append((ids + eos, ids + eos))
        return out
    if kind == "prompt":
        prompts = tokenizer(_texts(records, options.prompt_field, path))["input_ids"]
        responses = tokenizer(
            _texts(records, options.response_field, path), add_special_tokens=False
        )["input_ids"]
        return [
            (p + r + eos, [IGNORE] * len(p) + r + eos)
            for p, r in zip(prompts, responses, strict=True)
        ]
    return [
        _chat(tokenizer, messages, number, path)
        for number, messages in enumerate(records[options.messages_field], 1)
    ]


def _chat(
    tokenizer: PreTrainedTokenizerBase, messages: Any, number: int, path: Path
) -> tuple[list[int], list[int]]:
    """A conversation rendered by the chat template, cut where each assistant turn starts
    and ends (rendering its prefixes), so only the assistant's tokens carry loss."""
    if not getattr(tokenizer, "chat_template", None):
        raise TaskError(f"data {path}: chat messages need a tokenizer with a chat template")
    if not isinstance(messages, list) or not all(
        isinstance(m, dict) and isinstance(m.get("role"), str) and isinstance(m.get("content"), str)
        for m in messages
    ):
        raise TaskError(
            f"data {path}: record {number}: messages must be a list of {{role, content}} texts"
        )

    def render(turns: list[dict[str, str]], prompt: bool) -> str:
        text = tokenizer.apply_chat_template(turns, tokenize=False, add_generation_prompt=prompt)
        return str(text)

    full = render(messages, False)
    cuts = [0]
    for i, message in enumerate(messages):
        if message["role"] == "assistant":
            start, end = len(render(messages[:i], True)), len(render(messages[: i + 1], False))
            if not (cuts[-1] <= start <= end <= len(full)):
                raise TaskError(
                    f"data {path}: record {number}: the chat template does not render "
                    "a conversation's turns as prefixes of it"
                )
            cuts += [start, end]
    cuts.append(len(full))
    ids: list[int] = []
    targets: list[int] = []
    for k, (a, b) in enumerate(zip(cuts, cuts[1:], strict=False)):
        piece = tokenizer(full[a:b], add_special_tokens=False)["input_ids"] if b > a else []
        ids += piece
        targets += piece if k % 2 else [IGNORE] * len(piece)
    return ids, targets


def to_rows(examples: list[tuple[list[int], list[int]]], length: int, pack: bool, pad: int) -> Rows:
    """Rows of `length` tokens: packed end to end (consecutive rows share one token, so
    every token is a target once) or one record each, padded; rows without a target
    are dropped."""
    if pack:
        ids = [token for record, _ in examples for token in record]
        targets = [token for _, record in examples for token in record]
        pieces = [
            (ids[s : s + length], targets[s : s + length])
            for s in range(0, max(len(ids) - 1, 1), length - 1)
        ]
    else:
        pieces = [(record[:length], target[:length]) for record, target in examples]
    rows = [(i, t) for i, t in pieces if any(x != IGNORE for x in t[1:])]
    out = Rows(
        torch.full((len(rows), length), pad, dtype=torch.long),
        torch.full((len(rows), length), IGNORE, dtype=torch.long),
        torch.zeros((len(rows), length), dtype=torch.long),
    )
    for n, (ids_row, target_row) in enumerate(rows):
        out.ids[n, : len(ids_row)] = torch.tensor(ids_row)
        out.targets[n, : len(target_row)] = torch.tensor(target_row)
        out.mask[n, : len(ids_row)] = 1
    return out


def load_rows(
    path: Path, tokenizer: PreTrainedTokenizerBase, options: DataOptions, seed: int
) -> tuple[Rows, Rows | None]:
    """(training rows, held-out rows or None) of the site's file: `eval_fraction` of its
    records, drawn by `seed`, are held out (at least one when the fraction is above 0)."""
    records = read_records(path)
    if len(records) == 0:
        raise TaskError(f"data {path}: no records")
    examples = tokenize(records, tokenizer, options, path)
    kind = choose_format(records.column_names, options, path)
    pack = options.pack if options.pack is not None else kind == "text"
    order = torch.randperm(len(examples), generator=torch.Generator().manual_seed(seed)).tolist()
    held = round(len(examples) * options.eval_fraction) if options.eval_fraction > 0 else 0
    held = min(max(held, 1 if options.eval_fraction > 0 else 0), len(examples) - 1)
    if options.eval_fraction > 0 and held < 1:
        raise TaskError(f"data {path}: one record cannot be both trained on and held out")
    heldout, train = order[:held], order[held:]
    length, pad = options.max_seq_len + 1, pad_id(tokenizer)
    rows = to_rows([examples[i] for i in sorted(train)], length, pack, pad)
    if len(rows) == 0:
        raise TaskError(f"data {path}: no record has a token to train on")
    eval_rows = to_rows([examples[i] for i in sorted(heldout)], length, pack, pad) if held else None
    return rows, eval_rows if eval_rows is not None and len(eval_rows) else None
