"""The sessions the coordinator holds: which clients have joined, the session token each
call presents, and which clients are alive."""

from __future__ import annotations

import math
import secrets
import time
from collections.abc import Callable
from dataclasses import dataclass, field

from fedstream.server.errors import IdentityMismatch, UnknownClient


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
    """Holding a task for the open phase (such a client heartbeats instead of polling)."""
    certificate: str | None = None
    """The fingerprint of the client certificate the session was opened with (mutual
    TLS): its token works only on connections presenting that certificate."""


class ClientRegistry:
    """Clients by name and by session token.

    A session that joins again under the same name replaces the old one, whose token stops
    working; whether it may is admission's decision (`identity.py`). A client
    holding a task is live while it heartbeats (seen within `task_timeout`), any other
    while it polls (seen within the timeout `live` is given).
    """

    def __init__(
        self, clock: Callable[[], float] = time.monotonic, task_timeout: float = math.inf
    ) -> None:
        self._clock = clock
        self.task_timeout = task_timeout
        self._by_name: dict[str, ClientRecord] = {}
        self._by_token: dict[str, ClientRecord] = {}

    def get(self, name: str) -> ClientRecord | None:
        return self._by_name.get(name)

    def is_live(self, record: ClientRecord, timeout: float) -> bool:
        silent = self._clock() - record.last_seen
        return silent <= (self.task_timeout if record.busy else timeout)

    def forget_gone(self, timeout: float) -> None:
        """Drop the sessions that are not live: their tokens stop working."""
        for record in [r for r in self._by_name.values() if not self.is_live(r, timeout)]:
            del self._by_name[record.name]
            self._by_token.pop(record.token, None)

    def join(
        self, name: str, partition: int, num_partitions: int, certificate: str | None = None
    ) -> ClientRecord:
        old = self._by_name.pop(name, None)
        if old is not None:
            self._by_token.pop(old.token, None)
        now = self._clock()
        token = secrets.token_urlsafe(24)
        record = ClientRecord(
            name, token, partition, num_partitions, now, now, certificate=certificate
        )
        self._by_name[name] = record
        self._by_token[record.token] = record
        return record

    def session(self, token: str | None, certificate: str | None = None) -> ClientRecord:
        """The client holding `token`, presented with the client certificate of
        fingerprint `certificate`: UnknownClient for a token that is not a session's,
        IdentityMismatch for a session opened with another certificate."""
        record = self._by_token.get(token or "")
        if record is None:
            raise UnknownClient("unknown or expired session token: call Join first")
        if record.certificate != certificate:
            raise IdentityMismatch(
                f"the session token was issued to {record.name}'s client certificate; "
                "this connection presents another"
            )
        return record

    def authenticate(self, token: str | None, certificate: str | None = None) -> ClientRecord:
        """The client holding `token` (`session`), marked as seen now."""
        record = self.session(token, certificate)
        record.last_seen = self._clock()
        return record

    def live(self, timeout: float) -> list[ClientRecord]:
        """Live clients (`is_live`), sorted by name."""
        return sorted(
            (r for r in self._by_name.values() if self.is_live(r, timeout)), key=lambda r: r.name
        )

    def all(self) -> list[ClientRecord]:
        return sorted(self._by_name.values(), key=lambda r: r.name)

    def __len__(self) -> int:
        return len(self._by_name)
