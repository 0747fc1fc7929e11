"""Sites of several ranks (torchrun, `--nproc-per-node`) as real processes through the CLI.

The task is site_task.py's RegressionTask: full-batch gradient descent, so a site of two
ranks (DDP over two halves of its partition, gloo on CPU) trains as one process does.
"""

from __future__ import annotations

import json
import os
import signal
import sys
from pathlib import Path
from typing import Any

import pytest
import torch
from safetensors.torch import load_file

pytestmark = pytest.mark.e2e

TASK = "site_task:RegressionTask"
TIMEOUT = 120.0
ENV = {
    "PYTHONPATH": os.pathsep.join(
        p for p in (str(Path(__file__).resolve().parent), os.environ.get("PYTHONPATH", "")) if p
    )
}
CLIENT = ("--task", TASK, "--num-partitions", "2", "--threads", "1", "--max-backoff", "0.5")


def start_server(procs: Any, wait_for: Any, run_dir: str, *extra: str) -> tuple[Any, str]:
    """A coordinator of two sites; its process and the address it listens on."""
    server = procs(
        f"server-{run_dir}",
        "server",
        "--address", "127.0.0.1:0",
        "--run-dir", run_dir,
        "--min-clients", "2",
        "--min-reports", "2",
        "--task", TASK,
        "--poll-timeout", "2",
        "--done-grace", "15",
        *extra,
        env=ENV,
    )  # fmt: skip
    info = procs.workdir / run_dir / "coordinator.json"
    wait_for(info.exists, TIMEOUT, f"{run_dir}/coordinator.json", alive=[server])
    return server, json.loads(info.read_text())["address"]


def history(run_dir: Path) -> list[dict[str, Any]]:
    path = run_dir / "metrics.jsonl"
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


@pytest.mark.parametrize("parallel", ["ddp", "fsdp"])
def test_a_two_rank_site_and_a_one_rank_site_aggregate_as_two_single_processes(
    procs: Any, wait_for: Any, parallel: str
) -> None:
    """With DDP, or with FSDP sharding the site's model (`--site-parallel fsdp`; the site
    of one process has nothing to shard)."""
    rounds = ("--rounds", "2")
    site_flags = ("--site-parallel", parallel)
    _, ranked = start_server(procs, wait_for, "ranked", *rounds)
    _, flat = start_server(procs, wait_for, "flat", *rounds)
    # Site a of the first federation is a torchrun job of two ranks; site b is one process.
    torchrun = [sys.executable, "-m", "torch.distributed.run", "--standalone"]
    site = procs.start(
        "ranked-a",
        [
            *torchrun, "--nproc-per-node", "2", "-m", "fedstream", "client",
            "--server", ranked, "--name", "a", "--partition", "0", *CLIENT, *site_flags,
        ],
        env=ENV,
    )  # fmt: skip
    procs(
        "ranked-b",
        "client",
        "--server",
        ranked,
        "--name",
        "b",
        "--partition",
        "1",
        *CLIENT,
        *site_flags,
        env=ENV,
    )
    for partition in (0, 1):
        procs(
            f"flat-{partition}",
            "client",
            "--server", flat, "--name", f"p{partition}", "--partition", str(partition), *CLIENT,
            env=ENV,
        )  # fmt: skip
    codes = procs.wait_all(TIMEOUT)
    assert set(codes.values()) == {0}, codes

    ranked_rounds, flat_rounds = history(procs.workdir / "ranked"), history(procs.workdir / "flat")
    assert [(r["round"], r["updates"], r["num_examples"]) for r in ranked_rounds] == [
        (1, 2, 48),
        (2, 2, 48),
    ]
    assert [r["num_examples"] for r in flat_rounds] == [48, 48]
    ranked_model = load_file(procs.workdir / "ranked" / "checkpoints" / "round_00002.safetensors")
    flat_model = load_file(procs.workdir / "flat" / "checkpoints" / "round_00002.safetensors")
    initial = load_file(procs.workdir / "flat" / "checkpoints" / "round_00001.safetensors")
    assert ranked_model.keys() == flat_model.keys() == {"weight", "bias"}
    for name, tensor in flat_model.items():
        torch.testing.assert_close(ranked_model[name], tensor, rtol=1e-5, atol=1e-6)
        assert not torch.allclose(tensor, initial[name])  # round 2 moved the model
    site_log = site.log()
    assert "rank 1 of 2" in site_log and "the site's 2 ranks: 24 examples in all" in site_log
    assert ("sharded by FSDP" in site_log) == (parallel == "fsdp")
    assert site_log.count("rank 0 ended the run (exit code 0)") == 1  # rank 1 heard the end


def test_a_killed_rank_fails_its_sites_round_and_the_site_rejoins(
    procs: Any, wait_for: Any
) -> None:
    gate = procs.workdir / "gate"
    gate.mkdir()
    # Site a's rank 1 (partition 1 of 4) stops in round 2's training, where the test kills it.
    (gate / "hold-p1-of-4-r2").touch()
    server, address = start_server(
        procs, wait_for, "run",
        "--rounds", "3",
        "--heartbeat-seconds", "1",
        "--client-timeout", "5",
        "--round-timeout", "30",
    )  # fmt: skip
    site = procs(
        "site-a",
        "client",
        "--server", address, "--name", "a", "--partition", "0", *CLIENT,
        "--nproc-per-node", "2", "--max-restarts", "2", "--rank-timeout", "30",
        env=ENV,
    )  # fmt: skip
    other = procs(
        "site-b", "client", "--server", address, "--name", "b", "--partition", "1", *CLIENT, env=ENV
    )
    marker = gate / "train-p1-of-4-r2"
    wait_for(
        marker.exists, TIMEOUT, "site a's rank 1 to train round 2", alive=[server, site, other]
    )
    rank_pid = int(wait_for(marker.read_text, 10, "the rank's pid"))
    os.kill(rank_pid, signal.SIGKILL)
    (gate / "open-p1-of-4-r2").touch()

    codes = procs.wait_all(TIMEOUT)
    assert codes == {"server-run": 0, "site-a": 0, "site-b": 0}
    assert [(r["round"], r["updates"]) for r in history(procs.workdir / "run")] == [
        (1, 2),
        (2, 2),
        (3, 2),
    ]
    log = site.log()
    # The site's ranks were restarted once and its new rank 0 joined again.
    assert log.count("joined 127.0.0.1") == 2, log
    assert f"pid: {rank_pid}" in log or "a rank of this site failed" in log
    assert log.count("rank 0 ended the run (exit code 0)") == 1
