"""The tests' fault proxy (tests/server/faultproxy.py), holding connections while the
coordinator restarts.

The tests' proxy closes a client's connection at once when nothing listens behind it. A
client reads a few such closes in a row as a coordinator that speaks TLS to its plaintext
(client/retry.py gives up after 5) and exits, so a coordinator restart that takes longer
than five of the client's backoff delays would end the soak's clients. This proxy keeps
trying to reach the coordinator for `hold_s` before it closes the connection, as a TCP
proxy with connect retries does; its cuts are the tests' proxy's own.
"""

from __future__ import annotations

import socket
import threading
import time

from tests.server.faultproxy import FaultProxy

RETRY_S = 0.1


class HoldingProxy(FaultProxy):
    def __init__(self, target: str, hold_s: float = 30.0) -> None:
        self.hold_s = hold_s
        super().__init__(target)

    def _accept(self) -> None:
        while not self._closing.is_set():
            try:
                client, _ = self._listener.accept()
            except OSError:
                return
            threading.Thread(target=self._connect, args=(client,), daemon=True).start()

    def _connect(self, client: socket.socket) -> None:
        deadline = time.monotonic() + self.hold_s
        while True:
            try:
                upstream = socket.create_connection(self.target, timeout=RETRY_S * 10)
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
