"""Connections before anyone is authenticated: how many, for how long, and the process's
descriptor limit they count against (docs/security.md, "Before authentication").

A peer that opens TCP connections and says nothing holds a descriptor each. gRPC cuts a
connection whose handshake (TLS, then HTTP/2's preface and settings) has not finished
within `HANDSHAKE_TIMEOUT_MS`, and one that carries no call for `IDLE_TIMEOUT_MS`; it
accepts at most `connection_cap` connections at once, below the descriptor limit, so the
coordinator keeps descriptors for its own files (checkpoints, spools) and for the
clients that arrive while an outsider holds the rest.
"""

from __future__ import annotations

import logging
import resource

log = logging.getLogger(__name__)

HANDSHAKE_TIMEOUT_MS = 10_000
"""A connection that has not finished its TLS and HTTP/2 handshake by then is closed."""
IDLE_TIMEOUT_MS = 300_000
"""A connection with no call in flight for this long is closed (a client's channel
reconnects on its next call)."""
MAX_STREAMS_PER_CONNECTION = 32
"""Calls in flight on one connection (HTTP/2 SETTINGS_MAX_CONCURRENT_STREAMS); a client
holds a few (a long poll, a heartbeat, a transfer)."""
RESERVED_DESCRIPTORS = 256
"""Descriptors kept for the coordinator's own files, beyond the connection cap."""
MAX_CONNECTIONS = 16_384
"""The connection cap however high the descriptor limit is."""


def raise_descriptor_limit() -> int:
    """Raise this process's soft limit on open files to its hard limit; the soft limit
    now in force (`limits_line` says it, for the log once the coordinator listens)."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if hard == resource.RLIM_INFINITY:
        hard = max(soft, 1 << 20)
    if soft != resource.RLIM_INFINITY and soft < hard:
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
            soft = hard
        except (ValueError, OSError) as exc:
            log.warning(
                "open-file limit stays at %d (raising it to %d failed: %s)", soft, hard, exc
            )
    return int(soft)


def limits_line() -> str:
    """The descriptor limit in force and the connection cap under it, for the log."""
    soft = resource.getrlimit(resource.RLIMIT_NOFILE)[0]
    return f"open-file limit {soft}; at most {connection_cap(soft)} connections at once"


def connection_cap(descriptor_limit: int | None = None) -> int:
    """How many connections grpc accepts at once under `descriptor_limit` (the soft limit
    in force when None)."""
    if descriptor_limit is None or descriptor_limit == resource.RLIM_INFINITY:
        descriptor_limit = resource.getrlimit(resource.RLIMIT_NOFILE)[0]
    if descriptor_limit == resource.RLIM_INFINITY:
        return MAX_CONNECTIONS
    return max(16, min(MAX_CONNECTIONS, descriptor_limit - RESERVED_DESCRIPTORS))


def connection_options() -> list[tuple[str, int]]:
    """grpc server options bounding connections: handshake and idle timeouts, streams
    per connection, and the connection cap under the current descriptor limit."""
    return [
        ("grpc.server_handshake_timeout_ms", HANDSHAKE_TIMEOUT_MS),
        ("grpc.max_connection_idle_ms", IDLE_TIMEOUT_MS),
        ("grpc.max_concurrent_streams", MAX_STREAMS_PER_CONNECTION),
        ("grpc.max_allowed_incoming_connections", connection_cap()),
    ]
