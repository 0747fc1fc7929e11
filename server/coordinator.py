"""The round state machine: the coordinator as plain Python, driven by the gRPC skin.

    waiting     until at least min_clients have joined
    round r     select clients, publish the round; they pull model version r-1, train and
                push deltas; the round closes when every selected client has reported, or
                at the deadline (uploads still moving bytes are waited for)
                -> with enough updates: aggregate into version r, evaluate, checkpoint,
                   metrics; without: the round is run again with a fresh selection
    evaluating  every `eval_every` rounds, after aggregating: the round's selected clients
                pull version r, evaluate it on their own held-out data and report; closes
                when all have reported or at its own deadline
    done        every poll is answered Done; the daemon stops once all have heard it

Everything a client sends is validated before it touches state; failures raise the
domain errors of `server/errors.py`, which the servicer maps to gRPC statuses.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import enum
import logging
import math
import resource
import time
import uuid
from collections.abc import AsyncIterator, Iterator, Mapping
from typing import Any

import torch

from fedstream.common.codecs import UplinkCodec
from fedstream.common.errors import InvalidManifest
from fedstream.common.proto.v1 import coordinator_pb2 as pb
from fedstream.common.round_config import parse_scalar
from fedstream.common.round_config import to_proto as config_to_proto
from fedstream.common.tensor_codec import Manifest, ManifestLimits, iter_chunks
from fedstream.server.config import ServerConfig
from fedstream.server.errors import (
    InvalidUpdate,
    OffsetOutOfRange,
    TaskMismatch,
    UploadInProgress,
    WrongRound,
)
from fedstream.server.phases import OpenEvaluation, OpenRound, select_clients
from fedstream.server.registry import ClientRecord, ClientRegistry
from fedstream.server.run_store import RunStore
from fedstream.server.spool import SpoolFiles, UploadSpool
from fedstream.server.strategies import Strategy
from fedstream.tasks import Task, exchanged_names

log = logging.getLogger(__name__)

PLOT_INTERVAL_S = 30.0
"""Seconds between redraws of metrics.png while rounds run; the last round is always drawn."""


def peak_rss_bytes() -> int:
    """This process's peak resident memory so far, as the OS counts it."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


class Phase(enum.Enum):
    WAITING = "waiting"
    TRAINING = "training"
    AGGREGATING = "aggregating"
    EVALUATING = "evaluating"
    DONE = "done"


class GlobalModel:
    """The global weights: the exchanged tensors of the task's model (`exchanged_names`).

    The tensors share storage with the model's parameters, so evaluating the module sees
    the current weights and no second copy exists. Tensors not exchanged stay as the
    task built them.
    """

    def __init__(self, module: torch.nn.Module, names: list[str]) -> None:
        self.module = module
        state = module.state_dict()
        self.tensors: dict[str, torch.Tensor] = {name: state[name] for name in names}
        for name, tensor in self.tensors.items():
            if not tensor.is_contiguous():
                raise ValueError(f"model tensor {name!r} is not contiguous")
        self.manifest = Manifest.from_tensors(self.tensors)
        self.version = 0

    def load(self, tensors: Mapping[str, torch.Tensor]) -> None:
        Manifest.from_tensors(tensors).require_same_layout(self.manifest)
        with torch.no_grad():
            for name, target in self.tensors.items():
                target.copy_(tensors[name])

    def chunks(self, offset: int, chunk_bytes: int) -> Iterator[memoryview | bytes]:
        return iter_chunks(list(self.tensors.values()), chunk_bytes, offset)


class Coordinator:
    def __init__(
        self, config: ServerConfig, task: Task, strategy: Strategy, store: RunStore
    ) -> None:
        self.config = config
        self.task = task
        self.strategy = strategy
        self.store = store
        self.registry = ClientRegistry()
        module = task.build_model()
        self.model = GlobalModel(module, exchanged_names(task, module))
        self.run_id = uuid.uuid4().hex
        self.phase = Phase.WAITING
        self.round: OpenRound | None = None
        self.evaluation: OpenEvaluation | None = None
        self.completed = 0
        self.history: list[dict[str, Any]] = []
        self.uplink = UplinkCodec.parse(config.uplink_codec, config.topk_fraction)
        if config.uplink_zstd:
            self.uplink = UplinkCodec(self.uplink.codec, zstd=True)
        self.upload_layout = self.uplink.layout(self.model.manifest)
        self.base_round_config = {
            **{k: parse_scalar(v) for k, v in config.round_config.items()},
            **self.uplink.round_config(),
        }
        if config.proximal_mu > 0:
            self.base_round_config["proximal_mu"] = config.proximal_mu
        # Loose enough that a wrong dtype is reported as such, tight enough that no
        # manifest can make the coordinator spool far more than a model's worth.
        bound = 4 * self.model.manifest.total_bytes + (1 << 20)
        self.upload_limits = ManifestLimits(
            max_tensors=len(self.upload_layout.entries),
            max_total_bytes=bound,
            max_tensor_bytes=bound,
        )
        self._changed = asyncio.Event()
        self._fold_lock = asyncio.Lock()
        self._spool_writer = concurrent.futures.ThreadPoolExecutor(2, "spool-writer")
        self._spool_files = SpoolFiles(config.spool_path)
        self._last_plot = -math.inf
        self._plot_pending = False

    # ---- life cycle -------------------------------------------------------------------

    def restore(self) -> None:
        """Continue from the run directory's newest checkpoint, or write round 0's."""
        resumed = self.store.resume()
        if resumed is None:
            self.store.save(0, self.model.tensors, self.strategy.state_tensors(), [])
            log.info("new run in %s: %s", self.store.run_dir, self._model_summary())
            return
        self.model.load(resumed.model)
        self.model.version = resumed.round
        self.strategy.load_state_tensors(resumed.strategy_state)
        self.completed = resumed.round
        self.history = resumed.history
        log.info(
            "resumed %s at round %d of %d: %s",
            self.store.run_dir,
            resumed.round,
            self.config.rounds,
            self._model_summary(),
        )

    async def run(self) -> None:
        """Run rounds until the configured number have completed."""
        while self.completed < self.config.rounds:
            await self._wait_for_clients()
            attempt = 1
            while True:
                open_round = self._open_round(self.completed + 1, attempt)
                if await self._close(open_round):
                    await self._finish(open_round)
                    break
                self.strategy.abort_round()
                log.warning(
                    "round %d: %d of %d selected clients reported, fewer than needed; "
                    "running it again",
                    open_round.number,
                    len(open_round.reported),
                    len(open_round.selected),
                )
                attempt += 1
                await self._wait_for_clients()
        if self._plot_pending:
            await self._plot(force=True)
        await asyncio.to_thread(self.store.wait_on_disk)
        self.phase = Phase.DONE
        self.round = None
        self._notify()
        log.info("run complete: %d rounds", self.completed)

    async def wait_clients_told(self, grace: float) -> None:
        """After the run: give every live client up to `grace` seconds to hear it is done."""
        deadline = time.monotonic() + grace
        while time.monotonic() < deadline:
            waiting = [r for r in self.registry.live(self.config.client_timeout) if not r.told_done]
            if not waiting:
                return
            await self._wait_change(deadline - time.monotonic())

    # ---- calls from clients ------------------------------------------------------------

    def join(self, request: pb.JoinRequest) -> tuple[ClientRecord, pb.JoinReply]:
        if request.task != self.config.task:
            raise TaskMismatch(
                f"client runs task {request.task!r}; this coordinator runs {self.config.task!r}"
            )
        if not request.name or len(request.name) > 128:
            raise InvalidUpdate("client name must be 1 to 128 characters")
        if request.num_partitions < 1 or request.partition >= request.num_partitions:
            raise InvalidUpdate(
                f"partition {request.partition} is outside 0..{request.num_partitions - 1}"
            )
        record = self.registry.join(request.name, request.partition, request.num_partitions)
        log.info("client %s joined (partition %d)", record.name, record.partition)
        self._notify()
        reply = pb.JoinReply(
            client_id=record.name,
            token=record.token,
            run_id=self.run_id,
            max_chunk_bytes=self.config.max_chunk_bytes,
        )
        return record, reply

    async def poll(self, client: ClientRecord) -> pb.PollReply:
        deadline = time.monotonic() + self.config.poll_timeout
        while True:
            if self.phase is Phase.DONE:
                client.told_done = True
                self._notify()
                return pb.PollReply(done=pb.Done(reason=f"run complete: {self.completed} rounds"))
            task = self._task_for(client)
            if task is not None:
                client.busy = True
                return pb.PollReply(train=task)
            evaluate = self._evaluation_for(client)
            if evaluate is not None:
                client.busy = True
                return pb.PollReply(evaluate=evaluate)
            client.busy = False
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                return pb.PollReply(wait=pb.Wait(retry_after_seconds=0.0))
            await self._wait_change(remaining)

    def open_download(
        self, client: ClientRecord, request: pb.DownloadRequest
    ) -> tuple[pb.ModelHeader, Iterator[memoryview | bytes]]:
        phase: OpenRound | OpenEvaluation | None = None
        if self.phase is Phase.TRAINING:
            phase = self.round
        elif self.phase is Phase.EVALUATING:
            phase = self.evaluation
        if phase is None or not phase.accepting:
            raise WrongRound("no round is open for download")
        if request.model_version != self.model.version:
            raise WrongRound(
                f"model version {request.model_version} is not current "
                f"(current: {self.model.version})"
            )
        total = self.model.manifest.total_bytes
        if request.offset > total:
            raise OffsetOutOfRange(f"offset {request.offset} is beyond the model's {total} bytes")
        chunk = request.chunk_bytes or self.config.chunk_bytes
        chunk = max(1024, min(chunk, self.config.max_chunk_bytes))
        header = pb.ModelHeader(
            model_version=self.model.version,
            manifest=self.model.manifest.to_proto(),
            offset=request.offset,
        )
        return header, self._while_open(phase, self.model.chunks(request.offset, chunk))

    def count_download(self, nbytes: int) -> None:
        if self.round is not None:
            self.round.bytes_down += nbytes

    def _while_open(
        self, phase: OpenRound | OpenEvaluation, chunks: Iterator[memoryview | bytes]
    ) -> Iterator[memoryview | bytes]:
        """Chunks of the global model for as long as the round (or the evaluation) it
        belongs to is open.

        Aggregation rewrites the global tensors in place once the round closes; a chunk
        is a view of them until it is framed, which happens in the same event-loop step
        as this check, so no download ever reads a tensor that is being rewritten.
        """
        for chunk in chunks:
            current = self.round if isinstance(phase, OpenRound) else self.evaluation
            if current is not phase or not phase.accepting:
                raise WrongRound(f"round {phase.number} closed during the download")
            yield chunk

    async def receive_upload(
        self, client: ClientRecord, header: pb.UpdateHeader, chunks: AsyncIterator[memoryview]
    ) -> pb.UploadReply:
        open_round = self._check_upload_header(client, header)
        if client.name in open_round.reported:
            return pb.UploadReply(
                accepted=False, detail=f"update for round {open_round.number} already booked"
            )
        manifest = Manifest.from_proto(header.manifest, self.upload_limits)
        if manifest.codec != self.uplink.spec:
            raise InvalidManifest(
                f"codec {manifest.codec[:64]!r} is not this run's uplink codec {self.uplink.spec!r}"
            )
        self.upload_layout.require_same_layout(manifest)
        if client.name in open_round.uploading:
            raise UploadInProgress(f"an upload from {client.name} is already streaming")
        open_round.uploading.add(client.name)
        spool = UploadSpool(
            self._spool_files,
            f"r{open_round.number}-{client.name}",
            manifest,
            self.uplink,
            self.model.manifest,
        )
        writing: concurrent.futures.Future[None] | None = None
        try:
            async for chunk in chunks:
                if writing is not None:
                    await asyncio.wrap_future(writing)
                # A thread writes each chunk while the next one arrives: the write system
                # call then overlaps the event loop's work on every other stream.
                writing = self._spool_writer.submit(spool.write, chunk)
            if writing is not None:
                await asyncio.wrap_future(writing)
            spool.finish()
            # One update is read back at a time, verified and then folded: concurrent
            # read-backs would each hold a block buffer and compete for the same cores.
            async with self._fold_lock:
                await asyncio.to_thread(spool.verify_finite)
                if self.round is not open_round or not open_round.accepting:
                    raise WrongRound(f"round {open_round.number} closed while the update arrived")
                await asyncio.to_thread(
                    self.strategy.fold, client.name, header.num_examples, spool.blocks()
                )
                self._book(open_round, client, header, spool.bytes_written)
        except BaseException:
            open_round.rejected += 1
            raise
        finally:
            if writing is not None:
                concurrent.futures.wait([writing])  # never close the spool under a write
            open_round.uploading.discard(client.name)
            spool.discard()
            self._notify()
        return pb.UploadReply(accepted=True, detail=f"booked for round {open_round.number}")

    # ---- internals -----------------------------------------------------------------------

    def _check_upload_header(self, client: ClientRecord, header: pb.UpdateHeader) -> OpenRound:
        open_round = self.round
        if open_round is None:
            raise WrongRound(f"round {header.round} is not open for updates")
        open_round.check_update(client.name, header)
        return open_round

    def report_evaluation(
        self, client: ClientRecord, report: pb.EvaluationReport
    ) -> pb.EvaluationReply:
        """Book one client's federated evaluation of the current global model."""
        evaluation = self.evaluation
        if evaluation is None:
            raise WrongRound(f"no evaluation is open (report for round {report.round})")
        evaluation.check_report(client.name, report)
        if client.name in evaluation.reported:
            return pb.EvaluationReply(
                accepted=False, detail=f"evaluation of round {evaluation.number} already booked"
            )
        evaluation.reported.add(client.name)
        evaluation.totals.add(report.num_examples, report.metrics)
        client.busy = False
        self._notify()
        return pb.EvaluationReply(
            accepted=True, detail=f"evaluation booked for round {evaluation.number}"
        )

    def _book(
        self, open_round: OpenRound, client: ClientRecord, header: pb.UpdateHeader, nbytes: int
    ) -> None:
        open_round.book(client.name, header, nbytes)
        client.busy = False
        log.info(
            "round %d: update from %s (%d examples, %d/%d reported)",
            open_round.number,
            client.name,
            header.num_examples,
            len(open_round.reported),
            len(open_round.selected),
        )

    def _task_for(self, client: ClientRecord) -> pb.TrainTask | None:
        open_round = self.round
        if open_round is None or not open_round.owes(client.name):
            return None
        task = pb.TrainTask(
            round=open_round.number,
            model_version=self.model.version,
            deadline_seconds=max(0.0, open_round.deadline - time.monotonic()),
        )
        config_to_proto(open_round.config, task.config)
        return task

    def _evaluation_for(self, client: ClientRecord) -> pb.EvaluateTask | None:
        evaluation = self.evaluation
        if evaluation is None or not evaluation.owes(client.name):
            return None
        return pb.EvaluateTask(
            round=evaluation.number,
            model_version=self.model.version,
            deadline_seconds=max(0.0, evaluation.deadline - time.monotonic()),
        )

    def _notify(self) -> None:
        self._changed.set()
        self._changed = asyncio.Event()

    async def _wait_change(self, timeout: float) -> None:
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(self._changed.wait(), max(0.0, timeout))

    async def _wait_for_clients(self) -> None:
        announced = -1
        while True:
            live = len(self.registry.live(self.config.client_timeout))
            if live >= self.config.min_clients:
                return
            if live != announced:
                log.info("waiting for clients: %d of %d joined", live, self.config.min_clients)
                announced = live
            await self._wait_change(1.0)

    def _open_round(self, number: int, attempt: int) -> OpenRound:
        live = [r.name for r in self.registry.live(self.config.client_timeout)]
        selected = select_clients(
            live, self.config.fraction, self.config.min_clients, self.config.seed, number, attempt
        )
        count = len(selected)
        now = time.monotonic()
        open_round = OpenRound(
            number=number,
            attempt=attempt,
            model_version=self.model.version,
            selected=selected,
            config=self.strategy.configure_round(number, self.base_round_config),
            started=now,
            deadline=now + self.config.round_timeout,
        )
        self.round = open_round
        self.strategy.begin_round(self.model.tensors)
        self.phase = Phase.TRAINING
        self._notify()
        log.info(
            "round %d/%d started: %d of %d clients selected",
            number,
            self.config.rounds,
            count,
            len(live),
        )
        return open_round

    async def _close(self, open_round: OpenRound) -> bool:
        """Wait for the round's end; True when it has enough updates to aggregate."""
        while True:
            if open_round.reported >= open_round.selected:
                break
            now = time.monotonic()
            if now >= open_round.deadline and not open_round.uploading:
                log.warning(
                    "round %d: deadline reached with %d of %d updates",
                    open_round.number,
                    len(open_round.reported),
                    len(open_round.selected),
                )
                break
            await self._wait_change(max(0.05, open_round.deadline - now))
        open_round.accepting = False
        for record in self.registry.all():
            record.busy = False  # the round they held a task for is over
        self._notify()
        async with self._fold_lock:
            needed = min(self.config.min_reports, len(open_round.selected))
            return len(open_round.reported) >= max(1, needed)

    async def _evaluate_federated(self, open_round: OpenRound) -> dict[str, Any]:
        """Selected clients evaluate model version `open_round.number` on their own held-out
        data; the example-weighted mean of their metrics, as `fed_eval_*`."""
        live = {r.name for r in self.registry.live(self.config.client_timeout)}
        evaluation = OpenEvaluation(
            number=open_round.number,
            selected=open_round.selected & live,
            deadline=time.monotonic() + self.config.eval_timeout,
        )
        self.evaluation = evaluation
        self.phase = Phase.EVALUATING
        self._notify()
        while not evaluation.reported >= evaluation.selected:
            now = time.monotonic()
            if now >= evaluation.deadline:
                log.warning(
                    "round %d: evaluation deadline reached with %d of %d reports",
                    evaluation.number,
                    len(evaluation.reported),
                    len(evaluation.selected),
                )
                break
            await self._wait_change(evaluation.deadline - now)
        evaluation.accepting = False
        self.evaluation = None
        for client in self.registry.all():
            client.busy = False  # the evaluation they held a task for is over
        return {
            "fed_eval_clients": len(evaluation.reported),
            "fed_eval_examples": evaluation.totals.examples,
            **evaluation.totals.means("fed_eval_"),
        }

    async def _finish(self, open_round: OpenRound) -> None:
        self.phase = Phase.AGGREGATING
        await asyncio.to_thread(self.strategy.finish_round, self.model.tensors)
        self.model.version = open_round.number
        evaluation = await asyncio.to_thread(self.task.evaluate, self.model.module)
        record: dict[str, Any] = {
            "round": open_round.number,
            "model_version": self.model.version,
            "time": time.time(),
            "duration_s": round(time.monotonic() - open_round.started, 3),
            "clients_selected": len(open_round.selected),
            "updates": len(open_round.reported),
            "rejected_uploads": open_round.rejected,
            "attempt": open_round.attempt,
            "num_examples": open_round.num_examples,
            "bytes_down": open_round.bytes_down,
            "bytes_up": open_round.bytes_up,
            "coordinator_peak_rss_mb": round(peak_rss_bytes() / 2**20, 1),
        }
        record.update(open_round.totals.means("train_"))
        if evaluation is not None:
            for key, value in sorted(evaluation.metrics.items()):
                record[f"eval_{key}"] = value
        if self.config.eval_every and open_round.number % self.config.eval_every == 0:
            record.update(await self._evaluate_federated(open_round))
        self.history.append(record)
        await asyncio.to_thread(
            self.store.save,
            open_round.number,
            self.model.tensors,
            self.strategy.state_tensors(),
            self.history,
        )
        self.store.append_metrics(record)
        await self._plot(force=False)
        self.completed = open_round.number
        shown = {k: v for k, v in record.items() if k.startswith(("eval_", "train_", "fed_eval_"))}
        log.info(
            "round %d/%d done in %.1fs: %d updates, %s",
            open_round.number,
            self.config.rounds,
            record["duration_s"],
            record["updates"],
            ", ".join(f"{k}={v:.4f}" for k, v in shown.items()) or "no metrics",
        )

    async def _plot(self, force: bool) -> None:
        """Redraw metrics.png, at most every PLOT_INTERVAL_S while rounds run (drawing
        starts a Python with matplotlib: about a CPU-second, which short rounds would
        otherwise pay every time), and whenever `force` asks."""
        now = time.monotonic()
        if not force and now - self._last_plot < PLOT_INTERVAL_S:
            self._plot_pending = True
            return
        self._last_plot = now
        self._plot_pending = False
        await asyncio.to_thread(self.store.plot)

    def _model_summary(self) -> str:
        manifest = self.model.manifest
        params = sum(e.numel for e in manifest.entries)
        return (
            f"task {self.config.task}, {len(manifest.entries)} tensors, {params:,} parameters, "
            f"{manifest.total_bytes / 2**20:.1f} MiB exchanged, uplink {self.uplink.spec}"
        )
