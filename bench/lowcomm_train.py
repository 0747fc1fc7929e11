"""The training runs of `bench/lowcomm.py`, in one process, through the real code.

Every client is a real `charlm` task object (kept for the whole run, as a client process
keeps it, so `keep_optimizer=1` carries its inner AdamW from one round to the next) with
its own model; the coordinator's side is the real Strategy built from a ServerConfig;
uplink encoding is the real client encoder (`fedstream.client.uplink`, error feedback
included) and decoding the codec's own `decode`, as the coordinator's spool does. Bytes
are counted, not sent: each synchronisation moves every client's encoded update up and
the synchronised tensors (float32, raw, as the coordinator broadcasts them) down.

Streaming (Douillard et al. 2025, "Streaming DiLoCo with overlapping communication"): the
exchanged tensors are cut into F contiguous fragments (state-dict order, which is layer
order, balanced by bytes, as on the wire); fragment f is synchronised at steps
(f + 1) H / F + m H; a client keeps training for `overlap` steps while its fragment is
away and then mixes the new global fragment in, local <- alpha local + (1 - alpha) global.
Each fragment has its own outer DiLoCo step (its own momentum), as a fragment's round on
the wire has (`fedstream server --fragments F`, which mixes with overlap 0;
`bench/lowcomm_cluster.py` runs such a row through real processes).
"""

from __future__ import annotations

import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from fedstream.client.uplink import UplinkEncoder
from fedstream.common.codecs import UplinkCodec
from fedstream.common.fragments import split
from fedstream.common.wire.manifest import Manifest
from fedstream.server.config import ServerConfig
from fedstream.server.strategies import DeltaBlock
from fedstream.server.strategies.base import Strategy
from fedstream.server.strategies.build import build_strategy
from fedstream.server.updates import VerifiedUpdate
from fedstream.tasks import load_task
from fedstream.tasks.charlm import CharLMTask

FLOAT_BYTES = 4


@dataclass(frozen=True)
class Scale:
    """The problem every row shares: model, clients, steps and the inner optimiser."""

    task_opt: Mapping[str, str]
    clients: int = 4
    steps: int = 1000
    """Inner steps each client takes in the whole run (the same for every row)."""
    batch_size: int = 8
    """Windows per client step; the centralised run takes clients x this per step."""
    lr: float = 3e-3
    seed: int = 0
    iid: bool = False
    """Every client draws its windows from the pooled data (a diagnostic: not federated)."""


@dataclass
class Point:
    step: int
    bytes_moved: int
    loss: float


@dataclass
class Run:
    """One row of the table, and its curve."""

    label: str
    loss: float = float("nan")
    bytes_moved: int = 0
    uplink_bytes: int = 0
    peak_bytes: int = 0
    """The most bytes one synchronisation moved (all clients, up and down)."""
    syncs: int = 0
    seconds: float = 0.0
    curve: list[Point] = field(default_factory=list)

    def sync(self, up: int, down: int) -> None:
        self.bytes_moved += up + down
        self.uplink_bytes += up
        self.peak_bytes = max(self.peak_bytes, up + down)
        self.syncs += 1


def charlm(scale: Scale, keep: bool) -> CharLMTask:
    options = {**scale.task_opt, "keep_optimizer": "1" if keep else "0"}
    task = load_task("charlm", options, scale.seed)
    assert isinstance(task, CharLMTask)
    return task


def exchanged(model: nn.Module) -> dict[str, torch.Tensor]:
    """The floating-point state tensors, sharing storage with the model (as the coordinator)."""
    return {k: v for k, v in model.state_dict().items() if v.is_floating_point()}


def partitions(scale: Scale, keep: bool) -> list[CharLMTask]:
    """One task a client, each holding its own topics."""
    tasks = [charlm(scale, keep) for _ in range(scale.clients)]
    for partition, task in enumerate(tasks):
        task.load_data(partition, scale.clients)
    return tasks


def pooled_tokens(tasks: list[CharLMTask]) -> torch.Tensor:
    return torch.cat([t._tokens for t in tasks if t._tokens is not None])


def clients(scale: Scale, keep: bool) -> list[CharLMTask]:
    """The clients of a run: their own topics, or (`iid`) each the pooled data."""
    tasks = partitions(scale, keep)
    if scale.iid:
        pooled = pooled_tokens(tasks)
        for task in tasks:
            task._tokens = pooled
    return tasks


def heldout(task: CharLMTask, model: nn.Module) -> float:
    return task.evaluate(model).metrics["loss"]


def centralised(scale: Scale, evals: int) -> Run:
    """AdamW on the pooled data: the same total windows, clients x batch_size per step."""
    started = time.monotonic()
    parts = partitions(scale, keep=True)
    pooled = parts[0]
    pooled._tokens = pooled_tokens(parts)
    model = pooled.build_model()
    run = Run("centralised AdamW (pooled data)")
    every = scale.steps // evals
    for chunk in range(1, evals + 1):
        config = {"local_steps": every, "batch_size": scale.clients * scale.batch_size,
                  "lr": scale.lr, "round": chunk}  # fmt: skip
        pooled.train(model, config)
        run.curve.append(Point(chunk * every, 0, heldout(pooled, model)))
    run.loss, run.seconds = run.curve[-1].loss, time.monotonic() - started
    return run


def strategy(name: str, **flags: Any) -> Strategy:
    config = ServerConfig(strategy=name)
    for key, value in flags.items():
        setattr(config, key, value)
    config.validate()
    return build_strategy(config)


def ddp(scale: Scale, evals: int) -> Run:
    """Synchronous data parallelism: FedSGD every step (each client's gradient of one
    batch, averaged; the coordinator steps Adam with the inner learning rate). Bytes are
    a DDP ring all-reduce's: each of N workers sends 2 (N - 1) / N of the gradient a step."""
    started = time.monotonic()
    outer = strategy("fedsgd", server_optimizer="adam", server_lr=scale.lr)
    tasks = clients(scale, keep=False)
    model = tasks[0].build_model()
    global_tensors = exchanged(model)
    locals_ = [task.build_model() for task in tasks]
    size = sum(t.numel() for t in global_tensors.values()) * FLOAT_BYTES
    allreduce = 2 * (scale.clients - 1) * size
    run = Run("synchronous data parallel (FedSGD every step)")
    every = scale.steps // evals
    for step in range(1, scale.steps + 1):
        config = outer.configure_round(step, {"local_steps": 1, "batch_size": scale.batch_size})
        outer.begin_round(global_tensors)
        updates = []
        for k, (task, local) in enumerate(zip(tasks, locals_, strict=True)):
            local.load_state_dict(model.state_dict())
            result = task.compute_gradient(local, {**config, "round": step})
            params = dict(local.named_parameters())
            blocks = [DeltaBlock(n, 0, params[n].grad.reshape(-1)) for n in global_tensors]  # type: ignore[union-attr]
            update = VerifiedUpdate.in_memory(f"client-{k}", result.num_examples, blocks)
            outer.accept(update)
            updates.append(update)
        with torch.no_grad():
            outer.aggregate(updates, global_tensors)
        run.sync(allreduce, 0)
        if step % every == 0:
            run.curve.append(Point(step, run.bytes_moved, heldout(tasks[0], model)))
    run.loss, run.seconds = run.curve[-1].loss, time.monotonic() - started
    return run


def fragments(tensors: Mapping[str, torch.Tensor], count: int) -> list[list[str]]:
    """`count` contiguous runs of the tensor names balanced by bytes: the one split the
    coordinator and the clients use on the wire (`fedstream.common.fragments.split`)."""
    return split({n: t.numel() * t.element_size() for n, t in tensors.items()}, count)


@dataclass(frozen=True)
class LocalSGD:
    """A DiLoCo row: H, the uplink codec, and the streaming fragments (1: plain DiLoCo)."""

    label: str
    h: int
    codec: str = "raw"
    topk_fraction: float = 0.02
    fragments: int = 1
    overlap: int = 0
    """Streaming: inner steps a client takes between sending a fragment and mixing it."""
    alpha: float = 0.0
    """Streaming: the share of the local fragment kept when the global one arrives."""
    keep: bool = True
    """The clients keep their inner AdamW across rounds (`keep_optimizer=1`)."""
    outer_lr: float | None = None
    """The outer step's learning rate (None: DiLoCo's 0.7)."""
    outer_momentum: float | None = None
    """The outer step's Nesterov momentum (None: DiLoCo's 0.9; 0 with lr 1 is FedAvg)."""
    last_syncs: bool = True
    """Streaming: every fragment takes a last sync at the end (False: each fragment syncs
    on its own schedule alone, as `fedstream server --fragments F` rounds do)."""


class Sites:
    """The clients of a local-SGD run: their tasks, models and uplink encoders."""

    def __init__(self, scale: Scale, model: nn.Module, uplink: UplinkCodec, keep: bool) -> None:
        self.scale = scale
        self.tasks = clients(scale, keep)
        self.models = [task.build_model() for task in self.tasks]
        for local in self.models:
            local.load_state_dict(model.state_dict())
        self.encoders = [UplinkEncoder() for _ in self.tasks]
        for encoder in self.encoders:
            encoder.configure(uplink)
        self.uplink = uplink
        self.segment = 0

    def train(self, steps: int, config: Mapping[str, Any]) -> None:
        self.segment += 1
        for task, local in zip(self.tasks, self.models, strict=True):
            task.train(local, {**config, "local_steps": steps, "round": self.segment})

    def updates(
        self, global_tensors: Mapping[str, torch.Tensor], names: list[str]
    ) -> tuple[list[VerifiedUpdate], int]:
        """Each client's encoded delta of `names`, decoded as the coordinator does; and
        the bytes of the encoded parts, all clients together."""
        layout = Manifest.from_tensors({n: global_tensors[n] for n in names})
        out, moved = [], 0
        for k, (encoder, local) in enumerate(zip(self.encoders, self.models, strict=True)):
            state = local.state_dict()
            deltas = [state[n] - global_tensors[n] for n in names]
            encoded = encoder.encode(layout, lambda *_: iter(deltas))  # noqa: B023
            parts = [p.contiguous() for p in encoded.pieces()]
            moved += sum(p.numel() * p.element_size() for p in parts)
            blocks, at = [], 0
            for entry in layout.entries:
                count = len(self.uplink.codec.layout(entry))
                decoded = self.uplink.codec.decode(parts[at : at + count], entry.dtype, entry.shape)
                blocks.append(DeltaBlock(entry.name, 0, decoded.reshape(-1)))
                at += count
            encoded.commit()
            out.append(VerifiedUpdate.in_memory(f"client-{k}", 1, blocks))
        return out, moved

    def mix(
        self, global_tensors: Mapping[str, torch.Tensor], names: list[str], alpha: float
    ) -> None:
        with torch.no_grad():
            for local in self.models:
                state = local.state_dict()
                for n in names:
                    state[n].mul_(alpha).add_(global_tensors[n], alpha=1 - alpha)


def local_sgd(scale: Scale, row: LocalSGD, on_sync: Callable[[Run], None] | None = None) -> Run:
    """DiLoCo (or streaming DiLoCo) through the real DiLoCo strategy, one per fragment."""
    started = time.monotonic()
    server = charlm(scale, keep=False)
    model = server.build_model()
    global_tensors = exchanged(model)
    groups = fragments(global_tensors, row.fragments)
    flags = {"server_lr": row.outer_lr, "server_momentum": row.outer_momentum}
    outers = [strategy("diloco", **flags) for _ in groups]
    uplink = UplinkCodec.parse(row.codec, row.topk_fraction)
    sites = Sites(scale, model, uplink, row.keep)
    base = {"batch_size": scale.batch_size, "lr": scale.lr, **uplink.round_config()}
    run = Run(row.label)
    step = 0
    for at, kind, f in schedule(scale.steps, row):
        if at > step:
            sites.train(at - step, base)
            step = at
        names = groups[f]
        if kind == "merge":
            sites.mix(global_tensors, names, row.alpha)
            continue
        fragment = {n: global_tensors[n] for n in names}
        outers[f].begin_round(fragment)
        updates, up = sites.updates(global_tensors, names)
        for update in updates:
            outers[f].accept(update)
        with torch.no_grad():
            outers[f].aggregate(updates, fragment)
        run.sync(up, scale.clients * sum(t.numel() for t in fragment.values()) * FLOAT_BYTES)
        if row.overlap == 0:
            sites.mix(global_tensors, names, row.alpha)
        if f == row.fragments - 1:
            run.curve.append(Point(at, run.bytes_moved, heldout(server, model)))
        if on_sync:
            on_sync(run)
    run.loss, run.seconds = run.curve[-1].loss, time.monotonic() - started
    return run


def schedule(steps: int, row: LocalSGD) -> list[tuple[int, str, int]]:
    """(step, "sync" | "merge", fragment) in order. Fragment f syncs at (f + 1) H / F + m H
    and merges `overlap` steps later (overlap 0: no merge event, the sync mixes at once); at
    the last step every fragment takes a last sync, one after another, so the scored model
    holds all training (unless `last_syncs` is off)."""
    if row.h % row.fragments or steps % row.h or not 0 <= row.overlap < row.h // row.fragments:
        raise ValueError(f"{row.label}: need F | H, H | steps and overlap < H / F")
    events: list[tuple[int, str, int]] = []
    gap = row.h // row.fragments
    for f in range(row.fragments):
        for at in range((f + 1) * gap, steps + 1, row.h):
            events.append((at, "sync", f))
            if row.overlap and at + row.overlap <= steps and at != steps:
                events.append((at + row.overlap, "merge", f))
    last = {f for at, kind, f in events if at == steps}
    if row.last_syncs:
        events += [(steps, "sync", f) for f in range(row.fragments) if f not in last]
    order = {"merge": 0, "sync": 1}
    return sorted(set(events), key=lambda e: (e[0], order[e[1]], e[2]))
