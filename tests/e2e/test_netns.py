"""Several machines as Linux network namespaces: a coordinator host and two client hosts.

Each client host is joined to the coordinator host by its own veth link on a private /30
that exists only inside namespaces this test creates and removes. The hosts talk mutual
TLS, with certificates made by `fedstream certs` for the coordinator host's addresses.
Needs root and iproute2.
"""

from __future__ import annotations

import json
import os
import secrets
import shutil
import subprocess
import sys
from collections.abc import Iterator
from dataclasses import dataclass

import pytest

pytestmark = [pytest.mark.e2e, pytest.mark.netns]


def _ip(*args: str) -> None:
    subprocess.run(["ip", *args], check=True, capture_output=True, timeout=30)


@dataclass
class Host:
    namespace: str
    address: str

    def argv(self, *args: str) -> list[str]:
        return ["ip", "netns", "exec", self.namespace, *args]


@pytest.fixture
def hosts() -> Iterator[tuple[Host, list[Host]]]:
    """A coordinator host and two client hosts, each link a /30 of 10.231.<n>.0."""
    if os.geteuid() != 0 or shutil.which("ip") is None:
        pytest.skip("network namespaces need root and iproute2 (`ip netns`)")
    tag = secrets.token_hex(3)
    server_ns = f"fs-{tag}-s"
    created: list[str] = []
    try:
        try:
            _ip("netns", "add", server_ns)
        except subprocess.CalledProcessError as exc:
            pytest.skip(f"cannot create a network namespace here: {exc.stderr.decode().strip()}")
        created.append(server_ns)
        _ip("-n", server_ns, "link", "set", "lo", "up")
        clients = []
        for i in range(2):
            ns = f"fs-{tag}-c{i}"
            _ip("netns", "add", ns)
            created.append(ns)
            _ip("-n", ns, "link", "set", "lo", "up")
            here, there = f"fs{tag}s{i}", f"fs{tag}c{i}"
            _ip(
                "link",
                "add",
                here,
                "netns",
                server_ns,
                "type",
                "veth",
                "peer",
                "name",
                there,
                "netns",
                ns,
            )
            _ip("-n", server_ns, "addr", "add", f"10.231.{i}.1/30", "dev", here)
            _ip("-n", ns, "addr", "add", f"10.231.{i}.2/30", "dev", there)
            _ip("-n", server_ns, "link", "set", here, "up")
            _ip("-n", ns, "link", "set", there, "up")
            clients.append(Host(ns, f"10.231.{i}.2"))
        yield Host(server_ns, "10.231.0.1"), clients
    finally:
        for ns in reversed(created):
            subprocess.run(["ip", "netns", "del", ns], capture_output=True, timeout=30)


def test_clients_on_other_hosts_train_with_the_coordinator(hosts, procs):
    server_host, client_hosts = hosts
    fedstream = [sys.executable, "-m", "fedstream"]
    # the coordinator host is 10.231.<i>.1 on client i's link: its certificate names both
    names = ",".join(f"10.231.{i}.1" for i in range(len(client_hosts)))
    clients = ",".join(f"host-{i}" for i in range(len(client_hosts)))
    certs = procs("certs", "certs", "--out", "certs", "--server-name", names, "--clients", clients)
    assert procs.wait_all(60, [certs]) == {"certs": 0}
    server = procs.start(
        "server",
        server_host.argv(
            *fedstream, "server",
            "--address", "0.0.0.0:50051",
            "--tls-cert", "certs/server.pem",
            "--tls-key", "certs/server.key",
            "--client-ca", "certs/ca.pem",
            "--run-dir", "run",
            "--rounds", "2",
            "--min-clients", "2",
            "--task", "digits",
            "--done-grace", "15",
        ),
    )  # fmt: skip
    for i, host in enumerate(client_hosts):
        # each client reaches the coordinator over its own link: 10.231.<i>.1
        procs.start(
            f"client-{i}",
            host.argv(
                *fedstream, "client",
                "--server", f"10.231.{i}.1:50051",
                "--ca", "certs/ca.pem",
                "--cert", f"certs/host-{i}.pem",
                "--key", f"certs/host-{i}.key",
                "--task", "digits",
                "--partition", str(i),
                "--num-partitions", "2",
                "--name", f"host-{i}",
                "--threads", "1",
                "--max-backoff", "1",
            ),
        )  # fmt: skip
    codes = procs.wait_all(240)
    assert set(codes.values()) == {0}
    assert "mutual TLS" in server.log()
    lines = (procs.workdir / "run" / "metrics.jsonl").read_text().splitlines()
    assert [json.loads(line)["updates"] for line in lines] == [2, 2]
    log = server.log()
    assert "client host-0 joined" in log and "client host-1 joined" in log
