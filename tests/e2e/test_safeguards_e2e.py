"""Issue #12's done-when, through real processes: digits with 1 malicious client of 3.

The attacker is `bench.robust_attacks:AdversarialDigits` with `--task-opt attack=...`, a
real `fedstream client` that trains honestly and then sends, in every round, the attack
instead of its update. The coordinator and the honest clients run the same class without
the option (plain digits): a Join names its task, and the coordinator wants its own name.

With the safe defaults on, the 1e30 overflow and the constant step claiming 10^12 examples
leave the model at accuracy >= 0.8 after 4 rounds with a finite checkpoint; with
`--no-safeguards` the overflow wrecks it (the failure the defaults exist for).
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

pytestmark = pytest.mark.e2e

TASK = "bench.robust_attacks:AdversarialDigits"
BENCH_DIR = Path(__file__).resolve().parents[2] / "bench"


def bench_path(workdir: Path) -> str:
    """A PYTHONPATH entry holding only bench/ (the repository root would also put the
    source folders server/, client/, common/ on the path as top-level packages)."""
    path = workdir / "pythonpath"
    path.mkdir()
    (path / "bench").symlink_to(BENCH_DIR, target_is_directory=True)
    return str(path)


def run_attack(
    procs, free_port, attack: str, rounds: int, *server_flags: str, clients: int = 3
) -> Path:
    """A coordinator and `clients` clients, the last of them attacking, run to completion;
    the run directory."""
    address = f"127.0.0.1:{free_port()}"
    env = {"PYTHONPATH": bench_path(procs.workdir)}
    common = ["--task", TASK, "--num-partitions", str(clients), "--threads", "1"]
    procs(
        "server",
        "server",
        "--address", address,
        "--run-dir", "run",
        "--rounds", str(rounds),
        "--min-clients", str(clients),
        "--task", TASK,
        "--done-grace", "10",
        "--threads", "1",
        *server_flags,
        env=env,
    )  # fmt: skip
    for partition in range(clients):
        attacking = ["--task-opt", f"attack={attack}"] if partition == clients - 1 else []
        procs(
            f"client-{partition}",
            "client",
            "--server", address,
            "--partition", str(partition),
            "--max-backoff", "1",
            *common,
            *attacking,
            env=env,
        )  # fmt: skip
    assert set(procs.wait_all(240).values()) == {0}
    return procs.workdir / "run"


def metrics(run: Path) -> list[dict]:
    return [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]


def last_checkpoint(run: Path) -> dict[str, torch.Tensor]:
    saved = sorted((run / "checkpoints").glob("round_*.safetensors"))
    assert saved, f"no checkpoint in {run}"
    return load_file(saved[-1])


@pytest.mark.parametrize("attack", ["overflow", "constant"])
def test_safe_defaults_keep_digits_learning_under_attack(procs, free_port, attack):
    run = run_attack(procs, free_port, attack, 4)
    history = metrics(run)
    accuracy = [round(r["eval_accuracy"], 4) for r in history]
    print(f"{attack}: accuracy per round {accuracy}")
    assert [r["round"] for r in history] == [1, 2, 3, 4]
    assert accuracy[-1] >= 0.8
    tensors = last_checkpoint(run)
    assert tensors and all(torch.isfinite(t).all() for t in tensors.values())


def test_without_safeguards_the_overflow_wrecks_the_model(procs, free_port):
    # One honest client and the attacker, one round: the fewest processes that show it.
    run = run_attack(procs, free_port, "overflow", 1, "--no-safeguards", clients=2)
    accuracy = metrics(run)[-1]["eval_accuracy"]
    tensors = last_checkpoint(run)
    finite = all(torch.isfinite(t).all() for t in tensors.values())
    print(f"--no-safeguards, overflow: accuracy {accuracy}, checkpoint finite {finite}")
    assert not finite
    # Chance is 0.1; a non-finite model may score NaN (or null, where JSON has no NaN).
    assert accuracy is None or not accuracy > 0.2
