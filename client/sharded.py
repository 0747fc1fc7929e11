"""A site of several ranks whose model is sharded across them: FSDP2 (`--site-parallel fsdp`).

For a model that does not fit one device of the site (docs/multi-gpu-sites.md). Every rank
builds the model with its parameters on the meta device (no memory), wraps it with
torch's `fully_shard` (each nn.ModuleList's entries, then the whole model) and allocates
only its own shard of each parameter. Then, each round:

- **in**: rank 0 reads one global tensor at a time from the copy it holds on disk
  (held_model.py) and scatters it: each rank receives only its rows, straight into its
  shard. Buffers, which FSDP does not shard, are broadcast whole as a DDP site does.
- **training**: the task's `train` receives the sharded model; FSDP gathers each unit's
  parameters for its forward and backward and reduce-scatters the gradients, which it
  averages over the ranks as DDP does.
- **out**: every rank takes part, in manifest order, in gathering one trained parameter
  (or gradient) at a time (`full_tensor()`); rank 0 writes each into a spool file on its
  disk and lets it go before the next, and uploads from the spool, so its delta is
  computed against the held model block by block as a single process's is
  (`HeldModel.deltas`). A retried upload reads the spool again: the other ranks are not
  needed for it.

No rank ever holds the whole model: rank 0 holds its shard, one whole tensor in flight, and
two files on disk (the page cache keeps them fast while memory is plentiful).
"""

from __future__ import annotations

import contextlib
import logging
import mmap
import os
import tempfile
from collections.abc import Iterator, Mapping

import torch
import torch.distributed as dist
from torch import nn
from torch.distributed.device_mesh import init_device_mesh
from torch.distributed.fsdp import fully_shard
from torch.distributed.tensor import DTensor, Shard

from fedstream.client.held_model import HeldModel
from fedstream.client.site import RankGroup, Ranks, broadcast_tensor
from fedstream.common.config import ConfigError
from fedstream.common.wire.manifest import Manifest, TensorEntry
from fedstream.common.wire.stream import tensor_bytes
from fedstream.tasks import Task, exchanged_names

log = logging.getLogger(__name__)


@contextlib.contextmanager
def parameters_on_meta() -> Iterator[None]:
    """Every parameter a module registers goes to the meta device as it is registered:
    a model is built with no memory for its weights, one layer's at most in passing.
    Buffers stay where they are made (they are small, and a non-persistent one, such as
    rotary frequencies, is never sent: it must keep the value it is built with)."""
    register = nn.Module.register_parameter

    def on_meta(self: nn.Module, name: str, param: nn.Parameter | None) -> None:
        register(self, name, param)
        if param is not None and param.device.type != "meta":  # a tie keeps its identity
            self._parameters[name] = nn.Parameter(
                param.detach().to("meta"), requires_grad=param.requires_grad
            )

    nn.Module.register_parameter = on_meta  # type: ignore[method-assign]
    try:
        yield
    finally:
        nn.Module.register_parameter = register  # type: ignore[method-assign]


def layout_of(task: Task, model: nn.Module) -> Manifest:
    """Manifest.of_model for a model on the meta device, where every tensor has the same
    (empty) storage: a tie is the very same tensor object in two places."""
    state = model.state_dict(keep_vars=True)
    chosen = {name: state[name] for name in exchanged_names(task, model)}
    first: dict[int, str] = {}
    ties = {}
    for name, tensor in chosen.items():
        source = first.setdefault(id(tensor), name)
        if source != name:
            ties[name] = source
    sent = {name: tensor for name, tensor in chosen.items() if name not in ties}
    return Manifest.from_tensors(sent, ties=ties)


def rows_of(rank: int, world: int, rows: int) -> tuple[int, int]:
    """The rows [start, end) of a tensor of `rows` rows that FSDP's Shard(0) gives `rank`
    (torch.chunk's split: ceil(rows / world) each, the last ranks fewer or none)."""
    per = -(-rows // world)
    return min(rank * per, rows), min((rank + 1) * per, rows)


class Spool(Mapping[str, torch.Tensor]):
    """The trained tensors of `manifest` on rank 0's disk, written one at a time in
    manifest order, read back through a memory map (the kernel pages them in and out)."""

    def __init__(self, manifest: Manifest) -> None:
        self.manifest = manifest
        self._file = tempfile.TemporaryFile(prefix="fedstream-trained-")  # noqa: SIM115
        self._entries = {entry.name: entry for entry in manifest.entries}
        self._offsets: dict[str, int] = {}
        offset = 0
        for entry in manifest.entries:
            self._offsets[entry.name] = offset
            offset += entry.nbytes
        self._map: mmap.mmap | None = None

    def write(self, entry: TensorEntry, tensor: torch.Tensor) -> None:
        view = tensor_bytes(tensor.detach().to("cpu", entry.dtype).contiguous())
        offset, done = self._offsets[entry.name], 0
        while done < len(view):
            done += os.pwrite(self._file.fileno(), view[done:], offset + done)

    def __getitem__(self, name: str) -> torch.Tensor:
        entry = self._entries[name]
        if not entry.nbytes:
            return torch.empty(entry.shape, dtype=entry.dtype)
        if self._map is None:
            self._map = mmap.mmap(self._file.fileno(), self.manifest.total_bytes)
        raw = torch.frombuffer(
            self._map, dtype=torch.uint8, count=entry.nbytes, offset=self._offsets[name]
        )
        return raw.view(entry.dtype).view(entry.shape)

    def __iter__(self) -> Iterator[str]:
        return iter(self._entries)

    def __len__(self) -> int:
        return len(self._entries)

    def close(self) -> None:
        if self._map is not None:
            with contextlib.suppress(BufferError):  # a view still read: unmapped with it
                self._map.close()
        self._file.close()


class ShardedGroup(RankGroup):
    """The process group of a site whose model FSDP2 shards across its ranks."""

    def __init__(self, ranks: Ranks, device: torch.device, timeout: float) -> None:
        super().__init__(ranks, device, timeout)
        self.mesh = init_device_mesh(device.type, (self.world,))
        self.spool: Spool | None = None
        """Rank 0: the last round's trained tensors, until the next round's."""

    def build(self, task: Task) -> tuple[nn.Module, Manifest]:
        with parameters_on_meta():
            model = task.build_model()
        layout = layout_of(task, model)
        sent = set(layout.names) | {tie.name for tie in layout.ties}
        kept = [name for name, _ in model.named_parameters() if name not in sent]
        if kept:
            raise ConfigError(
                f"--site-parallel fsdp needs every parameter exchanged; {len(kept)} are not "
                f"(such as {kept[0]}): train this task with ddp"
            )
        units = [block for m in model.modules() if isinstance(m, nn.ModuleList) for block in m]
        for block in units:
            fully_shard(block, mesh=self.mesh)
        fully_shard(model, mesh=self.mesh)
        if self.leader:
            log.info(
                "the model is sharded by FSDP across the site's %d ranks (%d units)",
                self.world,
                len(units) + 1,
            )
        buffers = dict(model.named_buffers())
        model.to_empty(device=self.device)
        with torch.no_grad():
            for name, buffer in model.named_buffers():
                buffer.copy_(buffers[name])
        return model, layout

    def wrap(self, model: nn.Module) -> nn.Module:
        """The sharded model itself: FSDP's hooks are on it already."""
        return model

    def share_model(
        self, model: nn.Module, layout: Manifest, held: HeldModel | None = None
    ) -> None:
        """Each exchanged tensor in manifest order: a parameter scattered from rank 0's
        `held` copy, rows to their shard, a buffer broadcast whole."""
        state = model.state_dict(keep_vars=True)
        with torch.no_grad():
            for entry in layout.entries:
                target = state[entry.name]
                if isinstance(target, DTensor):
                    self._scatter(entry, target, held)
                    continue
                if held is not None:
                    target.copy_(held.read(entry))
                broadcast_tensor(entry.name, target.data)

    def _scatter(self, entry: TensorEntry, target: DTensor, held: HeldModel | None) -> None:
        if tuple(target.placements) != (Shard(0),) or not entry.shape:
            raise ConfigError(f"cannot share {entry.name}: it is not sharded by rows")
        local = target.to_local()
        rows = entry.shape[0]
        row_bytes = entry.nbytes // rows if rows else 0
        per = -(-rows // self.world) * row_bytes
        start, end = rows_of(self.rank, self.world, rows)
        if tuple(local.shape) != (end - start, *entry.shape[1:]):
            raise ConfigError(f"cannot share {entry.name}: FSDP split it other than by rows")
        received = torch.empty(per, dtype=torch.uint8, device=self.device)
        pieces = None
        if held is not None:
            raw = held.read(entry).view(-1).view(torch.uint8)
            padded = torch.zeros(per * self.world, dtype=torch.uint8)
            padded[: raw.numel()] = raw
            pieces = list(padded.to(self.device).chunk(self.world))
        dist.scatter(received, pieces, src=0)
        mine = received[: (end - start) * row_bytes]
        local.view(-1).view(torch.uint8).copy_(mine)

    def collect(
        self, model: nn.Module, layout: Manifest, gradient: bool
    ) -> Mapping[str, torch.Tensor] | None:
        """Gather each exchanged parameter (or its gradient) whole, one at a time, every
        rank in manifest order; rank 0 spools it and lets it go before the next."""
        if self.spool is not None:
            self.spool.close()
        spool = self.spool = Spool(layout) if self.leader else None
        state = model.state_dict(keep_vars=True)
        with torch.no_grad():
            for entry in layout.entries:
                value: torch.Tensor | None = state[entry.name]
                if gradient:
                    value = value.grad if isinstance(value, nn.Parameter) else None
                whole = value.full_tensor() if isinstance(value, DTensor) else value
                if spool is not None:
                    spool.write(entry, torch.zeros(entry.shape) if whole is None else whole)
                del whole
        return spool

    def close(self) -> None:
        if self.spool is not None:
            self.spool.close()
            self.spool = None
        super().close()
