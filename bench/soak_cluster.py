"""One soak run: a coordinator and its clients as real `fedstream` processes, disturbed.

The clients reach the coordinator through the tests' fault-injecting TCP proxy
(tests/server/faultproxy.py, holding new connections for `HOLD_S` while the coordinator
restarts), which forwards to a fixed loopback port, so a restarted coordinator
is found where the old one was. Each client has a token (`--tokens`): the
identity a restarted client joins under is the same proven identity, and it replaces the
session its killed process left. Every process's output goes to a log of its own life
(`logs/coordinator-2.log`, `logs/site-3-1.log`), read as it is written and stamped with
the soak's clock (bench/soak_ledger.py); the coordinator's resident memory is read from
/proc as each round's record appears in metrics.jsonl.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import socket
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from bench.soak_ledger import COORDINATOR, PATTERNS, Fired, Line
from bench.soak_plan import CUT, KILL_COORDINATOR, Disturbance
from fedstream.common.tokens import new_token, token_hash
from tests.server.faultproxy import FaultProxy

CLIENT_TOKEN = "FEDSTREAM_CLIENT_TOKEN"
TICK_S = 0.1
LATEST_S = 30.0
HOLD_S = 30.0
"""Seconds the proxy keeps trying to reach a restarting coordinator before it closes a new
connection (a client that was never answered reads a few closes in a row as a TLS mismatch:
client/retry.py)."""
"""A kill of the coordinator whose booked updates do not come fires this long after its
delay anyway (a round that cannot get them: too few clients back from their kills)."""


@dataclass(frozen=True)
class Shape:
    rounds: int
    clients: int
    seed: int
    timeout_s: float
    hidden: int
    """digits' hidden width: sets the round's length and the model's size."""


@dataclass
class Outcome:
    records: list[dict[str, Any]]
    lines: list[Line]
    fired: list[Fired]
    rss: list[tuple[int, int, float]]
    """(round, coordinator life, RSS MiB) as each round's record appeared."""
    exit_codes: dict[str, int | None]
    """The last life of each process; None where the soak had to kill it at its deadline."""
    cuts: int
    seconds: float
    skipped: list[dict[str, Any]] = field(default_factory=list)
    aborted: str = ""
    """Why the run stopped early: a process exited with an error by itself."""


def free_port() -> int:
    with socket.create_server(("127.0.0.1", 0)) as sock:
        return int(sock.getsockname()[1])


def rss_mib(pid: int) -> float | None:
    with contextlib.suppress(OSError):
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    return None


def read_metrics(run_dir: Path) -> list[dict[str, Any]]:
    """metrics.jsonl's complete lines (a line being written is left for the next read)."""
    with contextlib.suppress(OSError):
        records = []
        for line in (run_dir / "metrics.jsonl").read_text().splitlines():
            with contextlib.suppress(ValueError):
                records.append(json.loads(line))
        return records
    return []


class Tail:
    """The complete lines a process's log has gained since the last read."""

    def __init__(self, path: Path, source: str, life: int) -> None:
        self.path, self.source, self.life = path, source, life
        self.offset = 0

    def read(self, now: float) -> list[Line]:
        with contextlib.suppress(OSError), open(self.path, "rb") as f:
            f.seek(self.offset)
            data = f.read()
            end = data.rfind(b"\n") + 1
            self.offset += end
            text = data[:end].decode("utf-8", errors="replace")
            return [Line(now, self.source, self.life, t) for t in text.splitlines()]
        return []


class Process:
    """One role (the coordinator, or one client) over its successive lives."""

    def __init__(self, name: str, args: list[str], env: dict[str, str], logs: Path) -> None:
        self.name, self.args, self.env, self.logs = name, args, env, logs
        self.life = 0
        self.proc: subprocess.Popen[bytes] | None = None
        self.tail: Tail | None = None
        self.started = 0.0
        self.restart_at: float | None = None
        self.killed = False

    def start(self) -> None:
        self.life += 1
        path = self.logs / f"{self.name}-{self.life}.log"
        with open(path, "wb") as log:
            self.proc = subprocess.Popen(
                [sys.executable, "-m", "fedstream", *self.args],
                stdout=log,
                stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL,
                env=self.env,
                start_new_session=True,
            )
        self.tail = Tail(path, COORDINATOR if self.name == COORDINATOR else self.name, self.life)
        self.started = time.time()
        self.restart_at = None
        self.killed = False

    @property
    def running(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def kill(self, restart_at: float | None) -> None:
        if self.proc is not None:
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.killpg(self.proc.pid, signal.SIGKILL)
            self.proc.wait()
        self.killed = True
        self.restart_at = restart_at

    def read(self, now: float) -> list[Line]:
        return self.tail.read(now) if self.tail is not None else []


class Soak:
    """Runs `shape` with `plan` fired against it, in `work_dir` (emptied first by the caller)."""

    def __init__(
        self, shape: Shape, plan: list[Disturbance], protect: tuple[int, int], work_dir: Path
    ) -> None:
        self.shape, self.pending = shape, list(plan)
        self.protect = protect
        """No coordinator kill while a round after the first of these, up to the second,
        is in flight: one coordinator life holds both (bench/soak_plan.py)."""
        self.run_dir = work_dir / "run"
        logs = work_dir / "logs"
        logs.mkdir(parents=True)
        self.port = free_port()
        self.proxy = FaultProxy(f"127.0.0.1:{self.port}", connect_retry_s=HOLD_S)
        env = {k: v for k, v in os.environ.items() if not k.startswith("FEDSTREAM_")}
        names = [f"site-{i}" for i in range(shape.clients)]
        tokens = {name: new_token() for name in names}
        tokens_file = work_dir / "tokens"
        tokens_file.write_text("".join(f"{n} {token_hash(t)}\n" for n, t in tokens.items()))
        self.coordinator = Process(COORDINATOR, self._server_args(tokens_file), env, logs)
        self.clients = [
            Process(name, self._client_args(i, name), {**env, CLIENT_TOKEN: tokens[name]}, logs)
            for i, name in enumerate(names)
        ]
        self.lines: list[Line] = []
        self.fired: list[Fired] = []
        self.skipped: list[dict[str, Any]] = []
        self.rss: list[tuple[int, int, float]] = []
        self.committed = 0
        self.in_flight_since = time.monotonic()
        self.booked: dict[tuple[int, int], int] = {}
        """(coordinator life, round) -> updates booked, from the coordinator's log."""
        self.coordinator_pid: int | None = None
        self.aborted = ""

    def _server_args(self, tokens: Path) -> list[str]:
        shape = self.shape
        return [
            "server",
            "--address", f"127.0.0.1:{self.port}",
            "--status-address", "",
            "--run-dir", str(self.run_dir),
            "--task", "digits",
            "--task-opt", f"hidden={shape.hidden}",
            "--seed", str(shape.seed),
            "--rounds", str(shape.rounds),
            "--min-clients", str(shape.clients),
            "--tokens", str(tokens),
            "--threads", "1",
            "--heartbeat-seconds", "2",
            "--poll-timeout", "4",
            "--round-timeout", "60",
            "--stall-timeout", "15",
            "--done-grace", "20",
            "--keep-checkpoints", "2",
        ]  # fmt: skip

    def _client_args(self, partition: int, name: str) -> list[str]:
        return [
            "client",
            "--server", self.proxy.address,
            "--task", "digits",
            "--task-opt", f"hidden={self.shape.hidden}",
            "--name", name,
            "--partition", str(partition),
            "--num-partitions", str(self.shape.clients),
            "--seed", str(self.shape.seed),
            "--threads", "1",
            "--max-backoff", "2",
            "--stall-timeout", "15",
            "--give-up-after", "120",
        ]  # fmt: skip

    def run(self) -> Outcome:
        started = time.monotonic()
        deadline = started + self.shape.timeout_s
        everyone = [self.coordinator, *self.clients]
        try:
            self._start_coordinator()
            for client in self.clients:
                client.start()
            cuts = 0
            while time.monotonic() < deadline:
                now = time.time()
                for process in everyone:
                    self.lines += self._read(process, now)
                    if process.restart_at is None or now < process.restart_at:
                        continue
                    if process is self.coordinator:
                        self._start_coordinator()
                    else:
                        process.start()
                self._find_coordinator()
                self._observe_rounds()
                self.aborted = self._failed(everyone)
                if self.aborted:
                    break
                if self.proxy.cuts > cuts:
                    cuts = self.proxy.cuts
                    self.fired.append(Fired(now, CUT, self.committed + 1))
                if self.committed < self.shape.rounds:
                    self._fire_due(now)
                elif not any(p.running or p.restart_at is not None for p in everyone):
                    break
                time.sleep(TICK_S)
        finally:
            codes = {p.name: (p.proc.poll() if p.proc is not None else None) for p in everyone}
            for process in everyone:
                process.kill(None)
            for event in self.pending:
                self.skipped.append({**event.as_dict(), "why": "the run ended first"})
            now = time.time()
            for process in everyone:
                self.lines += process.read(now)
            self.proxy.close()
        return Outcome(
            records=read_metrics(self.run_dir),
            lines=self.lines,
            fired=self.fired,
            rss=self.rss,
            exit_codes=codes,
            cuts=self.proxy.cuts,
            seconds=time.monotonic() - started,
            skipped=self.skipped,
            aborted=self.aborted,
        )

    def _failed(self, everyone: list[Process]) -> str:
        """A process that exited with an error without being killed: nothing will restart
        it, so the run cannot finish."""
        for process in everyone:
            code = process.proc.poll() if process.proc is not None else None
            if code not in (None, 0) and not process.killed:
                where = f"round {self.committed + 1}"
                return f"{process.name} (life {process.life}) exited {code} in {where}"
        return ""

    def _start_coordinator(self) -> None:
        self.coordinator.start()
        self.coordinator_pid = None

    def _find_coordinator(self) -> None:
        """The running coordinator's pid, from the coordinator.json it wrote (the one a
        killed coordinator left behind is older than its successor's start)."""
        if self.coordinator_pid is not None or not self.coordinator.running:
            return
        path = self.run_dir / "coordinator.json"
        with contextlib.suppress(OSError, ValueError, KeyError):
            if path.stat().st_mtime >= self.coordinator.started - 1:
                self.coordinator_pid = int(json.loads(path.read_text())["pid"])

    def _read(self, process: Process, now: float) -> list[Line]:
        lines = process.read(now)
        if process is self.coordinator:
            for line in lines:
                match = PATTERNS["booked"].search(line.text)
                if match is not None:
                    key = (line.life, int(match.group(1)))
                    self.booked[key] = self.booked.get(key, 0) + 1
        return lines

    def _observe_rounds(self) -> None:
        records = read_metrics(self.run_dir)
        done = max((int(r.get("round", 0)) for r in records), default=0)
        if done <= self.committed:
            return
        pid = self.coordinator_pid
        rss = rss_mib(pid) if pid is not None and self.coordinator.running else None
        for number in range(self.committed + 1, done + 1):
            if rss is not None:
                self.rss.append((number, self.coordinator.life, rss))
        self.committed = done
        self.in_flight_since = time.monotonic()

    def _fire_due(self, now: float) -> None:
        in_flight = self.committed + 1
        waited = time.monotonic() - self.in_flight_since
        for event in list(self.pending):
            if event.round > in_flight:
                break
            if not self._ready(event, in_flight, waited):
                continue
            self.pending.remove(event)
            self._fire(event, now, in_flight)

    def _ready(self, event: Disturbance, in_flight: int, waited: float) -> bool:
        """A kill of the coordinator waits for its booked updates of the round in flight
        (at most LATEST_S past its delay); the others wait for their delay in their round."""
        if event.kind == KILL_COORDINATOR:
            booked = self.booked.get((self.coordinator.life, in_flight), 0)
            return booked >= event.after_updates or waited >= event.delay_s + LATEST_S
        return event.round < in_flight or waited >= event.delay_s

    def _fire(self, event: Disturbance, now: float, in_flight: int) -> None:
        if event.kind == CUT:
            self.proxy.cut_downstream_after(event.nbytes)
            return
        coordinator = event.kind == KILL_COORDINATOR
        target = self.coordinator if coordinator else self.clients[event.client]
        why = f"{target.name} was not running" if not target.running else ""
        if coordinator and self.protect[0] < in_flight <= self.protect[1]:
            why = f"round {in_flight} is inside the memory window {self.protect}"
        if why:
            self.skipped.append({**event.as_dict(), "in_flight": in_flight, "why": why})
            return
        target.kill(now + event.restart_after_s)
        name = "" if target is self.coordinator else target.name
        self.fired.append(Fired(now, event.kind, in_flight, name))
