"""The coordinator's HTTP status port: the status page, `/status.json` and `/metrics`.

It runs in the daemon's event loop beside grpc.aio (aiohttp), on its own port, so a
browser or a Prometheus scrape never shares a connection with tensor bytes. Everything
the page loads is served from `server/status_page/`: no CDN, no build step.

    /                    the status page (status.html, status.js, status.css, favicon.svg)
    /status.json         LiveState.snapshot(), as described by /status_schema.json
    /metrics             Prometheus text format (server/status_metrics.py)
"""

from __future__ import annotations

import json
import logging
import ssl
from pathlib import Path

from aiohttp import web
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

from fedstream.server.live_state import LiveState
from fedstream.server.ports import unavailable
from fedstream.server.status_metrics import metrics_registry

log = logging.getLogger(__name__)

HERE = Path(__file__).resolve().parent
PAGE_DIR = HERE / "status_page"
SCHEMA_PATH = HERE / "status_schema.json"
STATIC = {
    "/": ("status.html", "text/html"),
    "/status.js": ("status.js", "application/javascript"),
    "/status.css": ("status.css", "text/css"),
    "/favicon.svg": ("favicon.svg", "image/svg+xml"),
}
SECURITY_HEADERS = {
    # The page loads only what this server serves, and no other site may frame it.
    "Content-Security-Policy": "default-src 'self'; frame-ancestors 'none'",
    "X-Content-Type-Options": "nosniff",
    "Cache-Control": "no-store",
}


class StatusServer:
    """Serves `live` on `address`, with TLS when given the coordinator's SSL context
    (`server/admission/tls.py`)."""

    def __init__(self, live: LiveState, address: str, context: ssl.SSLContext | None) -> None:
        self.live = live
        self.address = address
        self.context = context
        self.registry = metrics_registry(live)
        self.files = {
            route: ((PAGE_DIR / name).read_bytes(), kind) for route, (name, kind) in STATIC.items()
        }
        self.files["/status_schema.json"] = (SCHEMA_PATH.read_bytes(), "application/json")
        app = web.Application()
        for route in self.files:
            app.router.add_get(route, self._static)
        app.router.add_get("/status.json", self._status)
        app.router.add_get("/metrics", self._metrics)
        self.runner = web.AppRunner(app, access_log=None)
        self.url = ""

    async def start(self) -> str:
        """Listen; the page's URL (with the port bound when 0 was asked for).
        PortUnavailable when the port cannot be had."""
        context = self.context
        host, _, port = self.address.rpartition(":")
        await self.runner.setup()
        site = web.TCPSite(self.runner, host.strip("[]"), int(port), ssl_context=context)
        try:
            await site.start()
        except OSError as exc:
            await self.runner.cleanup()
            raise unavailable("status_address", self.address, exc) from None
        bound = self.runner.addresses[0][1]
        scheme = "https" if context is not None else "http"
        self.url = f"{scheme}://{host}:{bound}/"
        return self.url

    async def stop(self) -> None:
        await self.runner.cleanup()

    async def _static(self, request: web.Request) -> web.Response:
        body, kind = self.files[request.path]
        return web.Response(body=body, content_type=kind, headers=SECURITY_HEADERS)

    async def _status(self, request: web.Request) -> web.Response:
        body = json.dumps(self.live.snapshot(), allow_nan=False)
        return web.Response(text=body, content_type="application/json", headers=SECURITY_HEADERS)

    async def _metrics(self, request: web.Request) -> web.Response:
        body = generate_latest(self.registry)
        return web.Response(
            body=body, headers={**SECURITY_HEADERS, "Content-Type": CONTENT_TYPE_LATEST}
        )
