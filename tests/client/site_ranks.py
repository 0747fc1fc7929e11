"""One rank of the two that tests/client/test_site.py starts: `python site_ranks.py OUT`.

RANK, WORLD_SIZE, MASTER_ADDR and MASTER_PORT come from the environment, as torchrun
sets them; what the rank saw is saved to OUT/rankN.pt for the test to compare.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

import torch
from torch import nn

from fedstream.client import site as site_module
from fedstream.client.site import Command, Ranks, open_site
from fedstream.common.proto.v1 import coordinator_pb2 as pb
from fedstream.common.wire.manifest import Manifest


class Pair(nn.Module):
    def __init__(self, fill: float) -> None:
        super().__init__()
        self.linear = nn.Linear(3, 1, bias=False)
        self.low = nn.Parameter(torch.full((5,), fill, dtype=torch.bfloat16), requires_grad=False)
        self.big = nn.Parameter(torch.full((300,), fill), requires_grad=False)
        with torch.no_grad():
            self.linear.weight.fill_(fill)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.linear(x)


def main(out: str) -> None:
    rank = int(os.environ["RANK"])
    site_module.BROADCAST_BLOCK_BYTES = 256  # `big` (1200 bytes) travels in 5 blocks
    ranks = Ranks.from_env()
    assert ranks is not None
    group = open_site(ranks, torch.device("cpu"), timeout=30)
    results: dict[str, object] = {}
    try:
        model = Pair(fill=1.5 if rank == 0 else -7.0)
        layout = Manifest.of_model(model.state_dict(), ["linear.weight", "low", "big"])
        if group.leader:
            group.send(Command.IDLE)
            group.send(Command.TRAIN, b"round 7")
        else:
            results["commands"] = [group.receive(), group.receive()]
        group.share_model(model, layout)
        results["state"] = {k: v.clone() for k, v in model.state_dict().items()}
        # DDP: each rank's gradient is the mean of both ranks' gradients.
        trained = group.wrap(model)
        x = torch.full((1, 3), float(rank + 1))
        trained(x).sum().backward()
        grad = model.linear.weight.grad
        assert grad is not None
        results["grad"] = grad.clone()
        results["total"] = group.total(10 * (rank + 1), {"loss": float(rank), "acc": 0.5})
        report = pb.EvaluationReport(round=3, num_examples=rank, metrics={"loss": 4.0})
        results["report"] = group.total_report(report).SerializeToString()
    finally:
        group.close()
    torch.save(results, Path(out) / f"rank{rank}.pt")


if __name__ == "__main__":
    main(sys.argv[1])
