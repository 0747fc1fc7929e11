"""What outsiders cost a coordinator before they are authenticated (docs/security.md,
"Before authentication"): a real `fedstream server` process, its resident memory and open
descriptors read from /proc while strangers throw large requests and idle connections at
it, then honest clients run a round through it.

    tokens   a coordinator with --tokens on loopback: concurrent Joins of `join_mib` MiB
             without a token and with a bad one, as many Polls with a bogus session
             token, and `idle` TCP connections that say nothing; then two clients with
             their tokens run a round.
    mtls     a coordinator with mutual TLS: the same Joins over TLS without a client
             certificate, and the idle connections; then two clients with their
             certificates run a round.

    python -m bench.preauth [--joins 100] [--join-mib 17] [--idle 1100] [--out DIR]

prints one line per case (resting, peak and after RSS in MiB, descriptors, whether the
round completed) and writes them to DIR/preauth.json.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import resource
import socket
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path

import grpc

from fedstream.certs import CertsConfig, make_certs
from fedstream.common.proto.v1 import coordinator_pb2 as pb
from fedstream.common.service import bearer_metadata, stub
from fedstream.common.tokens import new_token, token_hash

CLIENTS = ("site-a", "site-b")
START_TIMEOUT = 120.0
ROUND_TIMEOUT = 240.0


@dataclass
class Figures:
    case: str
    resting_mib: float
    peak_mib: float
    after_mib: float
    resting_fds: int
    peak_fds: int
    after_fds: int
    """Peak: while the attack ran; after: once it was over, the idle connections still
    open, before the honest clients started."""
    refused: dict[str, int]
    """Attack calls by the status they ended with."""
    round_completed: bool
    end_fds: int
    """The fewest descriptors while the honest round ran (until the coordinator began to
    stop), the idle connections still open on the attacker's side: the coordinator
    closes them after its handshake timeout (10 s), when the round lasts that long."""
    end_fds_after_s: float
    """Seconds after the honest clients started that `end_fds` was first seen."""

    def line(self) -> str:
        return (
            f"{self.case}: RSS resting {self.resting_mib:.0f} MiB, peak {self.peak_mib:.0f}, "
            f"after {self.after_mib:.0f} (+{self.after_mib - self.resting_mib:.0f}); fds "
            f"resting {self.resting_fds}, peak {self.peak_fds}, after {self.after_fds}; "
            f"attack calls {self.refused}; honest round completed: {self.round_completed}; "
            f"fewest fds during the round, idle connections still open: {self.end_fds} "
            f"({self.end_fds_after_s:g} s after the clients started)"
        )


def rss_mib(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    raise RuntimeError(f"no VmRSS for process {pid}")


def fds(pid: int) -> int:
    return len(os.listdir(f"/proc/{pid}/fd"))


def alive(pid: int) -> bool:
    """Whether `pid` runs (not gone, not a zombie)."""
    try:
        status = Path(f"/proc/{pid}/status").read_text()
    except OSError:
        return False
    return "\nState:\tZ" not in status


class Sampler:
    """The peak RSS and the highest and lowest descriptor counts of `pid`, sampled every
    20 ms while it runs."""

    def __init__(self, pid: int, serving: Callable[[], bool] = lambda: True) -> None:
        self.pid = pid
        self.serving = serving
        """Whether a sample counts: the coordinator still serves (not shutting down)."""
        self.started = time.monotonic()
        self.peak_mib = 0.0
        self.peak_fds = 0
        self.low_fds = 1 << 30
        self.low_after_s = 0.0
        """Seconds from the start until the fewest descriptors were first seen."""
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        while not self._stop.is_set() and alive(self.pid) and self.serving():
            try:
                rss, count = rss_mib(self.pid), fds(self.pid)
            except (OSError, RuntimeError):
                return  # it exited between the check and the reads
            if alive(self.pid) and self.serving():
                self.peak_mib = max(self.peak_mib, rss)
                self.peak_fds = max(self.peak_fds, count)
                if count < self.low_fds:
                    self.low_fds = count
                    self.low_after_s = time.monotonic() - self.started
            self._stop.wait(0.02)

    def __enter__(self) -> Sampler:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()


def _wait(predicate: Callable[[], object], timeout: float, what: str) -> object:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(0.1)
    raise TimeoutError(f"no {what} within {timeout:g}s")


def _coordinator_info(run_dir: Path) -> dict[str, object] | None:
    try:
        info: dict[str, object] = json.loads((run_dir / "coordinator.json").read_text())
    except (OSError, ValueError):
        return None
    return info


def _fedstream(*args: str, log: Path, env: dict[str, str] | None = None) -> subprocess.Popen[bytes]:
    out = log.open("wb")
    return subprocess.Popen(
        [sys.executable, "-m", "fedstream", *args],
        stdout=out,
        stderr=subprocess.STDOUT,
        env={**os.environ, **(env or {})},
    )


def _raise_own_descriptor_limit(needed: int) -> None:
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft < needed + 256:
        resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))


def idle_connections(port: int, count: int) -> list[socket.socket]:
    """`count` TCP connections to `port` that never send a byte (fewer where the
    coordinator's connection cap refuses the rest)."""
    held: list[socket.socket] = []
    for _ in range(count):
        try:
            held.append(socket.create_connection(("127.0.0.1", port), timeout=5))
        except OSError:
            break
    return held


Call = tuple[str, bytes, tuple[tuple[str, str], ...]]
"""A method, its raw request, and the call's metadata."""


async def _large_calls(
    target: str,
    credentials: grpc.ChannelCredentials | None,
    calls: list[Call],
    channels: int = 10,
) -> dict[str, int]:
    """Send every (method, raw request, metadata) at once over `channels` channels; the
    number of calls ending with each status."""
    options = [
        ("grpc.max_send_message_length", 64 << 20),
        ("grpc.ssl_target_name_override", "127.0.0.1"),
    ]
    opened = [
        grpc.aio.secure_channel(target, credentials, options=options)
        if credentials is not None
        else grpc.aio.insecure_channel(target, options=options)
        for _ in range(channels)
    ]

    async def one(i: int, method: str, raw: bytes, metadata: tuple[tuple[str, str], ...]) -> str:
        call = stub(opened[i % channels], method, request_serializer=lambda b: b)  # type: ignore[arg-type]
        try:
            await call(raw, metadata=metadata, timeout=60)
        except grpc.RpcError as exc:
            return exc.code().name  # type: ignore[no-any-return]
        return "OK"

    try:
        codes = await asyncio.gather(*(one(i, *c) for i, c in enumerate(calls)))
    finally:
        for channel in opened:
            await channel.close()
    counts: dict[str, int] = {}
    for code in codes:
        counts[code] = counts.get(code, 0) + 1
    return counts


def _join(size: int) -> bytes:
    return pb.JoinRequest(name="x" * size, task="digits", num_partitions=1).SerializeToString()


def _poll(size: int) -> bytes:
    # PollRequest has no field to pad: unknown field 15 (bytes) carries the weight
    return b"\x7a" + _varint(size) + b"\0" * size


def _varint(value: int) -> bytes:
    out = bytearray()
    while True:
        out.append((value & 0x7F) | (0x80 if value > 0x7F else 0))
        value >>= 7
        if not value:
            return bytes(out)


def run_case(
    case: str, workdir: Path, joins: int = 100, join_mib: float = 17, idle: int = 1100
) -> Figures:
    """One case ("tokens" or "mtls") in `workdir`: the figures of a real coordinator."""
    workdir.mkdir(parents=True, exist_ok=True)
    certs = workdir / "certs"
    make_certs(CertsConfig(out=certs, server_name="127.0.0.1", clients=",".join(CLIENTS)))
    tokens = {name: new_token() for name in CLIENTS}
    (workdir / "tokens.txt").write_text(
        "".join(f"{name} {token_hash(t)}\n" for name, t in tokens.items())
    )
    run_dir = workdir / "run"
    auth = (
        ["--tokens", str(workdir / "tokens.txt")]
        if case == "tokens"
        else [
            "--tls-cert", str(certs / "server.pem"),
            "--tls-key", str(certs / "server.key"),
            "--client-ca", str(certs / "ca.pem"),
        ]
    )  # fmt: skip
    server = _fedstream(
        "server", "--address", "127.0.0.1:0", "--status-address", "", "--run-dir", str(run_dir),
        "--rounds", "1", "--min-clients", str(len(CLIENTS)), "--task", "digits",
        "--done-grace", "5", "--threads", "1", *auth,
        log=workdir / "server.log",
    )  # fmt: skip
    clients: list[subprocess.Popen[bytes]] = []
    try:
        info = _wait(lambda: _coordinator_info(run_dir), START_TIMEOUT, "coordinator.json")
        assert isinstance(info, dict)
        address = str(info["address"])
        pid = int(str(info["pid"]))
        time.sleep(2.0)  # settle
        resting, resting_fds = rss_mib(pid), fds(pid)
        size = int(join_mib * (1 << 20))
        _raise_own_descriptor_limit(idle)
        with Sampler(pid) as sampler:
            if case == "tokens":
                calls: list[Call] = [("Join", _join(size), ()) for _ in range(joins)]
                calls += [("Join", _join(size), bearer_metadata("forged")) for _ in range(joins)]
                calls += [("Poll", _poll(size), bearer_metadata("forged")) for _ in range(joins)]
                refused = asyncio.run(_large_calls(address, None, calls))
            else:
                anonymous = grpc.ssl_channel_credentials((certs / "ca.pem").read_bytes())
                anonymous_calls: list[Call] = [("Join", _join(size), ()) for _ in range(joins)]
                refused = asyncio.run(_large_calls(address, anonymous, anonymous_calls))
            port = int(address.rpartition(":")[2])
            held = idle_connections(port, idle)
            refused["idle connections opened"] = len(held)
            time.sleep(1.0)
        after, after_fds = rss_mib(pid), fds(pid)
        during_round = Sampler(pid, serving=(run_dir / "coordinator.json").exists)
        try:
            with during_round:
                for i, name in enumerate(CLIENTS):
                    credentials = (
                        ["--token", tokens[name]]
                        if case == "tokens"
                        else [
                            "--ca", str(certs / "ca.pem"),
                            "--cert", str(certs / f"{name}.pem"),
                            "--key", str(certs / f"{name}.key"),
                        ]
                    )  # fmt: skip
                    common = ["--server", address, "--name", name, "--task", "digits"]
                    split = ["--partition", str(i), "--num-partitions", str(len(CLIENTS))]
                    pace = ["--threads", "1", "--max-backoff", "1"]
                    args = [*common, *split, *pace, *credentials]
                    clients.append(_fedstream("client", *args, log=workdir / f"{name}.log"))
                codes = [c.wait(ROUND_TIMEOUT) for c in clients]
        finally:
            for sock in held:
                sock.close()
        metrics = run_dir / "metrics.jsonl"
        completed = codes == [0, 0] and metrics.exists() and bool(metrics.read_text().strip())
        return Figures(
            case,
            round(resting, 1),
            round(sampler.peak_mib, 1),
            round(after, 1),
            resting_fds,
            sampler.peak_fds,
            after_fds,
            refused,
            completed,
            during_round.low_fds,
            round(during_round.low_after_s, 1),
        )
    finally:
        for process in [*clients, server]:
            if process.poll() is None:
                process.terminate()
                try:
                    process.wait(30)
                except subprocess.TimeoutExpired:
                    process.kill()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--joins", type=int, default=100)
    parser.add_argument("--join-mib", type=float, default=17.0)
    parser.add_argument("--idle", type=int, default=1100)
    parser.add_argument("--out", type=Path, default=Path("runs/preauth"))
    args = parser.parse_args(argv)
    results = []
    with tempfile.TemporaryDirectory() as tmp:
        for case in ("tokens", "mtls"):
            figures = run_case(case, Path(tmp) / case, args.joins, args.join_mib, args.idle)
            print(figures.line(), flush=True)
            results.append(asdict(figures))
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "preauth.json").write_text(json.dumps(results, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
