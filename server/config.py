"""The coordinator's configuration: one dataclass per component, composed into ServerConfig.

Each component (transport, rounds, uplink, strategy, evaluation) documents and validates
its own fields, so a part of the coordinator can be typed as taking just the component it
needs. `ServerConfig` inherits them all: its fields stay flat (`config.min_clients`,
`--min-clients`, `FEDSTREAM_SERVER_MIN_CLIENTS`, `min_clients` in the TOML `[server]`
table), and `fedstream server --help` lists the flags under one heading per component.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from pathlib import Path

from fedstream.common.codecs import CODEC_NAMES
from fedstream.common.config import CHOICES, DEFAULT_HELP, ConfigError
from fedstream.server.strategies import STRATEGIES, class_defaults
from fedstream.server.strategies.fedsgd import OPTIMIZERS

MIB = 1 << 20


def _positive(name: str, value: float) -> None:
    if not value > 0:
        raise ConfigError(f"{name} must be positive, got {value}")


@dataclass
class TransportConfig:
    """How the coordinator listens and moves bytes: its address, the chunking of model
    streams, and how long a quiet client or a stalled transfer is waited for."""

    address: str = "0.0.0.0:50051"
    """HOST:PORT the coordinator listens on (port 0 picks a free one)."""
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

    def validate(self) -> None:
        host, sep, port = self.address.rpartition(":")
        if not sep or not host or not port.isdigit():
            raise ConfigError(f"address: expected HOST:PORT, got {self.address!r}")
        if not 1024 <= self.chunk_bytes <= self.max_chunk_bytes:
            raise ConfigError(
                f"chunk_bytes must be between 1 KiB and max_chunk_bytes "
                f"({self.max_chunk_bytes}), got {self.chunk_bytes}"
            )
        _positive("poll_timeout", self.poll_timeout)
        _positive("client_timeout", self.client_timeout)
        _positive("stall_timeout", self.stall_timeout)


@dataclass
class RoundsConfig:
    """The run's rounds: how many, who takes part, when a round closes, and the training
    settings published to its clients."""

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
    round_config: dict[str, str] = field(default_factory=dict)
    """Training setting KEY=VALUE sent to clients each round, e.g. lr=0.05, local_epochs=2."""
    proximal_mu: float = 0.0
    """FedProx proximal coefficient sent to clients in the round config (0: off)."""
    done_grace: float = 30.0
    """Seconds to keep serving after the last round so every client hears it is done."""

    def validate(self) -> None:
        if self.rounds < 1:
            raise ConfigError(f"rounds must be at least 1, got {self.rounds}")
        if self.min_clients < 1:
            raise ConfigError(f"min_clients must be at least 1, got {self.min_clients}")
        if not 0.0 < self.fraction <= 1.0:
            raise ConfigError(f"fraction must be in (0, 1], got {self.fraction}")
        if self.min_reports < 1:
            raise ConfigError(f"min_reports must be at least 1, got {self.min_reports}")
        _positive("round_timeout", self.round_timeout)
        if not self.proximal_mu >= 0:
            raise ConfigError(f"proximal_mu must be at least 0, got {self.proximal_mu}")
        if not self.done_grace >= 0:
            raise ConfigError(f"done_grace must be at least 0, got {self.done_grace}")


@dataclass
class UplinkConfig:
    """How clients compress the updates they send."""

    uplink_codec: str = "raw"
    """Codec of client updates: raw, fp16, bf16, int8 (per-block scales) or topk."""
    uplink_zstd: bool = False
    """Compress client updates losslessly with zstd on top of the uplink codec."""
    topk_fraction: float = 0.01
    """Fraction of each tensor's elements a topk update carries."""

    def validate(self) -> None:
        if self.uplink_codec not in CODEC_NAMES:
            raise ConfigError(
                f"uplink_codec must be one of {', '.join(CODEC_NAMES)}, got {self.uplink_codec!r}"
            )
        if not 0.0 < self.topk_fraction <= 1.0:
            raise ConfigError(f"topk_fraction must be in (0, 1], got {self.topk_fraction}")


@dataclass
class StrategyConfig:
    """How a round's updates become the next global model. A hyper-parameter left unset
    takes the strategy's own default."""

    strategy: str = field(default="fedavg", metadata={CHOICES: tuple(STRATEGIES)})
    """Aggregation strategy (fedavg weighs by examples, or by --client-weight)."""
    client_weight: dict[str, str] = field(default_factory=dict)
    """NAME=W: fedavg weighs client NAME's update by W instead of its number of examples
    (clients not named weigh 1)."""
    server_lr: float | None = field(
        default=None, metadata={DEFAULT_HELP: class_defaults("default_lr")}
    )
    """Server learning rate of the strategies that step a server optimiser; unset, each
    takes its own default."""
    server_momentum: float | None = field(
        default=None, metadata={DEFAULT_HELP: class_defaults("default_momentum")}
    )
    """Server momentum of the strategies that keep one; unset, each takes its own default."""
    server_optimizer: str = field(default="sgd", metadata={CHOICES: OPTIMIZERS})
    """fedsgd's optimiser over the mean gradient (sgd steps with --server-momentum)."""
    beta1: float = 0.9
    """First-moment decay of fedadam, fedyogi, fedadagrad, and of fedsgd's adam."""
    beta2: float = 0.99
    """Second-moment decay of fedadam and fedyogi, and of fedsgd's adam."""
    tau: float = 1e-3
    """Adaptivity of fedadam, fedyogi and fedadagrad (the epsilon of fedsgd's adam)."""

    def validate(self) -> None:
        if self.strategy not in STRATEGIES:
            raise ConfigError(
                f"strategy {self.strategy!r} is unknown: use one of {', '.join(STRATEGIES)}"
            )
        for name, weight in self.client_weight.items():
            try:
                value = float(weight)
            except ValueError:
                raise ConfigError(f"client_weight {name}: {weight!r} is not a number") from None
            if not math.isfinite(value) or value <= 0:
                raise ConfigError(f"client_weight {name}: {weight} must be positive and finite")
        if self.server_lr is not None:
            _positive("server_lr", self.server_lr)
        if self.server_momentum is not None and not 0 <= self.server_momentum < 1:
            raise ConfigError(f"server_momentum must be in [0, 1), got {self.server_momentum}")
        if self.server_optimizer not in OPTIMIZERS:
            raise ConfigError(
                f"server_optimizer must be one of {', '.join(OPTIMIZERS)}, "
                f"got {self.server_optimizer!r}"
            )
        if not 0 <= self.beta1 < 1:
            raise ConfigError(f"beta1 must be in [0, 1), got {self.beta1}")
        if not 0 <= self.beta2 < 1:
            raise ConfigError(f"beta2 must be in [0, 1), got {self.beta2}")
        _positive("tau", self.tau)


@dataclass
class EvaluationConfig:
    """Federated evaluation: selected clients score the new global model on their own
    held-out data."""

    eval_every: int = 0
    """Federated evaluation every K rounds: selected clients evaluate the new global model
    on their own held-out data (0: never)."""
    eval_timeout: float = 60.0
    """Seconds an evaluation phase waits for the clients' reports."""

    def validate(self) -> None:
        if self.eval_every < 0:
            raise ConfigError(f"eval_every must be at least 0, got {self.eval_every}")
        _positive("eval_timeout", self.eval_timeout)


@dataclass
class ServerConfig(TransportConfig, RoundsConfig, UplinkConfig, StrategyConfig, EvaluationConfig):
    """The run: its directory, task and seed, and how the coordinator process runs."""

    run_dir: Path = Path("runs/latest")
    """Run directory: checkpoints, metrics.jsonl, plot; an existing one is resumed."""
    task: str = "digits"
    """Task: a built-in name (digits, charlm, synthetic) or package.module:ClassName."""
    task_opt: dict[str, str] = field(default_factory=dict)
    """Task option KEY=VALUE, e.g. params=100e6 for synthetic."""
    seed: int = 0
    """Seed for model initialisation, client selection and client data splits."""
    keep_checkpoints: int = 3
    """Round checkpoints kept in the run directory (the newest ones)."""
    spool_dir: Path | None = field(default=None, metadata={DEFAULT_HELP: "RUN_DIR/spool"})
    """Where uploads are spooled while they arrive."""
    threads: int = 0
    """Torch CPU threads (0 keeps torch's default); 1 where clients share the machine."""
    log_level: str = "INFO"
    """Logging level: DEBUG, INFO, WARNING or ERROR."""

    def validate(self) -> None:
        """Every component's checks, then the run's own."""
        TransportConfig.validate(self)
        RoundsConfig.validate(self)
        UplinkConfig.validate(self)
        StrategyConfig.validate(self)
        EvaluationConfig.validate(self)
        if self.keep_checkpoints < 1:
            raise ConfigError(f"keep_checkpoints must be at least 1, got {self.keep_checkpoints}")
        if self.threads < 0:
            raise ConfigError(f"threads must be 0 or more, got {self.threads}")

    @property
    def spool_path(self) -> Path:
        return self.spool_dir if self.spool_dir is not None else self.run_dir / "spool"
