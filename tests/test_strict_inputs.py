"""Bad input typed on the command line ends the process at once with exit 2 and one
line naming what is wrong, as real processes of the `fedstream` console script."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from fedstream.common.checkpoint import save_checkpoint

pytestmark = pytest.mark.e2e  # every test here starts real fedstream processes


def fedstream(*argv: str, cwd: Path, timeout: float = 120) -> subprocess.CompletedProcess[str]:
    script = Path(sys.executable).with_name("fedstream")
    found = str(script) if script.exists() else shutil.which("fedstream")
    assert found, "the `fedstream` console script is not installed (pip install -e .)"
    env = {k: v for k, v in os.environ.items() if not k.startswith("FEDSTREAM_")}
    return subprocess.run(
        [found, *argv], capture_output=True, text=True, timeout=timeout, cwd=cwd, env=env
    )


def one_line(result: subprocess.CompletedProcess[str], command: str) -> str:
    assert result.returncode == 2, (result.stdout, result.stderr)
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, result.stderr
    assert lines[0].startswith(f"fedstream {command}: "), lines[0]
    return lines[0]


SERVER = ("server", "--address", "127.0.0.1:0", "--run-dir", "run")


def test_an_unknown_task_option_stops_the_server(tmp_path: Path) -> None:
    line = one_line(fedstream(*SERVER, "--task-opt", "hiddn=64", cwd=tmp_path), "server")
    assert line.endswith(
        "task digits has no option 'hiddn': known options are alpha, hidden, partition_seed"
    )
    assert not (tmp_path / "run").exists()


def test_an_unknown_task_option_stops_the_client(tmp_path: Path) -> None:
    result = fedstream("client", "--task", "charlm", "--task-opt", "n_layers=1", cwd=tmp_path)
    assert "task charlm has no option 'n_layers': known options are" in one_line(result, "client")


def test_a_round_config_value_of_the_wrong_type_stops_the_server_before_it_listens(
    tmp_path: Path,
) -> None:
    result = fedstream(*SERVER, "--round-config", "lr=abc", cwd=tmp_path)
    line = one_line(result, "server")
    assert line.endswith("--round-config: task digits setting lr='abc' is not a number")
    assert not (tmp_path / "run" / "coordinator.json").exists()
    result = fedstream(*SERVER, "--round-config", "epochs=3", cwd=tmp_path)
    assert "has no setting 'epochs': known settings are batch_size, local_epochs" in one_line(
        result, "server"
    )


@pytest.mark.parametrize("command", ["server", "client"])
def test_help_task_lists_the_options_and_exits_0(command: str, tmp_path: Path) -> None:
    result = fedstream(command, "--task", "synthetic", "--help-task", cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    assert "task synthetic options (--task-opt KEY=VALUE):" in result.stdout
    assert "params" in result.stdout and "integer, default 1000000" in result.stdout
    assert "task synthetic round settings (--round-config KEY=VALUE):" in result.stdout


@pytest.mark.skipif(torch.cuda.is_available(), reason="this torch has CUDA and a device")
def test_device_cuda_without_cuda_is_one_line(tmp_path: Path) -> None:
    line = one_line(fedstream("client", "--device", "cuda", cwd=tmp_path), "client")
    if torch.version.cuda is None:
        assert "device cuda: this torch" in line and "is built without CUDA" in line
    else:
        assert "device cuda: this machine has 0 CUDA device(s) visible" in line
    assert "not a torch device" in one_line(
        fedstream("client", "--device", "gpu", cwd=tmp_path), "client"
    )


def write_run(run_dir: Path) -> None:
    """A run directory with one digits checkpoint, as the coordinator writes it."""
    from fedstream.server.checkpoints import CHECKPOINT_FORMAT
    from fedstream.tasks import load_task

    model = load_task("digits", {"hidden": "8"}).build_model()
    metadata = {
        "format": CHECKPOINT_FORMAT,
        "round": "1",
        "task": "digits",
        "task_opt": '{"hidden": "8"}',
        "seed": "0",
        "strategy": "fedavg",
        "history": "[]",
    }
    (run_dir / "checkpoints").mkdir(parents=True)
    save_checkpoint(
        run_dir / "checkpoints" / "round_00001.safetensors", model.state_dict(), metadata
    )


def test_export_makes_the_missing_parent_directories(tmp_path: Path) -> None:
    write_run(tmp_path / "run")
    result = fedstream("export", "run", "--out", "missing_dir/deeper/x.pt", cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    state = torch.load(tmp_path / "missing_dir" / "deeper" / "x.pt", weights_only=True)
    assert state["0.weight"].shape == (8, 64)


def test_export_to_a_path_it_cannot_write_is_one_line(tmp_path: Path) -> None:
    write_run(tmp_path / "run")
    (tmp_path / "afile").write_text("")
    result = fedstream("export", "run", "--out", "afile/x.pt", cwd=tmp_path)
    assert "cannot write afile/x.pt" in one_line(result, "export")
