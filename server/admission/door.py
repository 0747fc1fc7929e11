"""The door: a Join checked and given a session, and each later call's session found.

A Join is checked in this order: the claim's fields, the client's identity
(`identity.py`), its task, its task options and seed (`check_agreement`), and its model
layout (a client whose model differs would be selected and never send a usable update),
then whether its name is free (an unauthenticated claim never evicts a live session) and
whether there is room
(`--max-clients`; sessions that are gone make room first). Every later call presents the
session token its Join was given (`sessions.py`).
"""

from __future__ import annotations

from collections.abc import Callable

import grpc

from fedstream.common.service import bearer_token
from fedstream.common.tokens import load_tokens
from fedstream.server.admission.identity import Authenticator
from fedstream.server.admission.sessions import ClientRecord, ClientRegistry
from fedstream.server.admission.tls import peer_fingerprint, peer_identity
from fedstream.server.calls import Agreement, JoinClaim
from fedstream.server.config import SecurityConfig, TransportConfig
from fedstream.server.errors import AlreadyJoined, TaskMismatch, TooManyClients, UnknownClient
from fedstream.tasks.options import differences

TASK_SILENCE = 3
"""Heartbeat intervals a client holding a task may miss before it is released."""


class Admission:
    """Who may talk to the coordinator, and as whom; which of them are live."""

    def __init__(
        self,
        security: SecurityConfig,
        transport: TransportConfig,
        task: str,
        model_digest: str,
        clock: Callable[[], float],
        agreement: Agreement | None = None,
    ) -> None:
        self.task = task
        self.model_digest = model_digest
        self.agreement = agreement
        """The coordinator's task options and seed, which every client's must equal."""
        self.max_clients = security.max_clients
        self.client_timeout = transport.client_timeout
        self.registry = ClientRegistry(clock, TASK_SILENCE * transport.heartbeat_seconds)
        tokens = load_tokens(security.tokens) if security.tokens else None
        self.authenticator = Authenticator(security.client_ca is not None, tokens)

    @staticmethod
    def credentials(context: grpc.aio.ServicerContext) -> tuple[str | None, str | None, str | None]:
        """A call's credentials: its verified client certificate's name, its token, and
        its certificate's fingerprint."""
        auth = context.auth_context()
        token = bearer_token(context.invocation_metadata())
        return peer_identity(auth), token, peer_fingerprint(auth)

    def joiner(self, context: grpc.aio.ServicerContext) -> str | None:
        """Who a Join is from, before its message is read: the name its certificate or
        client token proves, or None for a Join that proves nobody but is read (where
        clients do not authenticate, and for a token that is not in the --tokens file,
        whose refusal names the name it claims). UnknownClient, unread, for a Join
        without the certificate or the token this coordinator needs."""
        peer_name, token, _ = self.credentials(context)
        if self.authenticator.mutual_tls:
            if not peer_name:
                raise UnknownClient("the client certificate names no identity (common name)")
            return peer_name
        if self.authenticator.tokens is not None and not token:
            raise UnknownClient("this coordinator needs a client token (--token)")
        return self.authenticator.token_owner(token)

    def session(self, context: grpc.aio.ServicerContext) -> ClientRecord:
        """The session a call's token names, checked before its message is read (not
        marked as seen): UnknownClient or IdentityMismatch as `caller`."""
        _, token, certificate = self.credentials(context)
        return self.registry.session(token, certificate)

    def join(self, claim: JoinClaim) -> ClientRecord:
        name = claim.check()
        identity = self.authenticator.identify(name, claim.peer_name, claim.token)
        if claim.task != self.task:
            raise TaskMismatch(
                f"client runs task {claim.task!r}; this coordinator runs {self.task!r}"
            )
        self.check_agreement(identity.name, claim.agreement)
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
        if existing is None and len(self.registry) >= self.max_clients:
            self.registry.forget_gone(self.client_timeout)
            if len(self.registry) >= self.max_clients:
                raise TooManyClients(
                    f"the coordinator holds {self.max_clients} sessions (--max-clients)"
                )
        return self.registry.join(
            identity.name, claim.partition, claim.num_partitions, claim.certificate
        )

    def check_agreement(self, name: str, theirs: Agreement | None) -> None:
        """TaskMismatch naming each difference between the client's options and seed and
        the coordinator's. Before the layout check: a differing option that shapes the
        model is named, not reported as a layout that differs."""
        if theirs is None or self.agreement is None:
            return
        ours = self.agreement
        found = differences(theirs.task_options, ours.task_options)
        if found:
            raise TaskMismatch(
                f"client {name}'s task options differ from the coordinator's: "
                f"{'; '.join(found)}. Every option but the task's site options must agree"
            )
        if theirs.seed != ours.seed:
            raise TaskMismatch(
                f"client {name} runs --seed {theirs.seed}; the coordinator runs --seed "
                f"{ours.seed}: the seed shapes the model and the data splits and must agree"
            )

    def caller(self, context: grpc.aio.ServicerContext) -> ClientRecord:
        """The client whose session the call's token is, on a connection presenting the
        certificate the session was opened with, marked as seen now."""
        _, token, certificate = self.credentials(context)
        return self.registry.authenticate(token, certificate)

    def alive(self, name: str) -> bool:
        record = self.registry.get(name)
        return record is not None and self.registry.is_live(record, self.client_timeout)

    def live(self) -> list[ClientRecord]:
        return self.registry.live(self.client_timeout)

    def release_tasks(self) -> None:
        """The phase the clients held tasks for is over."""
        for record in self.registry.all():
            record.busy = False
