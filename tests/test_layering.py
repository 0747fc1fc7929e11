"""The import structure: `server/` and `client/` meet only in `common/` and `tasks/`."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]

ALLOWED: dict[str, set[str]] = {
    "common": {"common"},
    "tasks": {"tasks", "common"},
    "server": {"server", "common", "tasks"},
    "client": {"client", "common", "tasks"},
}
"""Package -> the fedstream packages its modules may import."""


def fedstream_imports(path: Path) -> set[str]:
    """The fedstream packages (`server`, `client`, ...) that module `path` imports."""
    found: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            names = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            names = [node.module]
        else:
            continue
        for name in names:
            parts = name.split(".")
            if parts[0] == "fedstream" and len(parts) > 1:
                found.add(parts[1])
    return found


@pytest.mark.parametrize("package", sorted(ALLOWED))
def test_package_imports_only_what_it_may(package: str) -> None:
    wrong = {
        str(path.relative_to(ROOT)): sorted(fedstream_imports(path) - ALLOWED[package])
        for path in sorted((ROOT / package).rglob("*.py"))
        if fedstream_imports(path) - ALLOWED[package]
    }
    assert not wrong, f"{package}/ may import only {sorted(ALLOWED[package])}: {wrong}"


def test_the_walk_sees_imports_at_any_depth(tmp_path: Path) -> None:
    module = tmp_path / "m.py"
    module.write_text(
        "import fedstream.common.config\n"
        "def f():\n    from fedstream.client.loop import main\n"
        "from . import sibling\n"
    )
    assert fedstream_imports(module) == {"common", "client"}


def test_a_users_task_can_still_subclass_fedstream_client_task() -> None:
    import fedstream.client
    import fedstream.tasks

    assert fedstream.client.Task is fedstream.tasks.Task
    assert fedstream.client.TrainResult is fedstream.tasks.TrainResult
