"""What a failed call means to the client, and how long it waits before the next try.

A status is either worth the same call again later (`RETRYABLE`; for a Join, also
`DEFERRED_AT_JOIN`), or no retry mends it as the client is configured (`REFUSED_AT_JOIN`,
raised on as `Refused`). Retries wait under `Backoff`: exponential, with full jitter.

A connection that cannot be set up because of credentials also fails with UNAVAILABLE,
like an outage; its details carry the handshake's error. `HandshakeWatch` tells the two
apart, so a credential mistake ends the client in seconds rather than after
--give-up-after (`docs/troubleshooting.md` lists the causes it names).
"""

from __future__ import annotations

import random
import re
import time
from collections.abc import Callable

import grpc

RETRYABLE = frozenset(
    {
        grpc.StatusCode.UNAVAILABLE,
        grpc.StatusCode.DEADLINE_EXCEEDED,
        grpc.StatusCode.CANCELLED,
        grpc.StatusCode.RESOURCE_EXHAUSTED,
        grpc.StatusCode.ABORTED,
    }
)
"""Statuses after which the same call may succeed later (the peer or the link recovers)."""

REFUSED_AT_JOIN = {
    grpc.StatusCode.FAILED_PRECONDITION: "this client's model or task is not the coordinator's",
    grpc.StatusCode.INVALID_ARGUMENT: "the join request is not valid",
    grpc.StatusCode.PERMISSION_DENIED: "this client may not join under its name",
    grpc.StatusCode.UNAUTHENTICATED: "the coordinator does not accept this client's credentials",
}
"""Join statuses that no retry turns into a session, as the client is configured."""

DEFERRED_AT_JOIN = {
    grpc.StatusCode.ALREADY_EXISTS: "a live session holds this name; it may expire",
    grpc.StatusCode.RESOURCE_EXHAUSTED: "the coordinator is full (--max-clients)",
}
"""Join statuses that may turn into a session later: retried with backoff."""


class Refused(Exception):
    """The coordinator will never accept this client as configured (wrong task, say)."""


def rpc_status(exc: grpc.RpcError) -> tuple[grpc.StatusCode, str]:
    """The status code and details a failed call ended with.

    `grpc.RpcError` declares neither; the error a call raises is also a `grpc.Call`.
    """
    return exc.code(), exc.details()  # type: ignore[attr-defined]


class Backoff:
    """Exponential backoff with full jitter: sleep a uniform draw below a doubling cap.

    The n-th delay since the last reset is drawn from [0, min(cap, base * 2**n)].
    """

    def __init__(
        self,
        base: float = 0.5,
        cap: float = 30.0,
        rng: random.Random | None = None,
        sleep: Callable[[float], None] = time.sleep,
    ) -> None:
        self.base = base
        self.cap = cap
        self.attempt = 0
        self.rng = rng or random.Random()
        self._sleep = sleep

    def ceiling(self) -> float:
        """The bound of the next delay."""
        # 2.0 ** n raises OverflowError past n = 1023, which a client retrying for days
        # reaches; any cap is reached long before 2 ** 1000.
        return min(self.cap, self.base * 2.0 ** min(self.attempt, 1000))

    def next_delay(self) -> float:
        ceiling = self.ceiling()
        self.attempt += 1
        return self.rng.uniform(0.0, ceiling)

    def sleep(self) -> float:
        delay = self.next_delay()
        self._sleep(delay)
        return delay

    def sleep_for(self, delay: float) -> None:
        """Wait `delay` (drawn by `next_delay`, say to log it first) with the sleep given."""
        self._sleep(delay)

    def reset(self) -> None:
        self.attempt = 0


CONNECTING = "failed to connect to all addresses"
"""How the details of a call that found no connection begin (a broken call's do not)."""

DEFINITE_AFTER = 3
"""Handshake failures in a row, each naming its cause, after which the client gives up."""

CLOSED_AFTER = 5
"""Connections in a row closed by the coordinator during the handshake after which the
client gives up: such a close names no cause, and a proxy in front of a coordinator
that is down may close connections too, so it takes more of them (and once a call was
answered, closes never end the client: see `HandshakeWatch`)."""

LAST_ADDRESS = re.compile(r"last error: [A-Z_]+: (ipv[46]:.*?:\d+):")
"""The address grpc names in a failed connection's details (`ipv4:127.0.0.1:P`)."""


class HandshakeWatch:
    """Counts connection attempts in a row that failed in the TLS handshake, and names
    the likely cause once there are enough of them (`failed`).

    Any other outcome starts the count again: a failure of another kind (nothing
    listening, connection refused, a deadline) through `failed`, and an answered call
    through `reset`; but a refusal at another address than the one whose handshakes
    failed does not (a name such as `localhost` has an IPv6 address where nothing
    listens beside the IPv4 one where the coordinator does). `target` is the HOST:PORT
    dialled; `tls` whether this client speaks TLS (--ca), `mutual` whether it presents a
    certificate (--cert).

    Once a call has been answered, these credentials are known to pass the handshake, so
    connections closed in it with no cause named are an outage (a proxy whose coordinator
    is restarting accepts and closes), retried like a refused connection; a named cause
    (a certificate the coordinator changed) still ends the client.
    """

    def __init__(self, target: str, tls: bool, mutual: bool) -> None:
        self.target = target
        self.tls = tls
        self.mutual = mutual
        self.in_a_row = 0
        self.address: str | None = None
        self.answered = False

    def reset(self) -> None:
        """A call was answered."""
        self.in_a_row = 0
        self.answered = True

    def failed(self, code: grpc.StatusCode, details: str) -> str | None:
        """The likely cause, once `code`/`details` make enough handshake failures in a
        row to give up on; None while the client should go on retrying."""
        cause = self.cause(code, details)
        if cause is not None and self.answered and not cause[0]:
            cause = None
        named = LAST_ADDRESS.search(details)
        address = named.group(1) if named else None
        if cause is None:
            if not (self.in_a_row and address and self.address and address != self.address):
                self.reset()
            return None
        self.address = address
        self.in_a_row += 1
        definite, text = cause
        if self.in_a_row < (DEFINITE_AFTER if definite else CLOSED_AFTER):
            return None
        return f"cannot connect to the coordinator at {self.target}: {text}"

    def cause(self, code: grpc.StatusCode, details: str) -> tuple[bool, str] | None:
        """(whether the details name the cause, the cause) of a failed connection
        attempt that reached the coordinator's port; None for any other failure."""
        if code != grpc.StatusCode.UNAVAILABLE or not details.startswith(CONNECTING):
            return None
        host = self.target.rpartition(":")[0]
        if "CERTIFICATE_VERIFY_FAILED" in details:
            return True, (
                "its certificate is not signed by the CA this client trusts (--ca): "
                "give the CA that signed the coordinator's --tls-cert"
            )
        if "Hostname Verification Check failed" in details:
            return True, (
                f"its certificate does not name {host}, the host this client dials: "
                "dial a name the certificate holds (fedstream certs --server-name)"
            )
        if "WRONG_VERSION_NUMBER" in details:
            return True, (
                "it does not speak TLS and this client does (--ca): drop --ca, or start "
                "the coordinator with --tls-cert and --tls-key"
            )
        if "security handshaker" in details:
            return True, "this client's TLS credentials cannot be used (--ca, --cert, --key)"
        if "Socket closed" in details or "Connection reset" in details:
            return False, self._closed()
        return None

    def _closed(self) -> str:
        """What most likely made the coordinator close the connection in the handshake."""
        closed = "it closed every connection during the handshake"
        if not self.tls:
            return (
                f"{closed}: it most likely speaks TLS and this client plaintext: give "
                "--ca (and --cert, --key if it requires client certificates)"
            )
        if not self.mutual:
            return (
                f"{closed}: it most likely requires a client certificate (mutual TLS) "
                "and this client presents none: give --cert and --key"
            )
        return (
            f"{closed}: it most likely does not trust this client's certificate: --cert "
            "is not signed by the CA the coordinator trusts (its --client-ca)"
        )
