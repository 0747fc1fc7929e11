"""A site larger than one process: its ranks as one torch.distributed job.

A site is one client of the federation whatever its size (docs/multi-gpu-sites.md). When
`fedstream client` runs under torchrun (or `--nproc-per-node K`, launch.py), every rank
opens one process group (NCCL on CUDA, gloo on CPU) and only rank 0 talks to the
coordinator. Each time rank 0 has work it tells the other ranks over the group:

    IDLE      between polls, so a waiting rank's collective never reaches its timeout
    TRAIN     a round's TrainTask, then the global model, tensor by tensor, block by block
    EVALUATE  an EvaluateTask, then the global model
    END       the run is over: every rank exits with the code rank 0 exits with

then every rank trains its own shard inside DistributedDataParallel (its gradients are
all-reduced in backward) or evaluates it, and the example counts are summed and the
metrics averaged over ranks (weighted by examples), so rank 0 reports the site's total.

A rank that dies breaks the group: the survivors' next collective fails at once (a closed
connection) or after `rank_timeout` seconds (a hung rank), and they exit EXIT_RANK_LOST,
so the site's launcher restarts it or its operator does, and rank 0 joins again.

`Site` is the group of one: a client that is a single process pays nothing for any of it.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Mapping
from dataclasses import dataclass
from datetime import timedelta
from enum import IntEnum

import torch
import torch.distributed as dist
from torch.nn.parallel import DistributedDataParallel

from fedstream.client.held_model import HeldModel
from fedstream.common.config import ConfigError
from fedstream.common.proto.v1 import coordinator_pb2 as pb
from fedstream.common.wire.manifest import Manifest
from fedstream.tasks import Task, exchanged_names

log = logging.getLogger(__name__)

BROADCAST_BLOCK_BYTES = 64 << 20
"""Bytes of a tensor broadcast in one collective: big tensors travel in blocks."""


class Command(IntEnum):
    IDLE = 0
    TRAIN = 1
    EVALUATE = 2
    END = 3


@dataclass(frozen=True)
class Ranks:
    """Where this process stands in its site's job, as torchrun's environment says."""

    rank: int
    world: int
    local_rank: int

    @classmethod
    def from_env(cls) -> Ranks | None:
        """The ranks torchrun (or any launcher that sets RANK and WORLD_SIZE) gave this
        process; None for a process started on its own."""
        if "RANK" not in os.environ or "WORLD_SIZE" not in os.environ:
            return None
        try:
            rank, world = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
            local_rank = int(os.environ.get("LOCAL_RANK", rank))
        except ValueError:
            raise ConfigError(
                "RANK, WORLD_SIZE and LOCAL_RANK must be integers (as torchrun sets them)"
            ) from None
        if not 0 <= rank < world:
            raise ConfigError(f"RANK={rank} is outside 0..{world - 1} (WORLD_SIZE={world})")
        return cls(rank, world, local_rank)

    def device(self, configured: str) -> torch.device:
        """In a site of several ranks a bare `cuda` means this rank's own GPU
        (cuda:LOCAL_RANK); anything else is taken as given."""
        if configured == "cuda" and self.world > 1:
            return torch.device(f"cuda:{self.local_rank}")
        return torch.device(configured)

    def shard(self, partition: int, num_partitions: int) -> tuple[int, int]:
        """The data partition this rank loads: shard `rank` of the site's partition, as
        partition `partition * world + rank` of `num_partitions * world`."""
        return partition * self.world + self.rank, num_partitions * self.world


class Site:
    """A site of one process: nothing to share, nothing to sum."""

    rank = 0
    world = 1

    @property
    def leader(self) -> bool:
        return self.rank == 0

    def build(self, task: Task) -> tuple[torch.nn.Module, Manifest]:
        """The task's model on its device, and the layout of the tensors it exchanges
        (tied tensors follow their source as they share it)."""
        model = task.build_model().to(task.device)
        return model, Manifest.of_model(model.state_dict(), exchanged_names(task, model))

    def wrap(self, model: torch.nn.Module) -> torch.nn.Module:
        """The model as the task's train sees it."""
        return model

    def send(self, command: Command, payload: bytes = b"") -> None:
        """Rank 0: tell the other ranks `command` (with its serialised task)."""

    def receive(self) -> tuple[Command, bytes]:
        raise AssertionError("a site of one process has no rank 0 to hear from")

    def share_model(
        self, model: torch.nn.Module, layout: Manifest, held: HeldModel | None = None
    ) -> None:
        """The global model into every rank's `model`, in place: rank 0 passes the `held`
        copy it downloaded, the other ranks None."""
        if held is not None:
            held.load_into(model.state_dict())

    def collect(
        self, model: torch.nn.Module, layout: Manifest, gradient: bool
    ) -> Mapping[str, torch.Tensor] | None:
        """After training, the trained tensors (`gradient`: the gradients) `layout` lists,
        on rank 0, for its upload; None where rank 0's `model` holds them whole already."""
        return None

    def total(self, num_examples: int, metrics: dict[str, float]) -> tuple[int, dict[str, float]]:
        """The site's example count (the sum over ranks) and its metrics (their mean
        weighted by each rank's examples)."""
        return num_examples, metrics

    def total_report(self, report: pb.EvaluationReport) -> pb.EvaluationReport:
        """`report` of this rank's evaluation made the site's (`total`)."""
        num_examples, metrics = self.total(report.num_examples, dict(report.metrics))
        report.num_examples = num_examples
        report.metrics.clear()
        report.metrics.update(metrics)
        return report

    def close(self) -> None:
        """Leave the group."""


class RankGroup(Site):
    """The process group of a site of several ranks."""

    def __init__(self, ranks: Ranks, device: torch.device, timeout: float) -> None:
        self.rank = ranks.rank
        self.world = ranks.world
        self.device = device
        backend = "nccl" if device.type == "cuda" else "gloo"
        if device.type == "cuda":
            torch.cuda.set_device(device)
        wait = timedelta(seconds=timeout)
        dist.init_process_group(
            backend,
            store=_store(ranks, wait),
            rank=ranks.rank,
            world_size=ranks.world,
            timeout=wait,
        )
        log.info(
            "rank %d of %d (pid %d, %s on %s)", self.rank, self.world, os.getpid(), backend, device
        )

    def wrap(self, model: torch.nn.Module) -> torch.nn.Module:
        """`model` in DistributedDataParallel, which all-reduces its gradients in backward;
        the bare model when nothing in it is trained (DDP refuses such a model)."""
        if not any(p.requires_grad for p in model.parameters()):
            return model
        ids = [self.device.index] if self.device.type == "cuda" else None
        return DistributedDataParallel(model, device_ids=ids)

    def send(self, command: Command, payload: bytes = b"") -> None:
        header = torch.tensor([int(command), len(payload)], dtype=torch.int64, device=self.device)
        dist.broadcast(header, 0)
        if payload:
            body = torch.frombuffer(bytearray(payload), dtype=torch.uint8).to(self.device)
            dist.broadcast(body, 0)

    def receive(self) -> tuple[Command, bytes]:
        header = torch.zeros(2, dtype=torch.int64, device=self.device)
        dist.broadcast(header, 0)
        command, length = Command(int(header[0])), int(header[1])
        if not length:
            return command, b""
        body = torch.empty(length, dtype=torch.uint8, device=self.device)
        dist.broadcast(body, 0)
        return command, body.cpu().numpy().tobytes()

    def share_model(
        self, model: torch.nn.Module, layout: Manifest, held: HeldModel | None = None
    ) -> None:
        """Rank 0 loads `held`; then each exchanged tensor is broadcast from it as raw
        bytes (any dtype, bf16 included, over gloo as over NCCL), in blocks of
        BROADCAST_BLOCK_BYTES, into the tensors themselves: no rank holds a second copy
        of the model."""
        super().share_model(model, layout, held)
        state = model.state_dict()
        with torch.no_grad():
            for name in layout.names:
                broadcast_tensor(name, state[name])

    def total(self, num_examples: int, metrics: dict[str, float]) -> tuple[int, dict[str, float]]:
        shares: list[tuple[int, dict[str, float]] | None] = [None] * self.world
        dist.all_gather_object(shares, (num_examples, metrics))
        counted = [share for share in shares if share is not None]
        examples = sum(n for n, _ in counted)
        if self.leader:
            log.info("the site's %d ranks: %d examples in all", self.world, examples)
        combined: dict[str, float] = {}
        for key in metrics:
            values = [(n, m[key]) for n, m in counted if key in m]
            weight = sum(n for n, _ in values)
            combined[key] = (
                sum(n * v for n, v in values) / weight
                if weight
                else sum(v for _, v in values) / len(values)
            )
        return examples, combined

    def close(self) -> None:
        if dist.is_initialized():
            dist.destroy_process_group()


def broadcast_tensor(name: str, tensor: torch.Tensor) -> None:
    """Rank 0's `tensor` into every rank's, in place, as raw bytes, block by block."""
    if not tensor.is_contiguous():
        raise ConfigError(f"cannot broadcast {name}: it is not contiguous in memory")
    raw = tensor.view(-1).view(torch.uint8)
    for start in range(0, raw.numel(), BROADCAST_BLOCK_BYTES):
        dist.broadcast(raw[start : start + BROADCAST_BLOCK_BYTES], 0)


def _store(ranks: Ranks, timeout: timedelta) -> dist.Store:
    """The store at MASTER_ADDR:MASTER_PORT the ranks meet at, under a prefix of their own
    restart (TORCHELASTIC_RESTART_COUNT).

    torchrun's agent keeps one store across the restarts of its ranks, and env://
    rendezvous adds no prefix per restart: a restarted rank could read the address its
    dead predecessor published and fail to connect to it.
    """
    try:
        host, port = os.environ["MASTER_ADDR"], int(os.environ["MASTER_PORT"])
    except (KeyError, ValueError):
        raise ConfigError("a rank needs MASTER_ADDR and MASTER_PORT (torchrun sets them)") from None
    # Under torchrun's agent the agent hosts the store; without it, rank 0 does.
    hosted = os.environ.get("TORCHELASTIC_USE_AGENT_STORE") == str(True)
    store = dist.TCPStore(
        host, port, ranks.world, is_master=not hosted and ranks.rank == 0, timeout=timeout
    )
    attempt = os.environ.get("TORCHELASTIC_RESTART_COUNT", "0")
    return dist.PrefixStore(f"fedstream/attempt-{attempt}/", store)


def open_site(
    ranks: Ranks | None, device: torch.device, timeout: float, parallel: str = "ddp"
) -> Site:
    """The site this process belongs to: under torchrun a RankGroup (DDP) or, with
    `parallel` fsdp, a ShardedGroup (sharded.py); else a Site of one, whose model is
    whole in any case."""
    if ranks is None or ranks.world == 1:
        return Site()
    if parallel == "fsdp":
        from fedstream.client.sharded import ShardedGroup  # it builds on RankGroup

        return ShardedGroup(ranks, device, timeout)
    return RankGroup(ranks, device, timeout)
