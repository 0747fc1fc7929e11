"""Local training of `hf-causal-lm` as fine-tuners run it: mixed precision, gradient
accumulation and checkpointing, a learning-rate schedule that continues across rounds, and
(optionally) the optimiser's state kept from one round to the next on the client.

The schedule is a linear warm-up over `warmup_steps` optimiser steps, then a cosine decay to
`min_lr_ratio` x `lr` at the end of round `total_rounds` (round config; without it the rate
stays at `lr` after the warm-up). A round's first step is `(round - 1) * local_steps`: the
round number is in every round's config, so a client that joins late, or restarts, is at
the same point of the schedule as the others.

With `keep_optimizer=1` the AdamW moments of each trainable parameter are kept by its name
when the round ends and given to the same name's parameter of the next round's model (the
client loads each global model into its model, but a task may not assume the very same
parameter objects): the local-SGD recipe of DiLoCo (Douillard et al., 2023,
arXiv:2311.08105), whose inner optimiser's state stays on each worker.
"""

from __future__ import annotations

import contextlib
import logging
import math
import time
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from fedstream.tasks.hf_data import IGNORE, Batch
from fedstream.tasks.task import ConfigScalar, TaskError, TrainResult
from fedstream.tasks.training import ProximalTerm, config_float, config_int

log = logging.getLogger(__name__)

PRECISIONS = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": None}


@dataclass
class TrainOptions:
    """A site's training options (task options: they may differ between sites)."""

    precision: str = "fp32"
    grad_accum: int = 1
    grad_checkpointing: bool = False
    keep_optimizer: bool = False

    def __post_init__(self) -> None:
        if self.precision not in PRECISIONS:
            raise TaskError(f"precision must be bf16, fp16 or fp32, got {self.precision!r}")
        if self.grad_accum < 1:
            raise TaskError(f"grad_accum must be 1 or more, got {self.grad_accum}")


def autocast_dtype(precision: str, device: torch.device) -> torch.dtype | None:
    """The autocast dtype on `device`: bf16 and fp16 on CUDA; bf16 on CPU (fp16 autocast
    on CPU is slow and unscaled: it runs in fp32 there); None for fp32."""
    dtype = PRECISIONS[precision]
    if device.type != "cuda" and dtype is torch.float16:
        return None
    return dtype


def autocast(precision: str, device: torch.device) -> contextlib.AbstractContextManager[Any]:
    dtype = autocast_dtype(precision, device)
    if dtype is None:
        return contextlib.nullcontext()
    return torch.autocast(device_type=device.type, dtype=dtype)


def token_loss(model: nn.Module, batch: Batch) -> tuple[torch.Tensor, int]:
    """(summed next-token cross-entropy, number of targets) of a batch."""
    inputs, targets, mask = batch
    logits = model(input_ids=inputs, attention_mask=mask, use_cache=False).logits
    loss = F.cross_entropy(
        logits.flatten(0, 1).float(), targets.flatten(), ignore_index=IGNORE, reduction="sum"
    )
    return loss, int((targets != IGNORE).sum())


def learning_rate(config: Mapping[str, ConfigScalar], step: int, default_lr: float) -> float:
    """The rate of global optimiser step `step` (see the module docstring)."""
    lr = config_float(config, "lr", default_lr)
    warmup = config_int(config, "warmup_steps", 0)
    if step < warmup:
        return lr * (step + 1) / warmup
    total = config_int(config, "total_rounds", 0) * config_int(config, "local_steps", 30)
    if total <= warmup:
        return lr
    floor = config_float(config, "min_lr_ratio", 0.1)
    progress = min(1.0, (step - warmup) / (total - warmup))
    return lr * (floor + (1 - floor) * 0.5 * (1 + math.cos(math.pi * progress)))


class LocalTrainer:
    """Runs a round's optimiser steps; keeps the optimiser's state between rounds on request."""

    def __init__(self, options: TrainOptions) -> None:
        self.options = options
        self.saved: dict[str, dict[str, Any]] = {}
        self.scaler: torch.amp.GradScaler | None = None

    def _optimizer(self, named: list[tuple[str, nn.Parameter]], lr: float) -> torch.optim.AdamW:
        optimizer = torch.optim.AdamW([p for _, p in named], lr=lr)
        for name, param in named:
            state = self.saved.get(name)
            if state is not None and state["exp_avg"].shape == param.shape:
                optimizer.state[param] = {
                    k: v.to(param.device) if k != "step" else v for k, v in state.items()
                }
        return optimizer

    def _prepare(self, model: nn.Module, device: torch.device) -> None:
        on = getattr(model, "is_activation_checkpointing", None)  # transformers 5
        if on is None:
            on = getattr(model, "is_gradient_checkpointing", True)
        if self.options.grad_checkpointing and not on:
            model.gradient_checkpointing_enable(  # type: ignore[operator]
                gradient_checkpointing_kwargs={"use_reentrant": False}
            )
        if autocast_dtype(self.options.precision, device) is torch.float16:
            self.scaler = self.scaler or torch.amp.GradScaler("cuda")

    def train(
        self,
        model: nn.Module,
        config: Mapping[str, ConfigScalar],
        batches: Callable[[int], Iterator[Batch]],
        default_lr: float,
        progress: Callable[[int, int], None],
        device: torch.device,
    ) -> TrainResult:
        """`local_steps` optimiser steps, each over `grad_accum` batches from `batches(n)`."""
        self._prepare(model, device)
        named = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
        steps = config_int(config, "local_steps", 30)
        first = max(config_int(config, "round", 1) - 1, 0) * steps
        optimizer = self._optimizer(named, learning_rate(config, first, default_lr))
        proximal = ProximalTerm(model, config_float(config, "proximal_mu", 0.0))
        model.train()
        draw = batches(steps * self.options.grad_accum)
        loss_sum, targets, tokens = 0.0, 0, 0
        started = time.monotonic()
        for step in range(steps):
            for group in optimizer.param_groups:
                group["lr"] = learning_rate(config, first + step, default_lr)
            micro = [next(draw) for _ in range(self.options.grad_accum)]
            counted = sum(int((b[1] != IGNORE).sum()) for b in micro)
            optimizer.zero_grad(set_to_none=True)
            for index, batch in enumerate(micro):
                with autocast(self.options.precision, device):
                    loss, count = token_loss(model, batch)
                scaled = loss / max(counted, 1) + (proximal() if index == 0 else 0.0)
                (self.scaler.scale(scaled) if self.scaler else scaled).backward()
                loss_sum += float(loss.detach())
                targets += count
                tokens += int(batch[0].numel() if batch[2] is None else batch[2].sum())
            if self.scaler:
                self.scaler.unscale_(optimizer)
            nn.utils.clip_grad_norm_([p for _, p in named], 1.0)
            if self.scaler:
                self.scaler.step(optimizer)
                self.scaler.update()
            else:
                optimizer.step()
            progress(step + 1, steps)
        elapsed = max(time.monotonic() - started, 1e-9)
        if self.options.keep_optimizer:
            self.saved = {n: dict(optimizer.state[p]) for n, p in named if p in optimizer.state}
        log.info("trained %d tokens at %.0f tokens/s", tokens, tokens / elapsed)
        return TrainResult(
            num_examples=targets,
            metrics={"loss": loss_sum / max(targets, 1), "tokens_per_s": tokens / elapsed},
        )
