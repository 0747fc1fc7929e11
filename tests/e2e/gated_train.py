"""A `synthetic` task whose training waits at a gate per round that the test opens.

Imported by real `fedstream server` / `fedstream client` processes as
`gated_train:GatedTrainTask`, with this directory on their PYTHONPATH (as gated_eval.py).

Task option `gate_dir` (default `gate`, relative to the process's working directory):

    GATE_DIR/train-pP-rR     touched when partition P starts training round R
    GATE_DIR/open-pP-rR      created by the test: partition P's training of round R
                             returns once it exists

`train` polls for its gate for at most `gate_timeout` seconds (default 120), then carries
on, so a process never hangs forever on a test that forgot to open it.
"""

from __future__ import annotations

import time
from collections.abc import Mapping
from pathlib import Path

from torch import nn

from fedstream.tasks import ConfigScalar, TrainResult
from fedstream.tasks.synthetic import SyntheticTask
from fedstream.tasks.training import config_int


class GatedTrainTask(SyntheticTask):
    def __init__(self, options: Mapping[str, str] | None = None, seed: int = 0) -> None:
        super().__init__(options, seed)
        self.gate_dir = Path(self.option("gate_dir", "gate"))
        self.gate_timeout = self.float_option("gate_timeout", 120.0)

    def train(self, model: nn.Module, config: Mapping[str, ConfigScalar]) -> TrainResult:
        number = config_int(config, "round", 0)
        self.gate_dir.mkdir(parents=True, exist_ok=True)
        (self.gate_dir / f"train-p{self.partition}-r{number}").touch()
        deadline = time.monotonic() + self.gate_timeout
        while (
            not (self.gate_dir / f"open-p{self.partition}-r{number}").exists()
            and time.monotonic() < deadline
        ):
            time.sleep(0.05)
        return super().train(model, config)
