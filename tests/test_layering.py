"""The import structure: `server/` and `client/` meet only in `common/` and `tasks/`; no
import cycle between fedstream modules; inside `server/`, strategies import no transport
and admission alone handles credentials (TLS, tokens)."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PACKAGE_DIRS = {
    "fedstream": ROOT / "fedstream",
    "fedstream.common": ROOT / "common",
    "fedstream.server": ROOT / "server",
    "fedstream.client": ROOT / "client",
    "fedstream.tasks": ROOT / "tasks",
}
"""Import name -> folder (pyproject's package-dir)."""

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


# ---- the import graph --------------------------------------------------------------------


def module_files() -> dict[str, Path]:
    """Every fedstream module by its import name (a package by its own name)."""
    found: dict[str, Path] = {}
    for prefix, folder in PACKAGE_DIRS.items():
        for path in sorted(folder.rglob("*.py")):
            parts = list(path.relative_to(folder).with_suffix("").parts)
            if parts[-1] == "__init__":
                parts.pop()
            name = ".".join([prefix, *parts])
            found.setdefault(name, path)
    return found


def top_level_imports(path: Path) -> set[str]:
    """The modules `path` imports when it is loaded: statements at module level, in `if`
    and `try` blocks too (`if TYPE_CHECKING:` as well), not inside functions."""
    names: set[str] = set()
    pending: list[ast.stmt] = list(ast.parse(path.read_text(), str(path)).body)
    while pending:
        node = pending.pop()
        if isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            names.add(node.module)
            names.update(f"{node.module}.{alias.name}" for alias in node.names)
        elif isinstance(node, ast.If | ast.Try):
            for block in ("body", "orelse", "finalbody", "handlers"):
                for child in getattr(node, block, []):
                    pending.extend(child.body if isinstance(child, ast.ExceptHandler) else [child])
    return names


def import_graph() -> dict[str, set[str]]:
    """Module -> the fedstream modules loading it loads first. Importing `a.b.c` also runs
    the packages `a` and `a.b`, unless the importer is inside them (they are loaded already)."""
    modules = module_files()
    graph: dict[str, set[str]] = {}
    for name, path in modules.items():
        edges: set[str] = set()
        for target in top_level_imports(path):
            parts = target.split(".")
            for end in range(2, len(parts) + 1):
                module = ".".join(parts[:end])
                inside = name == module or name.startswith(module + ".")
                if module in modules and not inside:
                    edges.add(module)
        graph[name] = edges
    return graph


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    """One import cycle of `graph`, as the modules along it, or None."""
    state: dict[str, int] = {}  # 1: on the current path, 2: done
    path: list[str] = []

    def visit(node: str) -> list[str] | None:
        state[node] = 1
        path.append(node)
        for nxt in sorted(graph.get(node, ())):
            if state.get(nxt) == 1:
                return path[path.index(nxt) :] + [nxt]
            if nxt not in state and (cycle := visit(nxt)) is not None:
                return cycle
        path.pop()
        state[node] = 2
        return None

    for node in sorted(graph):
        if node not in state and (cycle := visit(node)) is not None:
            return cycle
    return None


def test_no_import_cycle_between_fedstream_modules() -> None:
    cycle = find_cycle(import_graph())
    assert cycle is None, "import cycle: " + " -> ".join(cycle or [])


def test_the_cycle_walk_finds_a_cycle_through_a_package() -> None:
    graph = {
        "fedstream.server.config": {"fedstream.server.admission"},
        "fedstream.server.admission": {"fedstream.server.admission.door"},
        "fedstream.server.admission.door": {"fedstream.server.config"},
    }
    assert find_cycle(graph) == [
        "fedstream.server.admission",
        "fedstream.server.admission.door",
        "fedstream.server.config",
        "fedstream.server.admission",
    ]
    assert find_cycle({"a": {"b"}, "b": set()}) is None


def test_the_graph_sees_imports_under_if_and_try(tmp_path: Path) -> None:
    module = tmp_path / "m.py"
    module.write_text(
        "from typing import TYPE_CHECKING\n"
        "if TYPE_CHECKING:\n    from fedstream.server.config import ServerConfig\n"
        "try:\n    import fedstream.common.tls\nexcept ImportError:\n    pass\n"
        "def f():\n    import fedstream.client.loop\n"
    )
    found = top_level_imports(module)
    assert {"fedstream.server.config", "fedstream.common.tls"} <= found
    assert "fedstream.client.loop" not in found


# ---- rules inside server/ ----------------------------------------------------------------

TRANSPORT = (
    "grpc",
    "aiohttp",
    "fedstream.common.service",
    "fedstream.common.wire.framing",
    "fedstream.server.admission",
    "fedstream.server.daemon",
    "fedstream.server.servicer",
    "fedstream.server.intake",
    "fedstream.server.spool",
    "fedstream.server.transfer",
    "fedstream.server.status_server",
    "fedstream.server.live_state",
    "fedstream.server.coordinator",
    "fedstream.server.assembly",
)
"""What a strategy must not import: the network, and the parts of the coordinator that
move bytes or hold sessions. A strategy sees verified updates (`server/updates.py`)."""

CREDENTIALS = ("fedstream.common.tls", "fedstream.common.tokens", "grpc.ssl_server_credentials")
"""Who may handle credentials in server/: server/admission/ alone."""


def all_imports(path: Path) -> set[str]:
    """Every module (and `module.name`) that `path` imports, at any depth."""
    names: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            names.add(node.module)
            names.update(f"{node.module}.{alias.name}" for alias in node.names)
        elif isinstance(node, ast.Attribute) and isinstance(node.value, ast.Name):
            names.add(f"{node.value.id}.{node.attr}")  # grpc.ssl_server_credentials(...)
    return names


def matching(names: set[str], prefixes: tuple[str, ...]) -> list[str]:
    return sorted(n for n in names if any(n == p or n.startswith(p + ".") for p in prefixes))


def test_strategies_import_no_transport() -> None:
    wrong = {
        str(path.relative_to(ROOT)): found
        for path in sorted((ROOT / "server" / "strategies").rglob("*.py"))
        if (found := matching(all_imports(path), TRANSPORT))
    }
    assert not wrong, f"server/strategies/ imports transport: {wrong}"


def test_admission_alone_handles_credentials_in_the_server() -> None:
    admission = ROOT / "server" / "admission"
    wrong = {
        str(path.relative_to(ROOT)): found
        for path in sorted((ROOT / "server").rglob("*.py"))
        if admission not in path.parents and (found := matching(all_imports(path), CREDENTIALS))
    }
    assert not wrong, f"only server/admission/ may handle TLS and tokens: {wrong}"
    assert matching(all_imports(admission / "door.py"), CREDENTIALS)  # the walk sees them


def test_the_server_rules_see_what_they_look_for(tmp_path: Path) -> None:
    module = tmp_path / "m.py"
    module.write_text(
        "import grpc\n"
        "from fedstream.common.tokens import load_tokens\n"
        "def f():\n    return grpc.ssl_server_credentials([])\n"
    )
    found = all_imports(module)
    assert matching(found, TRANSPORT) == ["grpc", "grpc.ssl_server_credentials"]
    assert matching(found, CREDENTIALS) == [
        "fedstream.common.tokens",
        "fedstream.common.tokens.load_tokens",
        "grpc.ssl_server_credentials",
    ]
