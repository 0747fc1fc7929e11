"""Who takes part in the run: Joins checked, sessions held, clients live or gone.

A Join is checked in this order: the claim's fields, the client's identity
(`server/identity.py`), its task and model layout (a client whose model differs would be
selected and never send a usable update), then whether its name is free (an
unauthenticated claim never evicts a live session) and whether there is room
(`--max-clients`; sessions that are gone make room first).
"""

from __future__ import annotations

from collections.abc import Callable

from fedstream.common.tokens import load_tokens
from fedstream.server.calls import JoinClaim
from fedstream.server.config import ServerConfig
from fedstream.server.errors import AlreadyJoined, TaskMismatch, TooManyClients
from fedstream.server.identity import Authenticator
from fedstream.server.registry import ClientRecord, ClientRegistry

TASK_SILENCE = 3
"""Heartbeat intervals a client holding a task may miss before it is released."""


class Membership:
    def __init__(self, config: ServerConfig, model_digest: str, clock: Callable[[], float]):
        self.config = config
        self.model_digest = model_digest
        self.registry = ClientRegistry(clock, TASK_SILENCE * config.heartbeat_seconds)
        self.authenticator = Authenticator(
            config.client_ca is not None, load_tokens(config.tokens) if config.tokens else None
        )

    def join(self, claim: JoinClaim) -> ClientRecord:
        claim.check()
        identity = self.authenticator.identify(claim.name, claim.peer_name, claim.token)
        if claim.task != self.config.task:
            raise TaskMismatch(
                f"client runs task {claim.task!r}; this coordinator runs {self.config.task!r}"
            )
        if claim.model_digest != self.model_digest:
            raise TaskMismatch(
                f"client {identity.name}'s model is laid out differently from the "
                "coordinator's (its exchanged tensors' names, dtypes or shapes differ): "
                "check --task and --task-opt"
            )
        existing = self.registry.get(identity.name)
        if existing is not None and self.alive(identity.name) and not identity.authenticated:
            raise AlreadyJoined(
                f"{identity.name} has a live session; a second client cannot join under "
                "that name until the first is gone"
            )
        if existing is None and len(self.registry) >= self.config.max_clients:
            self.registry.forget_gone(self.config.client_timeout)
            if len(self.registry) >= self.config.max_clients:
                raise TooManyClients(
                    f"the coordinator holds {self.config.max_clients} sessions (--max-clients)"
                )
        return self.registry.join(identity.name, claim.partition, claim.num_partitions)

    def authenticate(self, token: str | None) -> ClientRecord:
        """The client whose session `token` is, marked as seen now."""
        return self.registry.authenticate(token)

    def alive(self, name: str) -> bool:
        record = self.registry.get(name)
        return record is not None and self.registry.is_live(record, self.config.client_timeout)

    def live(self) -> list[ClientRecord]:
        return self.registry.live(self.config.client_timeout)

    def release_tasks(self) -> None:
        """The phase the clients held tasks for is over."""
        for record in self.registry.all():
            record.busy = False
