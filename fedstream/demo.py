"""`fedstream demo`: a whole local cluster as real processes on loopback.

One `fedstream server` and N `fedstream client` processes, started through the same CLI
a user types, each logging to RUN_DIR/logs/. Their progress is shown as it happens (the
coordinator's line about the round in flight, each client's download, training and
upload: `fedstream/demo_view.py`), rounds as they complete, and a summary table closes
the run.
"""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TextIO

from fedstream.common.codecs import CODEC_NAMES
from fedstream.common.config import CHOICES, ConfigError
from fedstream.demo_view import DemoView
from fedstream.server.strategies import STRATEGIES

MIB = 1 << 20


@dataclass
class DemoConfig:
    clients: int = 3
    """Number of client processes."""
    rounds: int = 5
    """Number of training rounds."""
    task: str = "digits"
    """Task for the whole cluster: digits, charlm, synthetic or package.module:ClassName."""
    task_opt: dict[str, str] = field(default_factory=dict)
    """Task option KEY=VALUE, passed to the server and every client."""
    round_config: dict[str, str] = field(default_factory=dict)
    """Training setting KEY=VALUE sent to clients each round."""
    run_dir: Path = Path("runs/demo")
    """Run directory; a previous run there is replaced."""
    seed: int = 0
    """Run seed."""
    strategy: str = field(default="fedavg", metadata={CHOICES: tuple(STRATEGIES)})
    """Aggregation strategy, passed to the server."""
    uplink_codec: str = field(default="raw", metadata={CHOICES: CODEC_NAMES})
    """Codec of client updates, passed to the server."""
    server_opt: dict[str, str] = field(default_factory=dict)
    """Any other `fedstream server` flag as FLAG=VALUE, passed to the server, e.g.
    server-lr=0.1, uplink-zstd=true, fraction=0.5, round-timeout=60, eval-every=1."""
    timeout: float = 600.0
    """Seconds after which the demo stops every process and fails."""

    def validate(self) -> None:
        if self.clients < 1:
            raise ConfigError("clients must be at least 1")
        if self.rounds < 1:
            raise ConfigError("rounds must be at least 1")
        if self.strategy not in STRATEGIES:
            raise ConfigError(
                f"strategy {self.strategy!r} is unknown: use one of {', '.join(STRATEGIES)}"
            )
        if self.uplink_codec not in CODEC_NAMES:
            raise ConfigError(
                f"uplink_codec must be one of {', '.join(CODEC_NAMES)}, got {self.uplink_codec!r}"
            )
        owned = {"address", "run-dir", "rounds", "min-clients", "task", "task-opt", "seed"}
        for flag in self.server_opt:
            if flag.removeprefix("--") in owned:
                raise ConfigError(f"server_opt {flag}: the demo sets it (use its own flag)")

    def server_flags(self) -> list[str]:
        """The server's flags this demo passes through."""
        flags = ["--strategy", self.strategy, "--uplink-codec", self.uplink_codec]
        for flag, value in self.server_opt.items():
            name = "--" + flag.removeprefix("--")
            if value.lower() in ("true", "false"):  # a switch: --uplink-zstd, --no-insecure
                flags.append(name if value.lower() == "true" else "--no-" + name[2:])
            else:
                flags += [name, value]
        return flags


def _pairs(flag: str, values: dict[str, str]) -> list[str]:
    return [arg for key, value in values.items() for arg in (flag, f"{key}={value}")]


def _clear_run_dir(run_dir: Path) -> None:
    if not run_dir.exists():
        return
    is_run = (run_dir / "checkpoints").is_dir() or (run_dir / "metrics.jsonl").exists()
    if any(run_dir.iterdir()) and not is_run:
        raise ConfigError(f"{run_dir} exists and is not a fedstream run directory")
    shutil.rmtree(run_dir)


LAST_LOG_LINES = 15
"""How much of a failed process's log the demo shows."""


class ProcessFailed(RuntimeError):
    """A process of the cluster exited with a non-zero code: the demo ends at once."""

    def __init__(self, name: str, code: int, log: Path) -> None:
        lines = log.read_text(errors="replace").splitlines() if log.exists() else []
        tail = "\n".join(f"  | {line}" for line in lines[-LAST_LOG_LINES:])
        super().__init__(
            f"{name} exited with code {code}; the last lines of {log}:\n{tail or '  (empty)'}"
        )


def _check_exits(processes: dict[str, subprocess.Popen[bytes]], logs: Path) -> None:
    """ProcessFailed for the first process that has exited with a non-zero code."""
    for name, proc in processes.items():
        code = proc.poll()
        if code is not None and code != 0:
            raise ProcessFailed(name, code, logs / f"{name}.log")


def _wait_for_coordinator(
    path: Path, processes: dict[str, subprocess.Popen[bytes]], logs: Path, timeout: float
) -> dict[str, Any]:
    """The coordinator's record (address, status page) once it listens."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        _check_exits(processes, logs)
        if path.exists():
            return dict(json.loads(path.read_text()))
        time.sleep(0.1)
    raise RuntimeError("server did not start listening in time")


def _read_metrics(path: Path) -> list[dict[str, Any]]:
    if not path.exists():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


SUMMARY_COLUMNS = (
    ("MiB down", "bytes_down", 1 / MIB, "{:>10.1f}"),
    ("MiB up", "bytes_up", 1 / MIB, "{:>10.1f}"),
    ("seconds", "duration_s", 1.0, "{:>10.1f}"),
    ("coord MiB", "coordinator_peak_rss_mb", 1.0, "{:>10.0f}"),
)
"""Beyond the metrics: (header, key, scale, format) of the bytes moved each round, the
round's time and the coordinator's peak resident memory so far."""


def _format_row(record: dict[str, Any], keys: list[str]) -> str:
    cells = [f"{record['round']:>5}"]
    for key in keys:
        value = record.get(key)
        cells.append(f"{value:>14.4f}" if isinstance(value, float) else f"{value!s:>14}")
    for _, key, scale, form in SUMMARY_COLUMNS:
        value = record.get(key)
        if isinstance(value, int | float):
            cells.append(form.format(value * scale))
        else:
            cells.append(f"{'-':>10}")
    return "  ".join(cells)


def print_summary(history: list[dict[str, Any]], out: TextIO = sys.stdout) -> None:
    keys = sorted({k for r in history for k in r if k.startswith(("eval_", "train_"))})
    header = "  ".join(
        [f"{'round':>5}", *[f"{k:>14}" for k in keys], *[f"{c[0]:>10}" for c in SUMMARY_COLUMNS]]
    )
    print(header, file=out)
    print("-" * len(header), file=out)
    for record in history:
        print(_format_row(record, keys), file=out)


def main(config: DemoConfig) -> int:
    _clear_run_dir(config.run_dir)
    logs = config.run_dir / "logs"
    logs.mkdir(parents=True, exist_ok=True)
    progress = config.run_dir / "progress"
    progress.mkdir()
    fedstream = [sys.executable, "-m", "fedstream"]
    common = [
        "--task",
        config.task,
        "--seed",
        str(config.seed),
        *_pairs("--task-opt", config.task_opt),
    ]
    processes: dict[str, subprocess.Popen[bytes]] = {}

    def start(name: str, args: list[str]) -> subprocess.Popen[bytes]:
        with open(logs / f"{name}.log", "wb") as log_file:
            proc = subprocess.Popen([*fedstream, *args], stdout=log_file, stderr=subprocess.STDOUT)
        processes[name] = proc
        return proc

    print(
        f"fedstream demo: 1 server + {config.clients} clients, task {config.task}, "
        f"{config.rounds} rounds, run dir {config.run_dir}"
    )
    deadline = time.monotonic() + config.timeout
    try:
        start(
            "server",
            [
                "server",
                "--address", "127.0.0.1:0",
                "--run-dir", str(config.run_dir),
                "--rounds", str(config.rounds),
                "--min-clients", str(config.clients),
                "--done-grace", "10",
                "--progress-file", str(progress / "server.json"),
                *common,
                *_pairs("--round-config", config.round_config),
                *config.server_flags(),
            ],
        )  # fmt: skip
        record = _wait_for_coordinator(config.run_dir / "coordinator.json", processes, logs, 120.0)
        address = str(record["address"])
        print(f"server listening on {address}; logs in {logs}")
        if record.get("status_url"):
            print(f"status page: {record['status_url']}")
        for i in range(config.clients):
            start(
                f"client-{i}",
                [
                    "client",
                    "--server", address,
                    "--partition", str(i),
                    "--num-partitions", str(config.clients),
                    "--name", f"demo-client-{i}",
                    "--threads", "1",
                    "--progress-file", str(progress / f"client-{i}.json"),
                    *common,
                ],
            )  # fmt: skip
        shown = 0
        started = time.monotonic()
        running = True
        names = ["coordinator", *(f"client-{i}" for i in range(config.clients))]
        files = [
            progress / "server.json",
            *(progress / f"client-{i}.json" for i in range(config.clients)),
        ]
        view = DemoView(dict(zip(names, files, strict=True)))
        try:
            while running:
                running = any(p.poll() is None for p in processes.values())
                _check_exits(processes, logs)
                if time.monotonic() > deadline:
                    raise TimeoutError(f"demo did not finish within {config.timeout:.0f}s")
                history = _read_metrics(config.run_dir / "metrics.jsonl")
                for record in history[shown:]:
                    metrics = ", ".join(
                        f"{k}={v:.4f}" for k, v in record.items() if k.startswith("eval_")
                    )
                    view.print(
                        f"[{time.monotonic() - started:6.1f}s] round {record['round']}/"
                        f"{config.rounds}: {record['updates']} updates, {metrics or 'no eval'}"
                    )
                shown = len(history)
                view.refresh()
                if running:
                    time.sleep(0.2)
        finally:
            view.close()
    except (TimeoutError, RuntimeError, KeyboardInterrupt) as exc:
        print(f"demo failed: {exc or type(exc).__name__}", file=sys.stderr)
        for proc in processes.values():
            if proc.poll() is None:
                proc.terminate()
        for proc in processes.values():
            try:
                proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                proc.kill()
        return 1
    history = _read_metrics(config.run_dir / "metrics.jsonl")
    print()
    print_summary(history)
    print()
    print(f"metrics:     {config.run_dir / 'metrics.jsonl'}")
    print(f"plot:        {config.run_dir / 'metrics.png'}")
    print(f"checkpoints: {config.run_dir / 'checkpoints'}")
    return 0
