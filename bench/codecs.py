"""Uplink codecs end to end: bytes on the wire and final model quality, per codec.

Each configuration is one `fedstream demo` run (a server and N clients as real processes
on loopback); the codec reaches the server as the demo's `--uplink-codec`, zstd and the
top-k fraction through its environment variables (`FEDSTREAM_SERVER_UPLINK_ZSTD`, ...),
so the demo runs exactly as a user would run it.
Uplink bytes are the server's `bytes_up` (encoded, compressed data bytes received per
round, all clients together), compared with the uncompressed (raw) run of the same task
and seed. Then charlm-lora, starting from the raw charlm run's final checkpoint, against
full charlm.

    python bench/codecs.py [--out runs/bench-codecs] [--parts error,digits,charlm,lora]
                           [--codecs raw,int8,int4] [--reuse]

With --reuse, a configuration whose run directory already holds every round is read
back instead of run again; --codecs measures only the labels named (raw is always
measured first, as the reference). The `error` part needs no processes: each codec's
bytes and reconstruction error on fixed random deltas, against its stated bound.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

from fedstream.common.codecs import TopK2, make_codec
from fedstream.common.codecs import int4 as int4_codec
from fedstream.common.codecs import int8 as int8_codec
from fedstream.common.codecs import topk2 as topk2_codec

CODECS: list[tuple[str, bool]] = [
    ("raw", False),
    ("raw", True),
    ("fp16", False),
    ("bf16", False),
    ("int8", False),
    ("int8", True),
    ("topk", False),
    ("topk", True),
    ("int4", False),
    ("int4", True),
    ("topk2", False),
    ("topk2", True),
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
        "FEDSTREAM_SERVER_UPLINK_ZSTD": str(zstd).lower(),
        "FEDSTREAM_SERVER_TOPK_FRACTION": str(TOPK_FRACTION),
    }
    args = [sys.executable, "-m", "fedstream", "demo", "--task", task, "--run-dir", str(run_dir)]
    args += ["--clients", str(clients), "--rounds", str(rounds), "--uplink-codec", codec]
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


def bound(name: str, x: torch.Tensor, parts: tuple[torch.Tensor, ...]) -> torch.Tensor | None:
    """Each element's stated error bound (None where the codec states none per element)."""
    if name in ("int8", "int4"):
        block = int8_codec.BLOCK if name == "int8" else int4_codec.BLOCK
        return parts[0].repeat_interleave(block)[: x.numel()] / 2
    if name == "topk2":
        codec = make_codec(name, TOPK_FRACTION)
        assert isinstance(codec, TopK2)
        out = torch.full_like(x, torch.inf)  # dropped: bounded by the smallest kept instead
        kept = x[parts[0].long()].abs()
        pad = -kept.numel() % topk2_codec.BLOCK
        hi = F.pad(kept, (0, pad)).view(-1, topk2_codec.BLOCK).amax(dim=1)
        lo = F.pad(kept, (0, pad), value=math.inf).view(-1, topk2_codec.BLOCK).amin(dim=1)
        out[parts[0].long()] = ((hi - lo) / 2).repeat_interleave(topk2_codec.BLOCK)[: kept.numel()]
        return out
    return None


def error_table() -> str:
    """Bytes and reconstruction error of each codec on 2^20 Gaussian and 2^20 Student-t
    (3 degrees of freedom, heavy-tailed) float32 deltas, seed 0."""
    g = torch.Generator().manual_seed(0)
    torch.manual_seed(0)  # StudentT samples from the global generator
    deltas = {
        "gaussian": torch.randn(1 << 20, generator=g),
        "student-t": torch.distributions.StudentT(3.0).sample((1 << 20,)),
    }
    lines = [
        f"### reconstruction error (2^20 float32 elements, top-k fraction {TOPK_FRACTION})",
        "",
        "| codec | bytes vs float32 | relative L2 error, gaussian | relative L2 error, "
        "student-t | largest error / stated bound |",
        "|---|---:|---:|---:|---:|",
    ]
    for name in ("fp16", "bf16", "int8", "int4", "topk", "topk2"):
        codec = make_codec(name, TOPK_FRACTION)
        cells, worst, size = [], 0.0, 0
        for x in deltas.values():
            parts = codec.encode(x)
            size = sum(p.numel() * p.element_size() for p in parts)
            err = (codec.decode(parts, x.dtype, tuple(x.shape)) - x).abs()
            cells.append(f"{float(err.norm() / x.norm()):.4f}")
            limit = bound(name, x, parts)
            if limit is not None:
                finite = torch.isfinite(limit)
                worst = max(worst, float((err[finite] / limit[finite].clamp_min(1e-30)).max()))
        ratio = f"{worst:.3f}" if name in ("int8", "int4", "topk2") else "-"
        lines.append(f"| {name} | {size / (4 << 20):.2%} | {' | '.join(cells)} | {ratio} |")
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
    parser.add_argument("--parts", default="error,digits,charlm,lora")
    parser.add_argument("--codecs", default="", help="labels to run, e.g. int8,int4+zstd")
    parser.add_argument("--reuse", action="store_true", help="read back completed runs")
    args = parser.parse_args()
    parts = set(args.parts.split(","))
    chosen = set(args.codecs.split(",")) if args.codecs else None
    codec_list = [
        (c, z)
        for c, z in CODECS
        if chosen is None or (c, z) == CODECS[0] or c + ("+zstd" if z else "") in chosen
    ]
    tables = [error_table()] if "error" in parts else []
    if "digits" in parts:
        results = codec_runs(args.out, "digits", 5, codec_list, args.reuse)
        tables.append(
            codec_table("digits (3 clients, 5 rounds)", results, ["eval_accuracy", "eval_loss"])
        )
    charlm_raw: Result | None = None
    if parts & {"charlm", "lora"}:
        codecs = codec_list if "charlm" in parts else CODECS[:1]
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
