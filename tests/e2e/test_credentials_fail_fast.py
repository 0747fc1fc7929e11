"""A credential mistake ends the client in seconds with exit 2 and one line naming the
likely cause; an outage is still retried until --give-up-after (docs/troubleshooting.md).

Real `fedstream server` and `fedstream client` processes on loopback, with certificates
made by `fedstream certs`. Each client is given --give-up-after 120: one that ends within
FAST seconds did not wait for it.
"""

from __future__ import annotations

import hashlib
import json
import subprocess
import sys
import time
from pathlib import Path

import pytest

pytestmark = pytest.mark.e2e

GIVE_UP_AFTER = "120"
FAST = 30.0
"""Seconds a refused client may take, its start (torch, the task's data) included."""
SERVER_START = 120.0


def certs(folder: Path, server_name: str = "localhost,127.0.0.1") -> Path:
    subprocess.run(
        [sys.executable, "-m", "fedstream", "certs", "--out", str(folder),
         "--server-name", server_name, "--clients", "client-0,client-1"],
        check=True, capture_output=True, timeout=60,
    )  # fmt: skip
    return folder


def start_server(procs, wait_for, name: str, *flags: str) -> str:
    """A coordinator that waits for more clients than will come; its address."""
    server = procs(
        name, "server", "--address", "127.0.0.1:0", "--status-address", "",
        "--run-dir", name, "--min-clients", "100", *flags,
    )  # fmt: skip
    record = procs.workdir / name / "coordinator.json"
    wait_for(record.exists, SERVER_START, f"{name}'s coordinator.json", alive=[server])
    address: str = json.loads(record.read_text())["address"]
    return address


def refused_fast(procs, name: str, address: str, *flags: str) -> tuple[str, float]:
    """Run a client that must be refused: its one ERROR line and its seconds."""
    return refused_line(*start_refused(procs, name, address, *flags))


def start_refused(procs, name: str, address: str, *flags: str):
    """Start a client that must be refused; it and the time it started."""
    client = procs(
        name, "client", "--server", address, "--name", "client-0", "--threads", "1",
        "--give-up-after", GIVE_UP_AFTER, *flags,
    )  # fmt: skip
    return client, time.monotonic()


def refused_line(client, started: float) -> tuple[str, float]:
    """The one ERROR line of a client started to be refused, and its seconds to exit 2."""
    name = client.name
    code = client.wait(FAST)
    seconds = time.monotonic() - started
    text = client.log()
    assert code == 2, f"{name}: exit {code}\n{client.describe()}"
    assert "Traceback" not in text and "ssl_transport_security" not in text, client.describe()
    errors = [
        line for line in text.splitlines() if " ERROR " in line or "fedstream client:" in line
    ]
    assert len(errors) == 1, f"{name}: not one line of cause\n{client.describe()}"
    print(f"{name}: exit {code} in {seconds:.1f}s: {errors[0]}")
    return errors[0], seconds


def test_mutual_tls_mistakes_end_the_client_in_seconds_naming_the_cause(procs, wait_for, tmp_path):
    pki = certs(tmp_path / "pki")
    other = certs(tmp_path / "other")
    address = start_server(
        procs, wait_for, "mtls",
        "--tls-cert", str(pki / "server.pem"), "--tls-key", str(pki / "server.key"),
        "--client-ca", str(pki / "ca.pem"),
    )  # fmt: skip
    ca = ("--ca", str(pki / "ca.pem"))
    # the five mistakes at once: each client's start (torch, the task) is most of its time
    started = [
        start_refused(procs, "no-cert", address, *ca),
        start_refused(
            procs, "stranger", address, *ca,
            "--cert", str(other / "client-0.pem"), "--key", str(other / "client-0.key"),
        ),
        start_refused(
            procs, "trusts-other-ca", address, "--ca", str(other / "ca.pem"),
            "--cert", str(pki / "client-0.pem"), "--key", str(pki / "client-0.key"),
        ),
        start_refused(procs, "plaintext", address),
        start_refused(
            procs, "key-mismatch", address, *ca,
            "--cert", str(pki / "client-0.pem"), "--key", str(pki / "client-1.key"),
        ),
    ]  # fmt: skip
    lines = [refused_line(*one)[0] for one in started]
    assert "requires a client certificate" in lines[0] and "--cert and --key" in lines[0]
    assert "does not trust this client's certificate" in lines[1] and "--client-ca" in lines[1]
    assert "not signed by the CA this client trusts (--ca)" in lines[2]
    assert "speaks TLS and this client plaintext" in lines[3] and "give --ca" in lines[3]
    assert f"--key {pki / 'client-1.key'} does not match --cert" in lines[4]
    # The coordinator still admits a client with the right credentials...
    good = procs(
        "good", "client", "--server", address, "--name", "client-0", "--threads", "1", *ca,
        "--cert", str(pki / "client-0.pem"), "--key", str(pki / "client-0.key"),
    )  # fmt: skip
    wait_for(lambda: "joined" in good.log(), FAST, "the good client to join", alive=[good])
    # ...and said nothing of gRPC core's about the handshakes it refused.
    server_log = procs.started[0].log()
    assert "ssl_transport_security" not in server_log and "Handshake failed" not in server_log


def test_tls_against_plaintext_and_a_name_not_in_the_certificate(procs, wait_for, tmp_path):
    pki = certs(tmp_path / "pki")
    plain = start_server(procs, wait_for, "plain")
    line, _ = refused_fast(procs, "tls-to-plaintext", plain, "--ca", str(pki / "ca.pem"))
    assert "does not speak TLS and this client does (--ca)" in line
    named = certs(tmp_path / "named", server_name="coordinator.example")
    address = start_server(
        procs, wait_for, "named",
        "--tls-cert", str(named / "server.pem"), "--tls-key", str(named / "server.key"),
    )  # fmt: skip
    line, _ = refused_fast(procs, "name-mismatch", address, "--ca", str(named / "ca.pem"))
    assert "its certificate does not name 127.0.0.1" in line
    assert "ssl_transport_security" not in procs.started[2].log()


def test_an_unknown_token_ends_the_client_at_once_and_the_coordinator_logs_it_once(
    procs, wait_for, tmp_path
):
    tokens = tmp_path / "tokens.txt"
    tokens.write_text(f"client-0 {hashlib.sha256(b'the-right-token').hexdigest()}\n")
    address = start_server(procs, wait_for, "tokens", "--tokens", str(tokens))
    line, _ = refused_fast(procs, "wrong-token", address, "--token", "not-the-token")
    assert "unknown token for 'client-0'" in line and "--token" in line
    refused = [line for line in procs.started[0].log().splitlines() if "rejected" in line]
    assert len(refused) == 1 and "Join from ipv4:127.0.0.1 rejected (UNAUTHENTICATED)" in refused[0]


@pytest.mark.parametrize("tls", [False, True], ids=["plaintext", "tls"])
def test_nothing_listening_is_still_retried_until_give_up_after(procs, free_port, tmp_path, tls):
    flags = ["--ca", str(certs(tmp_path / "pki") / "ca.pem")] if tls else []
    started = time.monotonic()
    client = procs(
        "client", "client", "--server", f"127.0.0.1:{free_port()}", "--threads", "1",
        "--give-up-after", "8", "--max-backoff", "1", *flags,
    )  # fmt: skip
    assert client.wait(60) == 1, client.describe()
    assert time.monotonic() - started >= 8
    text = client.log()
    assert "giving up" in text and "cannot connect to the coordinator" not in text
