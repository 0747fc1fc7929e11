"""The command line: its options are frozen here, so none appears or vanishes unnoticed.

Adding, renaming or removing a config field changes a flag, an environment variable and
a TOML key that users and deployments rely on. When that is intended, update the sets
below and run `make docs` (docs/reference/cli.md; tests/test_docs.py checks it) in the
same change.
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from fedstream.cli import COMMANDS, build_parser, main
from fedstream.common.config import component_title, components, field_docs
from fedstream.server.config import ServerConfig

OPTIONS: dict[str, set[str]] = {
    "server": {
        "--config",
        "--address",
        "--run-dir",
        "--rounds",
        "--min-clients",
        "--fraction",
        "--min-reports",
        "--round-timeout",
        "--task",
        "--task-opt",
        "--help-task",
        "--round-config",
        "--uplink-codec",
        "--uplink-zstd",
        "--no-uplink-zstd",
        "--topk-fraction",
        "--round-log-fsync",
        "--no-round-log-fsync",
        "--partial-upload-seconds",
        "--partial-upload-bytes",
        "--seed",
        "--init-weights",
        "--chunk-bytes",
        "--max-chunk-bytes",
        "--poll-timeout",
        "--client-timeout",
        "--stall-timeout",
        "--done-grace",
        "--keep-checkpoints",
        "--spool-dir",
        "--threads",
        "--log-level",
        "--strategy",
        "--client-weight",
        "--server-lr",
        "--server-momentum",
        "--server-optimizer",
        "--beta1",
        "--beta2",
        "--tau",
        "--trim-fraction",
        "--krum-byzantine",
        "--krum-select",
        "--geomedian-iterations",
        "--robust-optimizer",
        "--safeguards",
        "--no-safeguards",
        "--outlier-factor",
        "--max-update-norm",
        "--max-examples",
        "--claim-cap-factor",
        "--clip-factor",
        "--max-round-attempts",
        "--dp-clip",
        "--dp-noise-multiplier",
        "--dp-delta",
        "--proximal-mu",
        "--fragments",
        "--fragment-alpha",
        "--eval-every",
        "--eval-timeout",
        "--min-transfer-rate",
        "--transfer-window",
        "--max-uploads",
        "--heartbeat-seconds",
        "--tls-cert",
        "--tls-key",
        "--client-ca",
        "--tokens",
        "--insecure",
        "--no-insecure",
        "--open-enrolment",
        "--no-open-enrolment",
        "--max-clients",
        "--progress-file",
        "--status-address",
    },
    "client": {
        "--config",
        "--server",
        "--task",
        "--task-opt",
        "--help-task",
        "--partition",
        "--num-partitions",
        "--name",
        "--seed",
        "--device",
        "--threads",
        "--chunk-bytes",
        "--stall-timeout",
        "--max-backoff",
        "--give-up-after",
        "--ca",
        "--cert",
        "--key",
        "--token",
        "--log-level",
        "--nproc-per-node",
        "--max-restarts",
        "--rank-timeout",
        "--site-parallel",
        "--model-dir",
        "--progress-file",
    },
    "demo": {
        "--config",
        "--clients",
        "--rounds",
        "--task",
        "--task-opt",
        "--round-config",
        "--run-dir",
        "--seed",
        "--strategy",
        "--uplink-codec",
        "--server-opt",
        "--timeout",
    },
    "certs": {
        "--config",
        "--out",
        "--server-name",
        "--clients",
        "--keep-existing",
        "--no-keep-existing",
    },
    "status": {"--watch", "--no-watch", "--interval", "--ca", "--cert", "--key"},
    "token": set(),
    "export": {"--round", "--out", "--merge-adapters", "--no-merge-adapters", "--base-model"},
    "new": {"--dir"},
}

HELP_SUFFIX = re.compile(r"\s*\((default: .*|repeatable)\)$")
"""What `add_arguments` appends to a field's documentation."""


def subparsers() -> dict[str, argparse.ArgumentParser]:
    parser = build_parser()
    action = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    return dict(action.choices)


def options(parser: argparse.ArgumentParser) -> dict[str, argparse.Action]:
    return {
        option: action
        for action in parser._actions
        if not isinstance(action, argparse._HelpAction)
        for option in action.option_strings
    }


def test_commands_are_frozen() -> None:
    assert set(COMMANDS) == set(OPTIONS)
    assert set(subparsers()) == set(OPTIONS)


@pytest.mark.parametrize("command", sorted(OPTIONS))
def test_options_are_frozen(command: str) -> None:
    found = set(options(subparsers()[command]))
    assert found == OPTIONS[command], (
        f"fedstream {command}: new options {sorted(found - OPTIONS[command])}, "
        f"vanished options {sorted(OPTIONS[command] - found)}"
    )


@pytest.mark.parametrize("command", sorted(OPTIONS))
def test_every_option_has_help(command: str) -> None:
    for option, action in options(subparsers()[command]).items():
        text = HELP_SUFFIX.sub("", action.help or "").strip()
        assert text, f"fedstream {command} {option} has no help text"


@pytest.mark.parametrize("command", sorted(COMMANDS))
def test_every_config_field_is_documented(command: str) -> None:
    """The help text comes from the string under each field of the config dataclass."""
    cls: type = COMMANDS[command][0]
    docs = field_docs(cls)
    undocumented = [f.name for f in dataclasses.fields(cls) if not docs.get(f.name)]
    assert not undocumented, f"{cls.__name__} fields without a docstring: {undocumented}"


SERVER_GROUPS = [
    "server",
    "transport",
    "security",
    "rounds",
    "uplink",
    "streaming",
    "durability",
    "strategy",
    "safeguards",
    "privacy",
    "evaluation",
    "status",
]
"""`fedstream server --help`'s headings: the run's own flags, then one per component."""


def group_options(parser: argparse.ArgumentParser) -> dict[str | None, set[str]]:
    return {
        group.title: {option for action in group._group_actions for option in action.option_strings}
        for group in parser._action_groups
    }


def test_server_help_groups_the_flags_by_component() -> None:
    parser = subparsers()["server"]
    groups = group_options(parser)
    assert [g.title for g in parser._action_groups][2:] == SERVER_GROUPS
    assert groups["options"] == {"-h", "--help", "--config"}
    for component, fields in components(ServerConfig):
        flags = {"--" + f.name.replace("_", "-") for f in fields}
        for flag in (
            "--uplink-zstd",
            "--insecure",
            "--open-enrolment",
            "--safeguards",
            "--round-log-fsync",
        ):
            if flag in flags:
                flags.add("--no-" + flag[2:])
        assert groups[component_title(component)] == flags, component.__name__
    text = parser.format_help()
    for component, _ in components(ServerConfig):
        heading = f"\n{component_title(component)}:\n"
        assert heading in text
        first_words = " ".join((component.__doc__ or "").split()[:4])
        assert first_words in " ".join(text.split(heading)[1].split()[:20]), component.__name__
    assert text.index("\ntransport:\n") < text.index("\n  --address") < text.index("\nsecurity:\n")


@pytest.mark.parametrize("command", ["client", "demo"])
def test_client_and_demo_help_stay_ungrouped(command: str) -> None:
    groups = group_options(subparsers()[command])
    assert set(groups) == {"positional arguments", "options"}
    assert groups["options"] == OPTIONS[command] | {"-h", "--help"}


@pytest.mark.parametrize("command", sorted(OPTIONS))
def test_help_renders(command: str) -> None:
    """argparse %-formats help text when printing it: a stray % would crash --help."""
    assert "usage: fedstream " + command in subparsers()[command].format_help()


@pytest.mark.e2e
def test_module_help_runs() -> None:
    result = subprocess.run(
        [sys.executable, "-m", "fedstream", "--help"],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert result.returncode == 0, result.stderr
    for command in OPTIONS:
        assert command in result.stdout


@pytest.mark.e2e
def test_console_script_help_runs() -> None:
    script = Path(sys.executable).with_name("fedstream")
    found = str(script) if script.exists() else shutil.which("fedstream")
    assert found, "the `fedstream` console script is not installed (pip install -e .)"
    result = subprocess.run(
        [found, "server", "--help"], capture_output=True, text=True, timeout=120
    )
    assert result.returncode == 0, result.stderr
    assert "--min-clients" in result.stdout


@pytest.mark.parametrize(
    ("argv", "named"),
    [
        (["server", "--rounds", "0"], "rounds"),
        (["server", "--min-clients", "three"], "min_clients"),
        (["client", "--partition", "3", "--num-partitions", "3"], "partition"),
        (["demo", "--clients", "0"], "clients"),
    ],
)
def test_bad_values_exit_2_with_a_message(
    argv: list[str],
    named: str,
    capsys: pytest.CaptureFixture[str],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    for key in [k for k in os.environ if k.startswith("FEDSTREAM_")]:
        monkeypatch.delenv(key)
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"fedstream {argv[0]}: ")
    assert named in err
