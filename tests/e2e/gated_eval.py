"""A `digits` task whose federated evaluation waits at a gate the test opens.

Imported by real `fedstream server` / `fedstream client` processes as
`gated_eval:GatedEvalTask`, with this directory on their PYTHONPATH (not the repository
root, which would make the source folders `server`, `client`, `common` importable as
top-level packages).

Task option `gate_dir` (default `gate`, relative to the process's working directory):

    GATE_DIR/train-pP.txt    one line per `train` call of partition P: the round number
    GATE_DIR/eval-pP-N       touched when partition P enters its N-th `evaluate_local`
    GATE_DIR/open            created by the test: `evaluate_local` returns once it exists

`evaluate_local` polls for the gate for at most `gate_timeout` seconds (default 120), then
carries on, so a process never hangs forever on a test that forgot to open it.
"""

from __future__ import annotations

import time
from collections.abc import Mapping
from pathlib import Path

from torch import nn

from fedstream.tasks import ConfigScalar, EvalResult, TrainResult
from fedstream.tasks.digits import DigitsTask
from fedstream.tasks.training import config_int

GATE_FILE = "open"


class GatedEvalTask(DigitsTask):
    def __init__(self, options: Mapping[str, str] | None = None, seed: int = 0) -> None:
        super().__init__(options, seed)
        self.gate_dir = Path(self.option("gate_dir", "gate"))
        self.gate_timeout = self.float_option("gate_timeout", 120.0)
        self.evaluations = 0

    def train(self, model: nn.Module, config: Mapping[str, ConfigScalar]) -> TrainResult:
        result = super().train(model, config)
        self.gate_dir.mkdir(parents=True, exist_ok=True)
        with open(self.gate_dir / f"train-p{self.partition}.txt", "a") as log:
            log.write(f"{config_int(config, 'round', 0)}\n")
        return result

    def evaluate_local(self, model: nn.Module) -> EvalResult | None:
        self.evaluations += 1
        self.gate_dir.mkdir(parents=True, exist_ok=True)
        (self.gate_dir / f"eval-p{self.partition}-{self.evaluations}").touch()
        deadline = time.monotonic() + self.gate_timeout
        while not (self.gate_dir / GATE_FILE).exists() and time.monotonic() < deadline:
            time.sleep(0.05)
        return super().evaluate_local(model)
