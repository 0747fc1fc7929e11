"""A run's identity on resume: the task, the options that shape the model, the seed and
the strategy; a site option (a task's own data path) may change."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from fedstream.common.config import ConfigError
from fedstream.server.assembly import run_identity
from fedstream.server.config import ServerConfig
from fedstream.server.run_store import RunStore
from fedstream.tasks import Task, TrainResult


class SiteTask(Task):
    site_options = frozenset({"data"})

    def build_model(self) -> torch.nn.Module:
        return torch.nn.Linear(2, int(self.option("width", "1")))

    def load_data(self, partition: int, num_partitions: int) -> None:
        pass

    def train(self, model: torch.nn.Module, config: object) -> TrainResult:
        raise NotImplementedError


def resume(run_dir: Path, fragments: int = 1, **task_opt: str) -> None:
    config = ServerConfig(
        run_dir=run_dir, task="mine:SiteTask", task_opt=task_opt, fragments=fragments
    )
    store = RunStore(run_dir, run_identity(config, SiteTask(task_opt)))
    try:
        if store.resume() is None:
            store.save(0, {"weight": torch.zeros(1, 2)}, {}, [])
    finally:
        store.close()


def test_a_site_option_may_change_on_resume_a_shaping_one_may_not(tmp_path: Path) -> None:
    resume(tmp_path, data="/site/a.csv", width="1")
    resume(tmp_path, data="/elsewhere/b.csv", width="1")
    resume(tmp_path, width="1")
    with pytest.raises(ConfigError, match="holds a different run"):
        resume(tmp_path, data="/site/a.csv", width="2")


def test_a_resume_with_another_fragment_count_is_another_run(tmp_path: Path) -> None:
    """Round r synchronises fragment (r - 1) mod F: with another F the checkpoint's
    strategy state and the clients' anchors would belong to other tensors."""
    resume(tmp_path, fragments=2, width="1")
    resume(tmp_path, fragments=2, width="1")
    with pytest.raises(ConfigError, match="holds a different run"):
        resume(tmp_path, fragments=3, width="1")
    with pytest.raises(ConfigError, match="holds a different run"):
        resume(tmp_path, width="1")
