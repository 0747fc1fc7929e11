"""One logging format for every fedstream process."""

from __future__ import annotations

import logging
import sys


def setup_logging(level: str, role: str) -> None:
    """Timestamped lines on stderr, tagged with the process's role (server, client-0, ...)."""
    logging.basicConfig(
        level=level.upper(),
        format=f"%(asctime)s {role} %(levelname)s %(name)s: %(message)s",
        datefmt="%H:%M:%S",
        stream=sys.stderr,
        force=True,
    )
