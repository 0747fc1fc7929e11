"""The coordinator's ports are its own: one coordinator per port, and a port it cannot
have is one line at start, naming the address and why.

gRPC turns SO_REUSEPORT on by default, which lets a second coordinator bind the port of
a first and take a share of its clients; the daemon turns it off (`daemon.grpc_options`).
A port that is taken is found before the model is built (`check_free`), and again, for
certain, when the port is bound (`unavailable` describes the failure).
"""

from __future__ import annotations

import errno
import socket

from fedstream.common.errors import FedstreamError


class PortUnavailable(FedstreamError):
    """An address the coordinator cannot listen on (taken, not this machine's, ...)."""


CAUSES = {
    errno.EADDRINUSE: "is already in use: another process listens there",
    errno.EADDRNOTAVAIL: "is not an address of this machine",
    errno.EACCES: "needs privileges this process lacks (ports below 1024 do)",
}


def _flag(setting: str) -> str:
    return "--" + setting.replace("_", "-")


def unavailable(setting: str, address: str, error: OSError) -> PortUnavailable:
    """The one-line error for `address` (the value of --`setting`) failing with `error`."""
    cause = CAUSES.get(error.errno or 0, f"cannot be listened on: {error.strerror or error}")
    return PortUnavailable(f"{setting.replace('_', ' ')} {address} {cause} ({_flag(setting)})")


def _bind(address: str) -> None:
    """Bind (and release) a socket on HOST:PORT as a server would: OSError if it cannot."""
    host, _, port = address.rpartition(":")
    found = socket.getaddrinfo(
        host.strip("[]"), int(port), type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE
    )
    for family, kind, proto, _, sockaddr in found:
        with socket.socket(family, kind, proto) as probe:
            # As grpc and aiohttp do: a port whose last connections linger is still free.
            probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            probe.bind(sockaddr)


def check_free(setting: str, address: str) -> None:
    """PortUnavailable unless `address` can be listened on now (port 0 always can)."""
    if address.rpartition(":")[2] == "0":
        return
    try:
        _bind(address)
    except socket.gaierror as exc:
        raise PortUnavailable(
            f"{setting.replace('_', ' ')} {address}: its host is not found ({exc.strerror}) "
            f"({_flag(setting)})"
        ) from None
    except OSError as exc:
        raise unavailable(setting, address, exc) from None


def bind_failure(setting: str, address: str) -> PortUnavailable:
    """Why gRPC could not bind `address` (its own error names no cause): found by binding
    it again here."""
    try:
        check_free(setting, address)
    except PortUnavailable as exc:
        return exc
    return PortUnavailable(
        f"{setting.replace('_', ' ')} {address} could not be bound ({_flag(setting)})"
    )
