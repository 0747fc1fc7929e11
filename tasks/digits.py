"""Built-in task `digits`: an MLP on scikit-learn's 8x8 handwritten digits, split non-IID.

The 1797 images ship with scikit-learn, so the task needs no download. A fixed 20% is held
out for the coordinator's evaluation; the rest is dealt to clients class by class with
Dirichlet proportions, so each client sees a skewed mix of digits. Each client keeps a
deterministic 20% of its own share out of training, for federated evaluation.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Mapping
from typing import ClassVar

import numpy as np
import torch
import torch.nn.functional as F
from sklearn.datasets import load_digits
from sklearn.model_selection import train_test_split
from torch import nn

from fedstream.tasks import ConfigScalar, EvalResult, Task, TaskError, TaskOption, TrainResult
from fedstream.tasks.training import (
    ProximalTerm,
    check_partition,
    config_float,
    config_int,
    derive_seed,
    evaluating,
    seeded_rng,
)

NUM_FEATURES = 64
NUM_CLASSES = 10
HELDOUT_FRACTION = 0.2
HELDOUT_SEED = 1797
LOCAL_HELDOUT_FRACTION = 0.2
"""Part of each client's share kept out of its training for federated evaluation."""
"""Seeds the held-out split. A constant, not the run seed, so every run scores on the same
images and results of different runs compare."""


@functools.cache
def _split() -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """(train features, train labels, held-out features, held-out labels); features in [0, 1]."""
    digits = load_digits()
    features = (digits.data / 16.0).astype(np.float32)
    labels = digits.target.astype(np.int64)
    x_train, x_test, y_train, y_test = train_test_split(
        features,
        labels,
        test_size=HELDOUT_FRACTION,
        stratify=labels,
        random_state=HELDOUT_SEED,
    )
    return x_train, y_train, x_test, y_test


def dirichlet_partition(
    labels: np.ndarray, num_partitions: int, alpha: float, seed: int
) -> list[np.ndarray]:
    """Deal sample indices to partitions, each class by proportions drawn from Dir(alpha).

    The usual non-IID benchmark split (Hsu et al., 2019, arXiv:1909.06335): small alpha
    gives each partition a few dominant classes. The result is disjoint and covers every
    index. A partition left empty takes one sample from the largest, so none is empty;
    that fix-up is deterministic, like the draw, so every process computes the same split.
    """
    if not 1 <= num_partitions <= len(labels):
        raise TaskError(f"cannot split {len(labels)} samples into {num_partitions} partitions")
    if alpha <= 0:
        raise TaskError(f"alpha must be positive, got {alpha}")
    rng = np.random.default_rng(seed)
    parts: list[list[int]] = [[] for _ in range(num_partitions)]
    for cls in np.unique(labels):
        indices = rng.permutation(np.flatnonzero(labels == cls))
        shares = rng.dirichlet(np.full(num_partitions, alpha))
        cuts = (np.cumsum(shares)[:-1] * len(indices)).astype(np.int64)
        for part, chunk in zip(parts, np.split(indices, cuts), strict=True):
            part.extend(chunk.tolist())
    for part in parts:
        if not part:
            part.append(max(parts, key=len).pop())
    return [np.sort(np.asarray(part, dtype=np.int64)) for part in parts]


class DigitsTask(Task):
    """Options: `hidden` (128), `alpha` (0.5, the Dirichlet concentration; smaller is more
    skewed) and `partition_seed` (defaults to the run seed).

    Round config: `lr` (0.1, SGD with momentum 0.9), `local_epochs` (2), `batch_size` (32),
    `proximal_mu` (0), `round` (varies the shuffling). In gradient mode (FedSGD) the
    gradient is the full-batch one over the client's training examples.
    """

    declared_options: ClassVar[tuple[TaskOption, ...]] = (
        TaskOption("hidden", int, 128, "width of the hidden layer"),
        TaskOption(
            "alpha", float, 0.5, "Dirichlet concentration of the split; smaller is more skewed"
        ),
        TaskOption("partition_seed", int, None, "seed of the split (default: the run seed)"),
    )
    round_settings: ClassVar[tuple[TaskOption, ...]] = (
        TaskOption("lr", float, 0.1, "SGD learning rate (momentum 0.9)"),
        TaskOption("local_epochs", int, 2, "passes over the local data per round"),
        TaskOption("batch_size", int, 32, "examples per step"),
        TaskOption("proximal_mu", float, 0.0, "FedProx coefficient (also --proximal-mu)"),
    )

    def __init__(self, options: Mapping[str, str] | None = None, seed: int = 0) -> None:
        super().__init__(options, seed)
        self.hidden = self.int_option("hidden", 128)
        self.alpha = self.float_option("alpha", 0.5)
        self.partition_seed = self.int_option("partition_seed", seed)
        if self.hidden < 1:
            raise TaskError(f"hidden must be at least 1, got {self.hidden}")
        self.partition = 0
        self._data: tuple[torch.Tensor, torch.Tensor] | None = None
        self._local_heldout: tuple[torch.Tensor, torch.Tensor] | None = None

    def build_model(self) -> nn.Module:
        with seeded_rng(self.seed):
            return nn.Sequential(
                nn.Linear(NUM_FEATURES, self.hidden),
                nn.ReLU(),
                nn.Linear(self.hidden, NUM_CLASSES),
            )

    def partition_indices(self, num_partitions: int) -> list[np.ndarray]:
        """Indices into the training split of every partition (each client computes all)."""
        _, y_train, _, _ = _split()
        return dirichlet_partition(y_train, num_partitions, self.alpha, self.partition_seed)

    def load_data(self, partition: int, num_partitions: int) -> None:
        """The partition's share, less a deterministic LOCAL_HELDOUT_FRACTION of it that is
        kept for `evaluate_local`."""
        check_partition(partition, num_partitions)
        x_train, y_train, _, _ = _split()
        mine = self.partition_indices(num_partitions)[partition]
        rng = np.random.default_rng(derive_seed(self.partition_seed, partition, num_partitions))
        mine = rng.permutation(mine)
        cut = int(len(mine) * LOCAL_HELDOUT_FRACTION)
        heldout, train = np.sort(mine[:cut]), np.sort(mine[cut:])
        self.partition = partition
        self._data = (torch.from_numpy(x_train[train]), torch.from_numpy(y_train[train]))
        self._local_heldout = (
            (torch.from_numpy(x_train[heldout]), torch.from_numpy(y_train[heldout]))
            if cut
            else None
        )

    def train(self, model: nn.Module, config: Mapping[str, ConfigScalar]) -> TrainResult:
        if self._data is None:
            raise TaskError("load_data must be called before train")
        features, labels = self._data
        epochs = config_int(config, "local_epochs", 2)
        batch_size = config_int(config, "batch_size", 32)
        if epochs < 1 or batch_size < 1:
            raise TaskError(
                f"need local_epochs >= 1 and batch_size >= 1, got {epochs}, {batch_size}"
            )
        optimizer = torch.optim.SGD(
            model.parameters(), lr=config_float(config, "lr", 0.1), momentum=0.9
        )
        proximal = ProximalTerm(model, config_float(config, "proximal_mu", 0.0))
        generator = torch.Generator().manual_seed(
            derive_seed(self.seed, self.partition, config_int(config, "round", 0))
        )
        model.train()
        loss_sum = torch.zeros((), device=self.device)
        correct = torch.zeros((), dtype=torch.int64, device=self.device)
        seen = 0
        steps = epochs * math.ceil(len(labels) / batch_size)
        for epoch in range(epochs):
            batches = torch.randperm(len(labels), generator=generator).split(batch_size)
            for step, batch in enumerate(batches, epoch * len(batches) + 1):
                x = features[batch].to(self.device)
                y = labels[batch].to(self.device)
                logits = model(x)
                loss = F.cross_entropy(logits, y)
                optimizer.zero_grad(set_to_none=True)
                (loss + proximal()).backward()
                optimizer.step()
                loss_sum += loss.detach() * len(y)
                correct += (logits.argmax(dim=1) == y).sum()
                seen += len(y)
                self.report_progress(step, steps)
        return TrainResult(
            num_examples=len(labels),
            metrics={"loss": loss_sum.item() / seen, "accuracy": correct.item() / seen},
        )

    def compute_gradient(self, model: nn.Module, config: Mapping[str, ConfigScalar]) -> TrainResult:
        """The full-batch gradient of the mean cross-entropy over the training examples,
        accumulated batch by batch (`batch_size` bounds memory only); weights unchanged."""
        if self._data is None:
            raise TaskError("load_data must be called before compute_gradient")
        features, labels = self._data
        batch_size = config_int(config, "batch_size", 32)
        if batch_size < 1:
            raise TaskError(f"need batch_size >= 1, got {batch_size}")
        model.train()
        model.zero_grad(set_to_none=True)
        loss_sum = torch.zeros((), device=self.device)
        for batch in torch.arange(len(labels)).split(batch_size):
            x = features[batch].to(self.device)
            y = labels[batch].to(self.device)
            loss = F.cross_entropy(model(x), y, reduction="sum")
            (loss / len(labels)).backward()
            loss_sum += loss.detach()
        return TrainResult(
            num_examples=len(labels), metrics={"loss": loss_sum.item() / len(labels)}
        )

    def evaluate(self, model: nn.Module) -> EvalResult:
        _, _, x_test, y_test = _split()
        return self._score(model, torch.from_numpy(x_test), torch.from_numpy(y_test))

    def evaluate_local(self, model: nn.Module) -> EvalResult | None:
        """The client's own held-out 20% of its share."""
        if self._local_heldout is None:
            return None
        return self._score(model, *self._local_heldout)

    def _score(self, model: nn.Module, features: torch.Tensor, labels: torch.Tensor) -> EvalResult:
        x = features.to(self.device)
        y = labels.to(self.device)
        with evaluating(model):
            logits = model(x)
            loss = F.cross_entropy(logits, y).item()
            accuracy = (logits.argmax(dim=1) == y).float().mean().item()
        return EvalResult(num_examples=len(y), metrics={"loss": loss, "accuracy": accuracy})
