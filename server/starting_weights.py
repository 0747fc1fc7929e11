"""Where a run starts: the run directory's newest checkpoint, or round 0, the task's model or
the weights of `--init-weights` (loaded into the global model), evaluated and recorded
before round 1."""

from __future__ import annotations

import asyncio
import logging
import time
from pathlib import Path

from fedstream.common.errors import InvalidCheckpoint
from fedstream.common.weights import fit_weights, read_weights
from fedstream.server.clock import Clock
from fedstream.server.global_model import GlobalModel
from fedstream.server.run_store import RunStore
from fedstream.server.strategies import Strategy
from fedstream.tasks import Task

log = logging.getLogger(__name__)


def restore(
    model: GlobalModel, strategy: Strategy, store: RunStore, init_weights: Path | None
) -> int | None:
    """Continue from the run directory's newest checkpoint, or write round 0's (from
    `init_weights` when given: not applied again on resume); the round resumed at, or
    None for a new run."""
    resumed = store.resume(model.manifest)
    if resumed is None:
        if init_weights is not None:
            load_starting_weights(model, store, init_weights)
        store.save(0, model.tensors, strategy.state_tensors(), [])
        return None
    if init_weights is not None:
        log.info("resuming: --init-weights is not applied again")
    model.load(resumed.model)
    model.version = resumed.round
    strategy.load_state_tensors(resumed.strategy_state)
    return resumed.round


def load_starting_weights(model: GlobalModel, store: RunStore, path: Path) -> None:
    """Load the starting weights from `path` (InvalidCheckpoint naming the first tensor
    that does not fit) and record where they came from in the run's metadata."""
    try:
        weights = read_weights(path)
        model.load(fit_weights(weights, model.module, list(model.tensors)))
    except InvalidCheckpoint as exc:
        raise InvalidCheckpoint(f"--init-weights {path}: {exc}") from None
    store.origin = {"init_weights": weights.source, "init_sha256": weights.sha256}
    log.info("starting weights from %s (sha256 %s)", weights.source, weights.sha256)


async def record_round_zero(
    task: Task, model: GlobalModel, strategy: Strategy, store: RunStore, clock: Clock
) -> None:
    """Round 0 of a run started from --init-weights: the starting model, evaluated
    (the task's `evaluate`) and recorded with its source before round 1, once a run."""
    started = clock.now()
    evaluation = await asyncio.to_thread(task.evaluate, model.module)
    record = {
        "round": 0,
        "model_version": 0,
        "time": time.time(),
        "duration_s": round(clock.now() - started, 3),
        "updates": 0,
        "num_examples": 0,
        "bytes_down": 0,
        "bytes_up": 0,
        **store.origin,
    }
    if evaluation is not None:
        record.update({f"eval_{k}": v for k, v in sorted(evaluation.metrics.items())})
    await asyncio.to_thread(store.commit_round, 0, model.tensors, strategy.state_tensors(), record)
    shown = ", ".join(f"{k}={v:.4f}" for k, v in record.items() if k.startswith("eval_"))
    log.info("round 0 (starting weights): %s", shown or "no metrics")
