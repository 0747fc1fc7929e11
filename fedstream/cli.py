"""The `fedstream` command: `server`, `client`, `demo`, `status` that shows a running
coordinator, `certs` and `token` that make credentials, `export` that writes a run's model
as a plain state dict, and `new` that scaffolds a project for a user's own task.

Every flag can also come from a TOML file (`--config FILE`, one table per command) and
from `FEDSTREAM_<COMMAND>_<FLAG>` environment variables; a flag beats the environment,
which beats the file, which beats the default.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import cast

from fedstream.certs import CertsConfig, TokenConfig
from fedstream.client.config import ClientConfig
from fedstream.common.config import ConfigError, add_arguments, field_docs, load_config
from fedstream.common.errors import FedstreamError
from fedstream.common.logs import setup_logging
from fedstream.demo import DemoConfig
from fedstream.export import ExportConfig
from fedstream.scaffold import NewConfig
from fedstream.server.config import ServerConfig
from fedstream.status import StatusQuery

Config = (
    ServerConfig
    | ClientConfig
    | DemoConfig
    | StatusQuery
    | CertsConfig
    | TokenConfig
    | ExportConfig
    | NewConfig
)

COMMANDS: dict[str, tuple[type[Config], str]] = {
    "server": (ServerConfig, "run the coordinator daemon"),
    "client": (ClientConfig, "run a client process against a coordinator"),
    "demo": (DemoConfig, "run a local cluster: one server and N clients as processes"),
    "status": (StatusQuery, "show a running coordinator's clients and rounds (--watch)"),
    "certs": (CertsConfig, "make a development CA, a server and client certificates"),
    "token": (
        TokenConfig,
        "make a client token: the token on stdout, the --tokens file line on stderr",
    ),
    "export": (ExportConfig, "write a run's model as a plain state dict (or pretrained dir)"),
    "new": (NewConfig, "scaffold a project: a package with your own Task, a test, sample data"),
}

POSITIONAL: dict[str, tuple[str, ...]] = {
    "token": ("name",),
    "status": ("target",),
    "export": ("run_dir",),
    "new": ("kind", "name"),
}
"""Commands whose first fields are positional arguments (`fedstream token NAME`,
`fedstream new task NAME`); they take no --config file."""


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="fedstream",
        description="Federated learning for large models over streamed gRPC.",
        epilog="Precedence: flag > FEDSTREAM_<COMMAND>_<FLAG> environment variable > "
        "[command] table of --config FILE > default.",
    )
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for name, (cls, summary) in COMMANDS.items():
        sub = commands.add_parser(name, help=summary, description=summary)
        if name in POSITIONAL:
            docs = field_docs(cast(type, cls))  # the class, not its (unhashable) instances
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
    args = vars(build_parser().parse_args(argv))
    command = args.pop("command")
    config_file = args.pop("config", None)
    cls = COMMANDS[command][0]
    try:
        config: Config = load_config(cls, command, args, config_file)
    except ConfigError as exc:
        print(f"fedstream {command}: {exc}", file=sys.stderr)
        return 2
    try:
        if isinstance(config, ServerConfig):
            from fedstream.server.daemon import main as server_main

            setup_logging(config.log_level, "server")
            return server_main(config)
        if isinstance(config, ClientConfig):
            from fedstream.client.loop import main as client_main

            setup_logging(config.log_level, config.name)
            return client_main(config)
        if isinstance(config, CertsConfig):
            from fedstream.certs import certs_main

            return certs_main(config)
        if isinstance(config, StatusQuery):
            from fedstream.status import status_main

            return status_main(config)
        if isinstance(config, TokenConfig):
            from fedstream.certs import token_main

            return token_main(config)
        if isinstance(config, ExportConfig):
            from fedstream.export import main as export_main

            return export_main(config)
        if isinstance(config, NewConfig):
            from fedstream.scaffold import main as new_main

            return new_main(config)
        from fedstream.demo import main as demo_main

        return demo_main(config)
    except (ConfigError, FedstreamError) as exc:
        print(f"fedstream {command}: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130
