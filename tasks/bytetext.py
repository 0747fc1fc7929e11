"""Text as byte tokens, for the language-model tasks (`charlm`, `hf-causal-lm`).

Tokens are UTF-8 bytes (a vocabulary of 256), so no vocabulary or tokenizer has to be
agreed between processes or downloaded. The built-in text is CPython's pydoc topics
(`pydoc_data.topics.topics`: about 80 topics, 460 KB of reference text, shipped with every
CPython; it changes a little between Python versions). Topics sorted by name; every tenth
is held out for evaluation, and the rest are dealt to clients by topic, which makes the
clients' text differ in subject matter (non-IID).
"""

from __future__ import annotations

import functools
from collections.abc import Iterator, Mapping
from pydoc_data.topics import topics

import torch

from fedstream.tasks.task import ConfigScalar, TaskError
from fedstream.tasks.training import config_int, derive_seed

HELDOUT_EVERY = 10
"""Topic i (in name order) is held out when i % HELDOUT_EVERY == 0."""
EVAL_WINDOWS = 64
"""Evaluation scores this many windows, evenly spaced over the held-out text."""


@functools.cache
def split_topics() -> tuple[list[str], list[str]]:
    """(training topic texts, held-out topic texts), each in topic-name order."""
    texts = [topics[name] for name in sorted(topics)]
    train = [text for i, text in enumerate(texts) if i % HELDOUT_EVERY]
    heldout = [text for i, text in enumerate(texts) if not i % HELDOUT_EVERY]
    return train, heldout


def encode(texts: list[str]) -> torch.Tensor:
    """The texts joined by blank lines, as a 1-D int64 tensor of UTF-8 bytes."""
    return encode_bytes("\n\n".join(texts).encode("utf-8"))


def encode_bytes(data: bytes) -> torch.Tensor:
    """`data` as a 1-D int64 tensor of byte values."""
    return torch.frombuffer(bytearray(data), dtype=torch.uint8).long()


@functools.cache
def heldout_tokens() -> torch.Tensor:
    return encode(split_topics()[1])


def windows(
    tokens: torch.Tensor, starts: torch.Tensor, block_size: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """Inputs and next-token targets, (len(starts), block_size) each, from `tokens`."""
    chunks = tokens[starts.unsqueeze(1) + torch.arange(block_size + 1)]
    return chunks[:, :-1], chunks[:, 1:]


def window_batches(
    tokens: torch.Tensor | None,
    block_size: int,
    config: Mapping[str, ConfigScalar],
    seed: int,
    partition: int,
    device: torch.device | str,
) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """`local_steps` batches of (inputs, targets) windows of `tokens`, drawn repeatably
    per (seed, partition, round)."""
    if tokens is None:
        raise TaskError("load_data must be called before training")
    steps = config_int(config, "local_steps", 30)
    batch_size = config_int(config, "batch_size", 16)
    if steps < 1 or batch_size < 1:
        raise TaskError(f"need local_steps >= 1 and batch_size >= 1, got {steps}, {batch_size}")
    generator = torch.Generator().manual_seed(
        derive_seed(seed, partition, config_int(config, "round", 0))
    )
    for _ in range(steps):
        starts = torch.randint(len(tokens) - block_size, (batch_size,), generator=generator)
        x, y = windows(tokens, starts, block_size)
        yield x.to(device), y.to(device)


def eval_windows(tokens: torch.Tensor, block_size: int) -> tuple[torch.Tensor, torch.Tensor]:
    """EVAL_WINDOWS windows evenly spaced over `tokens` (held-out text), fixed for a text."""
    starts = torch.linspace(0, len(tokens) - block_size - 1, EVAL_WINDOWS).long()
    return windows(tokens, starts, block_size)
