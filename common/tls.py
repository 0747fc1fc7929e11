"""TLS on the client's side: credentials for the coordinator's gRPC port and an SSL context
for its status page, from PEM files. The coordinator's side is `server/admission/tls.py`.

What can be checked before dialling is checked here, so a mistake in the files is one
line at start rather than a handshake that fails over and over (`docs/troubleshooting.md`):
each file is readable PEM, and a private key belongs to the certificate beside it.
"""

from __future__ import annotations

import ssl
from pathlib import Path

import grpc
from cryptography import x509
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.types import PublicKeyTypes

from fedstream.common.config import ConfigError


def _read(path: Path, what: str) -> bytes:
    try:
        return Path(path).read_bytes()
    except OSError as exc:
        raise ConfigError(f"{what} {path} cannot be read: {exc.strerror or exc}") from None


def read_certificates(path: Path, what: str) -> bytes:
    """The PEM bytes of `path`, which must hold at least one certificate; ConfigError
    naming `what` (--ca, --cert, ...) otherwise."""
    data = _read(path, what)
    try:
        x509.load_pem_x509_certificates(data)
    except ValueError:
        raise ConfigError(f"{what} {path} holds no PEM certificate") from None
    return data


def _spki(public_key: PublicKeyTypes) -> bytes:
    return public_key.public_bytes(
        serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
    )


def read_key_pair(cert: Path, key: Path, cert_flag: str, key_flag: str) -> tuple[bytes, bytes]:
    """The PEM bytes of a certificate and its private key; ConfigError when either is not
    readable PEM, or when the key is not the certificate's (its public key differs)."""
    cert_pem = read_certificates(cert, cert_flag)
    key_pem = _read(key, key_flag)
    try:
        private = serialization.load_pem_private_key(key_pem, password=None)
    except (ValueError, TypeError) as exc:
        raise ConfigError(
            f"{key_flag} {key} is not an unencrypted PEM private key ({exc})"
        ) from None
    leaf = x509.load_pem_x509_certificates(cert_pem)[0]
    if _spki(private.public_key()) != _spki(leaf.public_key()):
        raise ConfigError(
            f"{key_flag} {key} does not match {cert_flag} {cert}: the key is another "
            "certificate's (give the key made with this certificate)"
        )
    return cert_pem, key_pem


def client_credentials(ca: Path, cert: Path | None, key: Path | None) -> grpc.ChannelCredentials:
    """A client's credentials: trust `ca` for the coordinator's certificate, and present
    `cert`/`key` (both or neither) for mutual TLS. ConfigError for files that cannot
    work (`read_key_pair`)."""
    if (cert is None) != (key is None):
        raise ValueError("cert and key go together: give both or neither")
    root = read_certificates(ca, "--ca")
    if cert is None or key is None:
        return grpc.ssl_channel_credentials(root_certificates=root)
    cert_pem, key_pem = read_key_pair(cert, key, "--cert", "--key")
    return grpc.ssl_channel_credentials(
        root_certificates=root, private_key=key_pem, certificate_chain=cert_pem
    )


def client_ssl_context(ca: Path, cert: Path | None, key: Path | None) -> ssl.SSLContext:
    """The same settings as `client_credentials`, for reading the HTTP status port."""
    if (cert is None) != (key is None):
        raise ValueError("cert and key go together: give both or neither")
    context = ssl.create_default_context(cafile=ca)
    if cert is not None and key is not None:
        context.load_cert_chain(cert, key)
    return context
