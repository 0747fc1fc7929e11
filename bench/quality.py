"""Learning quality: each strategy against centralised training on the pooled data.

    python bench/quality.py [--out report] [--digits-rounds 20] [--charlm-rounds 5]

Federated rounds run in this one process through the real Strategy classes (built from a
ServerConfig, exactly as the coordinator builds them) and the real built-in task code,
with no gRPC in between: the wire is tested elsewhere, this measures the learning. Each
round every client starts from the global weights, trains (or computes its gradient, for
FedSGD), and its update is handed to the strategy as the coordinator hands a verified
one (`accept`, block by block); `aggregate` makes the next global model, which the task's
held-out split scores.

The centralised baseline trains one model on the union of the clients' training data
with the same optimiser, the same round config, and the same number of local steps per
round (digits: `local_epochs` passes; charlm: `local_steps` batches).

Writes OUT/quality.md (the table) and OUT/quality.png (the curves).
"""

from __future__ import annotations

import argparse
import time
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from fedstream.server.config import ServerConfig
from fedstream.server.strategies import DeltaBlock
from fedstream.server.strategies.build import build_strategy
from fedstream.server.updates import VerifiedUpdate
from fedstream.tasks import EvalResult, Task, load_task


@dataclass
class Setting:
    """One federated problem: a task, its split, and its round config."""

    task: str
    clients: int
    rounds: int
    metric: str
    task_opt: dict[str, str] = field(default_factory=dict)
    round_config: dict[str, Any] = field(default_factory=dict)


STRATEGIES: dict[str, dict[str, Any]] = {
    "mean": {"strategy": "mean"},
    "fedavg": {"strategy": "fedavg"},
    "fedprox (mu=0.01)": {"strategy": "fedavg", "proximal_mu": 0.01},
    "fedavgm": {"strategy": "fedavgm", "server_lr": 1.0, "server_momentum": 0.7},
    "fedadam": {"strategy": "fedadam", "server_lr": 0.03},
    "fedyogi": {"strategy": "fedyogi", "server_lr": 0.03},
    "fedadagrad": {"strategy": "fedadagrad", "server_lr": 0.03},
    "fedsgd (adam)": {"strategy": "fedsgd", "server_optimizer": "adam", "server_lr": 0.01},
}
"""Label -> ServerConfig fields for that run. The same for both tasks; the server
momentum and learning rates were picked by a small sweep on digits, seed 0 (FedAvgM momentum
0.7 / 0.8 / 0.9, adaptive lr 0.01 / 0.03 / 0.1), which flatters them a little."""


def exchanged(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """The floating-point state tensors, sharing storage with the model (as the coordinator)."""
    return {k: v for k, v in model.state_dict().items() if v.is_floating_point()}


def update_blocks(
    local: torch.nn.Module, global_tensors: Mapping[str, torch.Tensor], gradient: bool
) -> list[DeltaBlock]:
    """What a client uploads: local - global, or each parameter's gradient (FedSGD)."""
    if gradient:
        params = dict(local.named_parameters())
        grads = {n: params[n].grad for n in global_tensors}
        return [
            DeltaBlock(n, 0, (torch.zeros_like(global_tensors[n]) if g is None else g).reshape(-1))
            for n, g in grads.items()
        ]
    state = local.state_dict()
    return [DeltaBlock(n, 0, (state[n] - g).reshape(-1)) for n, g in global_tensors.items()]


def score(task: Task, model: torch.nn.Module, metric: str) -> float:
    result: EvalResult | None = task.evaluate(model)
    assert result is not None
    return result.metrics[metric]


def federated(setting: Setting, flags: Mapping[str, Any], seed: int) -> list[float]:
    """The held-out metric after each round of one federated run."""
    config = ServerConfig(strategy=flags["strategy"], seed=seed)
    for key, value in flags.items():
        setattr(config, key, value)
    config.validate()
    strategy = build_strategy(config)
    server = load_task(setting.task, setting.task_opt, seed)
    clients = [load_task(setting.task, setting.task_opt, seed) for _ in range(setting.clients)]
    for partition, client in enumerate(clients):
        client.load_data(partition, setting.clients)
    model = server.build_model()
    global_tensors = exchanged(model)
    base = dict(setting.round_config)
    if config.proximal_mu:
        base["proximal_mu"] = config.proximal_mu
    curve = []
    for round_number in range(1, setting.rounds + 1):
        round_config = strategy.configure_round(round_number, base)
        gradient = round_config.get("mode") == "gradient"
        strategy.begin_round(global_tensors)
        updates = []
        for k, client in enumerate(clients):
            local = client.build_model()
            local.load_state_dict(model.state_dict())
            if gradient:
                result = client.compute_gradient(local, round_config)
            else:
                result = client.train(local, round_config)
            update = VerifiedUpdate.in_memory(
                f"client-{k}", result.num_examples, update_blocks(local, global_tensors, gradient)
            )
            strategy.accept(update)
            if not strategy.holds_updates:
                update.release()
            updates.append(update)
        with torch.no_grad():
            strategy.aggregate(updates, global_tensors)
        curve.append(score(server, model, setting.metric))
    return curve


def pooled_task(setting: Setting, seed: int) -> Task:
    """A task holding the union of every client's training data (the built-in tasks keep
    it in `_data` / `_tokens`; the bench reaches in rather than widen the Task API)."""
    parts = [load_task(setting.task, setting.task_opt, seed) for _ in range(setting.clients)]
    for partition, part in enumerate(parts):
        part.load_data(partition, setting.clients)
    pooled = parts[0]
    if setting.task == "digits":
        features = torch.cat([p._data[0] for p in parts])  # type: ignore[attr-defined]
        labels = torch.cat([p._data[1] for p in parts])  # type: ignore[attr-defined]
        pooled._data = (features, labels)  # type: ignore[attr-defined]
    else:
        pooled._tokens = torch.cat([p._tokens for p in parts])  # type: ignore[attr-defined]
    return pooled


def centralised(setting: Setting, seed: int) -> list[float]:
    """The held-out metric after each round of training on the pooled data."""
    task = pooled_task(setting, seed)
    model = task.build_model()
    curve = []
    for round_number in range(1, setting.rounds + 1):
        task.train(model, {**setting.round_config, "round": round_number})
        curve.append(score(task, model, setting.metric))
    return curve


def run_setting(setting: Setting, seed: int) -> dict[str, list[float]]:
    curves = {"centralised": centralised(setting, seed)}
    for label, flags in STRATEGIES.items():
        started = time.monotonic()
        curves[label] = federated(setting, flags, seed)
        print(
            f"{setting.task} {label}: {setting.metric} {curves[label][-1]:.4f} "
            f"({time.monotonic() - started:.0f}s)",
            flush=True,
        )
    return curves


def table(digits: Mapping[str, list[float]], charlm: Mapping[str, list[float]]) -> str:
    base_acc, base_loss = digits["centralised"][-1], charlm["centralised"][-1]
    lines = [
        "| strategy | digits accuracy (final) | vs centralised (points) | digits mean of "
        "last 5 rounds | digits best | charlm loss (final) | vs centralised |",
        "|---|---|---|---|---|---|---|",
    ]
    for label in digits:
        acc, loss = digits[label][-1], charlm[label][-1]
        last5 = sum(digits[label][-5:]) / len(digits[label][-5:])
        lines.append(
            f"| {label} | {100 * acc:.1f}% | {100 * (acc - base_acc):+.1f} | {100 * last5:.1f}% "
            f"| {100 * max(digits[label]):.1f}% | {loss:.3f} | {loss - base_loss:+.3f} |"
        )
    return "\n".join(lines)


def plot(curves: Mapping[str, Mapping[str, list[float]]], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(curves), figsize=(6 * len(curves), 4.5))
    for ax, (title, by_label) in zip(axes, curves.items(), strict=True):
        for label, curve in by_label.items():
            style = {"color": "black", "linewidth": 2.5} if label == "centralised" else {}
            ax.plot(range(1, len(curve) + 1), curve, label=label, **style)
        ax.set_title(title)
        ax.set_xlabel("round")
        ax.grid(alpha=0.3)
    axes[0].legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=Path("report"))
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--digits-rounds", type=int, default=20)
    parser.add_argument("--charlm-rounds", type=int, default=5)
    parser.add_argument("--charlm-steps", type=int, default=20)
    args = parser.parse_args()
    torch.set_num_threads(1)  # the models are small: threads cost more than they give
    digits = Setting(
        "digits", 5, args.digits_rounds, "accuracy", task_opt={"alpha": "0.1"},
        round_config={"lr": 0.1, "local_epochs": 1, "batch_size": 32},
    )  # fmt: skip
    charlm = Setting(
        "charlm", 3, args.charlm_rounds, "loss",
        round_config={"lr": 3e-3, "local_steps": args.charlm_steps, "batch_size": 16},
    )  # fmt: skip
    started = time.monotonic()
    digits_curves = run_setting(digits, args.seed)
    charlm_curves = run_setting(charlm, args.seed)
    args.out.mkdir(parents=True, exist_ok=True)
    text = table(digits_curves, charlm_curves)
    (args.out / "quality.md").write_text(
        "# Learning quality\n\n"
        f"digits: {digits.clients} clients, Dirichlet alpha 0.1 split, {digits.rounds} rounds, "
        f"round config {digits.round_config}. charlm: {charlm.clients} clients (split by "
        f"topic), {charlm.rounds} rounds, round config {charlm.round_config}. Centralised: "
        "the pooled training data, same optimiser and local steps per round. Held-out "
        f"metrics of the coordinator's split; seed {args.seed}. Federated rounds run "
        "in-process through the real Strategy classes and task code (no gRPC).\n\n"
        f"Server hyper-parameters: {STRATEGIES}\n\n{text}\n\n![curves](quality.png)\n"
    )
    plot(
        {"digits: held-out accuracy": digits_curves, "charlm: held-out loss": charlm_curves},
        args.out / "quality.png",
    )
    print(text)
    print(f"wrote {args.out}/quality.md and quality.png in {time.monotonic() - started:.0f}s")


if __name__ == "__main__":
    main()
