"""`fedstream new task NAME`: the project it makes passes its own test and runs a
two-round federation by the commands it prints."""

from __future__ import annotations

import json
import os
import shlex
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from fedstream.cli import main

pytestmark = pytest.mark.e2e


def as_argv(line: str) -> tuple[dict[str, str], list[str]]:
    """A printed command line as (environment additions, argv) run by this interpreter."""
    words = shlex.split(line)
    env = {}
    while "=" in words[0]:
        key, _, value = words.pop(0).partition("=")
        env[key] = value
    if words[0] == "fedstream":
        words = [sys.executable, "-m", "fedstream", *words[1:]]
    elif words[0] == "python":
        words = [sys.executable, *words[1:]]
    return env, words


def test_the_scaffold_passes_its_test_and_federates_by_its_commands(
    procs, free_port, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.chdir(procs.workdir)
    assert main(["new", "task", "mytask", "--dir", "projects"]) == 0
    shown = capsys.readouterr().out
    print(shown)
    root = procs.workdir / "projects" / "mytask"
    printed = [line.strip() for line in shown.splitlines() if line.startswith("  ")]
    test, server, client_0, client_1, export = printed
    assert server.startswith("PYTHONPATH=. fedstream server --task mytask.task:MytaskTask")

    # As after `make demo`, which installs fedstream without its dev tools: no pytest.
    no_pytest = procs.workdir / "no-pytest"
    no_pytest.mkdir()
    (no_pytest / "pytest.py").write_text(
        "raise ModuleNotFoundError(\"No module named 'pytest'\")\n"
    )
    env, argv = as_argv(test)
    own_test = subprocess.run(
        argv, cwd=root, capture_output=True, text=True, timeout=120,
        env={**os.environ, "PYTHONPATH": str(no_pytest)},
    )  # fmt: skip
    assert own_test.returncode == 0, own_test.stdout + own_test.stderr
    assert "Ran 2 tests" in own_test.stderr and "OK" in own_test.stderr

    # As printed, but on a free port: other tests may be using the default one.
    address = f"127.0.0.1:{free_port()}"
    for name, line, extra in [
        ("server", server, ["--address", address, "--done-grace", "15"]),
        ("client-0", client_0, ["--server", address, "--threads", "1", "--max-backoff", "1"]),
        ("client-1", client_1, ["--server", address, "--threads", "1", "--max-backoff", "1"]),
    ]:
        env, argv = as_argv(line)
        procs.start(name, [*argv, *extra], env=env, cwd=root)
    assert procs.wait_all(180) == {"server": 0, "client-0": 0, "client-1": 0}
    history = [json.loads(line) for line in (root / "runs/mytask/metrics.jsonl").open()]
    print([(r["round"], r["eval_loss"], r["eval_accuracy"]) for r in history])
    assert [r["round"] for r in history] == [1, 2]
    assert all(r["updates"] == 2 for r in history)
    for name in ("client-0", "client-1"):  # a site's own data: no partition in its log
        assert "partition" not in (procs.log_dir / f"{name}.log").read_text()

    env, argv = as_argv(export)  # in this process: PYTHONPATH=. is the project on sys.path
    assert env == {"PYTHONPATH": "."} and argv[1:3] == ["-m", "fedstream"]
    monkeypatch.chdir(root)
    monkeypatch.syspath_prepend(str(root))
    assert main(argv[3:]) == 0
    from mytask.task import MytaskTask  # type: ignore[import-not-found]

    model = MytaskTask().build_model()
    model.load_state_dict(torch.load(root / "mytask.pt"), strict=True)
    scored = MytaskTask({"data": str(root / "data/heldout.csv")}).evaluate(model)
    assert scored is not None
    assert scored.metrics["loss"] == pytest.approx(history[-1]["eval_loss"], rel=1e-6)


def test_a_missing_data_file_is_one_line_and_exit_2(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.chdir(tmp_path)
    assert main(["new", "task", "sitetask"]) == 0
    done = subprocess.run(
        [
            sys.executable, "-m", "fedstream", "client", "--task", "sitetask.task:SitetaskTask",
            "--task-opt", "data=data/nowhere.csv",
        ],
        cwd=tmp_path / "sitetask",
        env={**os.environ, "PYTHONPATH": "."},
        capture_output=True,
        text=True,
        timeout=60,
    )  # fmt: skip
    assert done.returncode == 2
    assert done.stderr == "fedstream client: data file data/nowhere.csv does not exist\n"
