"""common/fragments.py: the cut every process shares, and the round config that names a
round's fragment, refused when no coordinator would send it."""

from __future__ import annotations

import pytest
import torch

from fedstream.common.fragments import (
    StreamPlan,
    changed_by_version,
    fragment_manifests,
    fragment_of_round,
)
from fedstream.common.wire.manifest import Manifest


def test_a_round_synchronises_the_fragments_in_turn():
    assert [fragment_of_round(r, 3) for r in range(1, 8)] == [0, 1, 2, 0, 1, 2, 0]
    assert [changed_by_version(v, 3) for v in range(1, 5)] == [0, 1, 2, 0]


def test_fragments_are_balanced_by_bytes_and_keep_their_ties():
    tensors = {
        "emb": torch.zeros(8, 4),  # 128 bytes
        "mid": torch.zeros(16, dtype=torch.float64),  # 128 bytes
        "out": torch.zeros(32, dtype=torch.float16),  # 64 bytes
        "bias": torch.zeros(16, dtype=torch.float16),  # 32 bytes
    }
    manifest = Manifest.from_tensors(tensors, ties={"head": "emb"})
    parts = fragment_manifests(manifest, 2)
    assert [p.names for p in parts] == [("emb",), ("mid", "out", "bias")]
    assert [t.name for t in parts[0].ties] == ["head"] and parts[1].ties == ()
    assert sum(p.total_bytes for p in parts) == manifest.total_bytes


def test_the_round_config_round_trips_and_none_without_streaming():
    plan = StreamPlan(2, 4, 0.5)
    assert StreamPlan.from_round_config(plan.round_config()) == plan
    assert StreamPlan.from_round_config({"local_steps": 5}) is None


@pytest.mark.parametrize(
    ("config", "message"),
    [
        ({"fragments": 0, "fragment": 0, "fragment_alpha": 0.5}, "fragments must be"),
        ({"fragments": "4", "fragment": 0, "fragment_alpha": 0.5}, "fragments must be"),
        ({"fragments": 4, "fragment": 4, "fragment_alpha": 0.5}, r"fragment must be .* 0\.\.3"),
        ({"fragments": 4, "fragment_alpha": 0.5}, "fragment must be"),
        ({"fragments": 4, "fragment": 1, "fragment_alpha": 1.5}, r"in \[0, 1\]"),
        ({"fragments": 4, "fragment": 1, "fragment_alpha": True}, r"in \[0, 1\]"),
    ],
)
def test_a_round_config_no_coordinator_sends_is_refused(config, message):
    with pytest.raises(ValueError, match=message):
        StreamPlan.from_round_config(config)
