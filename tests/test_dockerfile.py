"""The Docker build context holds everything the Dockerfile copies.

`docker-compose config -q` validates the compose file but never builds the image, so a
path the Dockerfile copies and `.dockerignore` leaves out (`tasks/` once) only fails at
`docker build`. This reads both files the way Docker does and compares.
"""

from __future__ import annotations

import fnmatch
import shlex
import subprocess
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def copied_sources(dockerfile: str) -> list[str]:
    """The source paths of every COPY/ADD from the build context (not `--from=` copies)."""
    sources: list[str] = []
    for line in dockerfile.splitlines():
        if line.split(maxsplit=1)[:1] not in (["COPY"], ["ADD"]):
            continue
        words = shlex.split(line, comments=True)
        args = [w for w in words[1:] if not w.startswith("--")]
        if any(w.startswith("--from") for w in words[1:]):
            continue
        sources.extend(args[:-1])
    return sources


def ignore_rules(text: str) -> list[tuple[bool, str]]:
    """(excluded, pattern) per line of a .dockerignore; later rules win."""
    rules = []
    for raw in text.splitlines():
        line = raw.strip()
        if not line or line.startswith("#"):
            continue
        negated = line.startswith("!")
        pattern = line.lstrip("!").strip("/")
        rules.append((not negated, pattern))
    return rules


def excluded(path: str, rules: list[tuple[bool, str]]) -> bool:
    """Whether Docker leaves `path` out of the build context: the last rule that matches
    the path or one of its parent folders decides."""
    parts = path.split("/")
    prefixes = ["/".join(parts[: i + 1]) for i in range(len(parts))]
    result = False
    for is_excluded, pattern in rules:
        patterns = [pattern, pattern.removeprefix("**/")]
        if any(fnmatch.fnmatchcase(p, pat) for p in prefixes for pat in patterns):
            result = is_excluded
    return result


def test_every_path_the_dockerfile_copies_is_in_the_build_context() -> None:
    rules = ignore_rules((ROOT / ".dockerignore").read_text())
    tracked = subprocess.run(
        ["git", "ls-files"], cwd=ROOT, capture_output=True, text=True, check=True
    ).stdout.split()
    missing = {}
    for source in copied_sources((ROOT / "Dockerfile").read_text()):
        wanted = [f for f in tracked if f == source or f.startswith(source.rstrip("/") + "/")]
        assert wanted, f"the Dockerfile copies {source!r}, which git does not track"
        left_out = [f for f in wanted if f.endswith(".py") and excluded(f, rules)]
        left_out += [f for f in wanted if f == source and excluded(f, rules)]
        if left_out:
            missing[source] = left_out[:3]
    assert not missing, f".dockerignore leaves out what the Dockerfile copies: {missing}"


def test_the_matcher_reads_dockerignore_as_docker_does() -> None:
    rules = ignore_rules("*\n!server/\n**/__pycache__\n")
    assert not excluded("server/daemon.py", rules)
    assert excluded("tasks/digits.py", rules)
    assert excluded("server/__pycache__/x.pyc", rules)
    assert copied_sources("FROM x\nCOPY a b ./\nCOPY --from=y /c /d\nRUN z\n") == ["a", "b"]
