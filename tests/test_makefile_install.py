"""The first `make demo` installs quietly: every pip install of the Makefile's install
recipes is --quiet, and the person waiting is told what is happening instead."""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.skipif(shutil.which("make") is None, reason="needs make")
def test_the_install_recipes_run_pip_quietly_and_say_what_they_do() -> None:
    """`make -n -B` prints the recipes of both install stamps without running them."""
    result = subprocess.run(
        ["make", "-n", "-B", "-C", str(ROOT), ".venv/.installed"],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert result.returncode == 0, result.stderr
    installs = [line for line in result.stdout.splitlines() if "pip install" in line]
    assert len(installs) == 3, result.stdout  # pip itself, the package, the dev tools
    assert all(" --quiet " in line for line in installs), installs
    assert "installing fedstream and its dependencies" in result.stdout
