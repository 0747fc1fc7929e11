"""Weights in (`fedstream server --init-weights`) and a plain model out (`fedstream
export`), through the CLI a user types, with real server and client processes."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import torch
from safetensors.torch import load_file, save_file

from fedstream.cli import main
from fedstream.common.checkpoint import load_checkpoint, read_checkpoint_metadata
from fedstream.common.weights import file_sha256
from fedstream.tasks import load_task

pytestmark = pytest.mark.e2e

ROUNDS = 2


def metrics(run_dir: Path) -> list[dict]:
    path = run_dir / "metrics.jsonl"
    if not path.exists():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def fedstream(*args: str, cwd: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "fedstream", *args],
        cwd=cwd,
        capture_output=True,
        text=True,
        timeout=120,
    )


def digits_eval(state: dict[str, torch.Tensor]) -> dict[str, float]:
    """The coordinator's evaluation of `state` in a digits model, loaded strictly."""
    task = load_task("digits")
    model = task.build_model()
    model.load_state_dict(state, strict=True)
    result = task.evaluate(model)
    assert result is not None
    return result.metrics


def federate(procs, free_port, *server_args: str) -> Path:
    """A digits run of ROUNDS rounds with two clients; its run directory."""
    address = f"127.0.0.1:{free_port()}"
    procs(
        "server",
        "server", "--address", address, "--run-dir", "run", "--rounds", str(ROUNDS),
        "--task", "digits", "--done-grace", "15", "--threads", "1", *server_args,
    )  # fmt: skip
    for i in range(2):
        procs(
            f"client-{i}",
            "client", "--server", address, "--task", "digits", "--partition", str(i),
            "--num-partitions", "2", "--threads", "1", "--max-backoff", "1",
        )  # fmt: skip
    assert set(procs.wait_all(180).values()) == {0}
    return procs.workdir / "run"


def start_from(procs, wait_for, free_port, name: str, weights: Path) -> tuple[Path, Any]:
    """A server started from `weights`, once it has written round 0; (run dir, process)."""
    run = procs.workdir / name
    server = procs(
        name,
        "server", "--address", f"127.0.0.1:{free_port()}", "--run-dir", name,
        "--task", "digits", "--threads", "1", "--init-weights", str(weights),
    )  # fmt: skip
    wait_for(lambda: metrics(run), 60, f"{name}'s round 0", alive=[server])
    return run, server


@pytest.mark.parametrize("strategy", ["fedavg", "fedadam"])
def test_export_loads_strictly_and_scores_as_the_last_round(
    procs, free_port, wait_for, monkeypatch: pytest.MonkeyPatch, strategy: str
) -> None:
    run = federate(procs, free_port, "--strategy", strategy)
    history = metrics(run)
    assert [r["round"] for r in history] == list(range(1, ROUNDS + 1))
    last = history[-1]
    checkpoint = run / "checkpoints" / f"round_{ROUNDS:05d}.safetensors"
    raw, _ = load_checkpoint(checkpoint)
    if strategy == "fedadam":  # the optimiser's moments: why a plain load_state_dict fails
        assert any(name.startswith("strategy/") for name in raw)

    done = fedstream("export", "run", "--out", "model.safetensors", cwd=procs.workdir)
    assert done.returncode == 0, done.stderr
    assert f"round {ROUNDS} of run -> model.safetensors" in done.stdout
    monkeypatch.chdir(procs.workdir)  # the other exports in this process: the same main()
    assert main(["export", "run", "--out", "model.pt"]) == 0
    for out in ("model.safetensors", "model.pt"):
        path = procs.workdir / out
        state = load_file(path) if out.endswith(".safetensors") else torch.load(path)
        scored = digits_eval(state)
        print(f"{strategy} {out}: {scored}; round {ROUNDS}: {last['eval_loss']}")
        assert scored["loss"] == pytest.approx(last["eval_loss"], rel=1e-6)
        assert scored["accuracy"] == pytest.approx(last["eval_accuracy"], rel=1e-6)

    assert main(["export", "run", "--round", "1", "--out", "r1.pt"]) == 0
    scored = digits_eval(torch.load(procs.workdir / "r1.pt"))
    assert scored["loss"] == pytest.approx(history[0]["eval_loss"], rel=1e-6)

    if strategy == "fedadam":  # the third format: another run's round checkpoint
        again, server = start_from(procs, wait_for, free_port, "from-checkpoint", checkpoint)
        (start,) = metrics(again)
        assert start["round"] == 0
        assert start["eval_loss"] == pytest.approx(last["eval_loss"], rel=1e-6)
        assert start["init_sha256"] == file_sha256(checkpoint)
        server.stop()


def test_init_weights_from_torch_save_and_safetensors_then_resume_skips_round_0(
    procs, free_port, wait_for
) -> None:
    task = load_task("digits", seed=7)  # not the run's seed: other weights than its own
    state = {k: v.contiguous() for k, v in task.build_model().state_dict().items()}
    expected = digits_eval(state)
    torch.save(state, procs.workdir / "start.pt")
    save_file(state, procs.workdir / "start.safetensors")

    for source in ("start.pt", "start.safetensors"):
        path = procs.workdir / source
        run, server = start_from(procs, wait_for, free_port, f"run-{source}", path)
        (record,) = metrics(run)
        print(f"round 0 from {source}: {record}")
        assert record["round"] == 0
        assert record["eval_loss"] == pytest.approx(expected["loss"], rel=1e-6)
        assert record["init_weights"] == str(path.resolve())
        assert record["init_sha256"] == file_sha256(path)
        round_0 = run / "checkpoints" / "round_00000.safetensors"
        saved, meta = load_checkpoint(round_0)
        assert meta["init_sha256"] == file_sha256(path)
        assert all(torch.equal(saved[k], state[k]) for k in state)
        assert server.stop() == 0

    # Resumed, the run does not evaluate round 0 again: its one record stays as it was.
    run = procs.workdir / "run-start.pt"
    before = metrics(run)
    resumed = procs(
        "resumed",
        "server", "--address", f"127.0.0.1:{free_port()}", "--run-dir", "run-start.pt",
        "--task", "digits", "--threads", "1", "--init-weights", "start.pt",
    )  # fmt: skip
    wait_for(lambda: "waiting for clients" in resumed.log(), 60, "the resumed server to wait")
    assert "resumed" in resumed.log() and "round 0 (starting weights)" not in resumed.log()
    assert metrics(run) == before
    assert read_checkpoint_metadata(run / "checkpoints" / "round_00000.safetensors")[
        "init_sha256"
    ] == file_sha256(procs.workdir / "start.pt")
    assert resumed.stop() == 0


def test_init_weights_of_another_layout_is_refused_naming_the_tensor(tmp_path: Path) -> None:
    other = load_task("digits", {"hidden": "64"}).build_model().state_dict()
    torch.save(other, tmp_path / "small.pt")
    done = fedstream(
        "server", "--address", "127.0.0.1:0", "--run-dir", "run", "--task", "digits",
        "--init-weights", "small.pt", cwd=tmp_path,
    )  # fmt: skip
    print(done.stderr)
    assert done.returncode == 2
    assert done.stderr.count("\n") == 1 and "Traceback" not in done.stderr
    assert done.stderr.startswith("fedstream server: --init-weights small.pt: tensor '0.weight'")
    assert "float32 (64, 64); the model's is float32 (128, 64)" in done.stderr


def test_a_bad_task_option_is_one_line_and_exit_2(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.chdir(tmp_path)
    argv = ["server", "--address", "127.0.0.1:0", "--task", "digits", "--task-opt"]
    assert main([*argv, "hidden=banana"]) == 2
    assert capsys.readouterr().err == (
        "fedstream server: task digits option hidden='banana' is not an integer\n"
    )
