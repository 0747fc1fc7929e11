"""Attacks on the coordinator's disk for `bench/attacks.py`: a second coordinator on one run
directory, a poisoned checkpoint, metrics that must stay strict JSON, a full spool disk."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import time
from pathlib import Path

import torch

from bench.adversary import (
    MIB,
    NOTES,
    Coordinator,
    Peer,
    code_of,
    digest,
    header,
    layout,
    row,
    update_bytes,
)
from fedstream.common.checkpoint import load_checkpoint, save_checkpoint
from fedstream.common.wire.framing import frame_data


def run_dir_attacks(work: Path) -> None:
    """8 and 9 on one run directory."""
    first = Coordinator(work, "s7", "--rounds", "2", "--min-clients", "5")
    try:
        second = Coordinator(work, "s7", "--rounds", "2", "--min-clients", "5", wait=False)
        code = second.wait_exit(30)
        if code is None:
            second.stop()
            row(
                8,
                "A second coordinator on the same run directory",
                "OLD BEHAVIOUR: still running after 30 s (no run-directory lock)",
                f"log: {second.tail(1)[-200:]}",
            )
        else:
            row(
                8,
                "A second coordinator on the same run directory",
                f"exits {code}: {second.tail(1)[-220:]}",
                f"first coordinator {'still serving' if first.proc.poll() is None else 'DEAD'}",
            )
    finally:
        first.stop()

    checkpoints = first.run_dir / "checkpoints"
    good_path = checkpoints / "round_00000.safetensors"
    tensors, metadata = load_checkpoint(good_path)
    poisoned = {
        k: torch.full_like(v, float("nan")) if v.is_floating_point() else v
        for k, v in tensors.items()
    }
    save_checkpoint(checkpoints / "round_00001.safetensors", poisoned, {**metadata, "round": "1"})
    resumed = Coordinator(work, "s7", "--rounds", "2", "--min-clients", "5", wait=False)
    try:
        code = resumed.wait_exit(20)
        lines = [
            line.strip()
            for line in resumed.lines()
            if "round_00001" in line or "resumed" in line or "NaN" in line or "Error" in line
        ]
        shown = " / ".join(x[-200:] for x in lines[:2]) or resumed.tail(2)
        text = resumed.text()
        if code is None:
            fate = "keeps running"
            if "at round 1 of" in text:
                fate = "OLD BEHAVIOUR: resumed FROM THE NaN CHECKPOINT, keeps running"
            elif "trying the checkpoint before it" in text and "at round 0 of" in text:
                fate = "skips it (warning), resumes from round 0, keeps running"
        else:
            fate = f"exits {code}"
        row(9, "Resume with a NaN checkpoint newer than the good one", fate, f"log: {shown}")
    finally:
        resumed.stop()

    # 11: a good model whose checkpoint history holds NaN and infinity (as json.dumps
    # writes them by default); the resume rewrites metrics.jsonl from that history.
    for stale in checkpoints.glob("round_*.safetensors"):
        if stale != good_path:
            stale.unlink()
    history = [
        {"round": 1, "model_version": 1, "duration_s": 1.0, "updates": 1,
         "train_loss": float("nan"), "eval_loss": float("inf")},
        {"round": 2, "model_version": 2, "duration_s": 1.0, "updates": 1,
         "train_loss": float("-inf"), "eval_loss": float("nan")},
    ]  # fmt: skip
    save_checkpoint(
        checkpoints / "round_00002.safetensors",
        tensors,
        {**metadata, "round": "2", "history": json.dumps(history)},
    )
    again = Coordinator(work, "s7", "--rounds", "3", "--min-clients", "5", wait=False)
    try:
        again.wait_log("resumed", 20)
        time.sleep(0.5)
        code = again.proc.poll()
        state = "running" if code is None else f"exit {code}"
        NOTES.append(
            "11: includes s7 resumed from a checkpoint whose history holds NaN and +-Infinity "
            f"(coordinator {state}: {again.tail(1)[-160:]})"
        )
    finally:
        again.stop()


def metrics_attack(work: Path) -> None:
    def refuse(token: str) -> float:
        raise ValueError(f"non-strict JSON constant {token}")

    lines = bad = 0
    for path in sorted(work.glob("*/metrics.jsonl")):
        for line in path.read_text().splitlines():
            lines += 1
            try:
                json.loads(line, parse_constant=refuse)
            except ValueError:
                bad += 1
    row(
        11,
        "metrics.jsonl holds only strict JSON (every run of this bench)",
        "every line parses" if not bad else f"{bad} line(s) are NOT strict JSON",
        f"{lines - bad} of {lines} lines strict",
    )


def spool_attack(work: Path) -> None:
    if os.geteuid() != 0 or shutil.which("mount") is None:
        row(12, "A full spool disk", "skipped: not root (needs a tmpfs mount)", "-")
        return
    spool = work / "spool-tmpfs"
    spool.mkdir()
    mounted = subprocess.run(
        ["mount", "-t", "tmpfs", "-o", "size=1m", "tmpfs", str(spool)],
        capture_output=True,
        text=True,
    )
    if mounted.returncode != 0:
        row(12, "A full spool disk", f"skipped: mount failed ({mounted.stderr.strip()})", "-")
        return
    options = {"hidden": "8192"}  # a 2.4 MiB update for a 1 MiB spool
    server = Coordinator(
        work, "s8", "--rounds", "1", "--min-clients", "1", "--round-timeout", "120",
        "--task-opt", "hidden=8192", "--spool-dir", str(spool),
    )  # fmt: skip
    peer = Peer(server.address)
    try:
        peer.join("filler", digest(options))
        peer.until_train()
        tensors = layout(options)
        first = header(tensors)
        payload = update_bytes(tensors)
        chunks = [frame_data(payload[i : i + MIB]) for i in range(0, len(payload), MIB)]
        before = len(server.lines())
        seen: dict[str, int] = {}
        for _ in range(50):
            code = code_of(lambda: peer.upload(iter([first, *chunks]), timeout=30))
            seen[code] = seen.get(code, 0) + 1
        time.sleep(1.0)
        written = server.lines()[before:]
        row(
            12,
            f"Full spool disk (1 MiB tmpfs), 50 uploads of {len(payload) / MIB:.1f} MiB",
            ", ".join(f"`{k}` x{v}" for k, v in seen.items()),
            f"{len(written)} coordinator log lines for the 50 uploads: "
            + " / ".join(line.strip()[:170] for line in written[:2]),
        )
    finally:
        peer.close()
        server.stop()
        subprocess.run(["umount", str(spool)], check=False)
