"""A task whose site of several ranks must train exactly as one process does.

Imported by real `fedstream server` / `fedstream client` processes as
`site_task:RegressionTask`, with this directory on their PYTHONPATH (as gated_train.py).

A linear model fitted to DATA_SIZE fixed examples by full-batch gradient descent on the
mean squared error. Partition P of N is the P-th contiguous slice of the examples, so
partitions 2P and 2P+1 of 2N are the two halves of partition P of N: DDP's mean of the two
halves' gradients is the gradient on the whole partition, and a 2-rank site trains as the
single process holding its partition does, to float rounding.

Task option `gate_dir` (default `gate`): when GATE_DIR/hold-pP-of-N-rR exists, partition P
of N touches GATE_DIR/train-pP-of-N-rR (its pid inside) in round R and waits (at most
`gate_timeout` seconds) for GATE_DIR/open-pP-of-N-rR; a test kills a rank waiting there.
"""

from __future__ import annotations

import os
import time
from collections.abc import Mapping
from pathlib import Path

import torch
from torch import nn

from fedstream.tasks import ConfigScalar, Task, TrainResult
from fedstream.tasks.training import config_float, config_int, seeded_rng

DATA_SIZE = 48
FEATURES = 6


class RegressionTask(Task):
    def __init__(self, options: Mapping[str, str] | None = None, seed: int = 0) -> None:
        super().__init__(options, seed)
        self.gate_dir = Path(self.option("gate_dir", "gate"))
        self.gate_timeout = self.float_option("gate_timeout", 60.0)

    def build_model(self) -> nn.Module:
        with seeded_rng(self.seed):
            return nn.Linear(FEATURES, 2)

    def load_data(self, partition: int, num_partitions: int) -> None:
        generator = torch.Generator().manual_seed(1234)
        x = torch.randn(DATA_SIZE, FEATURES, generator=generator)
        y = x @ torch.randn(FEATURES, 2, generator=generator) + 0.1 * torch.randn(
            DATA_SIZE, 2, generator=generator
        )
        start = partition * DATA_SIZE // num_partitions
        end = (partition + 1) * DATA_SIZE // num_partitions
        self.partition, self.num_partitions = partition, num_partitions
        self.x, self.y = x[start:end], y[start:end]

    def train(self, model: nn.Module, config: Mapping[str, ConfigScalar]) -> TrainResult:
        self._wait_at_gate(config_int(config, "round", 0))
        model.train()
        optimizer = torch.optim.SGD(model.parameters(), lr=config_float(config, "lr", 0.1))
        loss = torch.zeros(())
        for _ in range(config_int(config, "steps", 5)):
            optimizer.zero_grad()
            loss = nn.functional.mse_loss(model(self.x), self.y)
            loss.backward()
            optimizer.step()
        return TrainResult(len(self.x), {"loss": float(loss)})

    def _wait_at_gate(self, number: int) -> None:
        gate = f"p{self.partition}-of-{self.num_partitions}-r{number}"
        if not (self.gate_dir / f"hold-{gate}").exists():
            return
        (self.gate_dir / f"train-{gate}").write_text(str(os.getpid()))
        deadline = time.monotonic() + self.gate_timeout
        while not (self.gate_dir / f"open-{gate}").exists() and time.monotonic() < deadline:
            time.sleep(0.05)
