"""One logging format for every fedstream process, and rate-limited logging of what
hostile peers can repeat at will."""

from __future__ import annotations

import logging
import os
import sys
import time
from collections import OrderedDict
from collections.abc import Callable, Hashable

from fedstream.common.config import ConfigError


class CurrentStderr:
    """sys.stderr as it is at each write: while a live progress display is drawn, it stands
    in for sys.stderr and prints log lines above itself (`common/progress_bars.py`)."""

    def write(self, text: str) -> int:
        return sys.stderr.write(text)

    def flush(self) -> None:
        sys.stderr.flush()


LEVELS = ("DEBUG", "INFO", "WARNING", "ERROR", "CRITICAL")

GRPC_CORE_VERBOSITY = "NONE"
"""gRPC core's own log level unless GRPC_VERBOSITY says otherwise. Core logs a refused
peer's handshake (`ssl_transport_security.cc ... PEER_DID_NOT_RETURN_A_CERTIFICATE`) and
a port it cannot bind on stderr; fedstream says each of these itself, in one line."""


def quiet_grpc_core() -> None:
    """Keep gRPC core's log lines out of the process's stderr, unless GRPC_VERBOSITY is
    set (GRPC_VERBOSITY=INFO brings them back: `docs/troubleshooting.md`).

    Core reads the variable once, as grpc is first imported, so this must run before
    (the CLI sets up logging before it imports the command's modules)."""
    os.environ.setdefault("GRPC_VERBOSITY", GRPC_CORE_VERBOSITY)


def setup_logging(level: str, role: str) -> None:
    """Timestamped lines on stderr, tagged with the process's role (server, client-0, ...),
    and none of gRPC core's (`quiet_grpc_core`)."""
    if level.upper() not in LEVELS:
        raise ConfigError(f"log_level {level!r} is unknown: use one of {', '.join(LEVELS)}")
    quiet_grpc_core()
    logging.basicConfig(
        level=level.upper(),
        format=f"%(asctime)s {role} %(levelname)s %(name)s: %(message)s",
        datefmt="%H:%M:%S",
        stream=CurrentStderr(),
        force=True,
    )


class RateLimitedLog:
    """Logs at most one record per key per `interval` seconds, counting the rest.

    For what a peer can repeat at will (refused requests, a full disk under every
    upload): the first record of a burst is logged at once, the rest of the burst is
    counted, and the next record logged for that key says how many were left out.
    At most `max_keys` keys are remembered (those logged longest ago go first), so
    a flood of distinct keys cannot grow memory.
    """

    def __init__(
        self,
        logger: logging.Logger,
        interval: float = 60.0,
        max_keys: int = 1024,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.logger = logger
        self.interval = interval
        self.max_keys = max_keys
        self._clock = clock
        self._keys: OrderedDict[Hashable, tuple[float, int]] = OrderedDict()
        """key -> (when its last record was logged, records left out since)."""

    def log(self, level: int, key: Hashable, msg: str, *args: object) -> bool:
        """Log `msg % args` at `level` unless `key` logged within `interval`; True if logged."""
        now = self._clock()
        last = self._keys.get(key)
        if last is not None and now - last[0] < self.interval:
            self._keys[key] = (last[0], last[1] + 1)
            return False
        suppressed = last[1] if last is not None else 0
        self._keys[key] = (now, 0)
        self._keys.move_to_end(key)
        while len(self._keys) > self.max_keys:
            self._keys.popitem(last=False)
        if suppressed:
            msg = f"{msg} (and {suppressed} like it in the {self.interval:g}s before, not logged)"
        self.logger.log(level, msg, *args)
        return True
