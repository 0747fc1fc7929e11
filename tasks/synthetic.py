"""Built-in task `synthetic`: transformer-shaped weights of any size, for benchmarks.

Training is a deterministic in-place nudge, so a benchmark measures the system (transfer,
codecs, aggregation), not the model. Every tensor is allocated once and filled in place,
so a billion parameters cost one copy of memory and seconds to build.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import ClassVar

import torch
from torch import nn

from fedstream.tasks import ConfigScalar, Task, TaskError, TaskOption, TrainResult
from fedstream.tasks.training import check_partition, config_float, config_int

DTYPES: dict[str, torch.dtype] = {
    "float32": torch.float32,
    "float16": torch.float16,
    "bfloat16": torch.bfloat16,
}
INIT_BOUND = 0.02
"""`init=uniform` draws from U(-INIT_BOUND, INIT_BOUND), the scale of GPT-2's init."""
EMBEDDING_SHARE = 0.25
"""The part of the parameters the embedding takes (before rounding); the layers get the rest."""


def layer_shapes(d: int, layer: int) -> dict[str, tuple[int, ...]]:
    """Parameter shapes of one transformer block of width d: 12 d^2 + 2 d elements."""
    prefix = f"layers.{layer}"
    return {
        f"{prefix}.attn.qkv.weight": (3 * d, d),
        f"{prefix}.attn.proj.weight": (d, d),
        f"{prefix}.mlp.up.weight": (4 * d, d),
        f"{prefix}.mlp.down.weight": (d, 4 * d),
        f"{prefix}.norm1.weight": (d,),
        f"{prefix}.norm2.weight": (d,),
    }


def synthetic_shapes(params: int, layers: int) -> dict[str, tuple[int, ...]]:
    """Names and shapes of a transformer with `layers` blocks and about `params` elements.

    The width d is the largest for which the blocks and final norm fit in
    (1 - EMBEDDING_SHARE) of the budget; the embedding's row count then takes up the rest,
    so the total is within d/2 of `params`.
    """
    if layers < 1:
        raise TaskError(f"layers must be at least 1, got {layers}")
    # The largest d with 12 L d^2 + (2 L + 1) d <= (1 - EMBEDDING_SHARE) * params.
    a, b, c = 12 * layers, 2 * layers + 1, (1 - EMBEDDING_SHARE) * params
    d = max(1, int((math.sqrt(b * b + 4 * a * c) - b) / (2 * a)))
    shapes: dict[str, tuple[int, ...]] = {}
    for layer in range(layers):
        shapes.update(layer_shapes(d, layer))
    shapes["norm.weight"] = (d,)
    used = sum(math.prod(shape) for shape in shapes.values())
    rows = round((params - used) / d)
    if rows < 1:
        raise TaskError(f"{params} parameters are too few for {layers} layers")
    return {"embedding.weight": (rows, d), **shapes}


class SyntheticModel(nn.Module):
    """Holds parameters under dotted names (`layers.0.attn.qkv.weight`); has no forward."""

    def __init__(self, tensors: Mapping[str, torch.Tensor]) -> None:
        super().__init__()
        for name, tensor in tensors.items():
            *path, leaf = name.split(".")
            owner: nn.Module = self
            for part in path:
                if not hasattr(owner, part):
                    owner.add_module(part, nn.Module())
                owner = owner.get_submodule(part)
            owner.register_parameter(leaf, nn.Parameter(tensor))

    def forward(self, *args: object) -> torch.Tensor:
        raise NotImplementedError("the synthetic model only carries weights")


class SyntheticTask(Task):
    """Options: `params` (1e6; "100e6" works), `layers` (4), `dtype` (float32 | float16 |
    bfloat16), `single_tensor` (0/1: the whole model as one 1-D tensor, to exercise tensors
    over 2 GiB) and `init` (uniform | zeros).

    Training adds lr * (partition + 1) to every weight (round config `lr`, default 1e-3),
    so each client's update is distinct, known in advance, and costs one pass over memory.
    It reports 100 * (partition + 1) examples and a made-up loss of 1 / (1 + round +
    partition), so weighting and metric plumbing can be checked against known numbers.
    """

    declared_options: ClassVar[tuple[TaskOption, ...]] = (
        TaskOption("params", int, 1_000_000, "parameters, about (100e6 works)"),
        TaskOption("layers", int, 4, "transformer blocks"),
        TaskOption("dtype", str, "float32", "float32, float16 or bfloat16"),
        TaskOption("single_tensor", int, 0, "1: the whole model as one 1-D tensor"),
        TaskOption("init", str, "uniform", "uniform or zeros"),
    )
    round_settings: ClassVar[tuple[TaskOption, ...]] = (
        TaskOption("lr", float, 1e-3, "what training adds, times partition + 1"),
    )

    def __init__(self, options: Mapping[str, str] | None = None, seed: int = 0) -> None:
        super().__init__(options, seed)
        self.params = int(self.float_option("params", 1e6))
        self.layers = self.int_option("layers", 4)
        self.single_tensor = bool(self.int_option("single_tensor", 0))
        dtype_name = self.option("dtype", "float32")
        if dtype_name not in DTYPES:
            raise TaskError(f"dtype must be one of {', '.join(DTYPES)}, got {dtype_name!r}")
        self.dtype = DTYPES[dtype_name]
        self.init = self.option("init", "uniform")
        if self.init not in ("uniform", "zeros"):
            raise TaskError(f"init must be uniform or zeros, got {self.init!r}")
        if self.params < 1:
            raise TaskError(f"params must be at least 1, got {self.params}")
        self.partition = 0

    def shapes(self) -> dict[str, tuple[int, ...]]:
        if self.single_tensor:
            return {"weight": (self.params,)}
        return synthetic_shapes(self.params, self.layers)

    def build_model(self) -> nn.Module:
        generator = torch.Generator().manual_seed(self.seed)

        def make(shape: tuple[int, ...]) -> torch.Tensor:
            if self.init == "zeros":
                return torch.zeros(shape, dtype=self.dtype)
            return torch.empty(shape, dtype=self.dtype).uniform_(
                -INIT_BOUND, INIT_BOUND, generator=generator
            )

        return SyntheticModel({name: make(shape) for name, shape in self.shapes().items()})

    def load_data(self, partition: int, num_partitions: int) -> None:
        check_partition(partition, num_partitions)
        self.partition = partition

    def train(self, model: nn.Module, config: Mapping[str, ConfigScalar]) -> TrainResult:
        step = config_float(config, "lr", 1e-3) * (self.partition + 1)
        with torch.no_grad():
            for param in model.parameters():
                if param.is_floating_point():
                    param.add_(step)
        round_ = config_int(config, "round", 0)
        return TrainResult(
            num_examples=100 * (self.partition + 1),
            metrics={"loss": 1.0 / (1 + round_ + self.partition)},
        )
