"""TLS for the coordinator's ports: its credentials from PEM files (mutual TLS with a client
CA), the same settings for the status page, and the identity a client certificate carries.

With a client CA the coordinator requires a client certificate signed by it (mutual TLS),
and the certificate's common name is the client's identity (`peer_identity`).
"""

from __future__ import annotations

import hashlib
import ssl
from collections.abc import Iterable, Mapping
from pathlib import Path

import grpc

from fedstream.common.tls import read_key_pair
from fedstream.server.admission.exposure import warn_if_plaintext
from fedstream.server.config import SecurityConfig

COMMON_NAME = "x509_common_name"
"""The auth-context property grpc fills with the peer certificate's subject CN."""
PEM_CERT = "x509_pem_cert"
"""The auth-context property grpc fills with the peer certificate (PEM)."""


def server_credentials(cert: Path, key: Path, client_ca: Path | None) -> grpc.ServerCredentials:
    """The coordinator's credentials; with `client_ca`, a client must present a
    certificate it signed. ConfigError for a key that is not the certificate's."""
    cert_pem, key_pem = read_key_pair(cert, key, "--tls-cert", "--tls-key")
    pair = (key_pem, cert_pem)
    if client_ca is None:
        return grpc.ssl_server_credentials([pair])
    return grpc.ssl_server_credentials(
        [pair], root_certificates=Path(client_ca).read_bytes(), require_client_auth=True
    )


def server_ssl_context(cert: Path, key: Path, client_ca: Path | None) -> ssl.SSLContext:
    """The same settings as `server_credentials`, for the coordinator's HTTP status port."""
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    context.load_cert_chain(cert, key)
    if client_ca is not None:
        context.verify_mode = ssl.CERT_REQUIRED
        context.load_verify_locations(client_ca)
    return context


def add_port(server: grpc.aio.Server, address: str, security: SecurityConfig) -> int:
    """Listen on `address` with TLS (mutual with a client CA) when `security` has a
    certificate, else in plaintext (warned beyond loopback); the port bound."""
    if security.tls_cert is not None and security.tls_key is not None:
        credentials = server_credentials(security.tls_cert, security.tls_key, security.client_ca)
        return server.add_secure_port(address, credentials)
    warn_if_plaintext(address, tls=False)
    return server.add_insecure_port(address)


def status_ssl_context(security: SecurityConfig) -> ssl.SSLContext | None:
    """The status page's TLS context: the coordinator's own settings, or None (plaintext)."""
    if security.tls_cert is None or security.tls_key is None:
        return None
    return server_ssl_context(security.tls_cert, security.tls_key, security.client_ca)


def describe(security: SecurityConfig) -> str:
    """ "mutual TLS", "TLS" or "plaintext", for the log."""
    if security.client_ca is not None:
        return "mutual TLS"
    return "TLS" if security.tls else "plaintext"


def peer_identity(auth_context: Mapping[str, Iterable[bytes]]) -> str | None:
    """The common name of the client's verified certificate, from a servicer context's
    `auth_context()`; None on a connection without one (plaintext, or TLS without a
    client certificate)."""
    for value in auth_context.get(COMMON_NAME, ()):
        name = value.decode("utf-8", errors="replace").strip()
        if name:
            return name
    return None


def peer_fingerprint(auth_context: Mapping[str, Iterable[bytes]]) -> str | None:
    """The SHA-256 of the client's verified certificate (PEM), from a servicer context's
    `auth_context()`; None on a connection without one."""
    for value in auth_context.get(PEM_CERT, ()):
        return hashlib.sha256(value).hexdigest()
    return None
