"""The docs: the README stays a signpost, the reference pages are what the code makes, the
site builds in strict mode with no warning, and the map of the tree covers the tree."""

from __future__ import annotations

import ast
import importlib.util
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from fedstream.docs_reference import METRICS_JSONL, main, pages, status_schema

ROOT = Path(__file__).resolve().parents[1]
DOCS = ROOT / "docs"
README_MAX_BYTES = 15_500
PACKAGES = ("fedstream", "common", "server", "client", "tasks")
"""The source folders whose modules the architecture page's map must cover."""


def test_reference_pages_are_what_the_code_makes() -> None:
    expected = pages()
    committed = {p.name for p in (DOCS / "reference").iterdir()}
    assert committed == set(expected), "docs/reference/ holds only generated pages"
    stale = [
        name for name, text in expected.items() if (DOCS / "reference" / name).read_text() != text
    ]
    assert not stale, f"docs/reference/{stale} differ from the code: run `make docs` and commit"


def test_check_mode_tells_a_stale_folder(tmp_path: Path) -> None:
    assert main(["--check", "--out", str(tmp_path)]) == 1
    assert main(["--out", str(tmp_path)]) == 0
    assert main(["--check", "--out", str(tmp_path)]) == 0
    cli = tmp_path / "cli.md"
    cli.write_text(cli.read_text().replace("--min-clients", "--min-client"))
    assert main(["--check", "--out", str(tmp_path)]) == 1


def test_cli_reference_lists_every_boolean_flag() -> None:
    """The README once said "Booleans (none so far)" while six fields were booleans."""
    text = pages()["cli.md"]
    intro = text.split("\n## ")[0]
    for flag in ("--insecure", "--uplink-zstd", "--safeguards", "--watch", "--merge-adapters"):
        assert f"`{flag}`" in intro
        assert f"`{flag}`, `--no-{flag[2:]}`" in text


def _string_literals(folders: tuple[str, ...]) -> set[str]:
    found: set[str] = set()
    for folder in folders:
        for path in (ROOT / folder).rglob("*.py"):
            for node in ast.walk(ast.parse(path.read_text())):
                if isinstance(node, ast.Constant) and isinstance(node.value, str):
                    found.add(node.value)
    return found


def test_metrics_jsonl_keys_are_written_by_the_code() -> None:
    """Each documented key (or the prefix of a `prefix_<metric>` family) is a string the
    coordinator's code holds, and every key the status schema requires is documented."""
    literals = _string_literals(("server", "common"))
    documented = [key for key, _ in METRICS_JSONL]
    missing = [k for k in documented if k.split("<")[0] not in literals]
    assert not missing, f"metrics.jsonl keys documented but not in the code: {missing}"
    required = status_schema()["properties"]["rounds"]["items"]["required"]
    assert set(required) <= set(documented)


def test_prometheus_reference_names_every_metric() -> None:
    text = pages()["prometheus.md"]
    for name in ("fedstream_round_duration_seconds", "fedstream_rejected_updates_total"):
        assert f"`{name}`" in text
    assert "waiting, training, aggregating, evaluating, done" in text


def test_task_options_reference_covers_every_builtin_task() -> None:
    from fedstream.tasks import BUILTIN_TASKS

    text = pages()["task-options.md"]
    for name, path in BUILTIN_TASKS.items():
        assert f"\n## {name}\n" in text and f"`{path}`" in text


def test_readme_is_a_signpost() -> None:
    readme = (ROOT / "README.md").read_text()
    assert len(readme.encode()) <= README_MAX_BYTES, "README.md: move the detail to docs/"
    head = "\n".join(readme.splitlines()[:40])
    assert "make demo" in head and "make test" in head
    links = re.findall(r"\]\(([^)#]+)(?:#[^)]*)?\)", readme)
    local = [link for link in links if "://" not in link]
    assert local, "the README links to the docs pages"
    broken = [link for link in local if not (ROOT / link).exists()]
    assert not broken, f"README.md links to missing files: {broken}"
    linked = {link for link in local if link.startswith("docs/")}
    unlinked = [p for p in ("docs/index.md", "docs/architecture.md") if p not in linked]
    assert not unlinked


def test_docs_cite_no_file_outside_the_project() -> None:
    texts = [(ROOT / "README.md").read_text()] + [p.read_text() for p in DOCS.rglob("*.md")]
    assert not [t for t in texts if "DESIGN" + ".md" in t]


def _map_paths() -> list[str]:
    text = (DOCS / "architecture.md").read_text()
    section = text.split("\n## Where things live\n")[1].split("\n## ")[0]
    return re.findall(r"^\| `([^`]+)` \|", section, flags=re.MULTILINE)


def test_architecture_map_covers_the_tree() -> None:
    """Every module is in "Where things live", and every path there exists (when a module
    moves, update the table)."""
    paths = _map_paths()
    gone = [p for p in paths if not (ROOT / p).exists()]
    assert not gone, f"docs/architecture.md maps paths that do not exist: {gone}"
    folders = tuple(p for p in paths if p.endswith("/"))
    modules = sorted(
        str(path.relative_to(ROOT))
        for package in PACKAGES
        for path in (ROOT / package).rglob("*.py")
        if path.name != "__init__.py"
    )
    unmapped = [m for m in modules if m not in paths and not m.startswith(folders)]
    assert not unmapped, f"docs/architecture.md's map leaves out {unmapped}"


TOP_FOLDERS = "fedstream|common|server|client|tasks|tests|bench|protos|report"
TREE_PATH = re.compile(rf"`((?:{TOP_FOLDERS})/[^`\s]*)`")
"""A path of the tree in backticks: `server/coordinator.py`, `common/codecs/`."""


def test_paths_named_in_the_docs_exist() -> None:
    """A file or folder of the tree named in the README or a docs page is there, so a move
    lists every page to update."""
    named = {
        (page.relative_to(ROOT).as_posix(), path)
        for page in [ROOT / "README.md", *DOCS.rglob("*.md")]
        for path in TREE_PATH.findall(page.read_text())
    }
    assert len(named) > 50
    gone = sorted((page, path) for page, path in named if not (ROOT / path).exists())
    assert not gone, f"docs name paths that do not exist: {gone}"


def _mkdocs_build(config: Path, site: Path) -> subprocess.CompletedProcess[str]:
    if importlib.util.find_spec("mkdocs") is None or importlib.util.find_spec("material") is None:
        pytest.skip("mkdocs and mkdocs-material are not installed: pip install '.[docs]'")
    return subprocess.run(
        [sys.executable, "-m", "mkdocs", "build", "--strict", "-f", str(config), "-d", str(site)],
        capture_output=True,
        text=True,
        timeout=180,
        env={**os.environ, "NO_MKDOCS_2_WARNING": "1"},
    )


def test_site_builds_strict_with_no_warning(tmp_path: Path) -> None:
    result = _mkdocs_build(ROOT / "mkdocs.yml", tmp_path / "site")
    output = result.stdout + result.stderr
    assert result.returncode == 0, output
    assert "WARNING" not in output, output
    for page in ("index.html", "architecture/index.html", "reference/cli/index.html"):
        assert (tmp_path / "site" / page).is_file(), page


def test_strict_build_fails_on_a_broken_link_and_a_page_left_out(tmp_path: Path) -> None:
    """What makes the build above worth passing: the config turns these into failures."""
    shutil.copytree(DOCS, tmp_path / "docs")
    shutil.copy(ROOT / "mkdocs.yml", tmp_path / "mkdocs.yml")
    with (tmp_path / "docs" / "index.md").open("a") as f:
        f.write("\n[gone](no-such-page.md) and [no anchor](running.md#no-such-heading)\n")
    (tmp_path / "docs" / "orphan.md").write_text("# Not in the nav\n")
    result = _mkdocs_build(tmp_path / "mkdocs.yml", tmp_path / "site")
    output = result.stdout + result.stderr
    assert result.returncode != 0
    for named in ("no-such-page.md", "#no-such-heading", "orphan.md"):
        assert named in output, output
