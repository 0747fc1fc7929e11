"""The client's local work on the model it holds, as a round's task asks: read the round
config, train (or compute the gradient), evaluate.

Nothing here talks to the coordinator: loop.py pulls the model before these steps and
pushes what they produce after them.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Iterator, Mapping
from dataclasses import dataclass

import torch

from fedstream.client.retry import Refused
from fedstream.common.codecs import UplinkCodec
from fedstream.common.config import ConfigError
from fedstream.common.fragments import StreamPlan
from fedstream.common.progress import ProgressView
from fedstream.common.proto.v1 import coordinator_pb2 as pb
from fedstream.common.round_config import from_proto as config_from_proto
from fedstream.common.wire.manifest import Manifest
from fedstream.tasks import ConfigScalar, Task, TrainResult

log = logging.getLogger(__name__)


def shown(metrics: Mapping[str, float]) -> str:
    """Metrics as a log line shows them: `loss=0.1234, accuracy=0.9000`."""
    return ", ".join(f"{k}={v:.4f}" for k, v in metrics.items())


@dataclass(frozen=True)
class RoundPlan:
    """What a train task's round config asks of this client."""

    config: dict[str, ConfigScalar]
    """The config as the task's `train` or `compute_gradient` receives it."""
    gradient: bool
    """FedSGD: compute the gradient at the global model and send it instead of a delta."""
    uplink: UplinkCodec
    """How to encode the update."""
    stream: StreamPlan | None = None
    """Streaming fragments: the fragment this round synchronises (None: the whole model)."""


def agreement(task: Task) -> pb.RunAgreement:
    """What this client's Join says it shares with the coordinator: the task's options but
    its site ones, and the seed; the coordinator refuses a Join that differs."""
    return pb.RunAgreement(task_options=task.agreed_options(), seed=task.seed)


def device(name: str) -> torch.device:
    """The torch device `--device` names, checked before anything is built on it: one
    ConfigError line, not a traceback from deep in the first `.to(device)`."""
    try:
        chosen = torch.device(name)
    except RuntimeError:
        raise ConfigError(
            f"device: {name!r} is not a torch device (cpu, cuda, cuda:1, ...)"
        ) from None
    if chosen.type == "cuda":
        if torch.version.cuda is None:
            raise ConfigError(
                f"device {name}: this torch ({torch.__version__}) is built without CUDA; "
                "install a CUDA build of torch, or use --device cpu"
            )
        count = torch.cuda.device_count()
        if count == 0 or (chosen.index or 0) >= count:
            raise ConfigError(f"device {name}: this machine has {count} CUDA device(s) visible")
    elif chosen.type == "mps" and not torch.backends.mps.is_available():
        raise ConfigError(f"device {name}: MPS is not available in this torch on this machine")
    return chosen


def read_round_config(task: pb.TrainTask) -> RoundPlan:
    """The plan `task`'s config announces; Refused for an uplink this client cannot encode
    or streaming fragments it cannot follow."""
    config = config_from_proto(task.config)
    try:
        uplink = UplinkCodec.from_round_config(config)
    except ValueError as exc:
        raise Refused(f"cannot encode updates as the coordinator asks: {exc}") from exc
    try:
        stream = StreamPlan.from_round_config(config)
    except ValueError as exc:
        raise Refused(f"cannot stream fragments as the coordinator asks: {exc}") from exc
    return RoundPlan(config, config.get("mode") == "gradient", uplink, stream)


def train(
    task: Task, model: torch.nn.Module, plan: RoundPlan, round_number: int, progress: ProgressView
) -> TrainResult:
    """Train `model` (or compute its gradient) as `plan` asks, the task's steps shown on
    `progress`."""
    started = time.monotonic()
    what = "computing the gradient" if plan.gradient else "training"
    with progress.track("train", f"round {round_number}: {what}", 0, "steps") as bar:
        task.progress_hook = bar.update
        try:
            if plan.gradient:
                result = task.compute_gradient(model, plan.config)
            else:
                result = task.train(model, plan.config)
        finally:
            task.progress_hook = None
    log.info(
        "round %d: %s on %d examples in %.1fs (%s)",
        round_number,
        "computed the gradient" if plan.gradient else "trained",
        result.num_examples,
        time.monotonic() - started,
        shown(result.metrics),
    )
    return result


def gradients(model: torch.nn.Module, manifest: Manifest) -> Iterator[torch.Tensor]:
    """The gradient the task left in each exchanged parameter (zeros for tensors that have
    none, such as buffers), in manifest order, whole tensors (the gradients exist whole
    anyway)."""
    params = dict(model.named_parameters())
    for entry in manifest.entries:
        param = params.get(entry.name)
        if param is None or param.grad is None:
            yield torch.zeros(entry.shape, dtype=entry.dtype)
        else:
            yield param.grad.detach().to("cpu", entry.dtype).view(entry.shape)


def evaluate(
    task: Task, model: torch.nn.Module, round_task: pb.EvaluateTask
) -> pb.EvaluationReport:
    """The report of `model` (global version `round_task.model_version`) evaluated on the
    task's own held-out data; no examples and no metrics when the task has none."""
    result = task.evaluate_local(model)
    report = pb.EvaluationReport(round=round_task.round, model_version=round_task.model_version)
    if result is not None:
        report.num_examples = result.num_examples
        report.metrics.update(result.metrics)
    return report
