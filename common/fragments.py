"""Streaming fragments: the exchanged tensors cut into F contiguous runs, and which run a
round synchronises (docs/low-communication.md, "Streaming fragments").

The coordinator and every client cut the same manifest the same way (state-dict order,
which is layer order, balanced by bytes), so a fragment is named by its index alone. Round
r synchronises fragment (r - 1) mod F: F rounds make one outer step of the whole model.
The coordinator announces the fragment of each round in its round config, with the count
and the clients' mixing factor (`FRAGMENT`, `FRAGMENTS`, `FRAGMENT_ALPHA`), so it is the
one source of truth; `StreamPlan.from_round_config` reads them back on the client.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass

from fedstream.common.round_config import ConfigScalar
from fedstream.common.wire.manifest import Manifest

FRAGMENT = "fragment"
"""Round config key: the index of the fragment the round synchronises."""
FRAGMENTS = "fragments"
"""Round config key: how many fragments the model is cut into (absent: 1, no streaming)."""
FRAGMENT_ALPHA = "fragment_alpha"
"""Round config key: the share of its local fragment a client keeps when the new global
fragment arrives: local <- alpha local + (1 - alpha) global."""


def split(sizes: Mapping[str, int], count: int) -> list[list[str]]:
    """`count` contiguous runs of the names of `sizes` (in its order, so layers stay
    together but at a cut) whose largest holds as few of the sizes as any such split can.
    ValueError unless 1 <= count <= len(sizes)."""
    names = list(sizes)
    if not 1 <= count <= len(names):
        raise ValueError(f"cannot cut {len(names)} tensors into {count} fragments")
    ends = [0]
    for name in names:
        ends.append(ends[-1] + sizes[name])
    # best[k][i]: the smallest largest-fragment of names[:i] in k fragments, and its cut
    best: list[list[tuple[float, int]]] = [[(math.inf, 0)] * (len(names) + 1)]
    best[0][0] = (0, 0)
    for k in range(1, count + 1):
        row = [(math.inf, 0)] * (len(names) + 1)
        for i in range(k, len(names) + 1):
            row[i] = min((max(best[k - 1][j][0], ends[i] - ends[j]), j) for j in range(k - 1, i))
        best.append(row)
    cuts, i = [], len(names)
    for k in range(count, 0, -1):
        j = best[k][i][1]
        cuts.append((j, i))
        i = j
    return [names[j:i] for j, i in reversed(cuts)]


def fragment_manifests(manifest: Manifest, count: int) -> list[Manifest]:
    """The manifests of `manifest`'s `count` fragments, balanced by bytes; each carries the
    ties onto its own tensors (a tied tensor follows its source)."""
    groups = split({entry.name: entry.nbytes for entry in manifest.entries}, count)
    out = []
    for group in groups:
        chosen = set(group)
        out.append(
            Manifest(
                tuple(e for e in manifest.entries if e.name in chosen),
                manifest.codec,
                tuple(t for t in manifest.ties if t.source in chosen),
            )
        )
    return out


def fragment_of_round(round_number: int, count: int) -> int:
    """The fragment round `round_number` (from 1) synchronises."""
    return (round_number - 1) % count


def changed_by_version(version: int, count: int) -> int:
    """The fragment model `version` (>= 1) changed: the one its round synchronised."""
    return fragment_of_round(version, count)


@dataclass(frozen=True)
class StreamPlan:
    """What a streaming round asks of a client: synchronise fragment `index` of `count`,
    mixing the global fragments it receives in with factor `alpha`."""

    index: int
    count: int
    alpha: float

    def round_config(self) -> dict[str, ConfigScalar]:
        return {FRAGMENT: self.index, FRAGMENTS: self.count, FRAGMENT_ALPHA: self.alpha}

    @classmethod
    def from_round_config(cls, config: Mapping[str, ConfigScalar]) -> StreamPlan | None:
        """The plan a round config announces; None for a round of the whole model.
        ValueError for values no coordinator sends (a count below 1, an index out of
        range, a mixing factor outside [0, 1])."""
        if FRAGMENTS not in config:
            return None
        count, index, alpha = config[FRAGMENTS], config.get(FRAGMENT), config.get(FRAGMENT_ALPHA)
        if type(count) is not int or count < 1:
            raise ValueError(f"{FRAGMENTS} must be a whole number of at least 1, got {count!r}")
        if type(index) is not int or not 0 <= index < count:
            raise ValueError(f"{FRAGMENT} must be a whole number in 0..{count - 1}, got {index!r}")
        if type(alpha) not in (int, float) or not 0.0 <= float(alpha) <= 1.0:  # type: ignore[arg-type]
            raise ValueError(f"{FRAGMENT_ALPHA} must be a number in [0, 1], got {alpha!r}")
        return cls(index, count, float(alpha))  # type: ignore[arg-type]
