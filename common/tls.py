"""TLS for the coordinator's port: server and client credentials from PEM files, and the
identity a client certificate carries.

With a client CA the coordinator requires a client certificate signed by it (mutual
TLS), and the certificate's common name is the client's identity (`peer_identity`).
"""

from __future__ import annotations

import ssl
from collections.abc import Iterable, Mapping
from pathlib import Path

import grpc

COMMON_NAME = "x509_common_name"
"""The auth-context property grpc fills with the peer certificate's subject CN."""


def server_credentials(cert: Path, key: Path, client_ca: Path | None) -> grpc.ServerCredentials:
    """The coordinator's credentials; with `client_ca`, a client must present a
    certificate it signed."""
    pair = (Path(key).read_bytes(), Path(cert).read_bytes())
    if client_ca is None:
        return grpc.ssl_server_credentials([pair])
    return grpc.ssl_server_credentials(
        [pair], root_certificates=Path(client_ca).read_bytes(), require_client_auth=True
    )


def client_credentials(ca: Path, cert: Path | None, key: Path | None) -> grpc.ChannelCredentials:
    """A client's credentials: trust `ca` for the coordinator's certificate, and present
    `cert`/`key` (both or neither) for mutual TLS."""
    if (cert is None) != (key is None):
        raise ValueError("cert and key go together: give both or neither")
    return grpc.ssl_channel_credentials(
        root_certificates=Path(ca).read_bytes(),
        private_key=Path(key).read_bytes() if key is not None else None,
        certificate_chain=Path(cert).read_bytes() if cert is not None else None,
    )


def server_ssl_context(cert: Path, key: Path, client_ca: Path | None) -> ssl.SSLContext:
    """The same settings as `server_credentials`, for the coordinator's HTTP status port."""
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    context.load_cert_chain(cert, key)
    if client_ca is not None:
        context.verify_mode = ssl.CERT_REQUIRED
        context.load_verify_locations(client_ca)
    return context


def client_ssl_context(ca: Path, cert: Path | None, key: Path | None) -> ssl.SSLContext:
    """The same settings as `client_credentials`, for reading the HTTP status port."""
    if (cert is None) != (key is None):
        raise ValueError("cert and key go together: give both or neither")
    context = ssl.create_default_context(cafile=ca)
    if cert is not None and key is not None:
        context.load_cert_chain(cert, key)
    return context


def peer_identity(auth_context: Mapping[str, Iterable[bytes]]) -> str | None:
    """The common name of the client's verified certificate, from a servicer context's
    `auth_context()`; None on a connection without one (plaintext, or TLS without a
    client certificate)."""
    for value in auth_context.get(COMMON_NAME, ()):
        name = value.decode("utf-8", errors="replace").strip()
        if name:
            return name
    return None
