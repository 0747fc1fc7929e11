"""One benchmark point: a coordinator and N clients as real `fedstream` processes.

The processes are started through the same CLI a user types and reaped with
`os.wait4`, so peak memory is the kernel's own `ru_maxrss` for each finished process.
Linux carries a parent's peak-memory mark into a child through fork and exec, so the
bench process imports neither torch nor fedstream's tasks and keeps no large buffers.
Round times and wire bytes come from the coordinator's metrics.jsonl.

With `poll_status`, a thread reads the coordinator's status page as an open browser tab
does (/status.json every second) and /metrics as a Prometheus scrape would, for the whole
run, so a point measured with and without it shows what watching a run costs.
"""

from __future__ import annotations

import json
import os
import shutil
import statistics
import subprocess
import sys
import threading
import time
import urllib.request
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, cast

MIB = 1 << 20


@dataclass(frozen=True)
class PointSpec:
    params: int
    clients: int
    rounds: int
    chunk_bytes: int
    layers: int = 4
    timeout: float = 1800.0
    strategy: str = "fedavg"
    """The coordinator's --strategy (robust ones read every update's spool block by block)."""
    poll_status: bool = False
    """Read the status page every second during the run (`StatusPoller`)."""


@dataclass
class PointResult:
    params: int
    clients: int
    rounds: int
    strategy: str
    model_bytes: int
    seconds_per_round: float
    first_round_seconds: float
    wire_bytes_per_round: int
    throughput_Bps: float
    coordinator_peak_rss_bytes: int
    client_peak_rss_bytes: int
    coordinator_cpu_seconds: float
    client_cpu_seconds: float
    round_seconds: list[float]
    status_polls: int = 0
    """Reads of the status page (/status.json and /metrics) that succeeded."""

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


def _reap(proc: subprocess.Popen[bytes], deadline: float) -> tuple[int, float]:
    """Wait for `proc` to exit; its peak resident bytes and CPU seconds (user + system),
    as the kernel reports them."""
    role = cast("list[str]", proc.args)[3]
    while time.monotonic() < deadline:
        pid, status, usage = os.wait4(proc.pid, os.WNOHANG)
        if pid == proc.pid:
            proc.returncode = os.waitstatus_to_exitcode(status)
            if proc.returncode != 0:
                raise RuntimeError(f"{role} exited with {proc.returncode}")
            return usage.ru_maxrss * 1024, usage.ru_utime + usage.ru_stime
        time.sleep(0.2)
    raise TimeoutError(f"{role} did not finish in time")


def _address(run_dir: Path, server: subprocess.Popen[bytes], deadline: float) -> str:
    path = run_dir / "coordinator.json"
    while time.monotonic() < deadline:
        if server.poll() is not None:
            raise RuntimeError(f"server exited early with {server.returncode}")
        if path.exists():
            return str(json.loads(path.read_text())["address"])
        time.sleep(0.1)
    raise TimeoutError("server did not start listening in time")


def _strategy_flags(spec: PointSpec) -> list[str]:
    """Krum tolerates the largest f its N allows (N >= 2f + 3), so that Krum itself runs
    rather than the coordinate-wise median it falls back to below that."""
    if spec.strategy == "krum":
        return ["--krum-byzantine", str(max(0, (spec.clients - 3) // 2))]
    return []


class StatusPoller:
    """Reads /status.json and /metrics from `url` every `interval` seconds until stopped."""

    def __init__(self, url: str, interval: float = 1.0) -> None:
        self.url = url.rstrip("/") + "/"
        self.interval = interval
        self.polls = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="status-poller", daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while not self._stop.wait(self.interval):
            for path in ("status.json", "metrics"):
                try:
                    with urllib.request.urlopen(self.url + path, timeout=10) as reply:
                        reply.read()
                    self.polls += 1
                except OSError:  # the coordinator stops at the end of the run
                    pass

    def stop(self) -> int:
        self._stop.set()
        self._thread.join()
        return self.polls


def run_point(spec: PointSpec, work_dir: Path) -> PointResult:
    """Run `spec.rounds` rounds and summarise them; raises if any process fails."""
    run_dir = work_dir / f"p{spec.params}-n{spec.clients}-{spec.strategy}"
    shutil.rmtree(run_dir, ignore_errors=True)
    logs = run_dir / "logs"
    logs.mkdir(parents=True)
    fedstream = [sys.executable, "-m", "fedstream"]
    task = [
        "--task", "synthetic",
        "--task-opt", f"params={spec.params}",
        "--task-opt", f"layers={spec.layers}",
    ]  # fmt: skip
    chunk = ["--chunk-bytes", str(spec.chunk_bytes)]
    procs: list[subprocess.Popen[bytes]] = []

    def start(name: str, args: list[str]) -> subprocess.Popen[bytes]:
        with open(logs / f"{name}.log", "wb") as log:
            proc = subprocess.Popen([*fedstream, *args], stdout=log, stderr=subprocess.STDOUT)
        procs.append(proc)
        return proc

    deadline = time.monotonic() + spec.timeout
    poller: StatusPoller | None = None
    try:
        server = start(
            "server",
            [
                "server",
                "--address", "127.0.0.1:0",
                "--run-dir", str(run_dir),
                "--rounds", str(spec.rounds),
                "--min-clients", str(spec.clients),
                "--done-grace", "30",
                "--keep-checkpoints", "1",
                "--threads", "1",
                "--strategy", spec.strategy,
                *_strategy_flags(spec),
                *task, *chunk,
            ],
        )  # fmt: skip
        address = _address(run_dir, server, deadline)
        if spec.poll_status:
            status_url = json.loads((run_dir / "coordinator.json").read_text())["status_url"]
            poller = StatusPoller(status_url)
        clients = [
            start(
                f"client-{i}",
                [
                    "client",
                    "--server",
                    address,
                    "--partition",
                    str(i),
                    "--num-partitions",
                    str(spec.clients),
                    "--name",
                    f"bench-{i}",
                    "--threads",
                    "1",
                    *task,
                    *chunk,
                ],
            )  # fmt: skip
            for i in range(spec.clients)
        ]
        client_usage = [_reap(c, deadline) for c in clients]
        server_rss, server_cpu = _reap(server, deadline)
    finally:
        polls = poller.stop() if poller is not None else 0
        for proc in procs:
            if proc.returncode is None:
                proc.kill()
                proc.wait()
    records = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    # A round's period runs from one round's end to the next: it includes the checkpoint,
    # the clients' polls and everything else a round really costs.
    periods = [b["time"] - a["time"] for a, b in zip(records, records[1:], strict=False)]
    per_round = statistics.median(periods) if periods else records[0]["duration_s"]
    wire = statistics.median(r["bytes_down"] + r["bytes_up"] for r in records[1:] or records)
    # Each client downloads the whole model once a round (no resumes on loopback).
    model_bytes = records[-1]["bytes_down"] // spec.clients
    result = PointResult(
        params=spec.params,
        clients=spec.clients,
        rounds=spec.rounds,
        strategy=spec.strategy,
        model_bytes=model_bytes,
        seconds_per_round=per_round,
        first_round_seconds=records[0]["duration_s"],
        wire_bytes_per_round=int(wire),
        throughput_Bps=wire / per_round,
        coordinator_peak_rss_bytes=server_rss,
        client_peak_rss_bytes=client_usage[0][0],
        coordinator_cpu_seconds=server_cpu,
        client_cpu_seconds=client_usage[0][1],
        round_seconds=[records[0]["duration_s"], *periods],
        status_polls=polls,
    )
    shutil.rmtree(run_dir / "checkpoints", ignore_errors=True)
    return result
