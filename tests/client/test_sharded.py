"""A site whose model FSDP2 shards (`--site-parallel fsdp`): two real ranks over gloo on
loopback (sharded_ranks.py)."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import pytest
import torch

from fedstream.client.config import ClientConfig
from fedstream.client.sharded import rows_of
from fedstream.common.config import ConfigError
from tests.client.two_ranks import run_two_ranks

HELPER = Path(__file__).with_name("sharded_ranks.py")


@pytest.mark.slow
def test_ranks_take_their_shards_and_rank_0_gathers_one_tensor_at_a_time(
    tmp_path: Path, free_port: Callable[[], int]
) -> None:
    leader, follower = run_two_ranks(HELPER, tmp_path, free_port(), 90)
    assert leader["same_layout"] and follower["same_layout"]
    # Weights of 5 and 3 rows: 3 + 2 and 2 + 1 rows on ranks 0 and 1.
    assert leader["local_rows"]["blocks.0.weight"] == 3
    assert follower["local_rows"]["blocks.0.weight"] == 2
    assert follower["local_rows"]["blocks.1.bias"] == 1
    # Each rank's shards and buffers hold rank 0's global model.
    for name, tensor in leader["global"].items():
        assert torch.equal(leader["shared"][name], tensor), name
        assert torch.equal(follower["shared"][name], tensor), name
    assert torch.equal(follower["freq"], torch.arange(3.0))  # a non-persistent buffer kept
    # The two ranks' gradients were averaged: both took the same step.
    for name, tensor in leader["trained"].items():
        assert torch.equal(follower["trained"][name], tensor), name
        if name in leader["grads"]:
            assert not torch.equal(tensor, leader["global"][name]), name
    # Four parameters gathered for the weights, four for the gradients, on both ranks;
    # never two whole tensors alive at once.
    assert leader["peaks"] == follower["peaks"] == [1] * 8
    assert follower["spooled"] is None
    for name, tensor in leader["spooled"].items():
        assert torch.equal(tensor, leader["trained"][name]), name
        if name in leader["grads"]:
            assert torch.equal(leader["spooled_grads"][name], leader["grads"][name]), name
        else:  # a buffer has no gradient: zeros
            assert not leader["spooled_grads"][name].any()
    expected = torch.cat(
        [(leader["trained"][n] - g).reshape(-1) for n, g in leader["global"].items()]
    )
    assert torch.equal(leader["deltas"], expected)


def test_rows_of_follows_torch_chunk() -> None:
    for rows in range(0, 9):
        for world in (1, 2, 3, 4):
            chunks = torch.arange(rows).chunk(world) if rows else ()
            got = [rows_of(rank, world, rows) for rank in range(world)]
            spans = [(int(c[0]), int(c[-1]) + 1) for c in chunks]
            assert [g for g in got if g[0] < g[1]] == spans, (rows, world)


def test_site_parallel_is_checked() -> None:
    config = ClientConfig(name="a", site_parallel="zero")
    with pytest.raises(ConfigError, match="site_parallel must be one of ddp, fsdp"):
        config.validate()
