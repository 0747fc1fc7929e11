"""The round state machine driven directly: no sockets, a clock moved by hand.

Each test runs a Coordinator on an event loop of its own and plays its clients by calling
`join`, `poll`, `receive_upload` and `report_evaluation` as the servicer would.
"""

from __future__ import annotations

import asyncio
import json
import socket
import time
from collections.abc import AsyncIterator, Callable, Coroutine, Mapping, Sequence
from pathlib import Path
from typing import Any

import pytest
import torch

from fedstream.common.checkpoint import load_checkpoint
from fedstream.common.errors import NonFiniteValues
from fedstream.common.wire.manifest import Manifest
from fedstream.common.wire.stream import iter_chunks
from fedstream.server.admission.sessions import ClientRecord
from fedstream.server.assembly import assemble
from fedstream.server.calls import (
    EvaluateWork,
    EvaluationClaim,
    JoinClaim,
    NoWork,
    RunDone,
    TrainWork,
    UpdateClaim,
)
from fedstream.server.config import ServerConfig
from fedstream.server.errors import NotSelected, WrongRound
from fedstream.server.phases import Done, OpenEvaluation, OpenRound, Waiting
from fedstream.server.run_store import RunStore
from fedstream.server.strategies import FedAvg, Strategy
from fedstream.server.updates import VerifiedUpdate

from .conftest import TINY_DIGEST, TinyModel, tiny_task
from .fake_clock import FakeClock

REAL_DEADLINE_S = 10.0
"""How long, in real seconds, a test waits for the coordinator's threads (checkpoint
writes, folds) before it fails."""


@pytest.fixture(autouse=True)
def no_network(monkeypatch: pytest.MonkeyPatch) -> None:
    """Fail any test here that binds or connects a socket."""

    def refuse(*args: Any) -> None:
        raise AssertionError("the state machine opened a network socket")

    monkeypatch.setattr(socket.socket, "bind", refuse)
    monkeypatch.setattr(socket.socket, "connect", refuse)
    monkeypatch.setattr(RunStore, "plot", lambda self, force=True: None)  # a matplotlib child


class Harness:
    """A coordinator, its fake clock, and helpers that play its clients."""

    def __init__(self, run_dir: Path, strategy: Strategy | None = None, **settings: Any) -> None:
        config = ServerConfig(
            **{"run_dir": run_dir, "task": "tiny", "min_clients": 2, "rounds": 1, **settings}
        )
        config.validate()
        self.clock = FakeClock()
        self.coordinator = assemble(config, tiny_task(), strategy or FedAvg(), self.clock)
        self.clients: dict[str, ClientRecord] = {}

    def join(self, name: str, partition: int) -> ClientRecord:
        joined = self.coordinator.join(JoinClaim(name, "tiny", partition, 8, TINY_DIGEST))
        self.clients[name] = joined.client
        return joined.client

    async def poll(self, name: str) -> Any:
        return await self.coordinator.poll(self.clients[name])

    async def upload(
        self,
        name: str,
        partition: int,
        round_number: int = 1,
        value: float | None = None,
        num_examples: int | None = None,
    ) -> None:
        """The TinyTask update of `partition` (every weight + 0.125 * (partition + 1)),
        or `value` everywhere; it claims 10 * (partition + 1) examples, or `num_examples`."""
        model = self.coordinator.model
        step = 0.125 * (partition + 1) if value is None else value
        deltas = {n: torch.full_like(t, step) for n, t in model.tensors.items()}
        claim = UpdateClaim(
            round=round_number,
            model_version=model.version,
            num_examples=10 * (partition + 1) if num_examples is None else num_examples,
            metrics={"loss": float(partition)},
            manifest=Manifest.from_tensors(deltas).to_proto(),
        )
        receipt = await self.coordinator.receive_upload(
            self.clients[name], claim, chunks_of(deltas)
        )
        assert receipt.accepted, receipt.detail

    async def start(self, *names: str) -> tuple[asyncio.Task[None], OpenRound]:
        """Join clients `names` (each's partition is its index), run the coordinator, and
        return its task and round 1 once that round is open."""
        for partition, name in enumerate(names):
            self.join(name, partition)
        running = asyncio.create_task(self.coordinator.run())
        await self.until(lambda: isinstance(self.coordinator.phase, OpenRound), "round 1 to open")
        assert isinstance(self.coordinator.phase, OpenRound)
        return running, self.coordinator.phase

    async def until(self, predicate: Callable[[], bool], what: str) -> None:
        """Yield to the coordinator until `predicate` holds (its threads take real time)."""
        deadline = time.monotonic() + REAL_DEADLINE_S
        while not predicate():
            if time.monotonic() > deadline:
                raise AssertionError(f"never reached: {what} (phase {self.coordinator.phase})")
            await asyncio.sleep(0.001)

    async def until_round(self, number: int) -> None:
        """Until round `number` is open for updates."""

        def is_open() -> bool:
            open_round = self.coordinator.round
            return open_round is not None and open_round.number == number and open_round.accepting

        await self.until(is_open, f"round {number} to open")

    def checkpoint(self, round_number: int) -> Path:
        return self.coordinator.store.checkpoint_path(round_number)


async def chunks_of(tensors: Mapping[str, torch.Tensor]) -> AsyncIterator[memoryview]:
    for chunk in iter_chunks(list(tensors.values()), 16, 0):
        yield memoryview(bytes(chunk))


def run(test: Callable[[], Coroutine[Any, Any, None]]) -> None:
    asyncio.run(asyncio.wait_for(test(), REAL_DEADLINE_S * 3))


def expected_fedavg(partitions: Sequence[int]) -> dict[str, torch.Tensor]:
    start = {k: v for k, v in TinyModel(0).state_dict().items() if v.is_floating_point()}
    weights = [10 * (p + 1) for p in partitions]
    mean = sum(w * 0.125 * (p + 1) for w, p in zip(weights, partitions, strict=True))
    return {k: (v.float() + mean / sum(weights)).to(v.dtype) for k, v in start.items()}


def test_round_closes_when_every_selected_client_has_reported(tmp_path: Path) -> None:
    async def scenario() -> None:
        # FedAvg as the claims and updates are made: bounded influence would weigh both
        # as the smaller claim and clip both to the smaller norm (tests/server/test_influence.py)
        h = Harness(tmp_path, claim_cap_factor=0, clip_factor=0)
        running = asyncio.create_task(h.coordinator.run())
        h.join("a", 0)
        await h.until(lambda: isinstance(h.coordinator.phase, Waiting), "waiting for clients")
        h.join("b", 1)
        await h.until(lambda: isinstance(h.coordinator.phase, OpenRound), "round 1 to open")
        for name in ("a", "b"):
            work = await h.poll(name)
            assert isinstance(work, TrainWork) and work.round == 1 and work.model_version == 0
        await h.upload("a", 0)
        assert isinstance(h.coordinator.phase, OpenRound)  # b still owes its update
        await h.upload("b", 1)
        await asyncio.wait_for(running, REAL_DEADLINE_S)

        assert isinstance(h.coordinator.phase, Done) and h.coordinator.completed == 1
        final, _ = load_checkpoint(h.checkpoint(1))
        for name, tensor in expected_fedavg([0, 1]).items():
            torch.testing.assert_close(final[name], tensor, rtol=0, atol=1e-6)
        (record,) = h.coordinator.store.history
        assert record["updates"] == 2 and record["attempt"] == 1
        assert record["train_loss"] == pytest.approx(20 / 30)

    run(scenario)


def test_round_closes_at_its_deadline_with_enough_reports(tmp_path: Path) -> None:
    async def scenario() -> None:
        h = Harness(tmp_path, round_timeout=30.0, min_reports=1)
        running, _ = await h.start("a", "b")
        await h.upload("a", 0)
        h.clock.advance(29.0)
        await asyncio.sleep(0)
        assert isinstance(h.coordinator.phase, OpenRound)  # not yet
        h.clock.advance(1.0)
        await asyncio.wait_for(running, REAL_DEADLINE_S)
        (record,) = h.coordinator.store.history
        assert record["updates"] == 1 and record["clients_selected"] == 2
        assert record["duration_s"] == pytest.approx(30.0)
        final, _ = load_checkpoint(h.checkpoint(1))
        torch.testing.assert_close(final["w"], expected_fedavg([0])["w"], rtol=0, atol=1e-6)

    run(scenario)


def test_round_with_too_few_reports_runs_again_with_its_updates_released(
    tmp_path: Path,
) -> None:
    async def scenario() -> None:
        h = Harness(tmp_path, round_timeout=30.0, min_reports=2, claim_cap_factor=0, clip_factor=0)
        running, first = await h.start("a", "b")
        await h.upload("a", 0)
        h.clock.advance(30.0)
        await h.until(
            lambda: h.coordinator.round is not None and h.coordinator.round.attempt == 2,
            "round 1's second attempt",
        )
        assert all(update.released for update in first.updates)
        assert h.coordinator.completed == 0 and not h.checkpoint(1).exists()
        for name, partition in (("a", 0), ("b", 1)):
            assert isinstance(await h.poll(name), TrainWork)
            await h.upload(name, partition)
        await asyncio.wait_for(running, REAL_DEADLINE_S)
        (record,) = h.coordinator.store.history
        assert record["attempt"] == 2 and record["updates"] == 2
        final, _ = load_checkpoint(h.checkpoint(1))
        torch.testing.assert_close(final["w"], expected_fedavg([0, 1])["w"], rtol=0, atol=1e-6)

    run(scenario)


def test_refused_updates_change_nothing_and_the_round_carries_on(tmp_path: Path) -> None:
    async def scenario() -> None:
        h = Harness(tmp_path, fraction=0.5, min_clients=1)
        running, open_round = await h.start("a", "b")
        (chosen,) = open_round.selected
        other = "b" if chosen == "a" else "a"
        partition = 0 if chosen == "a" else 1
        with pytest.raises(NotSelected):
            await h.upload(other, 1 - partition)
        with pytest.raises(WrongRound):
            await h.upload(chosen, partition, round_number=2)
        with pytest.raises(NonFiniteValues):
            await h.upload(chosen, partition, value=float("nan"))
        assert open_round.rejected == 1  # the header checks refuse before any byte is spooled
        assert not open_round.reported and not open_round.uploading
        await h.upload(chosen, partition)
        await asyncio.wait_for(running, REAL_DEADLINE_S)
        (record,) = h.coordinator.store.history
        assert record["updates"] == 1 and record["rejected_uploads"] == 1
        final, _ = load_checkpoint(h.checkpoint(1))
        expected = expected_fedavg([partition])
        torch.testing.assert_close(final["w"], expected["w"], rtol=0, atol=1e-6)

    run(scenario)


def test_evaluation_opens_after_the_checkpoint_and_adds_to_the_record(tmp_path: Path) -> None:
    async def scenario() -> None:
        h = Harness(tmp_path, eval_every=1, eval_timeout=60.0)
        running, _ = await h.start("a", "b")
        await h.upload("a", 0)
        await h.upload("b", 1)
        await h.until(lambda: isinstance(h.coordinator.phase, OpenEvaluation), "evaluation")
        # The round is committed before anyone evaluates it.
        assert h.checkpoint(1).exists() and h.coordinator.completed == 1
        _, metadata = load_checkpoint(h.checkpoint(1))
        assert json.loads(metadata["history"])[0]["round"] == 1
        work = await h.poll("a")
        assert isinstance(work, EvaluateWork) and work.model_version == 1
        receipt = h.coordinator.report_evaluation(
            h.clients["a"], EvaluationClaim(1, 1, 5, {"loss": 0.5})
        )
        assert receipt.accepted
        assert not h.coordinator.report_evaluation(
            h.clients["a"], EvaluationClaim(1, 1, 5, {"loss": 0.5})
        ).accepted  # booked once
        h.clock.advance(60.0)  # b never reports
        await asyncio.wait_for(running, REAL_DEADLINE_S)
        (record,) = h.coordinator.store.history
        assert record["fed_eval_clients"] == 1 and record["fed_eval_loss"] == 0.5
        logged = json.loads((tmp_path / "metrics.jsonl").read_text().splitlines()[0])
        assert logged["fed_eval_loss"] == 0.5 and logged["updates"] == 2

    run(scenario)


def test_done_answers_every_poll_and_waits_for_clients_to_hear_it(tmp_path: Path) -> None:
    async def scenario() -> None:
        h = Harness(tmp_path, min_clients=1, poll_timeout=5.0)
        running, _ = await h.start("a")
        await h.upload("a", 0)
        await asyncio.wait_for(running, REAL_DEADLINE_S)
        told = asyncio.create_task(h.coordinator.wait_clients_told(30.0))
        await asyncio.sleep(0)
        assert not told.done()
        assert isinstance(await h.poll("a"), RunDone)
        await asyncio.wait_for(told, REAL_DEADLINE_S)
        assert h.clients["a"].told_done

    run(scenario)


@pytest.mark.parametrize(
    ("client_timeout", "held"),
    [(120.0, 20.0), (3.0, 1.5)],
    ids=["the poll timeout", "half the client timeout"],
)
def test_a_poll_without_work_is_held_so_long_that_its_client_stays_live(
    tmp_path: Path, client_timeout: float, held: float
) -> None:
    """Held for the poll timeout (20 s), but at most half the client timeout: two clients
    whose polls were held past it in turn would each be counted gone while the other
    polls, and no round would open."""

    async def scenario() -> None:
        h = Harness(tmp_path, poll_timeout=20.0, client_timeout=client_timeout)
        h.join("a", 0)
        poll = asyncio.create_task(h.poll("a"))
        await asyncio.sleep(0)
        h.clock.advance(held - 0.1)
        await asyncio.sleep(0)
        assert not poll.done()
        h.clock.advance(0.1)
        assert isinstance(await asyncio.wait_for(poll, REAL_DEADLINE_S), NoWork)
        assert [r.name for r in h.coordinator.admission.live()] == ["a"]

    run(scenario)


class CoordinateMax(Strategy):
    """A strategy that holds its round's updates and reads them all at the end:
    w <- w + max_k delta_k, coordinate by coordinate."""

    holds_updates = True

    def begin_round(self, global_tensors: Mapping[str, torch.Tensor]) -> None:
        self.seen: list[str] = []

    def accept(self, update: VerifiedUpdate) -> None:
        self.seen.append(update.client)

    def aggregate(
        self, updates: Sequence[VerifiedUpdate], global_tensors: Mapping[str, torch.Tensor]
    ) -> None:
        top = {n: torch.full(t.shape, -torch.inf) for n, t in global_tensors.items()}
        for update in updates:
            for block in update.blocks():
                target = block.target(top)
                torch.maximum(target, block.values.float(), out=target)
        for name, tensor in global_tensors.items():
            tensor.add_(top[name].to(tensor.dtype))


def test_a_strategy_that_holds_updates_reads_every_one_at_the_end(tmp_path: Path) -> None:
    async def scenario() -> None:
        strategy = CoordinateMax()  # of the updates as sent: no clipping
        h = Harness(tmp_path, strategy=strategy, min_clients=3, clip_factor=0)
        running, open_round = await h.start("a", "b", "c")
        for name, partition in (("c", 2), ("a", 0), ("b", 1)):
            await h.upload(name, partition)
        await asyncio.wait_for(running, REAL_DEADLINE_S)
        assert strategy.seen == ["c", "a", "b"]
        assert all(update.released for update in open_round.updates)  # after the commit
        final, _ = load_checkpoint(h.checkpoint(1))
        start = TinyModel(0).state_dict()["w"]
        torch.testing.assert_close(final["w"], start + 0.375, rtol=0, atol=1e-6)

    run(scenario)


@pytest.mark.parametrize("safeguards", [True, False])
def test_fold_strategies_release_each_spool_once_it_cannot_be_needed_again(
    tmp_path: Path, safeguards: bool
) -> None:
    """Without safeguards a folded update's spool goes back at once; with them it is kept
    until the commit, in case the round must be aggregated again without an update."""

    async def scenario() -> None:
        h = Harness(tmp_path, safeguards=safeguards)
        running, open_round = await h.start("a", "b")
        await h.upload("a", 0)
        (update,) = open_round.updates
        assert update.released is not safeguards
        assert update.client == "a" and update.num_examples == 10
        await h.upload("b", 1)
        await asyncio.wait_for(running, REAL_DEADLINE_S)
        assert update.released

    run(scenario)


def test_restarted_on_a_finished_run_it_waits_for_its_clients_to_hear_it(
    tmp_path: Path,
) -> None:
    async def scenario() -> None:
        first = Harness(tmp_path, min_clients=1)
        running, _ = await first.start("a")
        await first.upload("a", 0)
        await asyncio.wait_for(running, REAL_DEADLINE_S)
        first.coordinator.store.close()  # killed before "a" heard the run is done

        again = Harness(tmp_path, min_clients=1)
        assert again.coordinator.completed == 1
        await asyncio.wait_for(again.coordinator.run(), REAL_DEADLINE_S)
        told = asyncio.create_task(again.coordinator.wait_clients_told(30.0))
        await asyncio.sleep(0)
        assert not told.done()  # nobody has come back yet
        again.join("a", 0)
        assert isinstance(await again.poll("a"), RunDone)
        await asyncio.wait_for(told, REAL_DEADLINE_S)

    run(scenario)
