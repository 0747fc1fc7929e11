"""The loopback rules: plaintext is for loopback addresses, any other needs TLS or
--insecure; and clients that prove nothing are for loopback, any other address needs
client authentication (mutual TLS or --tokens) or --open-enrolment."""

from __future__ import annotations

import ipaddress
import logging

from fedstream.common.config import ConfigError

log = logging.getLogger(__name__)


def is_loopback(address: str) -> bool:
    """Whether HOST:PORT names a loopback host (127.0.0.0/8, ::1, localhost)."""
    host = address.rpartition(":")[0].strip("[]")
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def require_tls_off_loopback(
    setting: str, address: str, tls: bool, insecure: bool, serving: str = ""
) -> None:
    """ConfigError when `address` (the value of `setting`) would serve `serving` (the
    coordinator itself when empty) in plaintext beyond loopback without --insecure."""
    if not tls and not insecure and not is_loopback(address):
        what = f"serve {serving} in plaintext" if serving else "serve plaintext"
        raise ConfigError(
            f"{setting} {address} is not loopback: give --tls-cert and --tls-key, "
            f"or --insecure to {what} on the network"
        )


def require_authentication_off_loopback(
    address: str, authenticates: bool, open_enrolment: bool
) -> None:
    """ConfigError when the coordinator would let unauthenticated clients join on a
    non-loopback `address` without --open-enrolment: anyone who reaches the port could
    then join under any free name and send updates."""
    if not authenticates and not open_enrolment and not is_loopback(address):
        raise ConfigError(
            f"address {address} is not loopback and clients do not authenticate: give "
            "--client-ca (mutual TLS) or --tokens, or --open-enrolment to let anyone who "
            "reaches the port join"
        )


def warn_if_plaintext(address: str, tls: bool) -> None:
    """Log, loudly, a port served in plaintext beyond loopback (allowed by --insecure)."""
    if not tls and not is_loopback(address):
        log.warning(
            "serving PLAINTEXT on %s (--insecure): anyone on the network can read the "
            "model and join; give --tls-cert and --tls-key for TLS",
            address,
        )
