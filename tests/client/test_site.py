"""A site's ranks over a real gloo process group: two processes (site_ranks.py) on loopback."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import pytest
import torch

from fedstream.client.config import ClientConfig
from fedstream.client.site import Command, RankGroup, Ranks, Site, open_site
from fedstream.common.config import ConfigError
from fedstream.common.proto.v1 import coordinator_pb2 as pb
from tests.client.two_ranks import run_two_ranks

HELPER = Path(__file__).with_name("site_ranks.py")


@pytest.mark.slow
def test_two_ranks_share_commands_the_model_gradients_and_totals(
    tmp_path: Path, free_port: Callable[[], int]
) -> None:
    leader, follower = run_two_ranks(HELPER, tmp_path, free_port(), 60)
    assert follower["commands"] == [(Command.IDLE, b""), (Command.TRAIN, b"round 7")]
    for name, tensor in leader["state"].items():  # rank 0's weights, bit for bit, bf16 too
        assert torch.equal(follower["state"][name], tensor), name
    assert follower["state"]["low"].dtype == torch.bfloat16
    assert float(follower["state"]["big"][-1]) == 1.5
    # d(sum(w.x))/dw = x: (1, 1, 1) on rank 0 and (2, 2, 2) on rank 1, averaged by DDP.
    expected = torch.full((1, 3), 1.5)
    assert torch.equal(leader["grad"], expected) and torch.equal(follower["grad"], expected)
    # 10 and 20 examples; loss 0 and 1 weighted by them; acc the same everywhere.
    assert leader["total"] == follower["total"] == (30, {"loss": 20 / 30, "acc": 0.5})
    report = pb.EvaluationReport.FromString(leader["report"])
    assert (report.num_examples, dict(report.metrics)) == (1, {"loss": 4.0})


def test_ranks_come_from_torchruns_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    for name in ("RANK", "WORLD_SIZE", "LOCAL_RANK"):
        monkeypatch.delenv(name, raising=False)
    assert Ranks.from_env() is None
    monkeypatch.setenv("RANK", "3")
    monkeypatch.setenv("WORLD_SIZE", "4")
    monkeypatch.setenv("LOCAL_RANK", "1")
    ranks = Ranks.from_env()
    assert ranks == Ranks(rank=3, world=4, local_rank=1)
    # Partition 2 of 5 of the site is shards 8..11 of 20: rank 3 holds shard 11.
    assert ranks.shard(2, 5) == (11, 20)
    assert ranks.device("cuda") == torch.device("cuda:1")
    assert ranks.device("cpu") == torch.device("cpu")
    assert Ranks(0, 1, 0).device("cuda") == torch.device("cuda")
    monkeypatch.setenv("RANK", "4")
    with pytest.raises(ConfigError, match="RANK=4 is outside 0..3"):
        Ranks.from_env()
    monkeypatch.setenv("RANK", "x")
    with pytest.raises(ConfigError, match="must be integers"):
        Ranks.from_env()


def test_a_site_of_one_process_opens_no_group() -> None:
    site = open_site(Ranks(0, 1, 0), torch.device("cpu"), timeout=1)
    assert type(site) is Site and not isinstance(site, RankGroup)
    model = torch.nn.Linear(2, 2)
    assert site.wrap(model) is model
    assert site.total(7, {"loss": 2.0}) == (7, {"loss": 2.0})
    assert open_site(None, torch.device("cpu"), timeout=1).leader


@pytest.mark.parametrize(
    ("field", "value", "message"),
    [
        ("nproc_per_node", 0, "nproc_per_node must be at least 1"),
        ("max_restarts", -1, "max_restarts must be 0 or more"),
        ("rank_timeout", 0.0, "rank_timeout must be more than 0"),
    ],
)
def test_site_options_are_checked(field: str, value: float, message: str) -> None:
    config = ClientConfig(name="a")
    setattr(config, field, value)
    with pytest.raises(ConfigError, match=message):
        config.validate()
