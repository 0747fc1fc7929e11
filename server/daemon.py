"""The coordinator daemon: the whole life cycle of `fedstream server` on one screen."""

from __future__ import annotations

import asyncio
import contextlib
import errno
import gc
import logging
import os
import signal
from urllib.parse import urlsplit

import grpc
import torch
from grpc_health.v1 import health, health_pb2, health_pb2_grpc

from fedstream.common.checkpoint import write_json_atomic
from fedstream.common.memory import reuse_chunk_buffers
from fedstream.common.service import SERVICE_NAME
from fedstream.server.admission.connections import (
    connection_options,
    limits_line,
    raise_descriptor_limit,
)
from fedstream.server.admission.tls import add_port, describe, status_ssl_context
from fedstream.server.assembly import assemble
from fedstream.server.config import ServerConfig
from fedstream.server.coordinator import Coordinator
from fedstream.server.live_state import LiveState
from fedstream.server.liveness import RoundStalled
from fedstream.server.ports import bind_failure, check_free
from fedstream.server.progress_line import RoundLine
from fedstream.server.run_file import RunFile
from fedstream.server.servicer import CoordinatorServicer
from fedstream.server.status_server import StatusServer
from fedstream.tasks import Task

log = logging.getLogger(__name__)

MANIFEST_HEADROOM = 64 << 20
"""Room for a header message (its manifest) beyond the largest data chunk, where the
manifest is not known."""


def header_room(coordinator: Coordinator) -> int:
    """Room for the largest header message this run can send or receive: the bigger of
    the model's and the upload's manifest, four times over, plus 1 MiB for the rest.

    grpc refuses a longer message itself (RESOURCE_EXHAUSTED) as its length prefix
    arrives, without buffering it, so a peer's oversized message costs no memory."""
    manifests = (coordinator.model.manifest, coordinator.intake.layout)
    return (1 << 20) + 4 * max(m.to_proto().ByteSize() for m in manifests)


def grpc_options(max_chunk_bytes: int, headroom: int = MANIFEST_HEADROOM) -> list[tuple[str, int]]:
    limit = max_chunk_bytes + headroom
    return [
        ("grpc.max_receive_message_length", limit),
        ("grpc.max_send_message_length", limit),
        # Without BDP probing the HTTP/2 windows stay small, so the bytes grpc buffers for
        # each stream stay small too and memory does not grow with the number of
        # concurrent transfers; on loopback this costs no measurable throughput (NOTES).
        ("grpc.http2.bdp_probe", 0),
        ("grpc.keepalive_time_ms", 30_000),
        ("grpc.keepalive_timeout_ms", 10_000),
        ("grpc.http2.max_pings_without_data", 0),
        ("grpc.keepalive_permit_without_calls", 1),
        ("grpc.http2.min_ping_interval_without_data_ms", 5_000),
        # One coordinator per port: with SO_REUSEPORT (grpc's default) a second one binds
        # the same port and takes a share of the clients (server/ports.py).
        ("grpc.so_reuseport", 0),
        *connection_options(),
    ]


class CoordinatorDaemon:
    """The coordinator behind a gRPC server with the standard health service, and its
    status page on a port of its own."""

    def __init__(self, config: ServerConfig, task: Task | None = None) -> None:
        self.config = config
        # A port that is taken ends the start before the model is built.
        check_free("address", config.address)
        if config.status_address:
            check_free("status_address", config.status_address)
        self.coordinator = assemble(config, task)
        options = grpc_options(config.max_chunk_bytes, header_room(self.coordinator))
        self.server = grpc.aio.server(options=options)
        self.live = LiveState(self.coordinator)
        servicer = CoordinatorServicer(
            self.coordinator, self.coordinator.admission, config, self.live
        )
        self.server.add_generic_rpc_handlers((servicer.handler(),))
        self.health = health.aio.HealthServicer()
        health_pb2_grpc.add_HealthServicer_to_server(self.health, self.server)
        self.address = ""
        self._round_line: asyncio.Task[None] | None = None
        self.run_file = RunFile(config.run_dir)
        self.status = (
            StatusServer(
                self.live,
                self.run_file.status_address(config.status_address),
                status_ssl_context(config),
            )
            if config.status_address
            else None
        )

    async def start(self) -> str:
        """Listen (TLS when configured), mark the service SERVING, and record the bound
        address in the run dir. PortUnavailable for a port that cannot be had."""
        config = self.config
        try:
            port = add_port(self.server, config.address, config)
        except RuntimeError:  # grpc's error names no cause
            raise bind_failure("address", config.address) from None
        self.address = f"{config.address.rpartition(':')[0]}:{port}"
        status_url = await self.status.start() if self.status is not None else None
        if status_url is not None:  # a restart asking for port 0 gets this port again
            self.run_file.update(status_port=urlsplit(status_url).port)
        await self.server.start()
        write_json_atomic(
            config.run_dir / "coordinator.json",
            {
                "address": self.address,
                "pid": os.getpid(),
                "run_id": self.coordinator.run_id,
                "tls": config.tls,
                "mutual_tls": config.client_ca is not None,
                "status_url": status_url,
            },
        )
        await self._set_health(health_pb2.HealthCheckResponse.SERVING)
        line = RoundLine(self.coordinator, file=config.progress_file)
        self._round_line = asyncio.create_task(line.run())
        log.info(
            "coordinator listening on %s, %s (run %s)",
            self.address,
            describe(config),
            self.coordinator.run_id,
        )
        log.info("%s", limits_line())
        if status_url is not None:
            log.info("status page on %s (also /status.json, /metrics)", status_url)
        return self.address

    async def run(self) -> None:
        """All rounds, then a grace period for every client to hear the run is over.

        Health answers NOT_SERVING from the end of the run: the coordinator still answers
        polls (Done) during the grace period, but it serves no more rounds."""
        await self.coordinator.run()
        await self._set_health(health_pb2.HealthCheckResponse.NOT_SERVING)
        await self.coordinator.wait_clients_told(self.config.done_grace)

    async def stop(self) -> None:
        if self._round_line is not None:
            self._round_line.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._round_line
        await self.health.enter_graceful_shutdown()
        await self.server.stop(grace=2.0)
        if self.status is not None:
            await self.status.stop()
        self.coordinator.close()
        await asyncio.to_thread(self.coordinator.store.close)
        (self.config.run_dir / "coordinator.json").unlink(missing_ok=True)

    async def _set_health(
        self, status: health_pb2.HealthCheckResponse.ServingStatus.ValueType
    ) -> None:
        for service in ("", SERVICE_NAME):
            await self.health.set(service, status)


async def serve(config: ServerConfig) -> int:
    """Run the coordinator until the run completes (0), fails (1) or a signal stops it (0)."""
    daemon = CoordinatorDaemon(config)
    await daemon.start()
    # Everything built so far (torch, grpc, the model's modules) lives for the whole run:
    # keep it out of the collector's generations, which then stay cheap to scan.
    gc.freeze()
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    run = asyncio.create_task(daemon.run())
    stopper = asyncio.create_task(stop.wait())
    await asyncio.wait({run, stopper}, return_when=asyncio.FIRST_COMPLETED)
    code = 0
    if run.done():
        stopper.cancel()
        failure = run.exception()
        if failure is not None and (full := disk_full(failure)) is not None:
            log.error("%s", full)
            code = 1
        elif isinstance(failure, RoundStalled):
            code = 1  # its one line is logged where the rule fired (server/liveness.py)
        elif failure is not None:
            log.error("coordinator failed", exc_info=failure)
            code = 1
    else:
        log.info("stopping on signal; restart with --run-dir %s to resume", config.run_dir)
        run.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await run
    await daemon.stop()
    return code


def disk_full(error: BaseException) -> str | None:
    """The one line for a failure caused by a full disk (ENOSPC, EDQUOT anywhere in its
    chain of causes), or None for any other failure."""
    seen: BaseException | None = error
    while seen is not None:
        if isinstance(seen, OSError) and seen.errno in (errno.ENOSPC, errno.EDQUOT):
            where = f" writing {seen.filename}" if seen.filename else ""
            return (
                f"coordinator stopped: no space left on the device{where} "
                "(free space, then restart with the same --run-dir to resume)"
            )
        seen = seen.__cause__ or seen.__context__
    return None


def main(config: ServerConfig) -> int:
    reuse_chunk_buffers()
    raise_descriptor_limit()
    if config.threads:
        torch.set_num_threads(config.threads)
    try:
        return asyncio.run(serve(config))
    except OSError as exc:
        if (full := disk_full(exc)) is None:
            raise
        log.error("%s", full)
        return 1
