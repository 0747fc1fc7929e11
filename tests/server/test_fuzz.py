"""Fuzz a live coordinator with hostile calls from a valid session while an honest client
takes part in the rounds (docs/architecture.md, "Trust boundary").

One coordinator serves every example: hypothesis draws calls (`fuzz_messages.calls`):
arbitrary bytes to each RPC, protobuf messages with hostile field values, Upload streams
out of order, Heartbeat and ReportEvaluation for rounds that are not open. The fuzz runs in
three stages: round 1 open, round 1's federated evaluation open, round 2 open; between
them the fuzzing peer ("mallory", a valid session) does its honest part to move the run
on. Every answer must be OK (the message happened to be valid) or a precise refusal, never
UNKNOWN or INTERNAL; a refusal books nothing; the health service says SERVING between
examples while rounds run; no session is evicted or added. Afterwards the run completes:
the honest client exits 0 and metrics.jsonl holds every round, each with both updates.
A refusal must also be the coordinator's own: one whose message is too large for gRPC's
trailers reaches the client as the transport's RESOURCE_EXHAUSTED ("Stream removed"),
and the reason is lost. Each stage first sends `fuzz_messages.explicit_calls`.

Run with `-s` to see how many cases ran and which statuses they got. FUZZ_N=1000 runs
1000 examples per stage instead of 50 (about a minute more per 1000 on two cores);
FUZZ_DETAILS=1 also prints every distinct refusal message.
"""

from __future__ import annotations

import json
import math
import os
import time
from collections import Counter
from collections.abc import Callable
from pathlib import Path
from typing import Any

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc
from hypothesis import HealthCheck, example, given, settings

from fedstream.common.proto.v1 import coordinator_pb2 as pb
from fedstream.common.service import METHODS, SERVICE_NAME, bearer_metadata
from fedstream.server.phases import (
    REFUSALS_PER_ATTEMPT,
    Aggregating,
    Done,
    OpenEvaluation,
    OpenRound,
    Phase,
    Waiting,
)

from .conftest import RunningCoordinator, start_client, tiny_join
from .fuzz_messages import MAX_CHUNK_BYTES, Call, Current, calls, explicit_calls, valid_upload

sc = grpc.StatusCode

STAGES = [(3, Current(1, 0)), (5, Current(1, 1)), (6, Current(2, 1))]
"""Where the run is (`progress`) while each stage of the fuzz runs, and what is open then:
round 1 (training model version 0), round 1's evaluation (of version 1), round 2."""
EXAMPLES_PER_STAGE = int(os.environ.get("FUZZ_N", 50))
CALL_TIMEOUT = 5.0
PHASE_TIMEOUT = 60.0 + 0.1 * EXAMPLES_PER_STAGE * len(STAGES)
"""Round and evaluation timeout: longer than the whole fuzz can keep a phase open (about
30 ms a case on two cores), so each round closes with both updates, never at its end."""
ROUNDS = 3
"""One more than the fuzz's stages reach, so it is rarely the fuzz that completes the run."""

PRECISE = frozenset(
    {
        sc.OK,
        sc.INVALID_ARGUMENT,
        sc.FAILED_PRECONDITION,
        sc.PERMISSION_DENIED,
        sc.UNAUTHENTICATED,
        sc.ALREADY_EXISTS,
        sc.RESOURCE_EXHAUSTED,
        sc.OUT_OF_RANGE,
        sc.ABORTED,
    }
)
"""What a call may be answered: OK where the message happens to be valid, else a refusal
that says what was wrong. Not UNKNOWN or INTERNAL (an exception escaped), not UNAVAILABLE
or CANCELLED (the server fell over), not DEADLINE_EXCEEDED (but see `allowed`)."""


def allowed(method: str, code: grpc.StatusCode) -> bool:
    """A long-poll may outlast this test's own call timeout; nothing else may."""
    return code in PRECISE or (method == "Poll" and code == sc.DEADLINE_EXCEEDED)


def made_by_transport(details: str) -> bool:
    """Whether a status came from gRPC's transport rather than the coordinator: a refusal
    whose message is too large for the trailers reaches the client as RESOURCE_EXHAUSTED
    "Stream removed (received metadata size exceeds ...)", and what was wrong is lost."""
    return details.startswith("Stream removed") or "metadata size exceeds" in details


def identity(raw: bytes) -> bytes:
    return raw


def progress(phase: Phase, completed: int) -> float:
    """How far the run is: 3r for round r open, 3r + 1 aggregating it, 3r + 2 for its
    evaluation open."""
    if isinstance(phase, OpenRound):
        return 3 * phase.number
    if isinstance(phase, Aggregating):
        return 3 * phase.round.number + 1
    if isinstance(phase, OpenEvaluation):
        return 3 * phase.number + 2
    if isinstance(phase, Waiting):
        return 3 * (completed + 1) - 0.5
    return math.inf


def task_progress(reply: pb.PollReply) -> float:
    """`progress` of the phase a task belongs to (inf for none)."""
    if reply.HasField("train"):
        return 3 * reply.train.round
    if reply.HasField("evaluate"):
        return 3 * reply.evaluate.round + 2
    return math.inf


class Fuzzer:
    """The fuzzing peer: a valid session ("mallory") that sends raw bytes to every RPC."""

    def __init__(self, running: RunningCoordinator) -> None:
        self.running = running
        self.channel = grpc.insecure_channel(running.address)
        self.health_channel = grpc.insecure_channel(running.address)
        self.health = health_pb2_grpc.HealthStub(self.health_channel)
        self.callables: dict[str, Any] = {}
        for name, spec in METHODS.items():
            factory: Callable[..., Any]
            match spec.request_streaming, spec.response_streaming:
                case True, False:
                    factory = self.channel.stream_unary
                case False, True:
                    factory = self.channel.unary_stream
                case _:
                    factory = self.channel.unary_unary
            self.callables[name] = factory(
                spec.path, request_serializer=identity, response_deserializer=identity
            )
        joined = self.unary("Join", tiny_join("mallory", 2), credential="none")
        self.token = pb.JoinReply.FromString(joined).token
        self.statuses: Counter[tuple[str, str]] = Counter()
        self.details: Counter[tuple[str, str, str]] = Counter()

    def close(self) -> None:
        self.channel.close()
        self.health_channel.close()

    # ---- raw calls ------------------------------------------------------------------------

    def send(self, call: Call) -> tuple[grpc.StatusCode, str, list[bytes]]:
        """The status, details and reply messages of `call`."""
        if call.credential == "session":
            metadata: tuple[tuple[str, str], ...] = bearer_metadata(self.token)
        elif call.credential == "none":
            metadata = ()
        else:
            metadata = bearer_metadata(call.credential)
        spec = METHODS[call.method]
        stub = self.callables[call.method]
        try:
            if spec.request_streaming:
                replies = [stub(iter(call.messages), metadata=metadata, timeout=CALL_TIMEOUT)]
            elif spec.response_streaming:
                replies = list(stub(call.messages[0], metadata=metadata, timeout=CALL_TIMEOUT))
            else:
                replies = [stub(call.messages[0], metadata=metadata, timeout=CALL_TIMEOUT)]
        except grpc.RpcError as error:
            return error.code(), error.details() or "", []
        return sc.OK, "", replies

    def unary(self, method: str, request: Any, credential: str = "session") -> bytes:
        code, details, replies = self.send(Call(method, (request.SerializeToString(),), credential))
        assert code == sc.OK, f"{method}: {code.name} {details}"
        reply: bytes = replies[0]
        return reply

    def poll(self) -> pb.PollReply:
        return pb.PollReply.FromString(self.unary("Poll", pb.PollRequest()))

    # ---- the honest part ------------------------------------------------------------------

    def do_task(self, reply: pb.PollReply) -> None:
        """Upload or report what a task asks for."""
        if reply.HasField("train"):
            train = reply.train
            code, details, _ = self.send(
                Call("Upload", valid_upload(train.round, train.model_version))
            )
            assert code == sc.OK, f"the fuzzer's valid upload: {code.name} {details}"
        elif reply.HasField("evaluate"):
            evaluate = reply.evaluate
            report = pb.EvaluationReport(
                round=evaluate.round, model_version=evaluate.model_version, num_examples=5
            )
            report.metrics["loss"] = 0.5
            self.unary("ReportEvaluation", report)

    def progress(self) -> float:
        coordinator = self.running.coordinator
        return progress(coordinator.phase, coordinator.completed)

    def advance_to(self, target: float, timeout: float) -> None:
        """Do the tasks owed before the run reaches `target` (`progress`), until it has."""
        deadline = time.monotonic() + timeout
        while self.progress() < target:
            assert time.monotonic() < deadline, f"the run is stuck at {self.progress()}"
            reply = self.poll()
            if task_progress(reply) < target:
                self.do_task(reply)

    def finish(self, timeout: float) -> None:
        """Do every task owed until the run is done."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.run_done():
                return
            reply = self.poll()
            if reply.HasField("done"):
                return
            self.do_task(reply)
        raise AssertionError("the run did not finish")

    # ---- invariants -----------------------------------------------------------------------

    def booked(self) -> tuple[object, bool]:
        """The open phase, and whether it has booked the fuzzer's update or report."""
        phase = self.running.coordinator.phase
        reported: set[str] = getattr(phase, "reported", set())
        return phase, "mallory" in reported

    def check(self, call: Call) -> None:
        """`call` is answered OK or refused precisely; a refusal books nothing."""
        before = self.booked()
        code, details, _ = self.send(call)
        after = self.booked()
        self.statuses[call.method, code.name] += 1
        self.details[call.method, code.name, details[:60]] += 1
        assert allowed(call.method, code), f"{call.method} answered {code.name}: {details}"
        assert not made_by_transport(details), f"{call.method}: {code.name} {details}"
        if code != sc.OK and before[0] is after[0]:
            assert before[1] == after[1], f"refused ({code.name}: {details}) yet booked"

    def run_done(self) -> bool:
        """Whether the run is over: the fuzz's own valid calls can complete it, after
        which the coordinator stops once every live client has heard so."""
        return isinstance(self.running.coordinator.phase, Done)

    def check_serving(self) -> None:
        """SERVING while the run has rounds to run; sessions as they were."""
        if self.run_done():
            return
        request = health_pb2.HealthCheckRequest(service=SERVICE_NAME)
        status = self.health.Check(request, timeout=CALL_TIMEOUT).status
        # health turns NOT_SERVING only after the coordinator has entered Done: a phase
        # read after the answer that is not Done means the answer had to be SERVING
        if not self.run_done():
            assert status == health_pb2.HealthCheckResponse.SERVING, status
        registry = self.running.coordinator.admission.registry
        mallory = registry.get("mallory")
        assert mallory is not None and mallory.token == self.token, "mallory was evicted"
        assert len(registry) == 2, [r.name for r in registry.all()]


@pytest.mark.slow
def test_hostile_calls_get_precise_statuses_and_the_rounds_complete(
    coordinator: Callable[..., RunningCoordinator], tmp_path: Path
) -> None:
    running = coordinator(
        rounds=ROUNDS,
        min_clients=2,
        max_clients=2,  # a hostile Join under a new name cannot add a session
        round_timeout=PHASE_TIMEOUT,
        eval_every=1,
        eval_timeout=PHASE_TIMEOUT,
        poll_timeout=0.25,
        chunk_bytes=1024,
        max_chunk_bytes=MAX_CHUNK_BYTES,
    )
    fuzzer = Fuzzer(running)
    honest = start_client(running.address, 0)
    first = fuzzer.poll()
    while not first.HasField("train"):  # until the honest client has joined too
        first = fuzzer.poll()
    assert first.train.round == 1

    started = time.monotonic()
    phases: Counter[str] = Counter()
    cases = 0
    after_done = 0

    def check(call: Call) -> None:
        nonlocal cases, after_done
        if fuzzer.run_done():
            after_done += 1  # the fuzz's valid calls completed the run: nothing to call
            return
        cases += 1
        phase = running.coordinator.phase
        phases[f"{type(phase).__name__} {getattr(phase, 'number', '')}".strip()] += 1
        fuzzer.check(call)
        fuzzer.check_serving()

    fuzz_settings = settings(
        max_examples=EXAMPLES_PER_STAGE,
        deadline=None,
        database=None,
        suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
    )
    try:
        for target, current in STAGES:
            if fuzzer.run_done():
                break
            fuzzer.advance_to(target, 30)
            fuzz = given(calls(current))(check)
            for call in explicit_calls(current):
                fuzz = example(call)(fuzz)
            fuzz_settings(fuzz)()
        fuzz_seconds = time.monotonic() - started
        fuzzer.finish(40)
        assert honest.join(60) == 0
        running.wait_done(30)
    finally:
        fuzzer.close()

    records = [
        json.loads(line)
        for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()
        if line.strip()
    ]
    assert [r["round"] for r in records] == list(range(1, ROUNDS + 1))
    # a client with REFUSALS_PER_ATTEMPT refused updates in an attempt (random payloads are
    # rarely finite) is no longer waited for in it: the round goes on with the honest one
    assert all(
        r["updates"] == 2 or (r["updates"] == 1 and r["rejected_uploads"] >= REFUSALS_PER_ATTEMPT)
        for r in records
    ), json.dumps(records)
    assert all(r["fed_eval_clients"] == 2 for r in records), records

    print(
        f"\nfuzz: {cases} cases in {fuzz_seconds:.1f}s ({after_done} drawn after the run "
        "was over, not sent) "
        f"(run finished {time.monotonic() - started:.1f}s after the fuzz began)"
    )
    print("fuzz: phases seen:", dict(phases))
    print("fuzz: statuses:", dict(sorted(fuzzer.statuses.items())))
    if os.environ.get("FUZZ_DETAILS"):
        for key, n in sorted(fuzzer.details.items()):
            print(n, key)
    assert cases + after_done >= EXAMPLES_PER_STAGE * len(STAGES)
    assert cases >= EXAMPLES_PER_STAGE, "the fuzz completed the run in its first stage"
