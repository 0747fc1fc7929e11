"""One DiLoCo row of `bench/lowcomm.py` through real `fedstream` processes on loopback.

A coordinator (`fedstream server --strategy diloco`) and 4 clients (`fedstream client
--task-opt keep_optimizer=1`), started through the CLI a user types, each in its own
process group; the held-out loss of every round is read from the coordinator's
metrics.jsonl and set beside the same row run in-process (`bench/lowcomm_train.py`).
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

from bench.lowcomm_train import Run, Scale
from bench.robust_cluster import _address, _kill, metrics

TIMEOUT_S = 900.0


@dataclass
class Twin:
    """The same DiLoCo row, in-process and as processes."""

    inprocess: Run
    h: int
    losses: list[float]
    """The coordinator's held-out loss after each round (metrics.jsonl `eval_loss`)."""
    bytes_up: int
    exit_codes: dict[str, int | None]
    seconds: float

    def text(self) -> str:
        mine = [p.loss for p in self.inprocess.curve]
        theirs = self.losses
        last = f"{theirs[-1]:.6f}" if theirs else "none (no round completed)"
        diff = abs(theirs[-1] - mine[-1]) if theirs else float("nan")
        return (
            f"The table's row {self.inprocess.label!r} ({len(mine)} rounds of H={self.h}, "
            f"4 clients, raw uplink) again through real processes. Held-out loss after each "
            f"round, in-process: {', '.join(f'{x:.6f}' for x in mine)}; real processes "
            f"(`fedstream server` + 4 `fedstream client` on 127.0.0.1): "
            f"{', '.join(f'{x:.6f}' for x in theirs)}. Final: {mine[-1]:.6f} against {last} "
            f"(difference {diff:.2e}). Uplink bytes: in-process {self.inprocess.uplink_bytes:,} "
            f"(tensor bytes), coordinator's `bytes_up` {self.bytes_up:,}. Processes exited "
            f"{self.exit_codes}; {self.seconds:.0f} s."
        )


def server_args(scale: Scale, h: int, run_dir: Path) -> list[str]:
    opts = [arg for k, v in scale.task_opt.items() for arg in ("--task-opt", f"{k}={v}")]
    config = {"local_steps": h, "batch_size": scale.batch_size, "lr": scale.lr}
    return [
        "server", "--address", "127.0.0.1:0", "--run-dir", str(run_dir),
        "--task", "charlm", *opts, "--strategy", "diloco",
        *[arg for k, v in config.items() for arg in ("--round-config", f"{k}={v}")],
        "--rounds", str(scale.steps // h), "--min-clients", str(scale.clients),
        "--seed", str(scale.seed), "--done-grace", "10", "--threads", "1",
    ]  # fmt: skip


def client_args(scale: Scale, address: str, partition: int) -> list[str]:
    opts = [arg for k, v in scale.task_opt.items() for arg in ("--task-opt", f"{k}={v}")]
    return [
        "client", "--server", address, "--task", "charlm", *opts,
        "--task-opt", "keep_optimizer=1",
        "--partition", str(partition), "--num-partitions", str(scale.clients),
        "--name", f"site-{partition}", "--seed", str(scale.seed), "--threads", "1",
        "--max-backoff", "1", "--give-up-after", "60",
    ]  # fmt: skip


def cluster(
    scale: Scale, h: int, run_dir: Path
) -> tuple[list[dict[str, object]], dict[str, int | None]]:
    """Run the coordinator and the clients in `run_dir` to the end (or TIMEOUT_S)."""
    logs = run_dir / "logs"
    logs.mkdir(parents=True, exist_ok=True)
    env = {k: v for k, v in os.environ.items() if not k.startswith("FEDSTREAM_")}
    procs: dict[str, subprocess.Popen[bytes]] = {}

    def start(name: str, args: list[str]) -> subprocess.Popen[bytes]:
        with open(logs / f"{name}.log", "wb") as log:
            procs[name] = subprocess.Popen(
                [sys.executable, "-m", "fedstream", *args],
                stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                env=env, start_new_session=True,
            )  # fmt: skip
        return procs[name]

    deadline = time.monotonic() + TIMEOUT_S
    try:
        server = start("server", server_args(scale, h, run_dir))
        address = _address(run_dir, server, deadline)
        if address is not None:
            for k in range(scale.clients):
                start(f"client-{k}", client_args(scale, address, k))
        while time.monotonic() < deadline and any(p.poll() is None for p in procs.values()):
            time.sleep(0.5)
    finally:
        codes = {name: proc.poll() for name, proc in procs.items()}
        for proc in procs.values():
            _kill(proc)
    return metrics(run_dir), codes


def twin(scale: Scale, h: int, inprocess: Run, run_dir: Path) -> Twin:
    """`inprocess` (the table's DiLoCo row of `h`) again as real processes in `run_dir`."""
    shutil.rmtree(run_dir, ignore_errors=True)
    started = time.monotonic()
    records, codes = cluster(scale, h, run_dir)
    losses = [float(r["eval_loss"]) for r in records if "eval_loss" in r]  # type: ignore[arg-type]
    bytes_up = sum(int(r.get("bytes_up", 0)) for r in records)  # type: ignore[call-overload]
    return Twin(inprocess, h, losses, bytes_up, codes, time.monotonic() - started)
