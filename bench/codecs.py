"""Uplink codecs end to end: bytes on the wire and final model quality, per codec.

Each configuration is one `fedstream demo` run (a server and N clients as real processes
on loopback); the codec reaches the server through its environment variables
(`FEDSTREAM_SERVER_UPLINK_CODEC`, ...), so the demo runs exactly as a user would run it.
Uplink bytes are the server's `bytes_up` (encoded, compressed data bytes received per
round, all clients together), compared with the uncompressed (raw) run of the same task
and seed. Then charlm-lora, starting from the raw charlm run's final checkpoint, against
full charlm.

    python bench/codecs.py [--out runs/bench-codecs] [--parts digits,charlm,lora] [--reuse]

With --reuse, a configuration whose run directory already holds every round is read
back instead of run again.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

CODECS: list[tuple[str, bool]] = [
    ("raw", False),
    ("raw", True),
    ("fp16", False),
    ("bf16", False),
    ("int8", False),
    ("int8", True),
    ("topk", False),
    ("topk", True),
]
"""(codec, zstd) pairs measured for each task; top-k keeps TOPK_FRACTION of each tensor."""
TOPK_FRACTION = 0.01


@dataclass
class Result:
    label: str
    history: list[dict[str, Any]]
    seconds: float

    def per_round(self, key: str) -> float:
        return sum(r[key] for r in self.history) / len(self.history)

    def final(self, key: str) -> float:
        return float(self.history[-1][key])


def run_demo(
    run_dir: Path,
    task: str,
    clients: int,
    rounds: int,
    codec: str = "raw",
    zstd: bool = False,
    task_opt: dict[str, str] | None = None,
    reuse: bool = False,
) -> Result:
    """One demo run; its per-round metrics. Fails loudly, pointing at the logs."""
    label = codec + ("+zstd" if zstd else "")
    metrics = run_dir / "metrics.jsonl"
    if reuse and metrics.exists():
        history = [json.loads(line) for line in metrics.read_text().splitlines() if line]
        if len(history) == rounds:
            return Result(label, history, 0.0)
    env = {
        **os.environ,
        "FEDSTREAM_SERVER_UPLINK_CODEC": codec,
        "FEDSTREAM_SERVER_UPLINK_ZSTD": str(zstd).lower(),
        "FEDSTREAM_SERVER_TOPK_FRACTION": str(TOPK_FRACTION),
    }
    args = [sys.executable, "-m", "fedstream", "demo", "--task", task, "--run-dir", str(run_dir)]
    args += ["--clients", str(clients), "--rounds", str(rounds)]
    for key, value in (task_opt or {}).items():
        args += ["--task-opt", f"{key}={value}"]
    print(f"  {task} {label} ...", end="", flush=True, file=sys.stderr)
    started = time.monotonic()
    done = subprocess.run(args, env=env, capture_output=True, text=True)
    seconds = time.monotonic() - started
    if done.returncode != 0:
        raise RuntimeError(f"{task} {label} failed: {done.stderr.strip()}; logs in {run_dir}/logs")
    print(f" {seconds:.0f}s", file=sys.stderr)
    lines = metrics.read_text().splitlines()
    return Result(label, [json.loads(line) for line in lines if line.strip()], seconds)


def codec_table(title: str, results: list[Result], metrics: list[str]) -> str:
    """A markdown table of uplink bytes and the final `metrics` against the raw run."""
    raw = results[0]
    head = "".join(f" final {m} | vs raw |" for m in metrics)
    lines = [
        f"### {title}",
        "",
        f"| codec | uplink bytes/round | vs raw |{head}",
        "|---|---:|---:|" + "---:|---:|" * len(metrics),
    ]
    for result in results:
        up = result.per_round("bytes_up")
        cells = "".join(
            f" {result.final(m):.4f} | {result.final(m) - raw.final(m):+.4f} |" for m in metrics
        )
        lines.append(
            f"| {result.label} | {up:,.0f} | {up / raw.per_round('bytes_up'):.2%} |{cells}"
        )
    return "\n".join(lines)


def lora_table(full: Result, lora: Result) -> str:
    lines = [
        "### charlm vs charlm-lora (3 clients, 3 rounds, raw uplink)",
        "",
        "| task | uplink bytes/round | downlink bytes/round | vs full | final eval_loss |",
        "|---|---:|---:|---:|---:|",
    ]
    full_bytes = full.per_round("bytes_up") + full.per_round("bytes_down")
    for name, result in (("charlm", full), ("charlm-lora (base: charlm round 3)", lora)):
        up, down = result.per_round("bytes_up"), result.per_round("bytes_down")
        lines.append(
            f"| {name} | {up:,.0f} | {down:,.0f} | {full_bytes / (up + down):.1f}x fewer "
            f"| {result.final('eval_loss'):.4f} |"
        )
    lines[-2] = lines[-2].replace("1.0x fewer", "1x")
    return "\n".join(lines)


def codec_runs(
    out: Path, task: str, rounds: int, codecs: list[tuple[str, bool]], reuse: bool
) -> list[Result]:
    """One 3-client demo run of `task` per (codec, zstd) in `codecs`."""
    return [
        run_demo(out / f"{task}-{c}{'-zstd' if z else ''}", task, 3, rounds, c, z, reuse=reuse)
        for c, z in codecs
    ]


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, default=Path("runs/bench-codecs"))
    parser.add_argument("--parts", default="digits,charlm,lora")
    parser.add_argument("--reuse", action="store_true", help="read back completed runs")
    args = parser.parse_args()
    parts = set(args.parts.split(","))
    tables = []
    if "digits" in parts:
        results = codec_runs(args.out, "digits", 5, CODECS, args.reuse)
        tables.append(
            codec_table("digits (3 clients, 5 rounds)", results, ["eval_accuracy", "eval_loss"])
        )
    charlm_raw: Result | None = None
    if parts & {"charlm", "lora"}:
        codecs = CODECS if "charlm" in parts else CODECS[:1]
        results = codec_runs(args.out, "charlm", 3, codecs, args.reuse)
        charlm_raw = results[0]
        if "charlm" in parts:
            tables.append(codec_table("charlm (3 clients, 3 rounds)", results, ["eval_loss"]))
    if "lora" in parts and charlm_raw is not None:
        base = args.out / "charlm-raw" / "checkpoints" / "round_00003.safetensors"
        lora = run_demo(
            args.out / "charlm-lora",
            "charlm-lora",
            3,
            3,
            task_opt={"base": str(base)},
            reuse=args.reuse,
        )
        tables.append(lora_table(charlm_raw, lora))
    print(f"top-k fraction {TOPK_FRACTION}; uplink bytes are encoded data bytes received.\n")
    print("\n\n".join(tables))
    return 0


if __name__ == "__main__":
    sys.exit(main())
