"""The built-in tasks: data splits, determinism, and that FedAvg actually learns with them."""

from __future__ import annotations

import math
from collections.abc import Mapping

import numpy as np
import pytest
import torch

from fedstream.tasks import ConfigScalar, EvalResult, Task, TaskError, load_task
from fedstream.tasks.charlm import CharLMTask
from fedstream.tasks.digits import DigitsTask, dirichlet_partition
from fedstream.tasks.synthetic import SyntheticTask

SMALL_SYNTHETIC = {"params": "20000", "layers": "2"}


def fedavg(
    name: str,
    num_clients: int,
    rounds: int,
    seed: int = 0,
    config: Mapping[str, ConfigScalar] | None = None,
) -> list[EvalResult]:
    """Plain FedAvg in one process: held-out results of the initial and each round's model.

    Each round every client starts from the global weights and trains; the new global
    model is the average of the clients' weights, weighted by their num_examples.
    """
    server = load_task(name, seed=seed)
    clients = [load_task(name, seed=seed) for _ in range(num_clients)]
    for partition, client in enumerate(clients):
        client.load_data(partition, num_clients)
    model = server.build_model()
    results = [evaluated(server, model)]
    for round_ in range(rounds):
        states, weights = [], []
        for client in clients:
            local = client.build_model()
            local.load_state_dict(model.state_dict())
            result = client.train(local, {**(config or {}), "round": round_})
            states.append(local.state_dict())
            weights.append(result.num_examples)
        shares = [w / sum(weights) for w in weights]
        model.load_state_dict(
            {k: sum(s[k] * w for s, w in zip(states, shares, strict=True)) for k in states[0]}
        )
        results.append(evaluated(server, model))
    return results


def evaluated(task: Task, model: torch.nn.Module) -> EvalResult:
    result = task.evaluate(model)
    assert result is not None
    return result


def distance(model: torch.nn.Module, start: Mapping[str, torch.Tensor]) -> float:
    return math.sqrt(sum((p - start[k]).pow(2).sum().item() for k, p in model.state_dict().items()))


@pytest.mark.parametrize(
    ("name", "cls", "option"),
    [
        ("digits", DigitsTask, "alpha"),
        ("charlm", CharLMTask, "dropout"),
        ("synthetic", SyntheticTask, "params"),
    ],
)
def test_builtin_tasks_resolve_by_short_name(name: str, cls: type[Task], option: str) -> None:
    task = load_task(name, {option: "0.3" if option != "params" else "3e4"}, seed=7)
    assert type(task) is cls
    assert task.seed == 7


@pytest.mark.parametrize("num_partitions", [1, 3, 10])
def test_digits_partitions_are_disjoint_cover_everything_and_agree(num_partitions: int) -> None:
    parts = DigitsTask(seed=3).partition_indices(num_partitions)
    again = DigitsTask(seed=3).partition_indices(num_partitions)
    assert len(parts) == num_partitions
    assert all(len(part) > 0 for part in parts)
    everything = np.sort(np.concatenate(parts))
    np.testing.assert_array_equal(everything, np.arange(len(everything)))  # disjoint, covering
    assert len(everything) == 1437  # 80% of the 1797 digits
    for mine, theirs in zip(parts, again, strict=True):
        np.testing.assert_array_equal(mine, theirs)


def test_digits_partition_seed_option_changes_the_split() -> None:
    default = DigitsTask(seed=0).partition_indices(3)
    reseeded = DigitsTask({"partition_seed": "5"}, seed=0).partition_indices(3)
    same_as_seed_5 = DigitsTask(seed=5).partition_indices(3)
    assert any(len(a) != len(b) or (a != b).any() for a, b in zip(default, reseeded, strict=True))
    for a, b in zip(reseeded, same_as_seed_5, strict=True):
        np.testing.assert_array_equal(a, b)


def test_dirichlet_partition_fixes_up_empty_partitions() -> None:
    labels = np.repeat(np.arange(10), 10)
    parts = dirichlet_partition(labels, 60, alpha=0.01, seed=0)
    assert all(len(part) > 0 for part in parts)
    np.testing.assert_array_equal(np.sort(np.concatenate(parts)), np.arange(100))
    with pytest.raises(TaskError):
        dirichlet_partition(labels, 101, alpha=0.5, seed=0)


@pytest.mark.parametrize(
    ("name", "options"), [("digits", {}), ("charlm", {}), ("synthetic", SMALL_SYNTHETIC)]
)
def test_build_model_is_deterministic_and_leaves_global_rng_alone(
    name: str, options: dict[str, str]
) -> None:
    rng_before = torch.get_rng_state()
    first = load_task(name, options, seed=1).build_model().state_dict()
    second = load_task(name, options, seed=1).build_model().state_dict()
    other = load_task(name, options, seed=2).build_model().state_dict()
    assert torch.equal(torch.get_rng_state(), rng_before)
    assert list(first) == list(second) == list(other)
    assert all(torch.equal(first[k], second[k]) for k in first)
    assert not all(torch.equal(first[k], other[k]) for k in first)


@pytest.mark.slow
@pytest.mark.parametrize("seed", [0, 1, 2])
def test_digits_fedavg_three_non_iid_clients_learn_in_five_rounds(seed: int) -> None:
    results = fedavg("digits", num_clients=3, rounds=5, seed=seed)
    accuracies = [round(r.metrics["accuracy"], 3) for r in results]
    print(f"digits seed {seed} held-out accuracy by round: {accuracies}")
    assert all(r.num_examples == 360 for r in results)
    assert accuracies[-1] >= 0.85


def test_digits_train_is_repeatable_per_round_and_reports_its_partition() -> None:
    task = DigitsTask(seed=0)
    task.load_data(1, 3)
    start = task.build_model()

    def trained(round_: int) -> dict[str, torch.Tensor]:
        model = task.build_model()
        model.load_state_dict(start.state_dict())
        result = task.train(model, {"round": round_, "local_epochs": 1})
        share = len(task.partition_indices(3)[1])
        assert result.num_examples == share - int(share * 0.2)  # less the local held-out
        assert set(result.metrics) == {"loss", "accuracy"}
        return model.state_dict()

    first, again, later = trained(4), trained(4), trained(5)
    assert all(torch.equal(first[k], again[k]) for k in first)
    assert not all(torch.equal(first[k], later[k]) for k in first)


def test_digits_proximal_term_keeps_weights_near_the_start() -> None:
    task = DigitsTask(seed=0)
    task.load_data(0, 3)
    start = task.build_model().state_dict()
    drift = {}
    for mu in (0.0, 0.5):
        model = task.build_model()
        task.train(model, {"proximal_mu": mu})
        drift[mu] = distance(model, start)
    assert drift[0.5] < 0.5 * drift[0.0]


@pytest.mark.parametrize("cls", [DigitsTask, CharLMTask])
def test_evaluate_is_deterministic_and_restores_the_mode(cls: type[Task]) -> None:
    task = cls()
    model = task.build_model()
    for training in (True, False):
        model.train(training)
        first, second = evaluated(task, model), evaluated(task, model)
        assert first == second
        assert model.training is training


def test_train_before_load_data_is_an_error() -> None:
    for task in (DigitsTask(), CharLMTask()):
        with pytest.raises(TaskError, match="load_data"):
            task.train(task.build_model(), {})


def test_charlm_partitions_are_by_topic_and_bounded() -> None:
    task = CharLMTask()
    with pytest.raises(TaskError):
        task.load_data(0, 72)  # 79 topics, 8 held out: at most 71 partitions
    task.load_data(70, 71)
    with pytest.raises(TaskError):
        task.load_data(3, 3)


@pytest.mark.slow
def test_charlm_fedavg_lowers_held_out_loss() -> None:
    losses = [r.metrics["loss"] for r in fedavg("charlm", num_clients=2, rounds=2)]
    print(f"charlm held-out loss by round: {[round(loss, 3) for loss in losses]}")
    assert losses[0] == pytest.approx(math.log(256), abs=0.1)  # a fresh model knows nothing
    assert losses[0] > losses[1] > losses[2]
    assert losses[2] < 3.5


@pytest.mark.parametrize("options", [{"n_embd": "100", "n_head": "3"}, {"block_size": "0"}])
def test_charlm_rejects_bad_model_options(options: dict[str, str]) -> None:
    with pytest.raises(TaskError):
        CharLMTask(options)


@pytest.mark.parametrize("params", ["1e4", "3e5", "2.5e6"])
@pytest.mark.parametrize("layers", ["1", "4", "12"])
def test_synthetic_size_is_within_one_percent(params: str, layers: str) -> None:
    task = SyntheticTask({"params": params, "layers": layers})
    count = sum(math.prod(shape) for shape in task.shapes().values())
    assert abs(count - float(params)) <= 0.01 * float(params)


@pytest.mark.parametrize("dtype", ["float32", "float16", "bfloat16"])
def test_synthetic_model_layout_and_dtype(dtype: str) -> None:
    state = SyntheticTask({**SMALL_SYNTHETIC, "dtype": dtype}).build_model().state_dict()
    assert abs(sum(t.numel() for t in state.values()) - 20000) <= 200
    assert {t.dtype for t in state.values()} == {getattr(torch, dtype)}
    d = state["norm.weight"].shape[0]
    assert state["layers.1.attn.qkv.weight"].shape == (3 * d, d)
    assert state["layers.1.mlp.down.weight"].shape == (d, 4 * d)
    assert set(state) == {"embedding.weight", "norm.weight"} | {
        f"layers.{i}.{name}.weight"
        for i in range(2)
        for name in ("attn.qkv", "attn.proj", "mlp.up", "mlp.down", "norm1", "norm2")
    }


def test_synthetic_single_tensor_and_zeros() -> None:
    state = SyntheticTask({"params": "12345", "single_tensor": "1", "init": "zeros"}).build_model()
    tensors = list(state.state_dict().values())
    assert len(tensors) == 1
    assert tensors[0].shape == (12345,)
    assert not tensors[0].any()


def test_synthetic_train_adds_a_per_partition_constant() -> None:
    task = SyntheticTask({**SMALL_SYNTHETIC, "dtype": "float32"})
    task.load_data(2, 4)
    model = task.build_model()
    start = {k: v.clone() for k, v in model.state_dict().items()}
    result = task.train(model, {"lr": 0.5, "round": 1})
    assert result.num_examples == 300
    assert result.metrics["loss"] == pytest.approx(0.25)
    assert all(torch.allclose(t, start[k] + 1.5) for k, t in model.state_dict().items())
    assert task.evaluate(model) is None


@pytest.mark.parametrize(
    "options", [{"dtype": "int8"}, {"init": "normal"}, {"params": "0"}, {"layers": "0"}]
)
def test_synthetic_rejects_bad_options(options: dict[str, str]) -> None:
    with pytest.raises(TaskError):
        SyntheticTask(options).shapes()


def test_digits_keeps_a_local_held_out_fifth_out_of_training() -> None:
    task = DigitsTask({}, seed=0)
    task.load_data(1, 3)
    assert task._data is not None and task._local_heldout is not None
    train_x, _ = task._data
    held_x, _ = task._local_heldout
    share = len(task.partition_indices(3)[1])
    assert len(held_x) == int(share * 0.2) and len(train_x) + len(held_x) == share
    rows = {tuple(r.tolist()) for r in train_x}
    assert not any(tuple(r.tolist()) in rows for r in held_x[:20])
    result = task.evaluate_local(task.build_model())
    assert result is not None and result.num_examples == len(held_x)
    assert 0.0 <= result.metrics["accuracy"] <= 1.0


@pytest.mark.parametrize(("name", "options"), [("digits", {}), ("charlm", {"n_embd": "32"})])
def test_compute_gradient_leaves_weights_alone_and_fills_every_grad(name, options) -> None:
    task = load_task(name, options, seed=0)
    task.load_data(0, 2)
    model = task.build_model()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    result = task.compute_gradient(model, {"local_steps": 2, "batch_size": 4, "round": 1})
    assert result.num_examples > 0 and result.metrics["loss"] > 0
    for key, value in model.state_dict().items():
        assert torch.equal(value, before[key])
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in model.parameters())
