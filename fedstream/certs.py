"""`fedstream certs` and `fedstream token`: credentials for a development federation.

`certs` makes a certificate authority, a server certificate for the names clients dial,
and one client certificate per client (its common name is the client's identity under
mutual TLS), all signed by that CA. It is meant for trying TLS out and for test clusters:
the CA key sits beside the certificates, so anyone who can read the folder can mint
identities. A real deployment keeps its CA elsewhere.

`token` makes a per-client token: the token alone on stdout (for the client, e.g. as
FEDSTREAM_CLIENT_TOKEN), and the `NAME SHA256-HEX` line for the coordinator's --tokens
file on stderr, so `TOKEN=$(fedstream token a 2>>tokens.txt)` keeps them apart.
"""

from __future__ import annotations

import datetime
import ipaddress
import os
import re
import sys
from dataclasses import dataclass
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from fedstream.common.config import ConfigError
from fedstream.common.tokens import new_token, token_hash

VALID_DAYS = 825
"""Lifetime of every certificate made (the longest that browsers' rules allow)."""

_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,63}")


def _names(text: str, what: str, *, ip: bool) -> list[str]:
    """The comma-separated names in `text`: each a name of letters, digits, `.`, `_`, `-`
    (usable as a file name and a DNS entry), or, where `ip` allows, an IP address."""
    names = [n.strip() for n in text.split(",") if n.strip()]
    if not names:
        raise ConfigError(f"{what}: give at least one name")
    for name in names:
        if not _NAME.fullmatch(name) and not (ip and _is_ip(name)):
            raise ConfigError(f"{what}: {name!r} is not a valid name")
    if len(set(names)) != len(names):
        raise ConfigError(f"{what}: a name is repeated in {text!r}")
    return names


def _is_ip(name: str) -> bool:
    try:
        ipaddress.ip_address(name)
    except ValueError:
        return False
    return True


@dataclass
class CertsConfig:
    out: Path = Path("certs")
    """Folder to write ca.pem, ca.key, server.pem, server.key and NAME.pem, NAME.key per
    client into (created; existing files there are not overwritten)."""
    server_name: str = "localhost,127.0.0.1"
    """Comma-separated names clients dial the coordinator by: host names and IP addresses,
    all put in the server certificate."""
    clients: str = ""
    """Comma-separated client names: one certificate each, its common name the name."""
    keep_existing: bool = False
    """When every file is there already, keep them and succeed (a cluster started again
    on the same volume); a partial set is still refused."""

    def validate(self) -> None:
        _names(self.server_name, "server_name", ip=True)
        clients = _names(self.clients, "clients", ip=False) if self.clients else []
        clashes = {"ca", "server"} & set(clients)
        if clashes:
            raise ConfigError(
                f"clients: {sorted(clashes)} would overwrite the CA's or server's files"
            )


@dataclass
class TokenConfig:
    name: str = ""
    """The client name the token belongs to."""

    def validate(self) -> None:
        if not _NAME.fullmatch(self.name):
            raise ConfigError(f"name: {self.name!r} is not a client name (letters, digits, . _ -)")


@dataclass
class Issued:
    """A certificate and its private key."""

    cert: x509.Certificate
    key: ec.EllipticCurvePrivateKey


def _subject(common_name: str) -> x509.Name:
    return x509.Name(
        [
            x509.NameAttribute(NameOID.ORGANIZATION_NAME, "fedstream development"),
            x509.NameAttribute(NameOID.COMMON_NAME, common_name),
        ]
    )


def _builder(
    subject: x509.Name, issuer: x509.Name, public_key: ec.EllipticCurvePublicKey
) -> x509.CertificateBuilder:
    now = datetime.datetime.now(datetime.UTC)
    return (
        x509.CertificateBuilder()
        .subject_name(subject)
        .issuer_name(issuer)
        .public_key(public_key)
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + datetime.timedelta(days=VALID_DAYS))
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(public_key), critical=False)
    )


def make_ca() -> Issued:
    key = ec.generate_private_key(ec.SECP256R1())
    name = _subject("fedstream development CA")
    cert = (
        _builder(name, name, key.public_key())
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .add_extension(
            x509.KeyUsage(
                digital_signature=True,
                content_commitment=False,
                key_encipherment=False,
                data_encipherment=False,
                key_agreement=False,
                key_cert_sign=True,
                crl_sign=True,
                encipher_only=False,
                decipher_only=False,
            ),
            critical=True,
        )
        .sign(key, hashes.SHA256())
    )
    return Issued(cert, key)


def issue(ca: Issued, common_name: str, names: list[str], *, server: bool) -> Issued:
    """A leaf certificate signed by `ca`: `names` as its subject alternative names (IP
    addresses as IP entries, the rest as DNS entries); for a server or a client."""
    key = ec.generate_private_key(ec.SECP256R1())
    alternative: list[x509.GeneralName] = [
        x509.IPAddress(ipaddress.ip_address(n)) if _is_ip(n) else x509.DNSName(n) for n in names
    ]
    usage = ExtendedKeyUsageOID.SERVER_AUTH if server else ExtendedKeyUsageOID.CLIENT_AUTH
    cert = (
        _builder(_subject(common_name), ca.cert.subject, key.public_key())
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(x509.SubjectAlternativeName(alternative), critical=False)
        .add_extension(x509.ExtendedKeyUsage([usage]), critical=False)
        .add_extension(
            x509.AuthorityKeyIdentifier.from_issuer_public_key(ca.key.public_key()),
            critical=False,
        )
        .sign(ca.key, hashes.SHA256())
    )
    return Issued(cert, key)


def _write(path: Path, data: bytes, mode: int) -> None:
    """Create `path` with `mode` from the start (a key is never readable by others, not
    even for a moment); refuse to overwrite."""
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, mode)
    with os.fdopen(fd, "wb") as file:
        file.write(data)
    os.chmod(path, mode)


def write_issued(issued: Issued, out: Path, stem: str) -> None:
    _write(out / f"{stem}.pem", issued.cert.public_bytes(serialization.Encoding.PEM), 0o644)
    key = issued.key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    )
    _write(out / f"{stem}.key", key, 0o600)


def make_certs(config: CertsConfig) -> list[Path]:
    """Write the CA, the server's and each client's certificate and key into
    `config.out`; the files written, in that order (none when `keep_existing` kept
    them all)."""
    server_names = _names(config.server_name, "server_name", ip=True)
    clients = _names(config.clients, "clients", ip=False) if config.clients else []
    stems = ["ca", "server", *clients]
    out = Path(config.out)
    out.mkdir(parents=True, exist_ok=True)
    files = [out / f"{s}{ext}" for s in stems for ext in (".pem", ".key")]
    present = [str(p) for p in files if p.exists()]
    if config.keep_existing and len(present) == len(files):
        return []
    if present:
        raise ConfigError(f"out: would overwrite {', '.join(present)}")
    ca = make_ca()
    write_issued(ca, out, "ca")
    write_issued(issue(ca, server_names[0], server_names, server=True), out, "server")
    for client in clients:
        write_issued(issue(ca, client, [client], server=False), out, client)
    return files


def certs_main(config: CertsConfig) -> int:
    written = make_certs(config)
    if not written:
        print(f"{config.out}: every file is there already; kept", file=sys.stderr)
    for path in written:
        print(path)
    return 0


def token_main(config: TokenConfig) -> int:
    token = new_token()
    print(token)
    print(f"{config.name} {token_hash(token)}", file=sys.stderr)
    return 0
