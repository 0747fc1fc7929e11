"""A site whose model FSDP shards across its ranks (`--site-parallel fsdp`), as real
processes through the CLI: gloo on CPU, site_task.py's full-batch regression."""

from __future__ import annotations

import sys
from typing import Any

import pytest
import torch
from safetensors.torch import load_file

from tests.e2e.test_multi_rank_sites import CLIENT, ENV, TIMEOUT, history, start_server

pytestmark = pytest.mark.e2e


def test_an_fsdp_site_and_a_one_rank_site_aggregate_as_two_single_processes(
    procs: Any, wait_for: Any
) -> None:
    rounds = ("--rounds", "2")
    _, sharded = start_server(procs, wait_for, "sharded", *rounds)
    _, flat = start_server(procs, wait_for, "flat", *rounds)
    # Site a of the first federation is a torchrun job of two ranks sharing its model.
    torchrun = [sys.executable, "-m", "torch.distributed.run", "--standalone"]
    site = procs.start(
        "sharded-a",
        [
            *torchrun, "--nproc-per-node", "2", "-m", "fedstream", "client",
            "--server", sharded, "--name", "a", "--partition", "0", *CLIENT,
            "--site-parallel", "fsdp",
        ],
        env=ENV,
    )  # fmt: skip
    procs(
        "sharded-b",
        "client",
        "--server", sharded, "--name", "b", "--partition", "1", *CLIENT,
        "--site-parallel", "fsdp",  # a site of one process: nothing to shard
        env=ENV,
    )  # fmt: skip
    for partition in (0, 1):
        procs(
            f"flat-{partition}",
            "client",
            "--server", flat, "--name", f"p{partition}", "--partition", str(partition), *CLIENT,
            env=ENV,
        )  # fmt: skip
    codes = procs.wait_all(TIMEOUT)
    assert set(codes.values()) == {0}, codes

    sharded_rounds = history(procs.workdir / "sharded")
    assert [(r["round"], r["updates"], r["num_examples"]) for r in sharded_rounds] == [
        (1, 2, 48),
        (2, 2, 48),
    ]
    checkpoints = procs.workdir / "sharded" / "checkpoints", procs.workdir / "flat" / "checkpoints"
    sharded_model, flat_model = (load_file(c / "round_00002.safetensors") for c in checkpoints)
    initial = load_file(checkpoints[1] / "round_00001.safetensors")
    assert sharded_model.keys() == flat_model.keys() == {"weight", "bias"}
    for name, tensor in flat_model.items():
        torch.testing.assert_close(sharded_model[name], tensor, rtol=1e-5, atol=1e-6)
        assert not torch.allclose(tensor, initial[name])  # round 2 moved the model
    site_log = site.log()
    assert "rank 1 of 2" in site_log and "the site's 2 ranks: 24 examples in all" in site_log
    assert "sharded by FSDP" in site_log
    assert site_log.count("rank 0 ended the run (exit code 0)") == 1  # rank 1 heard the end
