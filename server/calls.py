"""What a client's call carries into the coordinator and what it gets back, as plain
values: the servicer builds them from protobuf messages and turns them back into
protobuf messages, so the coordinator itself never touches the wire's types."""

from __future__ import annotations

from collections.abc import Iterator, Mapping
from dataclasses import dataclass

from fedstream.common.proto.v1 import coordinator_pb2 as pb
from fedstream.common.round_config import ConfigScalar
from fedstream.common.wire.manifest import Manifest
from fedstream.server.errors import InvalidUpdate
from fedstream.server.registry import ClientRecord

MAX_NAME = 128
MAX_TASK = 256


@dataclass(frozen=True)
class JoinClaim:
    name: str
    task: str
    partition: int
    num_partitions: int
    model_digest: str
    """`Manifest.digest()` of the client's exchanged tensors."""
    peer_name: str | None = None
    """The common name of the client's certificate (mutual TLS)."""
    token: str | None = None
    """The client token presented with the Join (--tokens)."""

    def check(self) -> None:
        """InvalidUpdate unless the name, the task and the partition are usable. Names and
        tasks reach logs and status messages: no control characters, bounded lengths."""
        if not 0 < len(self.name) <= MAX_NAME or not self.name.isprintable():
            raise InvalidUpdate(f"client name must be 1 to {MAX_NAME} printable characters")
        if not 0 < len(self.task) <= MAX_TASK or not self.task.isprintable():
            raise InvalidUpdate(f"task must be 1 to {MAX_TASK} printable characters")
        if self.num_partitions < 1:
            raise InvalidUpdate(f"num_partitions {self.num_partitions} must be at least 1")
        if not 0 <= self.partition < self.num_partitions:
            raise InvalidUpdate(
                f"partition {self.partition} is outside 0..{self.num_partitions - 1}"
            )


@dataclass(frozen=True)
class Joined:
    client: ClientRecord
    run_id: str
    max_chunk_bytes: int
    heartbeat_seconds: float


@dataclass(frozen=True)
class UpdateClaim:
    """An upload's header: what the client says its update is."""

    round: int
    model_version: int
    num_examples: int
    metrics: Mapping[str, float]
    manifest: pb.Manifest
    """Checked against the run's upload layout before anything is spooled."""


@dataclass(frozen=True)
class EvaluationClaim:
    round: int
    model_version: int
    num_examples: int
    metrics: Mapping[str, float]


@dataclass(frozen=True)
class Receipt:
    """The answer to an upload or an evaluation report: booked, or already booked."""

    accepted: bool
    detail: str


@dataclass(frozen=True)
class TrainWork:
    round: int
    model_version: int
    deadline_seconds: float
    config: Mapping[str, ConfigScalar]


@dataclass(frozen=True)
class EvaluateWork:
    round: int
    model_version: int
    deadline_seconds: float


@dataclass(frozen=True)
class NoWork:
    """Nothing to do yet: poll again."""


@dataclass(frozen=True)
class RunDone:
    reason: str


Work = TrainWork | EvaluateWork | NoWork | RunDone
"""The answer to a poll."""


@dataclass(frozen=True)
class ModelStream:
    """A download: the global model `version` from byte `offset` on, chunk by chunk."""

    version: int
    manifest: Manifest
    offset: int
    chunks: Iterator[memoryview | bytes]
