"""ClientRegistry: sessions by token, one per identity, liveness by a clock the test owns."""

from __future__ import annotations

import pytest

from fedstream.server.admission.sessions import ClientRegistry
from fedstream.server.errors import UnknownClient


class Clock:
    """A monotonic clock that moves only when the test says so."""

    def __init__(self, now: float = 1000.0) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now

    def advance(self, seconds: float) -> None:
        self.now += seconds


@pytest.fixture
def clock() -> Clock:
    return Clock()


@pytest.fixture
def registry(clock: Clock) -> ClientRegistry:
    return ClientRegistry(clock=clock)


def test_join_records_the_client_and_hands_out_a_token(
    registry: ClientRegistry, clock: Clock
) -> None:
    record = registry.join("alice", partition=2, num_partitions=8)
    assert (record.name, record.partition, record.num_partitions) == ("alice", 2, 8)
    assert record.joined_at == record.last_seen == clock.now
    assert not record.busy and not record.told_done
    assert len(record.token) >= 24
    assert registry.authenticate(record.token) is record
    assert len(registry) == 1


def test_every_session_gets_its_own_token(registry: ClientRegistry) -> None:
    tokens = {registry.join(f"c{i}", i, 8).token for i in range(8)}
    assert len(tokens) == 8


def test_a_rejoin_replaces_the_old_session(registry: ClientRegistry, clock: Clock) -> None:
    old = registry.join("alice", 0, 8)
    bob = registry.join("bob", 1, 8)
    clock.advance(5.0)
    new = registry.join("alice", 3, 8)

    assert new.token != old.token
    with pytest.raises(UnknownClient):
        registry.authenticate(old.token)
    assert registry.authenticate(new.token) is new
    assert (new.partition, new.joined_at) == (3, clock.now)
    assert registry.authenticate(bob.token) is bob  # other sessions are untouched
    assert [r.name for r in registry.all()] == ["alice", "bob"]
    assert len(registry) == 2


def test_authenticate_marks_the_client_seen(registry: ClientRegistry, clock: Clock) -> None:
    record = registry.join("alice", 0, 8)
    joined = clock.now
    clock.advance(42.0)
    registry.authenticate(record.token)
    assert record.last_seen == joined + 42.0
    assert record.joined_at == joined


@pytest.mark.parametrize("token", ["forged", "", None], ids=["forged", "empty", "none"])
def test_authenticate_refuses_an_unknown_token(registry: ClientRegistry, token: str | None) -> None:
    registry.join("alice", 0, 8)
    with pytest.raises(UnknownClient, match="Join first"):
        registry.authenticate(token)


def test_live_honours_the_timeout(registry: ClientRegistry, clock: Clock) -> None:
    quiet = registry.join("quiet", 0, 8)
    clock.advance(10.0)
    chatty = registry.join("chatty", 1, 8)
    assert [r.name for r in registry.live(timeout=10.0)] == ["chatty", "quiet"]  # boundary
    clock.advance(0.5)
    assert registry.live(timeout=10.0) == [chatty]
    registry.authenticate(quiet.token)
    assert [r.name for r in registry.live(timeout=10.0)] == ["chatty", "quiet"]
    clock.advance(30.0)
    assert registry.live(timeout=10.0) == []


def test_a_busy_client_is_live_while_it_heartbeats(clock: Clock) -> None:
    registry = ClientRegistry(clock=clock, task_timeout=30.0)
    training = registry.join("training", 0, 8)
    idle = registry.join("idle", 1, 8)
    training.busy = True
    clock.advance(25.0)
    registry.authenticate(training.token)  # a heartbeat
    clock.advance(29.0)
    assert registry.live(timeout=10.0) == [training]
    clock.advance(2.0)  # silent for 31 s while holding a task: released
    assert registry.live(timeout=10.0) == []
    assert registry.all() == [idle, training]


def test_sessions_that_are_gone_are_forgotten(registry: ClientRegistry, clock: Clock) -> None:
    gone = registry.join("gone", 0, 8)
    clock.advance(20.0)
    here = registry.join("here", 1, 8)
    registry.forget_gone(timeout=10.0)
    assert registry.all() == [here] and registry.get("gone") is None
    with pytest.raises(UnknownClient):
        registry.authenticate(gone.token)
