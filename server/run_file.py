"""What a run keeps across restarts of its coordinator beyond its checkpoints: its id and
its status page's port, in RUN_DIR/run.json.

The id names the run in the log, the status page, `fedstream status` and the plot's
title; a restart of the same run directory carries on the same run, so it keeps the id.
A status page asked for on port 0 comes back on the port it had, when that port is free,
so a browser tab left open on it follows the restarted run.
"""

from __future__ import annotations

import contextlib
import json
import socket
import uuid
from pathlib import Path
from typing import Any

from fedstream.common.checkpoint import write_json_atomic

RUN_FILE = "run.json"


class RunFile:
    """RUN_DIR/run.json: read once when made, written whole on each change."""

    def __init__(self, run_dir: Path) -> None:
        self.path = run_dir / RUN_FILE
        self.values: dict[str, Any] = {}
        with contextlib.suppress(OSError, ValueError):
            loaded = json.loads(self.path.read_text())
            if isinstance(loaded, dict):
                self.values = loaded

    def run_id(self) -> str:
        """The run's id: the one kept here, else a new one, kept from now on."""
        kept = self.values.get("run_id")
        if isinstance(kept, str) and kept:
            return kept
        return self.update(run_id=uuid.uuid4().hex)["run_id"]

    def status_address(self, asked: str) -> str:
        """`asked`, with port 0 replaced by the previous status port when it is free."""
        host, _, port = asked.rpartition(":")
        previous = self.values.get("status_port")
        if port != "0" or not isinstance(previous, int) or not port_free(host, previous):
            return asked
        return f"{host}:{previous}"

    def update(self, **values: Any) -> dict[str, Any]:
        self.values.update(values)
        write_json_atomic(self.path, self.values)
        return self.values


def port_free(host: str, port: int) -> bool:
    """Whether `port` on `host` can be bound now (as the status server binds it, with
    SO_REUSEADDR, so a port in TIME_WAIT after a restart counts as free)."""
    host = host.strip("[]")
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    with socket.socket(family, socket.SOCK_STREAM) as probe:
        probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            probe.bind((host, port))
        except OSError:
            return False
    return True
