"""The everyday commands that make credentials, show a run or scaffold a project start
without importing torch (`python -X importtime` lists every module a command imports)."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import pytest

IMPORTED = re.compile(r"^import time:\s+\d+ \|\s+\d+ \|\s+(\S.*)$")


def imported_modules(args: list[str], cwd: Path) -> set[str]:
    result = subprocess.run(
        [sys.executable, "-X", "importtime", "-m", "fedstream", *args],
        cwd=cwd, capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    found = {
        m.group(1).strip() for line in result.stderr.splitlines() if (m := IMPORTED.match(line))
    }
    assert found, result.stderr[-2000:]
    return found


@pytest.mark.parametrize(
    "args",
    [
        ["--help"],
        ["token", "alice"],
        ["certs", "--out", "certs"],
        ["status", "no-such-run"],
        ["new", "task", "mytask", "--dir", "new"],
    ],
    ids=lambda args: " ".join(args[:1]),
)
def test_command_imports_no_torch(args: list[str], tmp_path: Path) -> None:
    modules = imported_modules(args, tmp_path)
    assert "torch" not in modules
    assert "fedstream.cli" in modules


def test_the_server_command_does_import_torch(tmp_path: Path) -> None:
    """The check can fail: a command that needs torch shows it."""
    assert "torch" in imported_modules(["server", "--help"], tmp_path)


def test_an_unknown_log_level_is_one_line(tmp_path: Path) -> None:
    result = subprocess.run(
        [sys.executable, "-m", "fedstream", "server", "--log-level", "LOUD", "--run-dir", "r"],
        cwd=tmp_path, capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert result.returncode == 2
    assert result.stderr.strip().splitlines() == [
        "fedstream server: log_level 'LOUD' is unknown: use one of DEBUG, INFO, WARNING, "
        "ERROR, CRITICAL"
    ]
