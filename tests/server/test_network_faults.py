"""Broken and slow links between a client and the coordinator, through a fault proxy."""

from __future__ import annotations

import json
import logging

import pytest

from .conftest import ClientThread, client_config, wide_task
from .faultproxy import FaultProxy

MODEL_BYTES = (2 << 20) * 4 + 12 * 4 + 5 * 2


def test_cut_download_resumes_from_its_offset(coordinator, tmp_path, caplog):
    caplog.set_level(logging.INFO)
    running = coordinator(task=wide_task(), rounds=1, min_clients=1, chunk_bytes=64 << 10)
    with FaultProxy(running.address) as proxy:
        proxy.cut_downstream_after(2 << 20)
        config = client_config(proxy.address, 0, chunk_bytes=64 << 10)
        client = ClientThread(config, wide_task(0))
        assert client.join(60) == 0
        assert proxy.cuts == 1
    running.wait_done(30)
    resumed = [r.getMessage() for r in caplog.records if "resuming" in r.getMessage()]
    assert resumed, "the client did not report resuming its download"
    assert "broke at byte 0 " not in resumed[0]
    record = json.loads((tmp_path / "run" / "metrics.jsonl").read_text())
    assert record["updates"] == 1
    # resumed, not restarted: the first try served at most a model (some of it still in
    # flight when the proxy cut), the second only what lay past the resumed offset
    assert MODEL_BYTES <= record["bytes_down"] < 2 * MODEL_BYTES


@pytest.mark.slow
def test_slow_upload_still_moving_is_not_a_straggler(coordinator, tmp_path):
    running = coordinator(
        task=wide_task(), rounds=1, min_clients=1, round_timeout=3.0, stall_timeout=1.0
    )
    with FaultProxy(running.address, upstream_delay_s=0.03) as proxy:
        config = client_config(proxy.address, 0, stall_timeout=1.0)
        client = ClientThread(config, wide_task(0))
        assert client.join(120) == 0
    running.wait_done(30)
    record = json.loads((tmp_path / "run" / "metrics.jsonl").read_text())
    # the upload (8 MiB at 64 KiB per 30 ms, about 4 s) outlasts the round deadline and
    # the stall timeout, yet it keeps moving well above the rate floor, so it is waited
    # for (up to the round's hard end at twice its timeout) and counts
    assert record["updates"] == 1 and 3.0 < record["duration_s"] < 6.0
