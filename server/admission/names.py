"""Names that reach the coordinator's books and log lines: client names and metric names.

A client name is the identity its updates are booked under, so two spellings of one name
must be one name: it is normalised (Unicode NFKC, so a full-width or ligature spelling is
the plain one) and then held to a safe set of characters (letters and digits of any
script, and `_ . - @ + :`), at most `MAX_NAME` of them. A metric name goes into
metrics.jsonl and the log: at most `MAX_METRIC_NAME` characters of the same set plus `/`,
so no control character or newline can forge a line.
"""

from __future__ import annotations

import re
import unicodedata

MAX_NAME = 128
MAX_METRIC_NAME = 64
_NAME = re.compile(r"[\w.@+:-]+")
_METRIC = re.compile(r"[\w.@+:/-]+")


class BadName(ValueError):
    """A name outside the safe set, or too long; the message says which."""


def normalise_name(name: str, what: str = "client name") -> str:
    """`name` in NFKC form; BadName unless it is 1 to MAX_NAME safe characters."""
    normal = unicodedata.normalize("NFKC", name)
    if not 0 < len(normal) <= MAX_NAME:
        raise BadName(f"{what} must be 1 to {MAX_NAME} characters, got {len(normal)}")
    if _NAME.fullmatch(normal) is None:
        raise BadName(
            f"{what} {_shown(normal)} has characters outside letters, digits and _ . - @ + :"
        )
    return normal


def check_metric_name(name: str) -> None:
    """BadName unless `name` is 1 to MAX_METRIC_NAME letters, digits or _ . - @ + : /."""
    if not 0 < len(name) <= MAX_METRIC_NAME:
        raise BadName(f"metric name must be 1 to {MAX_METRIC_NAME} characters, got {len(name)}")
    if _METRIC.fullmatch(name) is None:
        raise BadName(
            f"metric name {_shown(name)} has characters outside letters, digits and "
            "_ . - @ + : / (no spaces, control characters or newlines)"
        )


def _shown(text: str) -> str:
    """`text` quoted with every unusual character escaped, cut to MAX_METRIC_NAME."""
    return ascii(text[:MAX_METRIC_NAME])
