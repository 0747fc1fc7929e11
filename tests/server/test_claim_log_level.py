"""The stock demo's honest, unequal shares of digits make the claim cap weigh the
largest share as the median every round: routine, logged at INFO. A claim far over the
median, or over --max-examples, is still a WARNING."""

from __future__ import annotations

import asyncio
import logging
from pathlib import Path
from typing import Any

import pytest

from .test_coordinator import REAL_DEADLINE_S, Harness, no_network, run

__all__ = ["no_network"]


def capped(caplog: pytest.LogCaptureFixture) -> list[logging.LogRecord]:
    return [r for r in caplog.records if "examples; weighed as" in r.getMessage()]


def claims_round(tmp_path: Path, claims: tuple[int, int, int], **settings: Any) -> None:
    async def scenario() -> None:
        h = Harness(tmp_path, min_clients=3, **settings)
        running, _ = await h.start("a", "b", "c")
        for i, (name, claim) in enumerate(zip("abc", claims, strict=True)):
            await h.upload(name, i, value=0.01, num_examples=claim)
        await asyncio.wait_for(running, REAL_DEADLINE_S)

    run(scenario)


def test_the_demo_shares_are_capped_at_info(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger="fedstream.server.safeguards")
    claims_round(tmp_path, (373, 407, 357))  # the stock demo's three digits shares
    (record,) = capped(caplog)
    assert record.levelno == logging.INFO
    assert "b claims 407 examples; weighed as 373" in record.getMessage()
    assert not [r for r in caplog.records if r.levelno >= logging.WARNING]


def test_a_claim_ten_times_the_median_is_a_warning(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger="fedstream.server.safeguards")
    claims_round(tmp_path, (10, 10, 10**12))
    (record,) = capped(caplog)
    assert record.levelno == logging.WARNING


def test_a_claim_over_max_examples_is_a_warning(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger="fedstream.server.safeguards")
    claims_round(tmp_path, (10, 12, 11), max_examples=11, claim_cap_factor=0)
    (record,) = capped(caplog)
    assert record.levelno == logging.WARNING
