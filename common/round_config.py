"""Round settings as they travel: typed values in a protobuf map."""

from __future__ import annotations

from collections.abc import Mapping, MutableMapping

from fedstream.common.proto.v1 import coordinator_pb2 as pb

ConfigScalar = float | int | str | bool
"""One round setting's value; a task's `train` and `evaluate` receive them by name."""


def parse_scalar(text: str) -> ConfigScalar:
    """'3' -> 3, '0.5' -> 0.5, 'true' -> True, anything else stays text."""
    lowered = text.strip().lower()
    if lowered in ("true", "false"):
        return lowered == "true"
    for kind in (int, float):
        try:
            return kind(text)
        except ValueError:
            pass
    return text


def to_proto(values: Mapping[str, ConfigScalar], out: MutableMapping[str, pb.ConfigValue]) -> None:
    for key, value in values.items():
        if isinstance(value, bool):
            out[key].CopyFrom(pb.ConfigValue(flag=value))
        elif isinstance(value, int):
            out[key].CopyFrom(pb.ConfigValue(integer=value))
        elif isinstance(value, float):
            out[key].CopyFrom(pb.ConfigValue(number=value))
        else:
            out[key].CopyFrom(pb.ConfigValue(text=str(value)))


def from_proto(values: Mapping[str, pb.ConfigValue]) -> dict[str, ConfigScalar]:
    out: dict[str, ConfigScalar] = {}
    for key, value in values.items():
        kind = value.WhichOneof("kind")
        out[key] = getattr(value, kind) if kind else ""
    return out
