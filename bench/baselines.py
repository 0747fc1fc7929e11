"""Transport ceilings measured beside every benchmark point, with no fedstream code.

    tcp     raw loopback TCP between two Python processes: `sendall` of 4 MiB buffers
    grpc    a bare grpcio stream between two Python processes: a `grpc.aio` server
            streams `bytes` messages to a sync client (fedstream's download shape)
    upload  N sync client processes stream `bytes` messages into one `grpc.aio` server
            process at once (fedstream's upload shape: the ceiling of a coordinator
            receiving N updates, with nothing done to the bytes received)
    memcpy  memory copy bandwidth (torch `copy_` of 256 MiB, in a child process)

Each figure is bytes moved per second, timed at the receiving end from the request to
the last byte. The transfer runs between two processes, so on a 2-core machine each side
has a core of its own, as a lone fedstream client and its coordinator would.
"""

from __future__ import annotations

import asyncio
import multiprocessing as mp
import socket
import time
from collections.abc import AsyncIterator, Sequence
from multiprocessing.connection import Connection
from multiprocessing.queues import Queue
from multiprocessing.synchronize import Event

import grpc

MIB = 1 << 20
TCP_BUFFER = 4 * MIB
STREAM_METHOD = "/bench.Bulk/Stream"
UPLOAD_METHOD = "/bench.Bulk/Upload"


def grpc_options(
    message_bytes: int, extra: Sequence[tuple[str, int]] = ()
) -> list[tuple[str, int]]:
    limit = message_bytes + MIB
    return [
        ("grpc.max_receive_message_length", limit),
        ("grpc.max_send_message_length", limit),
        *extra,
    ]


def _tcp_sender(port: int, total: int) -> None:
    payload = bytes(TCP_BUFFER)
    with socket.create_connection(("127.0.0.1", port)) as sock:
        sent = 0
        while sent < total:
            sock.sendall(payload)
            sent += len(payload)


def tcp_throughput(total: int = 2 << 30) -> float:
    """Bytes per second of `sendall` of 4 MiB buffers over loopback, process to process."""
    with socket.create_server(("127.0.0.1", 0)) as listener:
        port = listener.getsockname()[1]
        total -= total % TCP_BUFFER
        sender = mp.get_context("spawn").Process(target=_tcp_sender, args=(port, total))
        sender.start()
        conn, _ = listener.accept()
        buffer = memoryview(bytearray(TCP_BUFFER))
        received = 0
        started = time.perf_counter()
        with conn:
            while received < total:
                n = conn.recv_into(buffer)
                if not n:
                    break
                received += n
        elapsed = time.perf_counter() - started
    sender.join()
    return received / elapsed


async def serve_bulk(
    handlers: dict[str, grpc.RpcMethodHandler], options: list[tuple[str, int]], ready: Connection
) -> None:
    """Serve `bench.Bulk/<method>` for each of `handlers` on a free loopback port, sent
    through `ready`."""
    server = grpc.aio.server(options=options)
    server.add_generic_rpc_handlers((grpc.method_handlers_generic_handler("bench.Bulk", handlers),))
    port = server.add_insecure_port("127.0.0.1:0")
    await server.start()
    ready.send(port)
    await server.wait_for_termination()


def _grpc_server(
    message_bytes: int, count: int, ready: Connection, extra: Sequence[tuple[str, int]]
) -> None:
    payload = bytes(message_bytes)

    async def stream(request: bytes, context: object) -> AsyncIterator[bytes]:
        for _ in range(count):
            yield payload

    handler = grpc.unary_stream_rpc_method_handler(
        stream, request_deserializer=None, response_serializer=None
    )
    asyncio.run(serve_bulk({"Stream": handler}, grpc_options(message_bytes, extra), ready))


def grpc_throughput(
    message_bytes: int, total: int = 2 << 30, extra: Sequence[tuple[str, int]] = ()
) -> float:
    """Bytes per second of one grpcio server stream of `message_bytes` messages.

    `extra` channel options go to both ends (empty: grpcio's defaults).
    """
    count = max(1, total // message_bytes)
    ours, theirs = mp.get_context("spawn").Pipe()
    server = mp.get_context("spawn").Process(
        target=_grpc_server, args=(message_bytes, count, theirs, list(extra)), daemon=True
    )
    server.start()
    try:
        port = ours.recv()
        with grpc.insecure_channel(
            f"127.0.0.1:{port}", options=grpc_options(message_bytes, extra)
        ) as channel:
            grpc.channel_ready_future(channel).result(timeout=30)
            call = channel.unary_stream(STREAM_METHOD)
            received = 0
            started = time.perf_counter()
            for message in call(b""):
                received += len(message)
            elapsed = time.perf_counter() - started
    finally:
        server.terminate()
        server.join()
    return received / elapsed


async def drain_upload(requests: AsyncIterator[bytes], context: object) -> bytes:
    """Receive an upload and do nothing with it; the reply is the byte count."""
    received = 0
    async for message in requests:
        received += len(message)
    return str(received).encode()


def _upload_server(message_bytes: int, ready: Connection) -> None:
    handler = grpc.stream_unary_rpc_method_handler(
        drain_upload, request_deserializer=None, response_serializer=None
    )
    asyncio.run(serve_bulk({"Upload": handler}, grpc_options(message_bytes), ready))


def _uploader(port: int, message_bytes: int, count: int, go: Event, done: Queue[int]) -> None:
    payload = bytes(message_bytes)
    with grpc.insecure_channel(f"127.0.0.1:{port}", options=grpc_options(message_bytes)) as channel:
        grpc.channel_ready_future(channel).result(timeout=30)
        upload = channel.stream_unary(UPLOAD_METHOD)
        go.wait()
        done.put(int(upload(payload for _ in range(count))))


def grpc_upload_throughput(message_bytes: int, clients: int, total: int = 1 << 30) -> float:
    """Bytes per second into one grpcio server while `clients` processes upload at once,
    `total` bytes among them, timed from the common start to the last upload's reply."""
    spawn = mp.get_context("spawn")
    ours, theirs = spawn.Pipe()
    server = spawn.Process(target=_upload_server, args=(message_bytes, theirs), daemon=True)
    server.start()
    go, done = spawn.Event(), spawn.Queue()
    count = max(1, total // (message_bytes * clients))
    uploaders = []
    try:
        port = ours.recv()
        uploaders = [
            spawn.Process(target=_uploader, args=(port, message_bytes, count, go, done))
            for _ in range(clients)
        ]
        for uploader in uploaders:
            uploader.start()
        time.sleep(3.0)  # process start-up (imports, channel ready) is not the transfer's
        started = time.perf_counter()
        go.set()
        received = sum(done.get(timeout=300) for _ in uploaders)
        elapsed = time.perf_counter() - started
    finally:
        for uploader in uploaders:
            uploader.join(timeout=30)
        server.terminate()
        server.join()
    return received / elapsed


def _memcpy(nbytes: int, repeats: int) -> float:
    import torch  # only in the child: see memcpy_bandwidth

    src = torch.ones(nbytes, dtype=torch.uint8)
    dst = torch.empty_like(src)
    dst.copy_(src)
    best = float("inf")
    for _ in range(repeats):
        started = time.perf_counter()
        dst.copy_(src)
        best = min(best, time.perf_counter() - started)
    return nbytes / best


def memcpy_bandwidth(nbytes: int = 256 * MIB, repeats: int = 8) -> float:
    """Bytes per second copied by `torch.Tensor.copy_` between two buffers (best of runs).

    Measured in a child process: on Linux a process started later inherits its parent's
    peak-memory mark through fork and exec, so the bench process itself must stay small
    (no torch, no big buffers) for the peaks it reports to be the children's own.
    """
    with mp.get_context("spawn").Pool(1) as pool:
        return float(pool.apply(_memcpy, (nbytes, repeats)))


def measure(message_bytes: int, clients: Sequence[int] = (), repeats: int = 3) -> dict[str, float]:
    """The baselines in bytes per second, each the best of `repeats` runs; the upload
    shape once for each number of `clients`, as `grpc_upload_N_Bps`.

    On a shared machine a run can lose its core to another process; the best run is
    the ceiling, which keeps the ratios against it conservative.
    """
    baselines = {
        "tcp_Bps": max(tcp_throughput(1 << 30) for _ in range(repeats)),
        "grpc_Bps": max(grpc_throughput(message_bytes, 1 << 30) for _ in range(repeats)),
        "memcpy_Bps": memcpy_bandwidth(),
    }
    for n in clients:
        baselines[f"grpc_upload_{n}_Bps"] = max(
            grpc_upload_throughput(message_bytes, n) for _ in range(repeats)
        )
    return baselines
