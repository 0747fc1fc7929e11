"""One rank of the two that tests/client/test_sharded.py starts: `python sharded_ranks.py OUT`.

RANK, WORLD_SIZE, MASTER_ADDR and MASTER_PORT come from the environment, as torchrun
sets them; what the rank saw is saved to OUT/rankN.pt for the test to compare.
"""

from __future__ import annotations

import os
import sys
import weakref
from collections.abc import Mapping
from pathlib import Path
from typing import Any, cast

import torch
from torch import nn
from torch.distributed.tensor import DTensor

from fedstream.client.held_model import HeldModel
from fedstream.client.sharded import ShardedGroup
from fedstream.client.site import Ranks, open_site
from fedstream.common.wire.manifest import Manifest
from fedstream.common.wire.stream import tensor_bytes
from fedstream.tasks import ConfigScalar, Task, TrainResult, exchanged_names


class Stack(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.blocks = nn.ModuleList([nn.Linear(4, 5), nn.Linear(5, 3)])  # 5 and 3 rows
        self.register_buffer("scale", torch.full((3,), 2.0))
        self.register_buffer("freq", torch.arange(3.0), persistent=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for block in self.blocks:
            x = block(x)
        scale, freq = self.get_buffer("scale"), self.get_buffer("freq")
        return x * scale + freq


class StackTask(Task):
    def build_model(self) -> nn.Module:
        torch.manual_seed(0)
        return Stack()

    def load_data(self, partition: int, num_partitions: int) -> None:
        """Nothing to load."""

    def train(self, model: nn.Module, config: Mapping[str, ConfigScalar]) -> TrainResult:
        raise NotImplementedError


def global_model(layout: Manifest) -> dict[str, torch.Tensor]:
    return {
        e.name: torch.arange(e.numel, dtype=e.dtype).view(e.shape) / 10 + i
        for i, e in enumerate(layout.entries)
    }


def main(out: str) -> None:
    rank = int(os.environ["RANK"])
    ranks = Ranks.from_env()
    assert ranks is not None
    group = open_site(ranks, torch.device("cpu"), timeout=30, parallel="fsdp")
    assert isinstance(group, ShardedGroup)
    task = StackTask()
    results: dict[str, Any] = {}
    try:
        model, layout = group.build(task)
        whole = task.build_model()
        results["same_layout"] = layout == Manifest.of_model(
            whole.state_dict(), exchanged_names(task, whole)
        )
        results["local_rows"] = {
            n: cast(DTensor, p).to_local().shape[0] for n, p in model.named_parameters()
        }
        held = None
        if group.leader:
            held = HeldModel(layout, 1)
            for tensor in global_model(layout).values():
                held.write(tensor_bytes(tensor))
        group.share_model(model, layout, held)
        results["shared"] = {
            n: t.full_tensor() if isinstance(t, DTensor) else t.clone()
            for n, t in model.state_dict().items()
        }
        results["freq"] = model.get_buffer("freq").clone()
        nn.functional.mse_loss(
            model(torch.full((2, 4), float(rank + 1))), torch.zeros(2, 3)
        ).backward()
        torch.optim.SGD(model.parameters(), lr=0.1).step()

        # Count the whole tensors alive at each gather: the last one must be gone.
        gathered: list[weakref.ref[torch.Tensor]] = []
        peaks: list[int] = []
        full_tensor = DTensor.full_tensor

        def counted(self: DTensor, **kwargs: Any) -> torch.Tensor:
            whole = full_tensor(self, **kwargs)
            gathered.append(weakref.ref(whole))
            peaks.append(sum(ref() is not None for ref in gathered))
            return whole

        DTensor.full_tensor = counted  # type: ignore[method-assign]
        trained = group.collect(model, layout, gradient=False)
        spooled = {n: trained[n].clone() for n in layout.names} if trained else None
        if held is not None and trained is not None:  # before the next collect ends it
            results["deltas"] = torch.cat(list(held.deltas(trained, 4)))
        grads = group.collect(model, layout, gradient=True)
        spooled_grads = {n: grads[n].clone() for n in layout.names} if grads else None
        DTensor.full_tensor = full_tensor  # type: ignore[method-assign]
        results["peaks"] = peaks
        results["trained"] = {
            n: t.full_tensor() if isinstance(t, DTensor) else t.clone()
            for n, t in model.state_dict().items()
        }
        results["grads"] = {
            n: cast(DTensor, p.grad).full_tensor() for n, p in model.named_parameters()
        }
        results["spooled"], results["spooled_grads"] = spooled, spooled_grads
        if held is not None:
            results["global"] = global_model(layout)
            held.close()
    finally:
        group.close()
    torch.save(results, Path(out) / f"rank{rank}.pt")


if __name__ == "__main__":
    main(sys.argv[1])
