"""Each strategy's update against its paper's formula, computed here independently."""

from __future__ import annotations

import argparse

import pytest
import torch

from fedstream.common.config import ConfigError, add_arguments
from fedstream.server.aggregation_config import StrategyConfig
from fedstream.server.config import ServerConfig
from fedstream.server.strategies import (
    STRATEGIES,
    DeltaBlock,
    DiLoCo,
    FedAdagrad,
    FedAdam,
    FedAvg,
    FedAvgM,
    FedSGD,
    FedYogi,
    Mean,
    Strategy,
)
from fedstream.server.strategies.build import build_strategy
from fedstream.server.updates import VerifiedUpdate

ROUNDS = 3
CLIENTS = [("a", 10), ("b", 30), ("c", 5)]


def initial() -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    return {"w": torch.randn(3, 4, generator=g), "b": torch.randn(5, generator=g)}


def update(round_number: int, client: int) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(100 * round_number + client)
    return {"w": torch.randn(3, 4, generator=g), "b": torch.randn(5, generator=g)}


def blocks(update_: dict[str, torch.Tensor], size: int = 3) -> list[DeltaBlock]:
    """The update cut into blocks of `size` elements, the way a spool streams it."""
    out = []
    for name, tensor in update_.items():
        flat = tensor.reshape(-1)
        out += [DeltaBlock(name, s, flat[s : s + size]) for s in range(0, flat.numel(), size)]
    return out


def one_round(strategy: Strategy, model: dict[str, torch.Tensor], r: int) -> None:
    """Round `r` as the coordinator runs it: each update accepted as it arrives, then the
    aggregate of all of them."""
    strategy.begin_round(model)
    updates = [
        VerifiedUpdate.in_memory(name, n, blocks(update(r, k)))
        for k, (name, n) in enumerate(CLIENTS)
    ]
    for verified in updates:
        strategy.accept(verified)
    strategy.aggregate(updates, model)


def run(strategy: Strategy, rounds: int = ROUNDS) -> dict[str, torch.Tensor]:
    model = initial()
    for r in range(rounds):
        one_round(strategy, model, r)
    return model


def weighted_mean(r: int, weights: list[float]) -> dict[str, torch.Tensor]:
    ups = [update(r, k) for k in range(len(CLIENTS))]
    return {
        name: torch.stack([w * u[name] for w, u in zip(weights, ups, strict=True)]).sum(0)
        / sum(weights)
        for name in ups[0]
    }


EXAMPLES = [float(n) for _, n in CLIENTS]


def check(strategy: Strategy, expected: dict[str, torch.Tensor]) -> None:
    got = run(strategy)
    for name in expected:
        torch.testing.assert_close(got[name], expected[name], rtol=1e-5, atol=1e-6)


def test_mean_is_the_unweighted_mean_of_deltas() -> None:
    w = initial()
    for r in range(ROUNDS):
        w = {k: w[k] + weighted_mean(r, [1.0, 1.0, 1.0])[k] for k in w}
    check(Mean(), w)


def test_fedavg_weighs_by_examples() -> None:
    w = initial()
    for r in range(ROUNDS):
        w = {k: w[k] + weighted_mean(r, EXAMPLES)[k] for k in w}
    check(FedAvg(), w)


def test_fedavg_weighs_by_operator_weights_and_unnamed_clients_weigh_one() -> None:
    w = initial()
    for r in range(ROUNDS):
        w = {k: w[k] + weighted_mean(r, [3.0, 0.5, 1.0])[k] for k in w}
    check(FedAvg({"a": 3.0, "b": 0.5}), w)


def test_fedavgm_is_momentum_on_the_mean_delta() -> None:
    lr, beta = 0.7, 0.9
    w, v = initial(), {k: torch.zeros_like(t) for k, t in initial().items()}
    for r in range(ROUNDS):
        d = weighted_mean(r, EXAMPLES)
        v = {k: beta * v[k] + d[k] for k in w}
        w = {k: w[k] + lr * v[k] for k in w}
    check(FedAvgM(lr, beta), w)


def test_diloco_is_nesterov_on_the_outer_gradient() -> None:
    """Algorithm 1 of Douillard et al. (2023) in the paper's own signs: the outer
    gradient g = -delta, PyTorch's Nesterov SGD b = mu b + g, w -= lr (g + mu b)."""
    lr, mu = 0.7, 0.9
    w, b = initial(), {k: torch.zeros_like(t) for k, t in initial().items()}
    for r in range(ROUNDS):
        g = {k: -d for k, d in weighted_mean(r, EXAMPLES).items()}
        b = {k: mu * b[k] + g[k] for k in w}
        w = {k: w[k] - lr * (g[k] + mu * b[k]) for k in w}
    check(DiLoCo(), w)


def test_diloco_matches_torch_nesterov_sgd_and_numbers_stepped_by_hand() -> None:
    """One weight at 1, one client whose delta is +1 every round: by hand, with lr 0.7 and
    mu 0.9, b = -1, -1.9, -2.71 and w = 2.33, 4.227, 6.6343; torch.optim.SGD with
    nesterov=True on the gradient -delta takes the same three steps."""
    strategy, model = DiLoCo(), {"w": torch.tensor([1.0])}
    param = torch.nn.Parameter(torch.tensor([1.0]))
    sgd = torch.optim.SGD([param], lr=0.7, momentum=0.9, nesterov=True)
    for expected in (2.33, 4.227, 6.6343):
        strategy.begin_round(model)
        verified = VerifiedUpdate.in_memory("a", 1, [DeltaBlock("w", 0, torch.tensor([1.0]))])
        strategy.accept(verified)
        strategy.aggregate([verified], model)
        param.grad = torch.tensor([-1.0])
        sgd.step()
        assert model["w"].item() == pytest.approx(expected, abs=1e-5)
        assert param.item() == pytest.approx(expected, abs=1e-5)
    assert strategy.state_tensors()["v/w"].item() == pytest.approx(2.71)


@pytest.mark.parametrize("method", ["adam", "yogi", "adagrad"])
def test_adaptive_methods_follow_reddi_algorithm_2(method: str) -> None:
    lr, b1, b2, tau = 0.05, 0.9, 0.99, 1e-3
    w = initial()
    m = {k: torch.zeros_like(t) for k, t in w.items()}
    v = {k: torch.full_like(t, tau**2) for k, t in w.items()}
    for r in range(ROUNDS):
        d = weighted_mean(r, EXAMPLES)
        for k in w:
            m[k] = b1 * m[k] + (1 - b1) * d[k]
            if method == "adam":
                v[k] = b2 * v[k] + (1 - b2) * d[k] ** 2
            elif method == "yogi":
                v[k] = v[k] - (1 - b2) * d[k] ** 2 * torch.sign(v[k] - d[k] ** 2)
            else:
                v[k] = v[k] + d[k] ** 2
            w[k] = w[k] + lr * m[k] / (torch.sqrt(v[k]) + tau)
    classes: dict[str, type[FedAdam | FedYogi | FedAdagrad]] = {
        "adam": FedAdam,
        "yogi": FedYogi,
        "adagrad": FedAdagrad,
    }
    check(classes[method](lr, b1, b2, tau), w)


def test_fedsgd_sgd_with_momentum_on_the_mean_gradient() -> None:
    lr, mu = 0.1, 0.5
    w, buf = initial(), {k: torch.zeros_like(t) for k, t in initial().items()}
    for r in range(ROUNDS):
        g = weighted_mean(r, EXAMPLES)
        buf = {k: mu * buf[k] + g[k] for k in w}
        w = {k: w[k] - lr * buf[k] for k in w}
    check(FedSGD("sgd", lr, momentum=mu), w)


def test_fedsgd_adam_is_bias_corrected_adam() -> None:
    lr, b1, b2, eps = 0.01, 0.9, 0.999, 1e-8
    w = initial()
    m = {k: torch.zeros_like(t) for k, t in w.items()}
    v = {k: torch.zeros_like(t) for k, t in w.items()}
    for r in range(ROUNDS):
        g, t = weighted_mean(r, EXAMPLES), r + 1
        for k in w:
            m[k] = b1 * m[k] + (1 - b1) * g[k]
            v[k] = b2 * v[k] + (1 - b2) * g[k] ** 2
            w[k] = w[k] - lr * (m[k] / (1 - b1**t)) / (torch.sqrt(v[k] / (1 - b2**t)) + eps)
    check(FedSGD("adam", lr, beta1=b1, beta2=b2, eps=eps), w)


def test_fedsgd_asks_clients_for_gradients() -> None:
    config = FedSGD("sgd", 0.1).configure_round(4, {"lr": 0.5})
    assert config == {"lr": 0.5, "round": 4, "mode": "gradient"}
    assert "mode" not in FedAvg().configure_round(4, {})


@pytest.mark.parametrize("name", sorted(STRATEGIES))
def test_state_survives_a_checkpoint_round_trip_exactly(name: str) -> None:
    """Two rounds, state out and into a fresh strategy, one more: as three in one go."""
    config = ServerConfig(strategy=name, server_momentum=0.5 if name == "fedsgd" else None)
    whole = run(build_strategy(config), rounds=3)

    first = build_strategy(config)
    model = run(first, rounds=2)
    saved = {k: v.clone() for k, v in first.state_tensors().items()}
    second = build_strategy(config)
    second.load_state_tensors(saved)
    one_round(second, model, 2)
    for key in whole:
        assert torch.equal(model[key], whole[key]), key


def test_half_precision_models_sum_in_float32() -> None:
    model = {"h": torch.ones(4, dtype=torch.bfloat16), "d": torch.ones(2, dtype=torch.float64)}
    strategy = FedAvg()
    strategy.begin_round(model)
    assert strategy.running.sums == {}  # allocated by the first update, not before
    whole = [DeltaBlock(name, 0, t.clone()) for name, t in model.items()]
    strategy.accept(VerifiedUpdate.in_memory("a", 3, whole))
    assert strategy.running.sums["h"].dtype == torch.float32
    assert strategy.running.sums["d"].dtype == torch.float64


def test_unknown_strategy_is_a_config_error() -> None:
    with pytest.raises(ConfigError, match="unknown"):
        build_strategy(ServerConfig(strategy="no-such-strategy"))


@pytest.mark.parametrize("weight", ["0", "-1", "nan", "x"])
def test_client_weights_must_be_positive_numbers(weight: str) -> None:
    with pytest.raises(ConfigError, match="client_weight"):
        ServerConfig(client_weight={"a": weight}).validate()


# ---- defaults on the strategy classes ------------------------------------------------

HYPER_PARAMETERS = [
    ("server_lr", "default_lr", "lr"),
    ("server_momentum", "default_momentum", "momentum"),
]
"""Config field, the class attribute that is its default, and the built strategy's attribute."""


def server_help() -> dict[str, str]:
    parser = argparse.ArgumentParser()
    add_arguments(parser, ServerConfig)
    return {action.dest: action.help or "" for action in parser._actions}


def with_default(attribute: str) -> list[str]:
    return [name for name, named in STRATEGIES.items() if hasattr(named.cls, attribute)]


def test_every_strategy_with_a_server_optimiser_declares_its_defaults() -> None:
    assert set(with_default("default_lr")) == {
        "fedsgd",
        "fedavgm",
        "diloco",
        "fedadam",
        "fedyogi",
        "fedadagrad",
    }
    assert set(with_default("default_momentum")) == {"fedsgd", "fedavgm", "diloco"}


@pytest.mark.parametrize(("field", "attribute", "_built"), HYPER_PARAMETERS)
def test_help_names_each_strategys_class_default(field: str, attribute: str, _built: str) -> None:
    listed = server_help()[field].split("(default: ")[1].removesuffix(")")
    named = dict(pair.split(" ") for pair in listed.split(", "))
    assert named == {
        name: f"{getattr(STRATEGIES[name].cls, attribute):g}" for name in with_default(attribute)
    }


def test_strategy_help_lists_every_strategy() -> None:
    text = server_help()["strategy"]
    assert f"One of: {', '.join(STRATEGIES)}." in text


@pytest.mark.parametrize(
    ("name", "field", "attribute", "built"),
    [(name, *hyper) for hyper in HYPER_PARAMETERS for name in with_default(hyper[1])],
)
def test_build_strategy_takes_the_class_default_when_the_flag_is_unset(
    monkeypatch: pytest.MonkeyPatch, name: str, field: str, attribute: str, built: str
) -> None:
    cls = STRATEGIES[name].cls
    strategy = build_strategy(StrategyConfig(strategy=name))
    assert isinstance(strategy, cls)
    assert getattr(strategy, built) == getattr(cls, attribute)

    monkeypatch.setattr(cls, attribute, 0.375)
    assert getattr(build_strategy(StrategyConfig(strategy=name)), built) == 0.375
    given = StrategyConfig(strategy=name)
    setattr(given, field, 0.25)
    assert getattr(build_strategy(given), built) == 0.25


def test_constructors_take_class_defaults_for_none() -> None:
    assert (FedAvgM().lr, FedAvgM().momentum) == (FedAvgM.default_lr, FedAvgM.default_momentum)
    assert FedAvgM(None, 0.5).momentum == 0.5
    assert FedSGD("sgd").lr == FedSGD.default_lr
    assert FedAdam(None, 0.9, 0.99, 1e-3).lr == FedAdam.default_lr
    assert FedYogi(0.2, 0.9, 0.99, 1e-3).lr == 0.2


@pytest.mark.parametrize("name", sorted(STRATEGIES))
def test_each_name_builds_its_class(name: str) -> None:
    assert type(build_strategy(ServerConfig(strategy=name))) is STRATEGIES[name].cls
