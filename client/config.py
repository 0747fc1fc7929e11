"""The client process's configuration."""

from __future__ import annotations

import socket
from dataclasses import dataclass, field
from pathlib import Path

from fedstream.common.config import ACTION, ConfigError

MIB = 1 << 20
SITE_PARALLEL = ("ddp", "fsdp")


@dataclass
class ClientConfig:
    server: str = "127.0.0.1:50051"
    """HOST:PORT of the coordinator."""
    task: str = "digits"
    """Task: a built-in name (digits, charlm, synthetic) or package.module:ClassName."""
    task_opt: dict[str, str] = field(default_factory=dict)
    """Task option KEY=VALUE; must match the coordinator's except the task's site options
    (checked at Join); --help-task lists them."""
    help_task: bool = field(default=False, metadata={ACTION: True})
    """List the task's options and round settings (names, types, defaults) and exit."""
    partition: int = 0
    """Which partition of a built-in task's data this client trains on (0-based); a task
    of your own is handed it in load_data and may ignore it."""
    num_partitions: int = 1
    """How many partitions a built-in task's data is split into."""
    name: str = ""
    """Client identity in the federation (default: HOSTNAME-pPARTITION)."""
    seed: int = 0
    """Run seed; must match the coordinator's so data splits agree."""
    device: str = "cpu"
    """Torch device to train on: cpu, cuda, cuda:1, ..."""
    threads: int = 0
    """Torch CPU threads (0 keeps torch's default)."""
    chunk_bytes: int = MIB
    """Bytes per streamed chunk, uploads and downloads (lowered to the coordinator's
    max_chunk_bytes when that is smaller)."""
    stall_timeout: float = 60.0
    """Seconds a transfer may move no bytes before it is abandoned and retried."""
    max_backoff: float = 30.0
    """Longest wait between reconnection attempts, in seconds."""
    give_up_after: float = 300.0
    """Seconds without reaching the coordinator after which the client exits non-zero."""
    ca: Path | None = None
    """CA certificate (PEM) the coordinator's certificate must chain to: TLS."""
    cert: Path | None = None
    """This client's certificate (PEM) for mutual TLS; with --key and --ca."""
    key: Path | None = None
    """This client's private key (PEM) for mutual TLS; with --cert."""
    token: str = ""
    """This client's token, when the coordinator checks tokens (--tokens); better given
    as FEDSTREAM_CLIENT_TOKEN than on the command line."""
    log_level: str = "INFO"
    """Logging level: DEBUG, INFO, WARNING or ERROR."""
    nproc_per_node: int = 1
    """Processes (ranks) this site runs as one torch.distributed job, each training its
    shard of the site's data (one per GPU with --device cuda); rank 0 talks to the
    coordinator. Under torchrun, leave it at 1: torchrun's ranks are used."""
    max_restarts: int = 3
    """Times --nproc-per-node restarts the site's ranks after one of them dies."""
    rank_timeout: float = 1800.0
    """Seconds a rank waits for the others in a collective before the site's round fails:
    longer than the coordinator's long poll, --max-backoff and a model download."""
    site_parallel: str = "ddp"
    """How a site of several ranks trains: ddp (every rank holds the whole model) or fsdp
    (each rank holds a shard of it: for a model that does not fit one device)."""
    model_dir: Path | None = None
    """Directory the received global model is kept in (model.bin, model.json): a restarted
    client holding the round's model (its SHA-256 as the coordinator names it) does not
    download it again."""
    progress_file: Path | None = None
    """JSON file this client keeps its current download, training or upload in, for
    another process to show (fedstream demo does); progress itself goes to stderr: bars on
    a terminal, log lines otherwise."""

    def validate(self) -> None:
        host, sep, port = self.server.rpartition(":")
        if not sep or not host or not port.isdigit():
            raise ConfigError(f"server: expected HOST:PORT, got {self.server!r}")
        if not 0 <= self.partition < self.num_partitions:
            raise ConfigError(f"partition {self.partition} is outside 0..{self.num_partitions - 1}")
        if not 1024 <= self.chunk_bytes <= 16 * MIB:
            raise ConfigError("chunk_bytes must be between 1 KiB and 16 MiB")
        if self.nproc_per_node < 1:
            raise ConfigError("nproc_per_node must be at least 1")
        if self.max_restarts < 0:
            raise ConfigError("max_restarts must be 0 or more")
        if not self.rank_timeout > 0:
            raise ConfigError("rank_timeout must be more than 0 seconds")
        if self.site_parallel not in SITE_PARALLEL:
            raise ConfigError(f"site_parallel must be one of {', '.join(SITE_PARALLEL)}")
        if self.threads < 0:
            raise ConfigError("threads must be 0 or more")
        if (self.cert is None) != (self.key is None):
            raise ConfigError("cert and key go together: give both or neither")
        if self.cert is not None and self.ca is None:
            raise ConfigError("mutual TLS (cert, key) needs ca as well")
        for name in ("ca", "cert", "key"):
            path = getattr(self, name)
            if path is not None and not Path(path).is_file():
                raise ConfigError(f"{name}: {path} is not a readable file")
        if not self.name:
            self.name = f"{socket.gethostname()}-p{self.partition}"
