"""What a client's call carries into the coordinator and what it gets back, as plain
values: the servicer builds them from protobuf messages and turns them back into
protobuf messages, so the coordinator itself never touches the wire's types."""

from __future__ import annotations

from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field

from fedstream.common.proto.v1 import coordinator_pb2 as pb
from fedstream.common.round_config import ConfigScalar
from fedstream.common.wire.manifest import Manifest
from fedstream.server.admission.names import BadName, normalise_name
from fedstream.server.admission.sessions import ClientRecord
from fedstream.server.errors import InvalidJoin

MAX_TASK = 256
MAX_AGREED_OPTIONS = 256
MAX_AGREED_TEXT = 1024
"""Bounds of a Join's agreement: its keys and values reach log lines and refusals."""


@dataclass(frozen=True)
class Agreement:
    """What a client says it shares with the coordinator beyond its model's layout: the
    task's options other than its site options (canonical text), and the seed."""

    task_options: Mapping[str, str]
    seed: int

    @classmethod
    def of(cls, request: pb.JoinRequest) -> Agreement | None:
        """The request's agreement; None from a client that sends none."""
        if not request.HasField("agreement"):
            return None
        return cls(dict(request.agreement.task_options), request.agreement.seed)

    def check(self) -> None:
        if len(self.task_options) > MAX_AGREED_OPTIONS:
            raise InvalidJoin(f"a Join may carry at most {MAX_AGREED_OPTIONS} task options")
        for key, value in self.task_options.items():
            for text in (key, value):
                if len(text) > MAX_AGREED_TEXT or not text.isprintable():
                    raise InvalidJoin(
                        f"task options must be at most {MAX_AGREED_TEXT} printable characters"
                    )


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
    certificate: str | None = None
    """The fingerprint of the client's certificate (mutual TLS): its session is bound to it."""
    agreement: Agreement | None = None
    """The client's task options and seed; None from a client that sends none."""

    def check(self) -> str:
        """The claimed name, normalised (`admission/names.py`); InvalidJoin unless the
        name, the task and the partition are usable. Names and tasks reach logs and status
        messages: no control characters, bounded lengths."""
        try:
            name = normalise_name(self.name)
        except BadName as exc:
            raise InvalidJoin(str(exc)) from None
        if not 0 < len(self.task) <= MAX_TASK or not self.task.isprintable():
            raise InvalidJoin(f"task must be 1 to {MAX_TASK} printable characters")
        if self.num_partitions < 1:
            raise InvalidJoin(f"num_partitions {self.num_partitions} must be at least 1")
        if not 0 <= self.partition < self.num_partitions:
            raise InvalidJoin(f"partition {self.partition} is outside 0..{self.num_partitions - 1}")
        if self.agreement is not None:
            self.agreement.check()
        return name


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
    attempt: int = 0
    """The try of the round the update was trained for (0: the client did not say)."""
    resume_offset: int = 0
    """Where the upload's data starts: past the bytes kept of a cut upload."""
    trailer: UploadTrailer = field(default_factory=lambda: UploadTrailer())
    """Filled in as the stream ends: what the client says the whole update is."""


@dataclass
class UploadTrailer:
    """An upload's last message: the hex SHA-256 of the whole update ("" when none came)."""

    sha256: str = ""


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
    attempt: int = 0
    model_sha256: str = ""
    """Of the model's data stream: a client holding that model skips the download."""


@dataclass(frozen=True)
class EvaluateWork:
    round: int
    model_version: int
    deadline_seconds: float
    model_sha256: str = ""


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
    sha256: str = ""
    """Of the whole data stream (`GlobalModel.sha256`)."""
