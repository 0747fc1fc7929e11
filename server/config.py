"""The coordinator's configuration."""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from pathlib import Path

from fedstream.common.codecs import CODEC_NAMES
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
    uplink_codec: str = "raw"
    """Codec of client updates: raw, fp16, bf16, int8 (per-block scales) or topk."""
    uplink_zstd: bool = False
    """Compress client updates losslessly with zstd on top of the uplink codec."""
    topk_fraction: float = 0.01
    """Fraction of each tensor's elements a topk update carries."""
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
    strategy: str = "fedavg"
    """Aggregation: mean, fedavg (by examples, or by --client-weight), fedsgd, fedavgm,
    fedadam, fedyogi or fedadagrad."""
    client_weight: dict[str, str] = field(default_factory=dict)
    """NAME=W: fedavg weighs client NAME's update by W instead of its number of examples
    (clients not named weigh 1)."""
    server_lr: float | None = None
    """Server learning rate (default per strategy: fedsgd 0.1, fedavgm 1, fedadam, fedyogi
    and fedadagrad 0.01)."""
    server_momentum: float | None = None
    """Server momentum (default per strategy: fedavgm 0.9, fedsgd 0)."""
    server_optimizer: str = "sgd"
    """fedsgd's optimiser over the mean gradient: sgd (with --server-momentum) or adam."""
    beta1: float = 0.9
    """First-moment decay of fedadam, fedyogi, fedadagrad, and of fedsgd's adam."""
    beta2: float = 0.99
    """Second-moment decay of fedadam and fedyogi, and of fedsgd's adam."""
    tau: float = 1e-3
    """Adaptivity of fedadam, fedyogi and fedadagrad (the epsilon of fedsgd's adam)."""
    proximal_mu: float = 0.0
    """FedProx proximal coefficient sent to clients in the round config (0: off)."""
    eval_every: int = 0
    """Federated evaluation every K rounds: selected clients evaluate the new global model
    on their own held-out data (0: never)."""
    eval_timeout: float = 60.0
    """Seconds an evaluation phase waits for the clients' reports."""

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
        if self.uplink_codec not in CODEC_NAMES:
            raise ConfigError(f"uplink_codec must be one of {', '.join(CODEC_NAMES)}")
        if not 0.0 < self.topk_fraction <= 1.0:
            raise ConfigError("topk_fraction must be in (0, 1]")
        for name, weight in self.client_weight.items():
            try:
                value = float(weight)
            except ValueError:
                raise ConfigError(f"client_weight {name}: {weight!r} is not a number") from None
            if not math.isfinite(value) or value <= 0:
                raise ConfigError(f"client_weight {name}: {weight} must be positive and finite")
        if self.server_optimizer not in ("sgd", "adam"):
            raise ConfigError(
                f"server_optimizer must be sgd or adam, got {self.server_optimizer!r}"
            )
        if not 0 <= self.beta1 < 1 or not 0 <= self.beta2 < 1:
            raise ConfigError("beta1 and beta2 must be in [0, 1)")
        if self.tau <= 0 or (self.server_lr is not None and self.server_lr <= 0):
            raise ConfigError("tau and server_lr must be positive")
        if self.server_momentum is not None and not 0 <= self.server_momentum < 1:
            raise ConfigError("server_momentum must be in [0, 1)")
        if self.proximal_mu < 0:
            raise ConfigError("proximal_mu must be at least 0")
        if self.eval_every < 0 or self.eval_timeout <= 0:
            raise ConfigError("eval_every must be at least 0 and eval_timeout positive")

    @property
    def spool_path(self) -> Path:
        return self.spool_dir if self.spool_dir is not None else self.run_dir / "spool"
