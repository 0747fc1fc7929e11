"""What a round of a benchmark point's shape costs with no fedstream code at all.

    bare    N client processes each download the model's bytes from one `grpc.aio`
            server process and upload as many back; nothing else is done with them.
            The ceiling any grpcio coordinator can reach for a round of this shape.
    design  the same round plus only the work docs/architecture.md has every round do: the server
            spools each upload to a file as it arrives, reads it back in 4 MiB blocks and
            folds it into a float32 sum (one upload at a time), applies the mean to its
            model and writes the model to a file (the checkpoint, without fsync); each
            client writes its download to a file, loads it into its model from there,
            and uploads model - global, reading the file a block at a time.

Both are bytes per second over the whole round, both directions, timed from the moment
every client is told to start to the last upload's reply, median over the rounds after
the first. Hand-written with plain system calls and torch, they are the best case of each
step: fedstream's figure over `design` is how close it comes to what its architecture
allows on the machine, and `design` over the bare stream is the most any implementation
of that architecture could show there.
"""

from __future__ import annotations

import asyncio
import multiprocessing as mp
import os
import statistics
import tempfile
import threading
import time
from collections.abc import AsyncIterator, Iterator
from multiprocessing.connection import Connection
from multiprocessing.queues import Queue
from multiprocessing.synchronize import Barrier
from pathlib import Path
from typing import TYPE_CHECKING, Literal

import grpc

from bench.baselines import (
    MIB,
    STREAM_METHOD,
    UPLOAD_METHOD,
    drain_upload,
    grpc_options,
    serve_bulk,
)

if TYPE_CHECKING:
    import torch

Work = Literal["bare", "design"]
FOLD_BLOCK = 4 * MIB


def _bytes(tensor: torch.Tensor) -> memoryview:
    from fedstream.common.wire.stream import tensor_bytes  # torch only in the children

    return tensor_bytes(tensor)


class _DesignServer:
    """The server side of the design floor: spool, fold one upload at a time, step and
    write the model once every client of the round has been folded."""

    def __init__(self, model_bytes: int, clients: int, scratch: Path) -> None:
        import torch  # only in the child: see bench.baselines.memcpy_bandwidth

        self.model_bytes = model_bytes
        self.clients = clients
        self.scratch = scratch
        self.model = torch.zeros(model_bytes // 4)
        self.sum = torch.zeros(model_bytes // 4)
        self.block = torch.empty(FOLD_BLOCK // 4)
        self.folded = 0
        self.lock = threading.Lock()
        self.spools: list[int] = []

    async def upload(self, requests: AsyncIterator[bytes], context: object) -> bytes:
        """Spool an upload as it arrives, then fold it (in a thread, one at a time)."""
        fd = self.spools.pop() if self.spools else os.open(self.scratch, os.O_RDWR | os.O_TMPFILE)
        received = 0
        async for message in requests:
            os.pwrite(fd, message, received)
            received += len(message)
        await asyncio.to_thread(self.fold, fd)
        return str(received).encode()

    def fold(self, fd: int) -> None:
        with self.lock:
            view = _bytes(self.block)
            offset = 0
            while offset < self.model_bytes:
                n = os.preadv(fd, [view], offset)
                self.sum[offset // 4 : (offset + n) // 4].add_(self.block[: n // 4], alpha=1.0)
                offset += n
            self.spools.append(fd)
            self.folded += 1
            if self.folded % self.clients == 0:
                self.model.add_(self.sum.div_(self.clients))
                self.sum.zero_()
                with open(self.scratch / "checkpoint", "wb") as f:
                    f.write(_bytes(self.model))


def _server(
    work: Work, model_bytes: int, chunk: int, clients: int, scratch: str, ready: Connection
) -> None:
    payload = bytes(chunk)
    design = _DesignServer(model_bytes, clients, Path(scratch)) if work == "design" else None

    async def download(request: bytes, context: object) -> AsyncIterator[bytes]:
        for _ in range(model_bytes // chunk):
            yield payload

    handlers = {
        "Stream": grpc.unary_stream_rpc_method_handler(download),
        "Upload": grpc.stream_unary_rpc_method_handler(
            drain_upload if design is None else design.upload
        ),
    }
    asyncio.run(serve_bulk(handlers, grpc_options(chunk), ready))


def _client(
    work: Work,
    port: int,
    model_bytes: int,
    chunk: int,
    rounds: int,
    scratch: str,
    start: Barrier,
    done: Queue[int],
) -> None:
    import torch  # only in the child

    payload = bytes(chunk)
    model = torch.zeros(model_bytes // 4)
    with grpc.insecure_channel(f"127.0.0.1:{port}", options=grpc_options(chunk)) as channel:
        grpc.channel_ready_future(channel).result(timeout=30)
        download = channel.unary_stream(STREAM_METHOD)
        upload = channel.stream_unary(UPLOAD_METHOD)
        for _ in range(rounds):
            start.wait()
            if work == "bare":
                received = sum(len(message) for message in download(b""))
                done.put(received + int(upload(payload for _ in range(model_bytes // chunk))))
                continue
            fd = os.open(scratch, os.O_RDWR | os.O_TMPFILE, 0o600)
            try:
                received = 0
                for message in download(b""):
                    os.pwrite(fd, message, received)
                    received += len(message)
                os.preadv(fd, [_bytes(model)], 0)
                model.add_(1e-3)  # the near-free training step of the synthetic task

                def deltas(fd: int = fd) -> Iterator[bytes]:
                    for offset in range(0, model_bytes, chunk):
                        block = torch.empty(chunk // 4)
                        os.preadv(fd, [_bytes(block)], offset)
                        local = model[offset // 4 : (offset + chunk) // 4]
                        yield torch.sub(local, block, out=block).numpy().tobytes()

                done.put(received + int(upload(deltas())))
            finally:
                os.close(fd)


def round_throughput(
    work: Work, model_bytes: int, clients: int, rounds: int = 4, chunk: int = MIB
) -> float:
    """Bytes per second of `rounds` rounds of `work` (module docstring), median after the
    first; `model_bytes` is rounded down to whole chunks."""
    model_bytes -= model_bytes % chunk
    spawn = mp.get_context("spawn")
    with tempfile.TemporaryDirectory(prefix="fedstream-floor-") as scratch:
        ours, theirs = spawn.Pipe()
        server = spawn.Process(
            target=_server,
            args=(work, model_bytes, chunk, clients, scratch, theirs),
            daemon=True,
        )
        server.start()
        start, done = spawn.Barrier(clients + 1), spawn.Queue()
        workers: list[mp.process.BaseProcess] = []
        try:
            port = ours.recv()
            workers = [
                spawn.Process(
                    target=_client,
                    args=(work, port, model_bytes, chunk, rounds, scratch, start, done),
                )
                for _ in range(clients)
            ]
            for worker in workers:
                worker.start()
            times = []
            for _ in range(rounds):
                start.wait(timeout=300)
                began = time.perf_counter()
                moved = sum(done.get(timeout=600) for _ in workers)
                times.append(time.perf_counter() - began)
        finally:
            for worker in workers:
                worker.join(timeout=60)
            server.terminate()
            server.join()
    return moved / statistics.median(times[1:] or times)
