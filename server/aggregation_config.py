"""The coordinator's aggregation components: the strategy that turns a round's updates into
the next global model, the safeguards around every strategy, and central differential
privacy. Composed into `ServerConfig` (`server/config.py`) with the other components."""

from __future__ import annotations

import math
from dataclasses import dataclass, field

from fedstream.common.config import CHOICES, DEFAULT_HELP, ConfigError, require_positive
from fedstream.server.strategies.catalog import (
    ROBUST_OPTIMIZERS,
    STRATEGIES,
    class_defaults,
    require_mean_based,
    require_robust,
    strategy_class,
)
from fedstream.server.strategies.fedsgd import OPTIMIZERS


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
    trim_fraction: float | None = field(
        default=None, metadata={DEFAULT_HELP: class_defaults("default_trim_fraction")}
    )
    """trimmed-mean: fraction b of the updates dropped at each end, per coordinate
    (floor(b*N) largest and smallest; unset, at least 1 from N = 3); below 0.5, so a
    value is left."""
    krum_byzantine: int | None = field(
        default=None, metadata={DEFAULT_HELP: "krum floor((N-3)/2) for a round of N"}
    )
    """krum: f, the Byzantine clients tolerated; a round with fewer than 2f+3 updates takes
    their coordinate-wise median instead (logged); unset, f follows each round's N."""
    krum_select: int | None = field(
        default=None, metadata={DEFAULT_HELP: class_defaults("default_select")}
    )
    """krum: m, the updates of lowest score averaged (1 is Krum, more is Multi-Krum; at most
    N-f are)."""
    robust_optimizer: str = field(default="none", metadata={CHOICES: ROBUST_OPTIMIZERS})
    """median, trimmed-mean, krum, geomedian: the server optimiser their aggregate drives as
    its pseudo-gradient (with --server-lr, --server-momentum, --beta1, --beta2, --tau);
    none steps by the aggregate itself."""
    geomedian_iterations: int | None = field(
        default=None, metadata={DEFAULT_HELP: class_defaults("default_iterations")}
    )
    """geomedian: Weiszfeld iterations (two passes over the round's spools each)."""

    def validate(self) -> None:
        strategy_class(self.strategy)
        for name, weight in self.client_weight.items():
            try:
                value = float(weight)
            except ValueError:
                raise ConfigError(f"client_weight {name}: {weight!r} is not a number") from None
            if not math.isfinite(value) or value <= 0:
                raise ConfigError(f"client_weight {name}: {weight} must be positive and finite")
        if self.server_lr is not None:
            require_positive("server_lr", self.server_lr)
        if self.server_momentum is not None and not 0 <= self.server_momentum < 1:
            raise ConfigError(f"server_momentum must be in [0, 1), got {self.server_momentum}")
        if self.robust_optimizer not in ROBUST_OPTIMIZERS:
            raise ConfigError(
                f"robust_optimizer must be one of {', '.join(ROBUST_OPTIMIZERS)}, "
                f"got {self.robust_optimizer!r}"
            )
        require_robust(self.strategy, self.robust_optimizer)
        if self.server_optimizer not in OPTIMIZERS:
            raise ConfigError(
                f"server_optimizer must be one of {', '.join(OPTIMIZERS)}, "
                f"got {self.server_optimizer!r}"
            )
        if not 0 <= self.beta1 < 1:
            raise ConfigError(f"beta1 must be in [0, 1), got {self.beta1}")
        if not 0 <= self.beta2 < 1:
            raise ConfigError(f"beta2 must be in [0, 1), got {self.beta2}")
        require_positive("tau", self.tau)
        if self.trim_fraction is not None and not 0 <= self.trim_fraction < 0.5:
            raise ConfigError(
                f"trim_fraction must be in [0, 0.5) so that a value is left, "
                f"got {self.trim_fraction}"
            )
        if self.krum_byzantine is not None and self.krum_byzantine < 0:
            raise ConfigError(f"krum_byzantine must be at least 0, got {self.krum_byzantine}")
        if self.krum_select is not None and self.krum_select < 1:
            raise ConfigError(f"krum_select must be at least 1, got {self.krum_select}")
        if self.geomedian_iterations is not None and self.geomedian_iterations < 1:
            raise ConfigError(
                f"geomedian_iterations must be at least 1, got {self.geomedian_iterations}"
            )


@dataclass
class SafeguardsConfig:
    """Safe defaults around every strategy (server/safeguards.py): how far one update may
    move the model and how much its claimed examples may weigh."""

    safeguards: bool = True
    """Refuse outlier updates, cap claimed examples and never commit a non-finite model
    (--no-safeguards turns all of them off)."""
    outlier_factor: float = 10.0
    """With 3 or more updates in a round, one whose L2 norm is over this many times the
    round's median norm is left out of the aggregate (0: no outlier rule)."""
    max_update_norm: float | None = None
    """An update whose L2 norm is over this bound is refused as it arrives."""
    max_examples: int | None = None
    """The most examples one update may claim for its weight; larger claims are capped."""
    claim_cap_factor: float = 1.0
    """No update weighs more than this many times the round's low median claimed examples
    (in a round of two, the smaller claim; 0: no relative cap; raise it where sites
    legitimately differ in size)."""
    clip_factor: float = 1.0
    """Bounded influence (docs/strategies.md#safeguards): with 3 or more updates each is
    pulled to within 2 x this many times the low median distance of the round's centre,
    then every update is clipped to this many times the round's low median L2 norm, which
    grows by at most 2x a round (0: neither)."""
    max_round_attempts: int = 5
    """A round whose updates are all refused, or give no model that may be committed,
    this many times ends the run with an error (exit 1), keeping the last
    committed model."""

    def validate(self) -> None:
        if not self.outlier_factor >= 0:
            raise ConfigError(f"outlier_factor must be at least 0, got {self.outlier_factor}")
        if self.outlier_factor and self.outlier_factor <= 1:
            raise ConfigError(
                f"outlier_factor must be over 1 (or 0 for none), got {self.outlier_factor}"
            )
        if self.max_update_norm is not None:
            require_positive("max_update_norm", self.max_update_norm)
        if self.max_examples is not None and self.max_examples < 1:
            raise ConfigError(f"max_examples must be at least 1, got {self.max_examples}")
        if not self.claim_cap_factor >= 0:
            raise ConfigError(f"claim_cap_factor must be at least 0, got {self.claim_cap_factor}")
        if not self.clip_factor >= 0:
            raise ConfigError(f"clip_factor must be at least 0, got {self.clip_factor}")
        if self.max_round_attempts < 1:
            raise ConfigError(
                f"max_round_attempts must be at least 1, got {self.max_round_attempts}"
            )
        if self.claim_cap_factor and self.claim_cap_factor < 1:
            raise ConfigError(
                f"claim_cap_factor must be at least 1 (or 0 for none), got {self.claim_cap_factor}"
            )


@dataclass
class PrivacyConfig:
    """Central differential privacy (server/strategies/private.py): each update clipped
    to an L2 norm, Gaussian noise on the mean, the privacy spent accounted every round."""

    dp_clip: float | None = None
    """Clip each update to this L2 norm and weigh updates equally (turns central DP on)."""
    dp_noise_multiplier: float = 0.0
    """z: the noise on the sum of clipped updates has standard deviation z * dp_clip."""
    dp_delta: float = 1e-5
    """The delta at which the epsilon spent is reported."""

    def validate(self) -> None:
        if self.dp_clip is not None:
            require_positive("dp_clip", self.dp_clip)
        elif self.dp_noise_multiplier:
            raise ConfigError("dp_noise_multiplier needs dp_clip: noise is scaled to the clip")
        if not self.dp_noise_multiplier >= 0:
            raise ConfigError(
                f"dp_noise_multiplier must be at least 0, got {self.dp_noise_multiplier}"
            )
        if not 0 < self.dp_delta < 1:
            raise ConfigError(f"dp_delta must be in (0, 1), got {self.dp_delta}")


def validate_aggregation(
    strategy: StrategyConfig, safeguards: SafeguardsConfig, privacy: PrivacyConfig
) -> None:
    """Each aggregation component's checks, then the rule between two of them: central
    DP wraps only a mean-based strategy."""
    StrategyConfig.validate(strategy)  # not strategy.validate(): it may be a ServerConfig
    SafeguardsConfig.validate(safeguards)
    PrivacyConfig.validate(privacy)
    if privacy.dp_clip is not None:
        require_mean_based(strategy_class(strategy.strategy))
