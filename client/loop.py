"""The client's life cycle: join, poll, pull, train, push, repeat; reconnect on failure.

    join  -> poll -> (train task) download model vN unless held -> train -> upload delta
                        (FedSGD: compute the gradient instead of training, upload it;
                        streaming fragments: the fragment the last round changed, mixed
                        into a model that persists, and one fragment's delta, streaming.py)
          -> poll -> (evaluate task) download model vN+1 -> evaluate locally -> report
          -> poll -> ... -> done: exit 0

A coordinator that cannot be reached is retried with exponential backoff and jitter; one
that restarted (our session token is unknown to it) is re-joined; a run that stays
unreachable for `give_up_after` seconds ends the client with a non-zero exit. A Join
refused for what the client is (its model, its name, its credentials) ends it with
EXIT_REFUSED; one refused for now (the name's old session still lives, the coordinator
is full) is retried. A refused update or report is followed by a growing pause before the
next poll, so a client the coordinator keeps turning away does not retrain in a loop.

The decisions are here; the local work is in steps.py, the calls in connection.py, and
which statuses are retried in retry.py. A site of several ranks (torchrun, or
--nproc-per-node) runs this loop on rank 0 only, which hands each round's work and the
global model to the other ranks (site.py, follower.py; docs/multi-gpu-sites.md).
"""

from __future__ import annotations

import functools
import logging
import resource
import tempfile
import time
from collections.abc import Callable, Iterator, Mapping

import grpc
import torch

from fedstream.client import steps, streaming
from fedstream.client.config import ClientConfig
from fedstream.client.connection import Connection
from fedstream.client.held_model import HeldModel
from fedstream.client.push import Unsent, push
from fedstream.client.retry import (
    DEFERRED_AT_JOIN,
    REFUSED_AT_JOIN,
    RETRYABLE,
    Backoff,
    Refused,
    rpc_status,
)
from fedstream.client.session import Heartbeat, Session
from fedstream.client.site import Command, Site
from fedstream.client.uplink import UplinkEncoder
from fedstream.common.errors import InvalidManifest
from fedstream.common.fragments import StreamPlan
from fedstream.common.progress import progress_view
from fedstream.common.proto.v1 import coordinator_pb2 as pb
from fedstream.common.wire.manifest import Manifest
from fedstream.tasks import Task

log = logging.getLogger(__name__)

DELTA_BLOCK_ELEMENTS = 1 << 18
"""Elements of a delta computed at a time while uploading."""

EXIT_DONE = 0
EXIT_UNREACHABLE = 1
EXIT_REFUSED = 2
EXIT_RANK_LOST = 3
"""A rank of this site died or hung: the site's round is lost; restart the site."""


class FederatedClient:
    def __init__(self, config: ClientConfig, task: Task, site: Site | None = None) -> None:
        self.config = config
        self.task = task
        self.site = site or Site()
        """This client's ranks; this process is rank 0, the only one that talks to the
        coordinator."""
        self.model, self.layout = self.site.build(task)
        """The model (sharded with --site-parallel fsdp) and what this client exchanges:
        tied tensors follow their source as they share it."""
        self.trained = self.site.wrap(self.model)
        """The model as the task's train sees it (in DDP for a site of several ranks)."""
        self.outcome: Mapping[str, torch.Tensor] | None = None
        """The trained tensors to upload, where the model does not hold them whole (fsdp)."""
        self.uplink = UplinkEncoder()
        self.progress = progress_view(log, config.progress_file)
        self.connection = Connection(
            config.server,
            config.chunk_bytes,
            config.stall_timeout,
            ca=config.ca,
            cert=config.cert,
            key=config.key,
            progress=self.progress,
        )
        self.session: Session | None = None
        self.held: HeldModel | None = None
        """The global model last downloaded (on disk), reused while its version is current."""
        self.backoff = Backoff(cap=config.max_backoff)
        self.refusals = Backoff(cap=config.max_backoff)
        """Paces polling after refused updates and reports; reset by an accepted update."""
        self.last_contact = time.monotonic()
        self.stream: StreamPlan | None = None
        """The streaming fragments of the last round trained (streaming.py), if any."""
        self.unsent: Unsent | None = None
        """The update a coordinator restart cut off, sent again if asked for (push.py)."""

    def run(self) -> int:
        """Take part in the run until it ends; the exit code, which every rank exits with."""
        code = self._run()
        self.site.send(Command.END, str(code).encode())
        return code

    def _run(self) -> int:
        try:
            while True:
                self.site.send(Command.IDLE)  # the other ranks wait on this, not time out
                try:
                    if self.session is None:
                        self._join()  # leaves no session when turned away for now
                        continue
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
            model_digest=self.layout.digest(),
            agreement=steps.agreement(self.task),
        )
        try:
            session = self.connection.join(request, token=self.config.token)
        except grpc.RpcError as exc:
            code, details = rpc_status(exc)
            if code in REFUSED_AT_JOIN:
                raise Refused(
                    f"coordinator refused to join as {self.config.name} "
                    f"({code.name}: {REFUSED_AT_JOIN[code]}): {details}"
                ) from exc
            if code in DEFERRED_AT_JOIN:
                # The coordinator answered: not a silence that counts towards giving up.
                self.last_contact = time.monotonic()
                delay = self.backoff.next_delay()
                log.warning(
                    "coordinator turned the join away for now (%s: %s): %s; retrying in %.1fs",
                    code.name,
                    DEFERRED_AT_JOIN[code],
                    details,
                    delay,
                )
                self.backoff.sleep_for(delay)
                return
            raise
        if self.session is not None and session.run_id != self.session.run_id:
            self._forget_model()
        if self.session is None or session.run_id != self.session.run_id:
            log.info(
                "joined %s as %s (run %s)", self.config.server, session.client_id, session.run_id
            )
        self.session = session
        self._contacted()

    def _pull(self, model_version: int, sha256: str = "") -> None:
        """Make the model hold global version `model_version`, downloading it unless held
        (in memory, or in --model-dir with the SHA-256 `sha256` the task names)."""
        assert self.session is not None
        held = self.held
        if held is None or held.version != model_version or (sha256 and held.sha256 != sha256):
            self._forget_model()
            directory = self.config.model_dir
            if directory is not None and sha256:
                self.held = HeldModel.kept(directory, self.layout, model_version, sha256)
                if self.held is not None:
                    log.info(
                        "model v%d is the one kept in %s (sha256 %s): no download",
                        model_version,
                        directory,
                        sha256[:16],
                    )
                    return
            try:
                self.held = self.connection.download(
                    self.session, model_version, self.layout, directory=directory
                )
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
            self._contacted()

    def _pull_fragment(self, task: pb.TrainTask, stream: StreamPlan) -> Manifest:
        """Streaming: the fragment the last round changed, mixed in, or a catch-up to the
        whole model (streaming.py); the manifest of the fragment to upload."""
        if self.site.world > 1:
            raise Refused("streaming fragments need a client of one process (no --nproc-per-node)")
        assert self.session is not None
        args = (self.held, self.model, self.layout, task, stream)
        if streaming.pull(self.connection, self.session, *args):
            self._contacted()
        else:  # the whole model: the local model and every anchor reset to it
            self._forget_model()
            self._pull(task.model_version, task.model_sha256)
            self.site.share_model(self.model, self.layout, self.held)
            self.task.forget_optimizer_state()
        return streaming.layouts(self.layout, stream.count)[stream.index]

    def _in_round(self, round_number: int, work: Callable[[], bool]) -> bool:
        """Do `work` with the heartbeat beating, and pause after a refusal; whether what
        it sent was accepted."""
        assert self.session is not None
        with Heartbeat(self.connection, self.session, round_number):
            accepted = work()
        if not accepted:
            self._pause_after_refusal()
        return accepted

    def _train_round(self, task: pb.TrainTask) -> None:
        if self._in_round(task.round, lambda: self._train(task)):
            self.refusals.reset()

    def _train(self, task: pb.TrainTask) -> bool:
        """Train (or compute the gradient) and push the update; whether it was accepted.
        An update trained for this very task that a restarted coordinator never
        acknowledged is pushed again instead of trained again (push.py)."""
        plan = steps.read_round_config(task)
        layout, self.stream = self.layout, plan.stream
        if plan.stream is None:
            self._pull(task.model_version, task.model_sha256)
        else:
            layout = self._pull_fragment(task, plan.stream)
        self.uplink.configure(plan.uplink)
        unsent, self.unsent = self.unsent, None
        if unsent is not None and unsent.answers(task):
            log.info("round %d: sending the update trained before a restart", task.round)
            header, update = unsent.header, unsent.update
        else:
            self.site.send(Command.TRAIN, task.SerializeToString())
            if plan.stream is None:  # a streaming client's model persists (streaming.py)
                self.site.share_model(self.model, self.layout, self.held)
            result = steps.train(self.task, self.trained, plan, task.round, self.progress)
            num_examples, metrics = self.site.total(result.num_examples, result.metrics)
            self.outcome = self.site.collect(self.model, self.layout, plan.gradient)
            header = pb.UpdateHeader(
                round=task.round,
                model_version=task.model_version,
                num_examples=num_examples,
                metrics=metrics,
                attempt=task.attempt,
            )
            pieces = self._gradients if plan.gradient else self._deltas
            if layout is not self.layout:
                pieces = functools.partial(self._deltas, only=layout)
            update = self.uplink.encode(layout, pieces)
        assert self.session is not None
        try:
            return push(
                self.connection,
                self.session,
                header,
                task,
                update,
                self.config.max_backoff,
                self._contacted,
            )
        except grpc.RpcError:
            self.unsent = Unsent(header, Unsent.key(task), update)
            raise

    def _evaluate_round(self, task: pb.EvaluateTask) -> None:
        """Evaluate global version `task.model_version` on our own held-out data; report."""
        self._in_round(task.round, lambda: self._evaluate(task))

    def _evaluate(self, task: pb.EvaluateTask) -> bool:
        """Evaluate and report; whether the report was accepted."""
        assert self.session is not None
        args = (self.model, self.layout, self.stream, lambda: self.held, self.task)
        with streaming.own_model_kept(*args):
            self._pull(task.model_version, task.model_sha256)
            self.site.send(Command.EVALUATE, task.SerializeToString())
            self.site.share_model(self.model, self.layout, self.held)
            report = self.site.total_report(steps.evaluate(self.task, self.model, task))
        try:
            reply = self.connection.report_evaluation(self.session, report)
        except grpc.RpcError as exc:
            code, details = rpc_status(exc)
            if code in RETRYABLE or code == grpc.StatusCode.UNAUTHENTICATED:
                raise
            log.warning("round %d: report refused (%s): %s", task.round, code.name, details)
            return False
        self._contacted()
        log.info(
            "round %d: evaluated model v%d on %d held-out examples (%s): %s",
            task.round,
            task.model_version,
            report.num_examples,
            steps.shown(report.metrics) or "no metrics",
            reply.detail,
        )
        return reply.accepted

    def _pause_after_refusal(self) -> None:
        """Wait before polling again, longer each time in a row the coordinator refuses
        what this client sends, rather than retrain and resend at once."""
        delay = self.refusals.next_delay()
        log.info("polling again in %.1fs", delay)
        self.refusals.sleep_for(delay)

    def _deltas(
        self, block_elements: int | None = DELTA_BLOCK_ELEMENTS, only: Manifest | None = None
    ) -> Iterator[torch.Tensor]:
        """local - global, in manifest order, a block of elements at a time (with None,
        a whole tensor at a time, for the codecs that encode tensors whole); of the
        tensors `only` lists (a streaming fragment), when given.

        Computed while uploading, against the global copy on disk, so the client holds
        the model and one block: never a second whole model. The global copy survives,
        so a re-run round or a retried upload needs no new download.
        """
        assert self.held is not None
        trained = self.model.state_dict() if self.outcome is None else self.outcome
        yield from self.held.deltas(trained, block_elements, only)

    def _gradients(self, block_elements: int | None = None) -> Iterator[torch.Tensor]:
        """The gradients in place of the delta: whole tensors, whatever `block_elements`
        asks (steps.gradients)."""
        assert self.held is not None
        if self.outcome is None:
            return steps.gradients(self.model, self.held.manifest)
        return (self.outcome[entry.name].clone() for entry in self.held.manifest.entries)

    def _forget_model(self) -> None:
        if self.held is not None:
            self.held.close()
        self.held = None

    def _contacted(self) -> None:
        self.last_contact = time.monotonic()
        self.backoff.reset()

    def _recover(self, exc: grpc.RpcError) -> bool:
        """Decide what a failed call means; False when it is time to give up."""
        code, details = rpc_status(exc)
        if code == grpc.StatusCode.UNAUTHENTICATED:
            log.info("coordinator does not know our session (%s); joining again", details)
            self.session = None
            return True
        cause = self.connection.handshakes.failed(code, details)
        if cause is not None:
            raise Refused(cause)
        if code not in RETRYABLE:
            log.warning("call failed (%s): %s; polling again", code.name, details)
            self.backoff.sleep()
            return True
        reason = code.name
        if self.config.ca is not None and self.connection.handshakes.cause(code, details):
            reason = (
                f"{code.name}; TLS is on with --ca {self.config.ca}, so the TLS handshake "
                f"may have failed: {details}"
            )
        silent = time.monotonic() - self.last_contact
        if silent > self.config.give_up_after:
            log.error("coordinator unreachable for %.0fs (%s); giving up", silent, reason)
            return False
        delay = self.backoff.next_delay()
        log.warning("coordinator unreachable (%s); retrying in %.1fs", reason, delay)
        self.backoff.sleep_for(delay)
        return True
