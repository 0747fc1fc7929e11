"""The coordinator's ports are its own: a second coordinator on a port, a port out of
range, a status port in use are each exit 2 with one line (server/ports.py).

Real `fedstream server` processes, and real gRPC and aiohttp listeners on loopback."""

from __future__ import annotations

import asyncio
import socket
from collections.abc import Iterator

import grpc
import pytest

from fedstream.server.daemon import grpc_options
from fedstream.server.ports import PortUnavailable, bind_failure
from fedstream.server.status_server import StatusServer

EXIT_SOON = 60.0
"""Seconds a server refused its port may take to exit (its start imports torch)."""


@pytest.fixture
def taken() -> Iterator[str]:
    """HOST:PORT of a port on 127.0.0.1 that a plain socket listens on."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        sock.listen()
        yield f"127.0.0.1:{sock.getsockname()[1]}"


def one_line(process) -> str:
    """The process's only line of output (asserted): its reason to exit."""
    lines = [line for line in process.log().splitlines() if line.strip()]
    assert len(lines) == 1, process.describe()
    return lines[0]


@pytest.mark.e2e
def test_a_second_coordinator_on_the_same_port_exits_2_naming_it(procs, free_port, wait_for):
    address = f"127.0.0.1:{free_port()}"
    first = procs("first", "server", "--address", address, "--run-dir", "a", "--min-clients", "9")
    wait_for((procs.workdir / "a" / "coordinator.json").exists, 120, "the first", alive=[first])
    second = procs("second", "server", "--address", address, "--run-dir", "b")
    assert second.wait(EXIT_SOON) == 2, second.describe()
    assert one_line(second) == (
        f"fedstream server: address {address} is already in use: another process "
        "listens there (--address)"
    )
    assert first.alive


@pytest.mark.e2e
def test_a_port_out_of_range_exits_2_rather_than_listening_elsewhere(procs):
    server = procs("server", "server", "--address", "127.0.0.1:99999", "--run-dir", "run")
    assert server.wait(EXIT_SOON) == 2, server.describe()
    assert one_line(server) == (
        "fedstream server: address: port 99999 in 127.0.0.1:99999 is out of range: "
        "0 (any free port) to 65535"
    )


@pytest.mark.e2e
def test_a_status_port_in_use_exits_2_with_one_line(procs, taken):
    server = procs(
        "server", "server", "--address", "127.0.0.1:0", "--status-address", taken,
        "--run-dir", "run",
    )  # fmt: skip
    assert server.wait(EXIT_SOON) == 2, server.describe()
    assert one_line(server) == (
        f"fedstream server: status address {taken} is already in use: another process "
        "listens there (--status-address)"
    )


def test_grpc_servers_with_the_daemons_options_do_not_share_a_port():
    """SO_REUSEPORT off: grpc's default would let the second bind the first's port."""

    async def bind_twice() -> None:
        first = grpc.aio.server(options=grpc_options(1 << 20))
        port = first.add_insecure_port("127.0.0.1:0")
        await first.start()
        try:
            second = grpc.aio.server(options=grpc_options(1 << 20))
            with pytest.raises(RuntimeError):
                second.add_insecure_port(f"127.0.0.1:{port}")
            assert str(bind_failure("address", f"127.0.0.1:{port}")) == (
                f"address 127.0.0.1:{port} is already in use: another process listens "
                "there (--address)"
            )
        finally:
            await first.stop(None)

    asyncio.run(bind_twice())


def test_a_status_port_taken_after_the_check_is_one_error_not_a_traceback(coordinator, taken):
    running = coordinator()
    status = StatusServer(running.daemon.live, taken, None)
    with pytest.raises(PortUnavailable, match=f"status address {taken} is already in use"):
        asyncio.run(status.start())


def test_an_address_not_of_this_machine_is_named():
    with pytest.raises(PortUnavailable) as info:
        raise bind_failure("address", "192.0.2.1:5000")
    assert str(info.value) == "address 192.0.2.1:5000 is not an address of this machine (--address)"
