"""`fedstream status ADDRESS|RUN_DIR`: a running coordinator's live state as a table.

It reads the coordinator's `/status.json` (server/status_schema.json) from its status
port: HOST:PORT or a URL as given, or the `status_url` the coordinator wrote into
RUN_DIR/coordinator.json. `--watch` redraws the table every --interval seconds until the
run is done and the coordinator has stopped (or Ctrl-C).
"""

from __future__ import annotations

import json
import ssl
import time
import urllib.request
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from rich.console import Console, Group
from rich.live import Live
from rich.table import Table
from rich.text import Text

from fedstream.common.config import ConfigError
from fedstream.common.tls import client_ssl_context

FETCH_TIMEOUT_S = 10.0


@dataclass
class StatusQuery:
    """What `fedstream status` asks for: which coordinator's status page, how often, and
    the credentials to read it (the coordinator's own status page is `StatusConfig` in
    server/config.py)."""

    target: str = ""
    """The coordinator's status address (HOST:PORT or URL), or its run directory (the
    address is read from RUN_DIR/coordinator.json)."""
    watch: bool = False
    """Redraw the table every --interval seconds until the run is done (Ctrl-C stops)."""
    interval: float = 1.0
    """Seconds between two redraws with --watch."""
    ca: Path | None = None
    """CA certificate (PEM) to trust for a status page behind TLS."""
    cert: Path | None = None
    """Client certificate (PEM) for a status page behind mutual TLS; with --key."""
    key: Path | None = None
    """Client private key (PEM) for mutual TLS; with --cert."""

    def validate(self) -> None:
        if not self.target:
            raise ConfigError("target: give the status address (HOST:PORT) or the run directory")
        if not self.interval > 0:
            raise ConfigError(f"interval must be positive, got {self.interval}")
        if (self.cert is None) != (self.key is None):
            raise ConfigError("cert and key go together: give both or neither")


def status_url(config: StatusQuery) -> str:
    """The URL of /status.json for `config.target`."""
    target = config.target
    run_dir = Path(target)
    if run_dir.is_dir():
        info_path = run_dir / "coordinator.json"
        try:
            info = json.loads(info_path.read_text())
        except (OSError, ValueError) as exc:
            raise ConfigError(f"{info_path}: no running coordinator there ({exc})") from None
        url = info.get("status_url")
        if not url:
            raise ConfigError(f"the coordinator of {run_dir} serves no status page")
        return f"{str(url).rstrip('/')}/status.json"
    if "://" not in target:
        target = f"{'https' if config.ca is not None else 'http'}://{target}"
    return f"{target.rstrip('/')}/status.json"


def fetch(url: str, context: ssl.SSLContext | None) -> dict[str, Any]:
    with urllib.request.urlopen(url, timeout=FETCH_TIMEOUT_S, context=context) as response:
        snapshot: dict[str, Any] = json.loads(response.read())
    return snapshot


def _bytes(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB"):
        if n < 1024:
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return f"{n:.1f} TiB"


def _transfer(client: dict[str, Any], run: dict[str, Any]) -> str:
    done, total = 0, 0
    if client["state"] == "downloading":
        done, total = client["bytes_down"], run["model_bytes"]
    elif client["state"] == "uploading":
        done, total = client["bytes_up"], run["upload_bytes"]
    return f"{min(100, round(100 * done / total))}%" if total else ""


def render(snapshot: dict[str, Any]) -> Group:
    """The run's line, the clients' table and the last round's record."""
    run = snapshot["run"]
    parts = [f"run {run['run_id'][:8]}", f"task {run['task']}", f"phase {run['phase']}"]
    if run["round"] is not None:
        parts.append(f"round {run['round']}/{run['rounds']}")
    if run["attempt"] is not None and run["attempt"] > 1:
        parts.append(f"attempt {run['attempt']}")
    if run["selected"]:
        parts.append(f"{len(run['reported'])}/{len(run['selected'])} reported")
    if run["deadline_in_s"] is not None:
        parts.append(f"deadline in {run['deadline_in_s']:.0f}s")
    table = Table(title="clients", title_justify="left")
    for column in ("client", "state", "transfer", "down", "up", "rate", "last seen"):
        table.add_column(column, justify="left" if column in ("client", "state") else "right")
    for client in snapshot["clients"]:
        table.add_row(
            client["name"],
            client["state"],
            _transfer(client, run),
            _bytes(client["bytes_down"]),
            _bytes(client["bytes_up"]),
            f"{_bytes(client['down_rate_Bps'] + client['up_rate_Bps'])}/s",
            f"{client['last_seen_s']:.1f}s",
        )
    lines: list[Text | Table] = [Text(" · ".join(parts), style="bold"), table]
    if snapshot["rounds"]:
        last = snapshot["rounds"][-1]
        shown = ", ".join(
            f"{k}={v:.4g}"
            for k, v in last.items()
            if k.startswith(("train_", "eval_")) and isinstance(v, int | float)
        )
        lines.append(
            Text(
                f"round {last['round']}: {last['duration_s']:.1f}s, {last['updates']} updates"
                + (f", {shown}" if shown else "")
            )
        )
    return Group(*lines)


def status_main(config: StatusQuery) -> int:
    """Print the table once, or redraw it with --watch; 1 when the coordinator cannot be
    read."""
    context = None
    if config.ca is not None:
        context = client_ssl_context(config.ca, config.cert, config.key)
    url = status_url(config)
    console = Console()
    try:
        snapshot = fetch(url, context)
    except (OSError, ValueError) as exc:
        console.print(f"fedstream status: cannot read {url}: {exc}", style="red", markup=False)
        return 1
    if not config.watch:
        console.print(render(snapshot))
        return 0
    with Live(render(snapshot), console=console, auto_refresh=False) as live:
        while snapshot["run"]["phase"] != "done":
            time.sleep(config.interval)
            try:
                snapshot = fetch(url, context)
            except (OSError, ValueError) as exc:
                run = snapshot["run"]
                if run["completed"] < run["rounds"]:
                    console.print(f"cannot read {url}: {exc}", style="red", markup=False)
                    return 1
                break  # a coordinator stops once its clients know the run is done
            live.update(render(snapshot), refresh=True)
    console.print(f"run complete: {snapshot['run']['completed']} rounds")
    return 0
