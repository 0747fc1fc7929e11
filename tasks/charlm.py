"""Built-in task `charlm`: a small byte-level GPT on the text of CPython's pydoc topics.

The text, its split and its byte tokens are `fedstream.tasks.bytetext`'s: no download.

With `keep_optimizer=1` (a site option) the inner AdamW's moments are kept by parameter name
from one round to the next, as DiLoCo's inner optimiser is (Douillard et al., 2023,
arXiv:2311.08105; docs/low-communication.md). They live in the task object, which a client
process builds once: a restarted client starts its AdamW afresh.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping
from typing import Any, ClassVar

import torch
import torch.nn.functional as F
from torch import nn

from fedstream.tasks import ConfigScalar, EvalResult, Task, TaskError, TaskOption, TrainResult
from fedstream.tasks.bytetext import (
    encode,
    eval_windows,
    heldout_tokens,
    split_topics,
    window_batches,
)
from fedstream.tasks.gpt import GPT, GPTConfig
from fedstream.tasks.options import TRUE
from fedstream.tasks.training import (
    ProximalTerm,
    check_partition,
    config_float,
    config_int,
    evaluating,
    seeded_rng,
)


class CharLMTask(Task):
    """Options: `n_layer` (2), `n_head` (4), `n_embd` (128), `block_size` (64), `dropout` (0),
    `keep_optimizer` (0; a site option).

    Round config: `local_steps` (30), `batch_size` (16), `lr` (3e-3; AdamW, fresh each
    round unless `keep_optimizer=1`), `proximal_mu` (0), `round` (varies the windows drawn).
    In gradient mode (FedSGD) the gradient is the mean over `local_steps` batches, without
    clipping.
    """

    site_options: ClassVar[frozenset[str]] = frozenset({"keep_optimizer"})

    declared_options: ClassVar[tuple[TaskOption, ...]] = (
        TaskOption("n_layer", int, 2, "transformer blocks"),
        TaskOption("n_head", int, 4, "attention heads per block; must divide n_embd"),
        TaskOption("n_embd", int, 128, "width of the residual stream"),
        TaskOption("block_size", int, 64, "longest context, in bytes"),
        TaskOption("dropout", float, 0.0, "dropout probability in training"),
        TaskOption("keep_optimizer", bool, False, "keep AdamW's state across rounds"),
    )
    round_settings: ClassVar[tuple[TaskOption, ...]] = (
        TaskOption("local_steps", int, 30, "optimiser steps per round"),
        TaskOption("batch_size", int, 16, "windows per step"),
        TaskOption("lr", float, 3e-3, "AdamW learning rate (fresh each round unless kept)"),
        TaskOption("proximal_mu", float, 0.0, "FedProx coefficient (also --proximal-mu)"),
    )

    def __init__(self, options: Mapping[str, str] | None = None, seed: int = 0) -> None:
        super().__init__(options, seed)
        try:
            self.config = GPTConfig(
                block_size=self.int_option("block_size", 64),
                n_layer=self.int_option("n_layer", 2),
                n_head=self.int_option("n_head", 4),
                n_embd=self.int_option("n_embd", 128),
                dropout=self.float_option("dropout", 0.0),
            )
        except ValueError as exc:
            raise TaskError(f"charlm options: {exc}") from exc
        self.keep_optimizer = self.option("keep_optimizer", "0").strip().lower() in TRUE
        self.inner_state: dict[str, dict[str, Any]] = {}
        """AdamW's state by parameter name at the end of the last round (keep_optimizer)."""
        self.partition = 0
        self._tokens: torch.Tensor | None = None

    def build_model(self) -> nn.Module:
        with seeded_rng(self.seed):
            return GPT(self.config)

    def load_data(self, partition: int, num_partitions: int) -> None:
        """Take training topic j (in name order, held-out topics skipped) when
        j % num_partitions == partition."""
        check_partition(partition, num_partitions)
        train, _ = split_topics()
        if num_partitions > len(train):
            raise TaskError(
                f"charlm has {len(train)} training topics, fewer than {num_partitions} partitions"
            )
        tokens = encode(train[partition::num_partitions])
        if len(tokens) <= self.config.block_size:
            raise TaskError(
                f"partition {partition} is shorter than block_size {self.config.block_size}"
            )
        self.partition = partition
        self._tokens = tokens

    def _batches(
        self, config: Mapping[str, ConfigScalar]
    ) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        """`local_steps` batches of (inputs, targets) windows, drawn repeatably per round."""
        return window_batches(
            self._tokens, self.config.block_size, config, self.seed, self.partition, self.device
        )

    def compute_gradient(self, model: nn.Module, config: Mapping[str, ConfigScalar]) -> TrainResult:
        """The mean gradient over this round's `local_steps` batches; weights unchanged."""
        batches = list(self._batches(config))
        model.train()
        model.zero_grad(set_to_none=True)
        loss_sum = torch.zeros((), device=self.device)
        for x, y in batches:
            loss = F.cross_entropy(model(x).flatten(0, 1), y.flatten())
            (loss / len(batches)).backward()
            loss_sum += loss.detach()
        return TrainResult(
            num_examples=sum(y.numel() for _, y in batches),
            metrics={"loss": loss_sum.item() / len(batches)},
        )

    def train(self, model: nn.Module, config: Mapping[str, ConfigScalar]) -> TrainResult:
        batches = self._batches(config)
        total = config_int(config, "local_steps", 30)
        optimizer = self._optimizer(model, config_float(config, "lr", 3e-3))
        proximal = ProximalTerm(model, config_float(config, "proximal_mu", 0.0))
        model.train()
        loss_sum = torch.zeros((), device=self.device)
        steps = 0
        examples = 0
        for x, y in batches:
            logits = model(x)
            loss = F.cross_entropy(logits.flatten(0, 1), y.flatten())
            optimizer.zero_grad(set_to_none=True)
            (loss + proximal()).backward()
            nn.utils.clip_grad_norm_(model.parameters(), 1.0)
            optimizer.step()
            loss_sum += loss.detach()
            steps += 1
            examples += y.numel()
            self.report_progress(steps, total)
        if self.keep_optimizer:
            self.inner_state = {
                name: dict(optimizer.state[p])
                for name, p in model.named_parameters()
                if p in optimizer.state
            }
        return TrainResult(num_examples=examples, metrics={"loss": loss_sum.item() / steps})

    def forget_optimizer_state(self) -> None:
        self.inner_state = {}

    def _optimizer(self, model: nn.Module, lr: float) -> torch.optim.AdamW:
        """A new AdamW over `model`, holding the kept moments of each same-named, same-shaped
        parameter (the client loads every global model into a model object it may rebuild,
        so the moments follow names, not objects)."""
        optimizer = torch.optim.AdamW(model.parameters(), lr=lr)
        for name, param in model.named_parameters():
            state = self.inner_state.get(name)
            if state is not None and state["exp_avg"].shape == param.shape:
                optimizer.state[param] = {
                    k: v if k == "step" else v.to(param.device) for k, v in state.items()
                }
        return optimizer

    def evaluate(self, model: nn.Module) -> EvalResult:
        tokens = heldout_tokens()
        block_size = self.config.block_size
        if len(tokens) <= block_size:
            raise TaskError(f"held-out text is shorter than block_size {block_size}")
        x, y = (t.to(self.device) for t in eval_windows(tokens, block_size))
        with evaluating(model):
            loss = F.cross_entropy(model(x).flatten(0, 1), y.flatten()).item()
        return EvalResult(num_examples=y.numel(), metrics={"loss": loss})
