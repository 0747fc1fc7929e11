"""What a failed call means to the client, and how long it waits before the next try.

A status is either worth the same call again later (`RETRYABLE`; for a Join, also
`DEFERRED_AT_JOIN`), or no retry mends it as the client is configured (`REFUSED_AT_JOIN`,
raised on as `Refused`). Retries wait under `Backoff`: exponential, with full jitter.
"""

from __future__ import annotations

import random
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
