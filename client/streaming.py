"""A streaming client's side of a round (docs/low-communication.md, "Streaming fragments").

Round r synchronises fragment f_r = (r - 1) mod F and trains model version r - 1. The
client's own model persists from round to round (streaming never resets it to the global
model), and it holds the global model it last synchronised with, on disk (`HeldModel`):
each fragment's anchor, the global value its pseudo-gradient is taken against.

    holds version r - 1      nothing to download (a round run again, say)
    holds version r - 2      download fragment f_{r-1} as round r - 1 committed it, mix it
                             in: local <- alpha local + (1 - alpha) global; it becomes that
                             fragment's anchor
    holds anything else      catch up: download the whole model r - 1, reset the local
    (or nothing)             model and every anchor to it, drop the inner optimiser state

Then the client trains `local_steps` inner steps on its whole model and uploads
local - anchor for fragment f_r alone (the sign of every fedstream delta). The anchor of
f_r is the global value: no round since f_r's last synchronisation has changed it.

A federated evaluation loads the whole global model into the client's model; a streaming
client keeps its own model on disk meanwhile and takes it back after, with the fragment
the evaluated version changed mixed in as a round would have (`own_model_kept`).
"""

from __future__ import annotations

import contextlib
import functools
import logging
from collections.abc import Callable, Iterator, Mapping

import torch

from fedstream.client.connection import Connection
from fedstream.client.held_model import HeldModel
from fedstream.client.session import Session
from fedstream.common.fragments import StreamPlan, changed_by_version, fragment_manifests
from fedstream.common.proto.v1 import coordinator_pb2 as pb
from fedstream.common.wire.manifest import Manifest
from fedstream.common.wire.stream import tensor_bytes
from fedstream.tasks import Task

log = logging.getLogger(__name__)


@functools.lru_cache(maxsize=4)
def layouts(layout: Manifest, count: int) -> tuple[Manifest, ...]:
    """The client's exchanged tensors cut as the coordinator cuts them."""
    return tuple(fragment_manifests(layout, count))


def mix_in(
    held: HeldModel, part: HeldModel, state: Mapping[str, torch.Tensor], alpha: float
) -> None:
    """Fragment `part` (of the model version it names) into the client: each of its
    tensors is mixed into the local model and becomes the held anchor."""
    with torch.no_grad():
        for entry in part.manifest.entries:
            fresh = part.read(entry)
            local = state[entry.name]
            local.mul_(alpha).add_(fresh.to(local.device, local.dtype), alpha=1 - alpha)
            held.patch(entry, fresh)
    held.version = part.version


def pull(
    connection: Connection,
    session: Session,
    held: HeldModel | None,
    model: torch.nn.Module,
    layout: Manifest,
    task: pb.TrainTask,
    stream: StreamPlan,
) -> bool:
    """Bring the client holding `held` (its anchors) and `model` (its own) to the model
    version `task` trains, when a fragment is enough (module docstring); False when it
    must catch up with the whole model instead."""
    version = task.model_version
    if held is not None and held.version == version:
        return True
    if held is None or version < 1 or held.version != version - 1:
        had = "no model" if held is None else f"model v{held.version}"
        log.info("round %d: holding %s, catching up to model v%d", task.round, had, version)
        return False
    index = changed_by_version(version, stream.count)
    part = connection.download(
        session, version, layouts(layout, stream.count)[index], fragment=index
    )
    try:
        mix_in(held, part, model.state_dict(), stream.alpha)
    finally:
        part.close()
    log.info(
        "round %d: fragment %d of model v%d mixed in (alpha %g)",
        task.round,
        index,
        version,
        stream.alpha,
    )
    return True


def _mix_changed(
    held: HeldModel, layout: Manifest, model: torch.nn.Module, alpha: float, count: int
) -> None:
    """The fragment model `held.version` changed, from `held`, mixed into `model`."""
    state = model.state_dict()
    with torch.no_grad():
        for entry in layouts(layout, count)[changed_by_version(held.version, count)].entries:
            local = state[entry.name]
            fresh = held.read(entry)
            local.mul_(alpha).add_(fresh.to(local.device, local.dtype), alpha=1 - alpha)


@contextlib.contextmanager
def own_model_kept(
    model: torch.nn.Module,
    layout: Manifest,
    stream: StreamPlan | None,
    held: Callable[[], HeldModel | None],
    task: Task,
) -> Iterator[None]:
    """Around a federated evaluation, which loads the global model into `model`: a
    streaming client's own model goes to disk and comes back after it. Then, holding the
    next version (`held()`), the client mixes in the fragment that version changed; holding
    an older one than the version it held before, it has caught up instead: its model
    stays the global one and its inner optimiser state goes."""
    before = held()
    if stream is None or before is None or before.version < 0:
        yield
        return
    prior = before.version
    snapshot = HeldModel(layout, -1)
    try:
        state = model.state_dict()
        for entry in layout.entries:
            snapshot.write(tensor_bytes(state[entry.name].detach().to("cpu").contiguous()))
        try:
            yield
        except BaseException:
            snapshot.load_into(model.state_dict())
            raise
        now = held()
        if now is not None and prior <= now.version <= prior + 1:
            snapshot.load_into(model.state_dict())
            if now.version == prior + 1 and now.version >= 1:
                _mix_changed(now, layout, model, stream.alpha, stream.count)
        else:
            task.forget_optimizer_state()
    finally:
        snapshot.close()
