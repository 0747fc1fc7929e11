"""TLS on the client's side: credentials for the coordinator's gRPC port and an SSL context
for its status page, from PEM files. The coordinator's side is `server/admission/tls.py`."""

from __future__ import annotations

import ssl
from pathlib import Path

import grpc


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


def client_ssl_context(ca: Path, cert: Path | None, key: Path | None) -> ssl.SSLContext:
    """The same settings as `client_credentials`, for reading the HTTP status port."""
    if (cert is None) != (key is None):
        raise ValueError("cert and key go together: give both or neither")
    context = ssl.create_default_context(cafile=ca)
    if cert is not None and key is not None:
        context.load_cert_chain(cert, key)
    return context
