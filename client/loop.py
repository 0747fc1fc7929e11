"""The client's life cycle: join, poll, pull, train, push, repeat; reconnect on failure.

    join  -> poll -> (train task) download model vN unless held -> train -> upload delta
                        (FedSGD: compute the gradient instead of training, upload it)
          -> poll -> (evaluate task) download model vN+1 -> evaluate locally -> report
          -> poll -> ... -> done: exit 0

A coordinator that cannot be reached is retried with exponential backoff and jitter; one
that restarted (our session token is unknown to it) is re-joined; a run that stays
unreachable for `give_up_after` seconds ends the client with a non-zero exit.
"""

from __future__ import annotations

import logging
import resource
import tempfile
import time
from collections.abc import Iterator

import grpc
import torch

from fedstream.client.config import ClientConfig
from fedstream.client.connection import RETRYABLE, Backoff, Connection, Session
from fedstream.client.held_model import HeldModel
from fedstream.client.uplink import Deltas, UplinkEncoder
from fedstream.common.codecs import UplinkCodec
from fedstream.common.errors import FedstreamError, InvalidManifest
from fedstream.common.memory import reuse_chunk_buffers
from fedstream.common.proto.v1 import coordinator_pb2 as pb
from fedstream.common.round_config import from_proto as config_from_proto
from fedstream.common.tensor_codec import Manifest
from fedstream.tasks import Task, exchanged_names, load_task

log = logging.getLogger(__name__)

DELTA_BLOCK_ELEMENTS = 1 << 18
"""Elements of a delta computed at a time while uploading."""

EXIT_DONE = 0
EXIT_UNREACHABLE = 1
EXIT_REFUSED = 2


class Refused(Exception):
    """The coordinator will never accept this client as configured (wrong task, say)."""


class FederatedClient:
    def __init__(self, config: ClientConfig, task: Task) -> None:
        self.config = config
        self.task = task
        self.model = task.build_model().to(task.device)
        state = self.model.state_dict()
        self.layout = Manifest.from_tensors(
            {name: state[name] for name in exchanged_names(task, self.model)}
        )
        self.uplink = UplinkEncoder()
        self.connection = Connection(config.server, config.chunk_bytes, config.stall_timeout)
        self.session: Session | None = None
        self.held: HeldModel | None = None
        """The global model last downloaded (on disk), reused while its version is current."""
        self.held_version = -1
        self.backoff = Backoff(cap=config.max_backoff)
        self.last_contact = time.monotonic()

    def run(self) -> int:
        try:
            while True:
                try:
                    if self.session is None:
                        self._join()
                    assert self.session is not None
                    reply = self.connection.poll(self.session)
                    self._contacted()
                    action = reply.WhichOneof("action")
                    if action == "done":
                        log.info(
                            "coordinator says the run is done (%s); peak memory %.0f MiB",
                            reply.done.reason,
                            resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
                        )
                        return EXIT_DONE
                    if action == "train":
                        self._train_round(reply.train)
                    if action == "evaluate":
                        self._evaluate_round(reply.evaluate)
                except grpc.RpcError as exc:
                    if not self._recover(exc):
                        return EXIT_UNREACHABLE
        except Refused as exc:
            log.error("%s", exc)
            return EXIT_REFUSED
        finally:
            self._forget_model()
            self.connection.close()

    def _join(self) -> None:
        request = pb.JoinRequest(
            name=self.config.name,
            task=self.config.task,
            partition=self.config.partition,
            num_partitions=self.config.num_partitions,
        )
        try:
            session = self.connection.join(request)
        except grpc.RpcError as exc:
            if exc.code() in (  # type: ignore[attr-defined]
                grpc.StatusCode.FAILED_PRECONDITION,
                grpc.StatusCode.INVALID_ARGUMENT,
            ):
                raise Refused(f"coordinator refused to join: {exc.details()}") from exc  # type: ignore[attr-defined]
            raise
        if self.session is not None and session.run_id != self.session.run_id:
            self._forget_model()
        if self.session is None or session.run_id != self.session.run_id:
            log.info(
                "joined %s as %s (run %s)", self.config.server, session.client_id, session.run_id
            )
        self.session = session
        self._contacted()

    def _pull(self, model_version: int) -> None:
        """Make the model hold global version `model_version`, downloading it unless held."""
        assert self.session is not None
        if self.held is None or self.held_version != model_version:
            self._forget_model()
            try:
                self.held = self.connection.download(self.session, model_version, self.layout)
            except InvalidManifest as exc:
                raise Refused(
                    f"the coordinator's model is not this client's model "
                    f"(do --task and --task-opt match the server's?): {exc}"
                ) from exc
            except OSError as exc:
                raise Refused(
                    f"cannot keep the downloaded model on local disk in "
                    f"{tempfile.gettempdir()} (TMPDIR chooses another place): {exc}"
                ) from exc
            self.held_version = model_version
            self._contacted()
        self._load_held()

    def _train_round(self, task: pb.TrainTask) -> None:
        self._pull(task.model_version)
        config = config_from_proto(task.config)
        try:
            self.uplink.configure(UplinkCodec.from_round_config(config))
        except ValueError as exc:
            raise Refused(f"cannot encode updates as the coordinator asks: {exc}") from exc
        started = time.monotonic()
        gradient = config.get("mode") == "gradient"
        if gradient:
            result = self.task.compute_gradient(self.model, config)
        else:
            result = self.task.train(self.model, config)
        log.info(
            "round %d: %s on %d examples in %.1fs (%s)",
            task.round,
            "computed the gradient" if gradient else "trained",
            result.num_examples,
            time.monotonic() - started,
            ", ".join(f"{k}={v:.4f}" for k, v in result.metrics.items()),
        )
        header = pb.UpdateHeader(
            round=task.round,
            model_version=task.model_version,
            num_examples=result.num_examples,
            metrics=result.metrics,
        )
        self._upload(header, task, self._gradients if gradient else self._deltas)

    def _evaluate_round(self, task: pb.EvaluateTask) -> None:
        """Evaluate global version `task.model_version` on our own held-out data; report."""
        assert self.session is not None
        self._pull(task.model_version)
        result = self.task.evaluate_local(self.model)
        report = pb.EvaluationReport(round=task.round, model_version=task.model_version)
        if result is not None:
            report.num_examples = result.num_examples
            report.metrics.update(result.metrics)
        reply = self.connection.report_evaluation(self.session, report)
        self._contacted()
        log.info(
            "round %d: evaluated model v%d on %d held-out examples (%s): %s",
            task.round,
            task.model_version,
            report.num_examples,
            ", ".join(f"{k}={v:.4f}" for k, v in report.metrics.items()) or "no metrics",
            reply.detail,
        )

    def _upload(
        self,
        header: pb.UpdateHeader,
        task: pb.TrainTask,
        pieces: Deltas,
    ) -> None:
        """Push the update, retrying transient failures until the round's deadline."""
        assert self.session is not None and self.held is not None
        update = self.uplink.encode(self.layout, pieces)
        deadline = time.monotonic() + max(task.deadline_seconds, 1.0)
        backoff = Backoff(cap=self.config.max_backoff)
        while True:
            try:
                reply = self.connection.upload(
                    self.session, header, update.manifest, update.pieces()
                )
                self._contacted()
                update.commit()
                log.info(
                    "round %d: update %s (%s)",
                    task.round,
                    "accepted" if reply.accepted else "not needed",
                    reply.detail,
                )
                return
            except grpc.RpcError as exc:
                code = exc.code()  # type: ignore[attr-defined]
                if code not in RETRYABLE or time.monotonic() + backoff.base > deadline:
                    log.warning(
                        "round %d: update refused (%s): %s",
                        task.round,
                        code.name,
                        exc.details(),  # type: ignore[attr-defined]
                    )
                    return
                log.warning("round %d: upload failed (%s); retrying", task.round, code.name)
                backoff.sleep()

    def _load_held(self) -> None:
        assert self.held is not None
        self.held.load_into(self.model.state_dict())

    def _deltas(self, block_elements: int | None = DELTA_BLOCK_ELEMENTS) -> Iterator[torch.Tensor]:
        """local - global, in manifest order, a block of elements at a time (with None,
        a whole tensor at a time, for the codecs that encode tensors whole).

        Computed while uploading, against the global copy on disk, so the client holds
        the model and one block: never a second whole model. The global copy survives,
        so a re-run round or a retried upload needs no new download.
        """
        assert self.held is not None
        yield from self.held.deltas(self.model.state_dict(), block_elements)

    def _gradients(self, block_elements: int | None = None) -> Iterator[torch.Tensor]:
        """The gradient the task left in each exchanged parameter (zeros for tensors that
        have none, such as buffers), in manifest order, in place of the delta: whole
        tensors (the gradients exist whole anyway), whatever `block_elements` asks."""
        assert self.held is not None
        params = dict(self.model.named_parameters())
        for entry in self.held.manifest.entries:
            param = params.get(entry.name)
            if param is None or param.grad is None:
                yield torch.zeros(entry.shape, dtype=entry.dtype)
            else:
                yield param.grad.detach().to("cpu", entry.dtype).view(entry.shape)

    def _forget_model(self) -> None:
        if self.held is not None:
            self.held.close()
        self.held = None
        self.held_version = -1

    def _contacted(self) -> None:
        self.last_contact = time.monotonic()
        self.backoff.reset()

    def _recover(self, exc: grpc.RpcError) -> bool:
        """Decide what a failed call means; False when it is time to give up."""
        code = exc.code()  # type: ignore[attr-defined]
        details = exc.details()  # type: ignore[attr-defined]
        if code == grpc.StatusCode.UNAUTHENTICATED:
            log.info("coordinator does not know our session (%s); joining again", details)
            self.session = None
            return True
        if code not in RETRYABLE:
            log.warning("call failed (%s): %s; polling again", code.name, details)
            time.sleep(self.backoff.next_delay())
            return True
        silent = time.monotonic() - self.last_contact
        if silent > self.config.give_up_after:
            log.error("coordinator unreachable for %.0fs; giving up", silent)
            return False
        delay = self.backoff.next_delay()
        log.warning("coordinator unreachable (%s); retrying in %.1fs", code.name, delay)
        time.sleep(delay)
        return True


def main(config: ClientConfig) -> int:
    reuse_chunk_buffers()
    if config.threads:
        torch.set_num_threads(config.threads)
    task = load_task(config.task, config.task_opt, config.seed)
    task.device = torch.device(config.device)
    task.load_data(config.partition, config.num_partitions)
    try:
        client = FederatedClient(config, task)
    except FedstreamError as exc:
        log.error("cannot start: %s", exc)
        return EXIT_REFUSED
    log.info(
        "client %s: task %s, partition %d of %d, device %s",
        config.name,
        config.task,
        config.partition,
        config.num_partitions,
        config.device,
    )
    return client.run()
