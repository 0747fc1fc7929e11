"""Fixtures of the task tests: a small pretrained model directory, made once per session."""

from __future__ import annotations

from pathlib import Path

import pytest


def pytest_configure(config: pytest.Config) -> None:
    config.addinivalue_line("markers", "slow: takes more than about 10 s")


@pytest.fixture(scope="session")
def model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A BPE tokenizer (with a chat template) and a small Llama, saved with save_pretrained."""
    pytest.importorskip("transformers")
    from .llm_fixtures import make_model_dir

    return make_model_dir(tmp_path_factory.mktemp("pretrained") / "tiny-llama")
