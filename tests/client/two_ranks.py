"""Two ranks of a site as real processes on loopback (gloo), each running a helper script
that writes what it saw to `out/rank{r}.pt`."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import torch


def run_two_ranks(helper: Path, out: Path, port: int, timeout: float) -> tuple[Any, Any]:
    """What rank 0 and rank 1 of `helper` saved, once both exited 0."""
    ranks = [
        subprocess.Popen(
            [sys.executable, str(helper), str(out)],
            env={
                **os.environ,
                "MASTER_ADDR": "127.0.0.1",
                "MASTER_PORT": str(port),
                "RANK": str(rank),
                "WORLD_SIZE": "2",
            },
        )
        for rank in (0, 1)
    ]
    try:
        assert [rank.wait(timeout) for rank in ranks] == [0, 0]
    finally:
        for rank in ranks:
            rank.kill()
    leader, follower = (torch.load(out / f"rank{r}.pt", weights_only=False) for r in (0, 1))
    return leader, follower
