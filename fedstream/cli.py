"""The `fedstream` command: `server`, `client`, `demo`, `status` that shows a running
coordinator, `certs` and `token` that make credentials, `export` that writes a run's model
as a plain state dict, and `new` that scaffolds a project for a user's own task.

Every flag can also come from a TOML file (`--config FILE`, one table per command) and
from `FEDSTREAM_<COMMAND>_<FLAG>` environment variables; a flag beats the environment,
which beats the file, which beats the default.
"""

from __future__ import annotations

import argparse
import importlib
import sys
from collections.abc import Collection, Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

from fedstream.common.config import ConfigError, add_arguments, field_docs, load_config
from fedstream.common.errors import FedstreamError
from fedstream.common.logs import setup_logging

COMMAND_SPECS: dict[str, tuple[str, str, str]] = {
    "server": (
        "fedstream.server.config:ServerConfig",
        "fedstream.server.daemon:main",
        "run the coordinator daemon",
    ),
    "client": (
        "fedstream.client.config:ClientConfig",
        "fedstream.client.process:main",
        "run a client process against a coordinator",
    ),
    "demo": (
        "fedstream.demo:DemoConfig",
        "fedstream.demo:main",
        "run a local cluster: one server and N clients as processes",
    ),
    "status": (
        "fedstream.status:StatusQuery",
        "fedstream.status:status_main",
        "show a running coordinator's clients and rounds (--watch)",
    ),
    "certs": (
        "fedstream.certs:CertsConfig",
        "fedstream.certs:certs_main",
        "make a development CA, a server and client certificates",
    ),
    "token": (
        "fedstream.certs:TokenConfig",
        "fedstream.certs:token_main",
        "make a client token: the token on stdout, the --tokens file line on stderr",
    ),
    "export": (
        "fedstream.export:ExportConfig",
        "fedstream.export:main",
        "write a run's model as a plain state dict (or pretrained dir)",
    ),
    "new": (
        "fedstream.scaffold:NewConfig",
        "fedstream.scaffold:main",
        "scaffold a project: a package with your own Task, a test, sample data",
    ),
}
"""Command -> (its config class, the function that runs it, its summary), by import path:
a command imports only its own modules, so `fedstream --help`, `token`, `certs`, `status`
and `new` start without importing torch."""


def _load(path: str) -> Any:
    module, _, name = path.partition(":")
    return getattr(importlib.import_module(module), name)


class Commands(Mapping[str, tuple[type, str]]):
    """Command -> (config class, summary), importing a command's config class only when
    it is looked up."""

    def __getitem__(self, name: str) -> tuple[type, str]:
        config_path, _, summary = COMMAND_SPECS[name]
        return _load(config_path), summary

    def __iter__(self) -> Iterator[str]:
        return iter(COMMAND_SPECS)

    def __len__(self) -> int:
        return len(COMMAND_SPECS)


COMMANDS = Commands()

POSITIONAL: dict[str, tuple[str, ...]] = {
    "token": ("name",),
    "status": ("target",),
    "export": ("run_dir",),
    "new": ("kind", "name"),
}
"""Commands whose first fields are positional arguments (`fedstream token NAME`,
`fedstream new task NAME`); they take no --config file."""


def build_parser(only: Collection[str] | None = None) -> argparse.ArgumentParser:
    """The whole command line; with `only`, the other commands are listed but their
    options are left out (and their modules not imported)."""
    parser = argparse.ArgumentParser(
        prog="fedstream",
        description="Federated learning for large models over streamed gRPC.",
        epilog="Precedence: flag > FEDSTREAM_<COMMAND>_<FLAG> environment variable > "
        "[command] table of --config FILE > default.",
    )
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for name, (_, _, summary) in COMMAND_SPECS.items():
        sub = commands.add_parser(name, help=summary, description=summary)
        if only is not None and name not in only:
            continue
        cls = COMMANDS[name][0]
        if name in POSITIONAL:
            docs = field_docs(cls)
            for field in POSITIONAL[name]:
                metavar = "ADDRESS|RUN_DIR" if name == "status" else field.upper()
                sub.add_argument(field, metavar=metavar, help=docs[field])
            add_arguments(sub, cls, exclude=set(POSITIONAL[name]))
            continue
        sub.add_argument(
            "--config", type=Path, metavar="FILE", help=f"TOML file with a [{name}] table"
        )
        add_arguments(sub, cls)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    named = next((arg for arg in argv if not arg.startswith("-")), None)
    args = vars(build_parser(only={named} if named else ()).parse_args(argv))
    command = args.pop("command")
    config_file = args.pop("config", None)
    config_path, runner_path, _ = COMMAND_SPECS[command]
    try:
        config = load_config(_load(config_path), command, args, config_file)
    except ConfigError as exc:
        print(f"fedstream {command}: {exc}", file=sys.stderr)
        return 2
    try:
        if getattr(config, "help_task", False):
            print(_load("fedstream.tasks.task:task_help")(config.task))
            return 0
        if command in ("server", "client"):
            setup_logging(config.log_level, "server" if command == "server" else config.name)
        return int(_load(runner_path)(config))
    except (ConfigError, FedstreamError) as exc:
        print(f"fedstream {command}: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130
