"""One DiLoCo row of `bench/lowcomm.py` through real `fedstream` processes on loopback,
and one streaming row (`--fragments 4`).

A coordinator (`fedstream server --strategy diloco`) and 4 clients (`fedstream client
--task-opt keep_optimizer=1`), started through the CLI a user types, each in its own
process group; the held-out loss of every round is read from the coordinator's
metrics.jsonl and set beside the same row run in-process (`bench/lowcomm_train.py`),
which has no safeguards: the coordinator runs with `--no-safeguards` (its update clipping
would otherwise re-weigh the clients' updates: docs/strategies.md, "Safeguards"). A
streaming row's rounds are fragments (H/F inner steps each, mixed in with overlap 0);
its loss is compared after every F rounds, when the in-process twin scores its model.

    python -m bench.lowcomm_cluster [--steps 40] [--h 20] [--fragments 4]

runs one short twin alone and prints the comparison.
"""

from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import torch

from bench.lowcomm_train import LocalSGD, Run, Scale, local_sgd
from bench.robust_cluster import _address, _kill, metrics

TIMEOUT_S = 900.0
TASK_OPT = {"n_layer": "2", "n_head": "2", "n_embd": "32", "block_size": "32"}
"""`bench/lowcomm.py`'s model."""


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
    fragments: int = 1
    alpha: float = 0.5

    def text(self) -> str:
        mine = [p.loss for p in self.inprocess.curve]
        f = self.fragments
        theirs = self.losses[f - 1 :: f]  # the whole model synchronised once more
        last = f"{theirs[-1]:.6f}" if theirs else "none (no round completed)"
        diff = abs(theirs[-1] - mine[-1]) if theirs else float("nan")
        rounds = f"{len(mine)} rounds of H={self.h}"
        if f > 1:
            rounds = (
                f"{len(mine) * f} fragment rounds of H/F={self.h // f} steps, F={f}, "
                f"alpha {self.alpha}, overlap 0; the loss after every {f} rounds"
            )
        return (
            f"The row {self.inprocess.label!r} ({rounds}, "
            f"4 clients, raw uplink) again through real processes. Held-out loss after each "
            f"round, in-process: {', '.join(f'{x:.6f}' for x in mine)}; real processes "
            f"(`fedstream server` + 4 `fedstream client` on 127.0.0.1): "
            f"{', '.join(f'{x:.6f}' for x in theirs)}. Final: {mine[-1]:.6f} against {last} "
            f"(difference {diff:.2e}). Uplink bytes: in-process {self.inprocess.uplink_bytes:,} "
            f"(tensor bytes), coordinator's `bytes_up` {self.bytes_up:,}. Processes exited "
            f"{self.exit_codes}; {self.seconds:.0f} s."
        )


def server_args(
    scale: Scale, h: int, run_dir: Path, fragments: int = 1, alpha: float = 0.5
) -> list[str]:
    opts = [arg for k, v in scale.task_opt.items() for arg in ("--task-opt", f"{k}={v}")]
    steps = h // fragments
    config = {"local_steps": steps, "batch_size": scale.batch_size, "lr": scale.lr}
    streaming = ["--fragments", str(fragments), "--fragment-alpha", str(alpha)]
    return [
        "server", *(streaming if fragments > 1 else []),
        "--address", "127.0.0.1:0", "--run-dir", str(run_dir),
        "--task", "charlm", *opts, "--strategy", "diloco", "--no-safeguards",
        *[arg for k, v in config.items() for arg in ("--round-config", f"{k}={v}")],
        "--rounds", str(scale.steps // steps), "--min-clients", str(scale.clients),
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
    scale: Scale, h: int, run_dir: Path, fragments: int = 1, alpha: float = 0.5
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
        server = start("server", server_args(scale, h, run_dir, fragments, alpha))
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


def twin(
    scale: Scale, h: int, inprocess: Run, run_dir: Path, fragments: int = 1, alpha: float = 0.5
) -> Twin:
    """`inprocess` (a DiLoCo row of `h`; with `fragments`, a streaming row of overlap 0
    without last syncs) again as real processes in `run_dir`."""
    shutil.rmtree(run_dir, ignore_errors=True)
    started = time.monotonic()
    records, codes = cluster(scale, h, run_dir, fragments, alpha)
    losses = [float(r["eval_loss"]) for r in records if "eval_loss" in r]  # type: ignore[arg-type]
    bytes_up = sum(int(r.get("bytes_up", 0)) for r in records)  # type: ignore[call-overload]
    seconds = time.monotonic() - started
    return Twin(inprocess, h, losses, bytes_up, codes, seconds, fragments, alpha)


def streaming_row(h: int, fragments: int, alpha: float) -> LocalSGD:
    """The in-process twin of `fedstream server --fragments F`: overlap 0, no last syncs."""
    label = f"streaming DiLoCo, F={fragments}, H={h}, overlap 0 (the wire's schedule)"
    return LocalSGD(label, h, fragments=fragments, alpha=alpha, last_syncs=False)


def main() -> None:
    parser = argparse.ArgumentParser(description="one short in-process/real-process twin")
    parser.add_argument("--steps", type=int, default=40)
    parser.add_argument("--h", type=int, default=20)
    parser.add_argument("--fragments", type=int, default=4)
    parser.add_argument("--alpha", type=float, default=0.5)
    parser.add_argument("--run-dir", type=Path, default=Path("runs/lowcomm-twin"))
    args = parser.parse_args()
    torch.set_num_threads(1)
    scale = Scale(TASK_OPT, steps=args.steps)
    row = streaming_row(args.h, args.fragments, args.alpha)
    if args.fragments == 1:
        row = LocalSGD(f"DiLoCo H={args.h}", args.h)
    inprocess = local_sgd(scale, row)
    print(twin(scale, args.h, inprocess, args.run_dir.resolve(), args.fragments, args.alpha).text())


if __name__ == "__main__":
    main()
