"""FedSGD with one client reproduces centralised training of that client's data."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from fedstream.server.strategies import DeltaBlock, FedSGD
from fedstream.server.updates import VerifiedUpdate
from fedstream.tasks.digits import DigitsTask

STEPS = 5


def gradient_blocks(model: torch.nn.Module) -> list[DeltaBlock]:
    """What the client uploads in gradient mode: each parameter's .grad, flattened."""
    blocks = []
    for name, p in model.named_parameters():
        assert p.grad is not None
        blocks.append(DeltaBlock(name, 0, p.grad.reshape(-1)))
    return blocks


@pytest.mark.slow
@pytest.mark.parametrize(
    ("optimizer", "make_torch_optimizer"),
    [
        ("sgd", lambda params: torch.optim.SGD(params, lr=0.5, momentum=0.9)),
        ("adam", lambda params: torch.optim.Adam(params, lr=0.01, betas=(0.9, 0.999), eps=1e-8)),
    ],
)
def test_one_client_fedsgd_is_centralised_training(optimizer, make_torch_optimizer) -> None:
    task = DigitsTask({"hidden": "32"}, seed=3)
    task.load_data(0, 1)
    assert task._data is not None
    features, labels = task._data  # the client's training examples
    config = {"batch_size": 100, "round": 1}

    # federated: the client sends its full-batch gradient, the server steps
    client_model = task.build_model()
    global_tensors = dict(client_model.state_dict())  # shares storage with the model
    strategy = FedSGD(optimizer, lr=0.5 if optimizer == "sgd" else 0.01, momentum=0.9)
    for _ in range(STEPS):
        strategy.begin_round(global_tensors)
        result = task.compute_gradient(client_model, config)
        update = VerifiedUpdate.in_memory(
            "only", result.num_examples, gradient_blocks(client_model)
        )
        strategy.accept(update)
        with torch.no_grad():
            strategy.aggregate([update], global_tensors)

    # centralised: plain torch on the same data, full batch
    central = task.build_model()
    opt = make_torch_optimizer(central.parameters())
    for _ in range(STEPS):
        opt.zero_grad()
        F.cross_entropy(central(features), labels).backward()
        opt.step()

    for (name, got), want in zip(
        client_model.state_dict().items(), central.state_dict().values(), strict=True
    ):
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6, msg=name)
    first = "0.weight"
    assert not torch.equal(central.state_dict()[first], task.build_model().state_dict()[first])
