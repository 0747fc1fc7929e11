"""The coordinator's configuration."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from fedstream.common.config import ConfigError

MIB = 1 << 20


@dataclass
class ServerConfig:
    address: str = "0.0.0.0:50051"
    """HOST:PORT the coordinator listens on (port 0 picks a free one)."""
    run_dir: Path = Path("runs/latest")
    """Run directory: checkpoints, metrics.jsonl, plot; an existing one is resumed."""
    rounds: int = 5
    """Number of training rounds in the run."""
    min_clients: int = 2
    """Clients that must have joined before a round starts; also the fewest selected."""
    fraction: float = 1.0
    """Fraction of joined clients selected for each round."""
    min_reports: int = 1
    """Updates needed to close a round at its deadline; with fewer the round is re-run."""
    round_timeout: float = 300.0
    """Seconds a round waits for its updates before closing with what it has."""
    task: str = "digits"
    """Task: a built-in name (digits, charlm, synthetic) or package.module:ClassName."""
    task_opt: dict[str, str] = field(default_factory=dict)
    """Task option KEY=VALUE, e.g. params=100e6 for synthetic."""
    round_config: dict[str, str] = field(default_factory=dict)
    """Training setting KEY=VALUE sent to clients each round, e.g. lr=0.05, local_epochs=2."""
    seed: int = 0
    """Seed for model initialisation, client selection and client data splits."""
    chunk_bytes: int = MIB
    """Bytes per streamed chunk of model data."""
    max_chunk_bytes: int = 16 * MIB
    """Largest chunk accepted from a client."""
    poll_timeout: float = 20.0
    """Seconds a long-poll waits for work before telling the client to poll again."""
    client_timeout: float = 120.0
    """Seconds without any call after which an idle client is no longer selected."""
    stall_timeout: float = 60.0
    """Seconds an upload may move no bytes before it is dropped as stalled."""
    done_grace: float = 30.0
    """Seconds to keep serving after the last round so every client hears it is done."""
    keep_checkpoints: int = 3
    """Round checkpoints kept in the run directory (the newest ones)."""
    spool_dir: Path | None = None
    """Where uploads are spooled while they arrive (default: RUN_DIR/spool)."""
    threads: int = 0
    """Torch CPU threads (0 keeps torch's default); 1 where clients share the machine."""
    log_level: str = "INFO"
    """Logging level: DEBUG, INFO, WARNING or ERROR."""

    def validate(self) -> None:
        host, sep, port = self.address.rpartition(":")
        if not sep or not host or not port.isdigit():
            raise ConfigError(f"address: expected HOST:PORT, got {self.address!r}")
        if self.rounds < 1:
            raise ConfigError("rounds must be at least 1")
        if self.min_clients < 1:
            raise ConfigError("min_clients must be at least 1")
        if not 0.0 < self.fraction <= 1.0:
            raise ConfigError("fraction must be in (0, 1]")
        if not self.min_reports >= 1:
            raise ConfigError("min_reports must be at least 1")
        if self.round_timeout <= 0 or self.poll_timeout <= 0 or self.stall_timeout <= 0:
            raise ConfigError("timeouts must be positive")
        if not 1024 <= self.chunk_bytes <= self.max_chunk_bytes:
            raise ConfigError("chunk_bytes must be between 1 KiB and max_chunk_bytes")
        if self.threads < 0:
            raise ConfigError("threads must be 0 or more")
        if self.keep_checkpoints < 1:
            raise ConfigError("keep_checkpoints must be at least 1")

    @property
    def spool_path(self) -> Path:
        return self.spool_dir if self.spool_dir is not None else self.run_dir / "spool"
