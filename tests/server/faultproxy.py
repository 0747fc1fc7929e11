"""A small fault-injecting TCP proxy for tests: delay traffic, cut connections.

    with FaultProxy(target="127.0.0.1:50051", upstream_delay_s=0.02) as proxy:
        proxy.cut_downstream_after(2 << 20)   # cut the next connection that carries 2 MiB
        proxy.cut_upstream_after(2 << 20)     # the same, towards the server (an upload)
        client connects to proxy.address ...

`upstream_delay_s` slows the client-to-server direction: every 64 KiB read waits that long.
`connect_retry_s` keeps trying to reach `target` that long before closing a new connection
(as a TCP proxy with connect retries does, while the server behind it restarts); by default
a connection nothing listens behind is closed at once.

It forwards every accepted connection to `target` on its own thread pair, counting the
bytes each connection has carried towards the client, and only ever talks to loopback.
"""

from __future__ import annotations

import contextlib
import socket
import threading
import time
from types import TracebackType

RETRY_S = 0.1
"""Seconds between tries to reach the target while `connect_retry_s` lasts."""


class FaultProxy:
    def __init__(
        self, target: str, upstream_delay_s: float = 0.0, connect_retry_s: float = 0.0
    ) -> None:
        host, _, port = target.rpartition(":")
        self.target = (host, int(port))
        self.upstream_delay_s = upstream_delay_s
        self.connect_retry_s = connect_retry_s
        self.cuts = 0
        self.upstream_bytes = 0
        """Bytes carried towards the server, every connection together."""
        self._cut_after: int | None = None
        self._cut_upstream_after: int | None = None
        self._lock = threading.Lock()
        self._closing = threading.Event()
        self._sockets: list[socket.socket] = []
        self._listener = socket.create_server(("127.0.0.1", 0))
        self.address = f"127.0.0.1:{self._listener.getsockname()[1]}"
        self._acceptor = threading.Thread(target=self._accept, daemon=True)
        self._acceptor.start()

    def cut_downstream_after(self, nbytes: int) -> None:
        """Reset the first connection whose bytes towards the client pass `nbytes`, once."""
        with self._lock:
            self._cut_after = nbytes

    def cut_upstream_after(self, nbytes: int) -> None:
        """Reset the first connection whose bytes towards the server pass `nbytes`, once."""
        with self._lock:
            self._cut_upstream_after = nbytes

    def _accept(self) -> None:
        while not self._closing.is_set():
            try:
                client, _ = self._listener.accept()
            except OSError:
                return
            if self.connect_retry_s:
                threading.Thread(target=self._connect, args=(client,), daemon=True).start()
            else:
                self._connect(client)

    def _connect(self, client: socket.socket) -> None:
        deadline = time.monotonic() + self.connect_retry_s
        while True:
            try:
                upstream = socket.create_connection(self.target, timeout=1.0)
                upstream.settimeout(None)
                break
            except OSError:
                if self._closing.is_set() or time.monotonic() >= deadline:
                    client.close()
                    return
                time.sleep(RETRY_S)
        with self._lock:
            self._sockets += [client, upstream]
        pair = (client, upstream)
        for source, sink, downstream in ((client, upstream, False), (upstream, client, True)):
            threading.Thread(
                target=self._pump, args=(source, sink, downstream, pair), daemon=True
            ).start()

    def _pump(
        self,
        source: socket.socket,
        sink: socket.socket,
        downstream: bool,
        pair: tuple[socket.socket, socket.socket],
    ) -> None:
        carried = 0
        try:
            while True:
                data = source.recv(1 << 16)
                if not data:
                    break
                if not downstream and self.upstream_delay_s:
                    time.sleep(self.upstream_delay_s)
                carried += len(data)
                if downstream and self._should_cut(carried):
                    self._reset(pair)
                    return
                if not downstream:
                    with self._lock:
                        self.upstream_bytes += len(data)
                    if self._should_cut_upstream(carried):
                        self._reset(pair)
                        return
                sink.sendall(data)
        except OSError:
            pass
        finally:
            with contextlib.suppress(OSError):
                sink.shutdown(socket.SHUT_WR)

    def _should_cut(self, carried: int) -> bool:
        with self._lock:
            if self._cut_after is None or carried < self._cut_after:
                return False
            self._cut_after = None
            self.cuts += 1
            return True

    def _should_cut_upstream(self, carried: int) -> bool:
        with self._lock:
            if self._cut_upstream_after is None or carried < self._cut_upstream_after:
                return False
            self._cut_upstream_after = None
            self.cuts += 1
            return True

    @staticmethod
    def _reset(pair: tuple[socket.socket, socket.socket]) -> None:
        """Abort both ends with RST, as a dropped link or a crashed middlebox would.

        The other pump may be blocked in `recv` on one of these sockets, which holds the
        socket open past `close` (no RST) until its peer sends again: a client waiting
        for the rest of a download sends nothing, so it would hang until its own timeout.
        Shutting the read side first wakes that `recv`; the RST then goes out as the
        last reference is dropped."""
        for sock in pair:
            with contextlib.suppress(OSError):
                sock.setsockopt(
                    socket.SOL_SOCKET, socket.SO_LINGER, b"\x01\x00\x00\x00\x00\x00\x00\x00"
                )
                sock.shutdown(socket.SHUT_RD)
            with contextlib.suppress(OSError):
                sock.close()

    def close(self) -> None:
        self._closing.set()
        self._listener.close()
        with self._lock:
            for sock in self._sockets:
                with contextlib.suppress(OSError):
                    sock.close()

    def __enter__(self) -> FaultProxy:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()
