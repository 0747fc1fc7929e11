"""The coordinator's configuration: one dataclass per component, composed into ServerConfig.

Each component (transport, rounds, uplink, streaming, strategy, evaluation) documents and validates
its own fields, so a part of the coordinator can be typed as taking just the component it
needs. `ServerConfig` inherits them all: its fields stay flat (`config.min_clients`,
`--min-clients`, `FEDSTREAM_SERVER_MIN_CLIENTS`, `min_clients` in the TOML `[server]`
table), and `fedstream server --help` lists the flags under one heading per component.
The aggregation components (strategy, safeguards, privacy) live in `aggregation_config.py`.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from fedstream.common.codecs import CODEC_NAMES
from fedstream.common.config import ACTION, DEFAULT_HELP, ConfigError, require_positive
from fedstream.common.round_config import ConfigScalar, parse_scalar
from fedstream.server.admission.exposure import (
    require_authentication_off_loopback,
    require_tls_off_loopback,
)
from fedstream.server.aggregation_config import (
    PrivacyConfig,
    SafeguardsConfig,
    StrategyConfig,
    validate_aggregation,
)

MIB = 1 << 20
MAX_PORT = 65535


def check_address(setting: str, address: str) -> None:
    """ConfigError unless `address` is HOST:PORT with a port from 0 (any free one) to
    65535: grpc would listen on some other port than one beyond the range."""
    host, sep, port = address.rpartition(":")
    if not sep or not host or not port.isdigit():
        raise ConfigError(f"{setting}: expected HOST:PORT, got {address!r}")
    if int(port) > MAX_PORT:
        raise ConfigError(
            f"{setting}: port {port} in {address} is out of range: 0 (any free port) to {MAX_PORT}"
        )


@dataclass
class TransportConfig:
    """How the coordinator listens and moves bytes: its address, the chunking of model
    streams, and how long a quiet client or a stalled transfer is waited for."""

    address: str = "127.0.0.1:50051"
    """HOST:PORT the coordinator listens on (port 0 picks a free one); an address other
    than loopback needs TLS (--tls-cert, --tls-key) or --insecure."""
    chunk_bytes: int = MIB
    """Bytes per streamed chunk of model data."""
    max_chunk_bytes: int = 16 * MIB
    """Largest chunk accepted from a client."""
    poll_timeout: float = 20.0
    """Seconds a long-poll waits for work before telling the client to poll again (at
    most half of --client-timeout, so that a waiting client stays live)."""
    client_timeout: float = 120.0
    """Seconds without any call after which an idle client is no longer selected."""
    stall_timeout: float = 60.0
    """Seconds an upload may move no bytes before it is dropped as stalled."""
    min_transfer_rate: float = 64 * 1024
    """Bytes per second a download or upload must average over --transfer-window; a
    slower one is cut (a peer trickling bytes cannot hold a round open)."""
    transfer_window: float = 30.0
    """Seconds over which a transfer's rate is measured against --min-transfer-rate."""
    max_uploads: int = 16
    """Uploads received at once; more wait for a free slot (memory does not grow with
    the number of open streams)."""
    heartbeat_seconds: float = 10.0
    """How often a client holding a task calls Heartbeat; one silent for three times
    this is released from its round."""

    def validate(self) -> None:
        check_address("address", self.address)
        if not 1024 <= self.chunk_bytes <= self.max_chunk_bytes:
            raise ConfigError(
                f"chunk_bytes must be between 1 KiB and max_chunk_bytes "
                f"({self.max_chunk_bytes}), got {self.chunk_bytes}"
            )
        require_positive("poll_timeout", self.poll_timeout)
        require_positive("client_timeout", self.client_timeout)
        require_positive("stall_timeout", self.stall_timeout)
        if not self.min_transfer_rate >= 0:
            raise ConfigError(f"min_transfer_rate must be at least 0, got {self.min_transfer_rate}")
        require_positive("transfer_window", self.transfer_window)
        if self.max_uploads < 1:
            raise ConfigError(f"max_uploads must be at least 1, got {self.max_uploads}")
        require_positive("heartbeat_seconds", self.heartbeat_seconds)


@dataclass
class SecurityConfig:
    """Who may talk to the coordinator: TLS, mutual TLS, per-client tokens, and how many
    sessions it holds."""

    tls_cert: Path | None = None
    """Server certificate (PEM) for TLS; with --tls-key."""
    tls_key: Path | None = None
    """Server private key (PEM) for TLS; with --tls-cert."""
    client_ca: Path | None = None
    """CA certificate (PEM) that signs client certificates: mutual TLS, and a client's
    identity is its certificate's common name."""
    tokens: Path | None = None
    """File of per-client tokens, one `NAME SHA256-HEX` a line (`fedstream token NAME`
    makes one): a client must present the token of the name it joins as."""
    insecure: bool = False
    """Listen on a non-loopback address without TLS (plaintext: anyone on the network can
    read the model and join)."""
    open_enrolment: bool = False
    """On a non-loopback address, let clients join without proving who they are (no
    --client-ca and no --tokens): anyone who reaches the port can join under any free
    name. Without it such a coordinator refuses to start."""
    max_clients: int = 256
    """Client sessions the coordinator holds; Joins beyond it are refused."""

    @property
    def tls(self) -> bool:
        return self.tls_cert is not None

    @property
    def authenticates(self) -> bool:
        """Whether every client proves its identity (mutual TLS or tokens)."""
        return self.client_ca is not None or self.tokens is not None

    def validate(self) -> None:
        if (self.tls_cert is None) != (self.tls_key is None):
            raise ConfigError("tls_cert and tls_key go together: give both or neither")
        if self.client_ca is not None and self.tls_cert is None:
            raise ConfigError("client_ca (mutual TLS) needs tls_cert and tls_key")
        for name in ("tls_cert", "tls_key", "client_ca", "tokens"):
            path = getattr(self, name)
            if path is not None and not Path(path).is_file():
                raise ConfigError(f"{name}: {path} is not a readable file")
        if self.max_clients < 1:
            raise ConfigError(f"max_clients must be at least 1, got {self.max_clients}")


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

    def published(self) -> dict[str, ConfigScalar]:
        """The settings every round sends its clients (before the strategy's own)."""
        settings = {key: parse_scalar(value) for key, value in self.round_config.items()}
        if self.proximal_mu > 0:
            settings["proximal_mu"] = self.proximal_mu
        return settings

    def validate(self) -> None:
        if self.rounds < 1:
            raise ConfigError(f"rounds must be at least 1, got {self.rounds}")
        if self.min_clients < 1:
            raise ConfigError(f"min_clients must be at least 1, got {self.min_clients}")
        if not 0.0 < self.fraction <= 1.0:
            raise ConfigError(f"fraction must be in (0, 1], got {self.fraction}")
        if self.min_reports < 1:
            raise ConfigError(f"min_reports must be at least 1, got {self.min_reports}")
        require_positive("round_timeout", self.round_timeout)
        if not self.proximal_mu >= 0:
            raise ConfigError(f"proximal_mu must be at least 0, got {self.proximal_mu}")
        if not self.done_grace >= 0:
            raise ConfigError(f"done_grace must be at least 0, got {self.done_grace}")


@dataclass
class UplinkConfig:
    """How clients compress the updates they send."""

    uplink_codec: str = "raw"
    """Codec of client updates: raw, fp16, bf16, int8 or int4 (per-block scales), topk or
    topk2 (top-k with 2-bit values)."""
    uplink_zstd: bool = False
    """Compress client updates losslessly with zstd on top of the uplink codec."""
    topk_fraction: float = 0.01
    """Fraction of each tensor's elements a topk or topk2 update carries."""

    def validate(self) -> None:
        if self.uplink_codec not in CODEC_NAMES:
            raise ConfigError(
                f"uplink_codec must be one of {', '.join(CODEC_NAMES)}, got {self.uplink_codec!r}"
            )
        if not 0.0 < self.topk_fraction <= 1.0:
            raise ConfigError(f"topk_fraction must be in (0, 1], got {self.topk_fraction}")


@dataclass
class StreamingConfig:
    """Streaming fragments (docs/low-communication.md): each round synchronises one of
    `fragments` contiguous parts of the model, in turn."""

    fragments: int = 1
    """Cut the exchanged tensors into F fragments; round r synchronises fragment
    (r - 1) mod F, so F rounds make one outer step of the whole model (1: every round
    synchronises the whole model)."""
    fragment_alpha: float = 0.5
    """Streaming: the share of its own fragment a client keeps when the new global
    fragment arrives (local <- alpha local + (1 - alpha) global)."""

    def validate(self) -> None:
        if self.fragments < 1:
            raise ConfigError(f"fragments must be at least 1, got {self.fragments}")
        if not 0.0 <= self.fragment_alpha <= 1.0:
            raise ConfigError(f"fragment_alpha must be in [0, 1], got {self.fragment_alpha}")


@dataclass
class DurabilityConfig:
    """What outlives a cut upload and a coordinator crash: the round's log of verified
    updates (docs/checkpoints.md, "The round's log") and cut uploads kept for resuming."""

    round_log_fsync: bool = False
    """Put each logged update on disk (fsync) before acknowledging it: a power cut then
    loses no acknowledged update, at the cost of writing it out at once
    (docs/checkpoints.md gives the figure). Without it a kill -9 loses nothing, a power
    cut the updates not yet written back."""
    partial_upload_seconds: float = 600.0
    """Seconds a cut upload is kept for its client to resume at the byte it reached
    (0: cut uploads are not kept; a client starts again from byte 0)."""
    partial_upload_bytes: int = 8 << 30
    """Most bytes of a cut upload kept per client; a larger cut upload is dropped."""

    def validate(self) -> None:
        if not self.partial_upload_seconds >= 0:
            raise ConfigError(
                f"partial_upload_seconds must be at least 0, got {self.partial_upload_seconds}"
            )
        if self.partial_upload_bytes < 0:
            raise ConfigError(
                f"partial_upload_bytes must be at least 0, got {self.partial_upload_bytes}"
            )


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
        require_positive("eval_timeout", self.eval_timeout)


@dataclass
class StatusConfig:
    """The status page, /status.json and Prometheus /metrics: an HTTP port of their own,
    behind the same TLS settings as the coordinator."""

    status_address: str = "127.0.0.1:0"
    """HOST:PORT of the status page (port 0 picks a free one, written to
    RUN_DIR/coordinator.json and the log; empty: no status page); an address other than
    loopback needs TLS or --insecure, as --address does."""

    def validate(self) -> None:
        if not self.status_address:
            return
        check_address("status_address", self.status_address)


@dataclass
class ServerConfig(
    TransportConfig,
    SecurityConfig,
    RoundsConfig,
    UplinkConfig,
    StreamingConfig,
    DurabilityConfig,
    StrategyConfig,
    SafeguardsConfig,
    PrivacyConfig,
    EvaluationConfig,
    StatusConfig,
):
    """The run: its directory, task and seed, and how the coordinator process runs."""

    run_dir: Path = Path("runs/latest")
    """Run directory: checkpoints, metrics.jsonl, plot; an existing one is resumed."""
    task: str = "digits"
    """Task: a built-in name (digits, charlm, synthetic) or package.module:ClassName."""
    task_opt: dict[str, str] = field(default_factory=dict)
    """Task option KEY=VALUE, e.g. params=100e6 for synthetic; --help-task lists them."""
    help_task: bool = field(default=False, metadata={ACTION: True})
    """List the task's options and round settings (names, types, defaults) and exit."""
    seed: int = 0
    """Seed for model initialisation, client selection and client data splits."""
    init_weights: Path | None = None
    """Start a new run from these weights instead of the task's initialisation: a
    torch.save state dict (.pt/.pth, loaded with weights_only=True), a .safetensors file,
    or a fedstream checkpoint (RUN_DIR/checkpoints/round_NNNNN.safetensors); round 0 is
    their evaluation. Not applied again on resume."""
    keep_checkpoints: int = 3
    """Round checkpoints kept in the run directory (the newest ones)."""
    spool_dir: Path | None = field(default=None, metadata={DEFAULT_HELP: "RUN_DIR/spool"})
    """Where uploads are spooled while they arrive."""
    threads: int = 0
    """Torch CPU threads (0 keeps torch's default); 1 where clients share the machine."""
    log_level: str = "INFO"
    """Logging level: DEBUG, INFO, WARNING or ERROR."""
    progress_file: Path | None = None
    """JSON file the coordinator keeps its line about the round in flight in, for another
    process to show (fedstream demo does); the line itself goes to stderr: redrawn in place
    on a terminal, logged every few seconds otherwise."""

    def validate(self) -> None:
        """Every component's checks, then the run's own."""
        TransportConfig.validate(self)
        SecurityConfig.validate(self)
        require_tls_off_loopback("address", self.address, self.tls, self.insecure)
        require_authentication_off_loopback(self.address, self.authenticates, self.open_enrolment)
        RoundsConfig.validate(self)
        UplinkConfig.validate(self)
        StreamingConfig.validate(self)
        if self.fragments > 1 and self.strategy == "fedsgd":
            raise ConfigError("fragments: a FedSGD round needs the whole model (fragments 1)")
        DurabilityConfig.validate(self)
        validate_aggregation(self, self, self)
        EvaluationConfig.validate(self)
        if self.init_weights is not None and not Path(self.init_weights).is_file():
            raise ConfigError(f"init_weights: {self.init_weights} is not a readable file")
        StatusConfig.validate(self)
        if self.status_address:
            require_tls_off_loopback(
                "status_address", self.status_address, self.tls, self.insecure, "the status page"
            )
        if self.keep_checkpoints < 1:
            raise ConfigError(f"keep_checkpoints must be at least 1, got {self.keep_checkpoints}")
        if self.threads < 0:
            raise ConfigError(f"threads must be 0 or more, got {self.threads}")

    @property
    def spool_path(self) -> Path:
        return self.spool_dir if self.spool_dir is not None else self.run_dir / "spool"
