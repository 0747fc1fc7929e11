"""`fedstream certs` and `fedstream token`: what they write, and that it fits together."""

from __future__ import annotations

import ipaddress
import stat
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from fedstream.certs import CertsConfig, make_certs
from fedstream.cli import main
from fedstream.common.config import ConfigError
from fedstream.common.tokens import load_tokens, new_token, token_matches


def load(path: Path) -> x509.Certificate:
    return x509.load_pem_x509_certificate(path.read_bytes())


def common_name(cert: x509.Certificate) -> str:
    return str(cert.subject.get_attributes_for_oid(NameOID.COMMON_NAME)[0].value)


def test_certs_are_signed_by_the_ca_and_name_what_they_should(tmp_path):
    out = tmp_path / "certs"
    code = main(
        [
            "certs",
            "--out", str(out),
            "--server-name", "server,10.0.0.7,localhost",
            "--clients", "a,b",
        ]
    )  # fmt: skip
    assert code == 0
    ca = load(out / "ca.pem")
    assert ca.extensions.get_extension_for_class(x509.BasicConstraints).value.ca

    server = load(out / "server.pem")
    server.verify_directly_issued_by(ca)
    names = server.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert names.get_values_for_type(x509.DNSName) == ["server", "localhost"]
    assert names.get_values_for_type(x509.IPAddress) == [ipaddress.ip_address("10.0.0.7")]
    usage = server.extensions.get_extension_for_class(x509.ExtendedKeyUsage).value
    assert list(usage) == [ExtendedKeyUsageOID.SERVER_AUTH]

    for client in ("a", "b"):
        cert = load(out / f"{client}.pem")
        cert.verify_directly_issued_by(ca)
        assert common_name(cert) == client
        names = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
        assert names.get_values_for_type(x509.DNSName) == [client]
        usage = cert.extensions.get_extension_for_class(x509.ExtendedKeyUsage).value
        assert list(usage) == [ExtendedKeyUsageOID.CLIENT_AUTH]

    for stem in ("ca", "server", "a", "b"):
        assert stat.S_IMODE((out / f"{stem}.key").stat().st_mode) == 0o600, stem


def test_certs_never_overwrite_and_keep_a_complete_set_only_when_asked(tmp_path):
    config = CertsConfig(out=tmp_path, server_name="localhost", clients="a")
    make_certs(config)
    before = {p.name: p.read_bytes() for p in tmp_path.iterdir()}
    with pytest.raises(ConfigError, match="would overwrite"):
        make_certs(config)
    config.keep_existing = True
    assert make_certs(config) == []
    assert {p.name: p.read_bytes() for p in tmp_path.iterdir()} == before
    # a set that lacks a file is not silently completed with a new CA
    (tmp_path / "a.key").unlink()
    with pytest.raises(ConfigError, match="would overwrite"):
        make_certs(config)


@pytest.mark.parametrize(
    ("server_name", "clients", "fragment"),
    [
        ("", "a", "at least one name"),
        ("bad name", "a", "not a valid name"),
        ("localhost", "::1", "not a valid name"),
        ("localhost", "a,../b", "not a valid name"),
        ("localhost", "a,a", "repeated"),
        ("localhost", "server", "would overwrite"),
    ],
)
def test_certs_refuse_unusable_names(server_name, clients, fragment):
    with pytest.raises(ConfigError, match=fragment):
        CertsConfig(server_name=server_name, clients=clients).validate()


def test_token_prints_the_token_and_the_line_for_the_tokens_file(tmp_path, capsys):
    assert main(["token", "alice"]) == 0
    out, err = capsys.readouterr()
    token = out.strip()
    assert out == token + "\n" and len(token) >= 32
    (tmp_path / "tokens").write_text(err)
    hashes = load_tokens(tmp_path / "tokens")
    assert list(hashes) == ["alice"] and token_matches(token, hashes["alice"])
    assert not token_matches(token + "x", hashes["alice"])


def test_a_token_never_begins_with_a_dash_so_token_flag_takes_it():
    """`--token -x...` is a missing argument to argparse; a base64 token began with "-"
    once in 64 (a flaky e2e test found it)."""
    tokens = {new_token() for _ in range(500)}
    assert len(tokens) == 500
    assert all(len(t) == 64 and not t.startswith("-") for t in tokens)
