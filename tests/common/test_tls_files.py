"""What the client checks of its TLS files before dialling (common/tls.py)."""

from __future__ import annotations

from pathlib import Path

import pytest

from fedstream.certs import CertsConfig, make_certs
from fedstream.common.config import ConfigError
from fedstream.common.tls import client_credentials, read_key_pair
from fedstream.server.admission.tls import server_credentials


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> Path:
    folder = tmp_path_factory.mktemp("pki")
    make_certs(CertsConfig(out=folder, clients="a,b"))
    return folder


def test_a_key_of_another_certificate_is_named(pki):
    with pytest.raises(ConfigError, match=r"--key .*b\.key does not match --cert .*a\.pem"):
        client_credentials(pki / "ca.pem", pki / "a.pem", pki / "b.key")


def test_a_matching_pair_is_read(pki):
    cert, key = read_key_pair(pki / "a.pem", pki / "a.key", "--cert", "--key")
    assert cert.startswith(b"-----BEGIN CERTIFICATE") and b"PRIVATE KEY" in key


def test_a_file_that_is_no_certificate_or_key_is_named(pki, tmp_path):
    junk = tmp_path / "junk.pem"
    junk.write_text("not pem\n")
    with pytest.raises(ConfigError, match=r"--ca .*junk\.pem holds no PEM certificate"):
        client_credentials(junk, None, None)
    with pytest.raises(ConfigError, match=r"--key .*junk\.pem is not an unencrypted PEM"):
        client_credentials(pki / "ca.pem", pki / "a.pem", junk)
    with pytest.raises(ConfigError, match=r"--ca .*missing\.pem cannot be read"):
        client_credentials(tmp_path / "missing.pem", None, None)


def test_the_coordinators_key_is_checked_against_its_certificate(pki):
    with pytest.raises(ConfigError, match=r"--tls-key .*a\.key does not match --tls-cert"):
        server_credentials(pki / "server.pem", pki / "a.key", None)
