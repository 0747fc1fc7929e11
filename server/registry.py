"""Which clients have joined, how to recognise them, and which are alive."""

from __future__ import annotations

import secrets
import time
from collections.abc import Callable
from dataclasses import dataclass, field

from fedstream.server.errors import UnknownClient


@dataclass
class ClientRecord:
    """One joined client. `name` is its identity: updates are booked under it."""

    name: str
    token: str
    partition: int
    num_partitions: int
    joined_at: float
    last_seen: float
    told_done: bool = False
    busy: bool = field(default=False)
    """Holding a task for the open round (training clients do not poll)."""


class ClientRegistry:
    """Clients by name and by session token.

    A client that joins again under the same name (a restarted process, or one re-joining
    after the coordinator restarted) replaces its old session: its old token stops working.
    """

    def __init__(self, clock: Callable[[], float] = time.monotonic) -> None:
        self._clock = clock
        self._by_name: dict[str, ClientRecord] = {}
        self._by_token: dict[str, ClientRecord] = {}

    def join(self, name: str, partition: int, num_partitions: int) -> ClientRecord:
        old = self._by_name.pop(name, None)
        if old is not None:
            self._by_token.pop(old.token, None)
        now = self._clock()
        record = ClientRecord(name, secrets.token_urlsafe(24), partition, num_partitions, now, now)
        self._by_name[name] = record
        self._by_token[record.token] = record
        return record

    def authenticate(self, token: str | None) -> ClientRecord:
        """The client holding `token`, marked as seen now."""
        record = self._by_token.get(token or "")
        if record is None:
            raise UnknownClient("unknown or expired session token: call Join first")
        record.last_seen = self._clock()
        return record

    def live(self, timeout: float) -> list[ClientRecord]:
        """Clients seen within `timeout` seconds or busy with a task, sorted by name."""
        now = self._clock()
        return sorted(
            (r for r in self._by_name.values() if r.busy or now - r.last_seen <= timeout),
            key=lambda r: r.name,
        )

    def all(self) -> list[ClientRecord]:
        return sorted(self._by_name.values(), key=lambda r: r.name)

    def __len__(self) -> int:
        return len(self._by_name)
