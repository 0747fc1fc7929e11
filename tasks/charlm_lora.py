"""Built-in task `charlm-lora`: LoRA adapters on charlm's frozen GPT; only they travel.

Hu et al., "LoRA: Low-Rank Adaptation of Large Language Models", ICLR 2022.

The base model is charlm's GPT with the weights of `base=PATH`: a fedstream checkpoint of
an earlier `charlm` run with the same model options, such as
RUN_DIR/checkpoints/round_00003.safetensors. Without `base`, it is charlm's seeded random
initialisation (the same on every process of a run, since they share the seed): enough to
exercise the exchange, not to learn much. Every base weight is frozen. Each block's four
projections (attention `c_attn`, which computes q, k and v, and `c_proj`; MLP `c_fc` and
`c_proj`) gain a trainable low-rank term (alpha / rank) * B @ A, A random and B zero, so
training starts from the base model exactly. `exchanged_parameters` names the A and B
matrices: only they are downloaded, uploaded and aggregated, and only they are in the
run's checkpoints.

This is the mechanism written out by hand, with no dependency, as an example of
`exchanged_parameters`; `hf-causal-lm` with `lora=1` does the same with PEFT's adapters on
a transformers model.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from pathlib import Path
from typing import ClassVar

import torch
from torch import nn

from fedstream.common.checkpoint import load_checkpoint
from fedstream.common.errors import InvalidCheckpoint
from fedstream.tasks import TaskError, TaskOption
from fedstream.tasks.charlm import CharLMTask
from fedstream.tasks.training import seeded_rng

ADAPTED = ("attn.c_attn", "attn.c_proj", "mlp.c_fc", "mlp.c_proj")
"""The linear layers of each block that get adapters."""


class LoRALinear(nn.Module):
    """A frozen linear layer plus a trainable rank-`rank` update of its weight."""

    def __init__(self, base: nn.Linear, rank: int, alpha: float) -> None:
        super().__init__()
        self.base = base.requires_grad_(False)
        self.lora_a = nn.Parameter(torch.empty(rank, base.in_features))
        self.lora_b = nn.Parameter(torch.zeros(base.out_features, rank))
        nn.init.kaiming_uniform_(self.lora_a, a=math.sqrt(5))  # as nn.Linear's own weight
        self.scale = alpha / rank

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.base(x) + (x @ self.lora_a.T @ self.lora_b.T) * self.scale


class CharLMLoRATask(CharLMTask):
    """Options: charlm's, plus `base` (a charlm checkpoint; default: seeded random),
    `rank` (4) and `alpha` (8). Round config: charlm's."""

    declared_options: ClassVar[tuple[TaskOption, ...]] = (
        *CharLMTask.declared_options,
        TaskOption("base", str, None, "a charlm checkpoint to adapt (default: seeded random)"),
        TaskOption("rank", int, 4, "rank of each adapter"),
        TaskOption("alpha", float, None, "adapter scale numerator (default: 2 * rank)"),
    )
    round_settings: ClassVar[tuple[TaskOption, ...]] = CharLMTask.round_settings

    def __init__(self, options: Mapping[str, str] | None = None, seed: int = 0) -> None:
        super().__init__(options, seed)
        self.rank = self.int_option("rank", 4)
        self.alpha = self.float_option("alpha", 2.0 * self.rank)
        if self.rank < 1:
            raise TaskError(f"charlm-lora rank must be at least 1, got {self.rank}")
        self.base = self.options.get("base")

    def build_model(self) -> nn.Module:
        model = super().build_model()
        if self.base:
            self._load_base(model, Path(self.base))
        model.requires_grad_(False)
        with seeded_rng(self.seed):
            for block in model.h:  # type: ignore[union-attr]
                for path in ADAPTED:
                    parent_name, attr = path.split(".")
                    parent = getattr(block, parent_name)
                    setattr(parent, attr, LoRALinear(getattr(parent, attr), self.rank, self.alpha))
        return model

    def exchanged_parameters(self, model: nn.Module) -> list[str]:
        return [name for name, _ in model.named_parameters() if ".lora_" in name]

    def _load_base(self, model: nn.Module, path: Path) -> None:
        try:
            tensors, metadata = load_checkpoint(path)
        except (OSError, InvalidCheckpoint) as exc:
            raise TaskError(f"charlm-lora base {path}: {exc}") from exc
        if metadata.get("task", "charlm") != "charlm":
            raise TaskError(f"charlm-lora base {path} is a {metadata['task']!r} checkpoint")
        state = model.state_dict()
        missing = sorted(state.keys() - tensors.keys())
        if missing:
            raise TaskError(f"charlm-lora base {path} lacks {', '.join(missing[:3])}")
        try:
            model.load_state_dict({name: tensors[name] for name in state})
        except RuntimeError as exc:
            raise TaskError(
                f"charlm-lora base {path} does not fit these charlm options: {exc}"
            ) from exc
