"""The client's local steps: what a round config asks, and the gradients sent in FedSGD."""

from __future__ import annotations

import pytest
import torch

from fedstream.client.retry import Refused
from fedstream.client.steps import gradients, read_round_config, shown
from fedstream.common.codecs import UplinkCodec
from fedstream.common.proto.v1 import coordinator_pb2 as pb
from fedstream.common.round_config import ConfigScalar, to_proto
from fedstream.common.wire.manifest import Manifest


def train_task(config: dict[str, ConfigScalar]) -> pb.TrainTask:
    task = pb.TrainTask(round=3, model_version=2)
    to_proto(config, task.config)
    return task


def test_the_round_config_says_gradient_or_training_and_the_uplink() -> None:
    plan = read_round_config(train_task({"mode": "gradient", "lr": 0.1, "uplink_codec": "int8"}))
    assert plan.gradient
    assert plan.config["lr"] == 0.1
    assert plan.uplink.round_config() == UplinkCodec.parse("int8").round_config()

    plain = read_round_config(train_task({"lr": 0.1}))
    assert not plain.gradient
    assert plain.uplink.round_config() == UplinkCodec.parse("raw").round_config()


def test_an_uplink_the_client_cannot_encode_refuses_the_round() -> None:
    with pytest.raises(Refused, match="cannot encode updates"):
        read_round_config(train_task({"uplink_codec": "no-such-codec"}))


class WithBuffer(torch.nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.w = torch.nn.Parameter(torch.ones(2, 3))
        self.b = torch.nn.Parameter(torch.ones(3))
        self.register_buffer("count", torch.zeros(4, dtype=torch.int64))


def test_gradients_follow_the_manifest_with_zeros_where_there_is_none() -> None:
    model = WithBuffer()
    (model.w * 2.0).sum().backward()  # b gets no gradient
    manifest = Manifest.from_tensors(dict(model.state_dict()))

    got = dict(zip([e.name for e in manifest.entries], gradients(model, manifest), strict=True))

    assert torch.equal(got["w"], torch.full((2, 3), 2.0))
    assert torch.equal(got["b"], torch.zeros(3))
    assert got["count"].dtype == torch.int64 and torch.equal(got["count"], torch.zeros(4))


def test_metrics_show_with_four_decimals_in_their_order() -> None:
    assert shown({"loss": 0.5, "accuracy": 0.91234}) == "loss=0.5000, accuracy=0.9123"
    assert shown({}) == ""
