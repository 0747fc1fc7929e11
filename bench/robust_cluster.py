"""One adversarial run: a coordinator and its clients as real `fedstream` processes.

The clients run `bench.robust_attacks:AdversarialDigits`; the last `malicious` of them
attack in every round. The processes are started through the CLI a user types, each in
its own process group, and every one still running at the run's deadline is killed. The
outcome is read from what the coordinator wrote: metrics.jsonl and its last checkpoint.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import shutil
import signal
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from safetensors import safe_open

TASK = "bench.robust_attacks:AdversarialDigits"
BENCH_DIR = Path(__file__).resolve().parent


@dataclass(frozen=True)
class ClusterRun:
    """What to run: the coordinator's strategy flags and who attacks how."""

    server_flags: tuple[str, ...]
    attack: str = "none"
    malicious: int = 0
    clients: int = 5
    rounds: int = 10
    seed: int = 0
    round_config: tuple[str, ...] = ()
    """KEY=VALUE settings sent to the clients every round (--round-config)."""


@dataclass
class RunOutcome:
    accuracy: list[float]
    """The coordinator's held-out accuracy after each completed round."""
    records: list[dict[str, Any]]
    """metrics.jsonl, one dict a round."""
    checkpoint_finite: bool | None
    """Every tensor of the last checkpoint finite (None: no checkpoint)."""
    exit_codes: dict[str, int | None] = field(default_factory=dict)
    """Each process's exit code; None for one killed at the deadline."""
    seconds: float = 0.0

    @property
    def final_accuracy(self) -> float:
        """Accuracy after the last completed round; NaN when no round completed."""
        return self.accuracy[-1] if self.accuracy else math.nan

    @property
    def completed(self) -> bool:
        return all(code == 0 for code in self.exit_codes.values())


def pythonpath(work_dir: Path) -> Path:
    """A directory holding only a link to bench/, for the processes' PYTHONPATH (the
    repository root would also make server/, client/ and common/ importable as top-level
    packages)."""
    path = work_dir / "pythonpath"
    path.mkdir(parents=True, exist_ok=True)
    link = path / "bench"
    if not link.exists():
        link.symlink_to(BENCH_DIR, target_is_directory=True)
    return path


def metrics(run_dir: Path) -> list[dict[str, Any]]:
    path = run_dir / "metrics.jsonl"
    if not path.exists():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def checkpoint_finite(run_dir: Path) -> bool | None:
    """Whether every tensor of the newest checkpoint is finite; None when there is none."""
    saved = sorted((run_dir / "checkpoints").glob("round_*.safetensors"))
    if not saved:
        return None
    import torch  # only here: the bench process itself has no other use for torch

    with safe_open(str(saved[-1]), framework="pt") as f:
        return all(bool(torch.isfinite(f.get_tensor(key)).all()) for key in f.keys())  # noqa: SIM118


def server_args(run: ClusterRun, run_dir: Path) -> list[str]:
    config = [arg for kv in run.round_config for arg in ("--round-config", kv)]
    return [
        "server",
        "--address", "127.0.0.1:0",
        "--run-dir", str(run_dir),
        "--rounds", str(run.rounds),
        "--min-clients", str(run.clients),
        "--task", TASK,
        "--seed", str(run.seed),
        "--done-grace", "10",
        "--keep-checkpoints", "1",
        "--threads", "1",
        *config,
        *run.server_flags,
    ]  # fmt: skip


def client_args(run: ClusterRun, address: str, partition: int) -> list[str]:
    attacking = partition >= run.clients - run.malicious
    return [
        "client",
        "--server", address,
        "--task", TASK,
        *(["--task-opt", f"attack={run.attack}"] if attacking else []),
        "--partition", str(partition),
        "--num-partitions", str(run.clients),
        "--name", f"{'attacker' if attacking else 'honest'}-{partition}",
        "--seed", str(run.seed),
        "--threads", "1",
        "--max-backoff", "1",
        "--give-up-after", "60",
    ]  # fmt: skip


def _address(run_dir: Path, server: subprocess.Popen[bytes], deadline: float) -> str | None:
    path = run_dir / "coordinator.json"
    while time.monotonic() < deadline and server.poll() is None:
        if path.exists():
            with contextlib.suppress(json.JSONDecodeError):
                return str(json.loads(path.read_text())["address"])
        time.sleep(0.1)
    return None


def _kill(proc: subprocess.Popen[bytes]) -> None:
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()


def run_cluster(run: ClusterRun, run_dir: Path, timeout: float) -> RunOutcome:
    """Run `run` in `run_dir` (emptied first) for at most `timeout` seconds."""
    shutil.rmtree(run_dir, ignore_errors=True)
    logs = run_dir / "logs"
    logs.mkdir(parents=True)
    env = {k: v for k, v in os.environ.items() if not k.startswith("FEDSTREAM_")}
    env["PYTHONPATH"] = str(pythonpath(run_dir.parent))
    procs: dict[str, subprocess.Popen[bytes]] = {}

    def start(name: str, args: list[str]) -> subprocess.Popen[bytes]:
        with open(logs / f"{name}.log", "wb") as log:
            procs[name] = subprocess.Popen(
                [sys.executable, "-m", "fedstream", *args],
                stdout=log,
                stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL,
                env=env,
                start_new_session=True,
            )
        return procs[name]

    started = time.monotonic()
    deadline = started + timeout
    try:
        server = start("server", server_args(run, run_dir))
        address = _address(run_dir, server, deadline)
        if address is not None:
            for i in range(run.clients):
                start(f"client-{i}", client_args(run, address, i))
        while time.monotonic() < deadline and any(p.poll() is None for p in procs.values()):
            time.sleep(0.2)
    finally:
        codes = {name: proc.poll() for name, proc in procs.items()}
        for proc in procs.values():
            _kill(proc)
    records = metrics(run_dir)
    return RunOutcome(
        accuracy=[float(r["eval_accuracy"]) for r in records if "eval_accuracy" in r],
        records=records,
        checkpoint_finite=checkpoint_finite(run_dir),
        exit_codes=codes,
        seconds=time.monotonic() - started,
    )
