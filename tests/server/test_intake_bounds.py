"""The upload intake's bounds: a progress floor under every upload, a cap on uploads
spooling at once, idle spool files released, and a full spool disk refused precisely and
logged once per burst. Plus the pieces alone: `RateFloor` and `RateLimitedLog`."""

from __future__ import annotations

import asyncio
import errno
import logging
import subprocess
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import pytest
import torch

from fedstream.common.logs import RateLimitedLog
from fedstream.common.wire.manifest import Manifest
from fedstream.common.wire.stream import iter_chunks
from fedstream.server.config import UplinkConfig
from fedstream.server.errors import TransferStalled
from fedstream.server.intake import UploadIntake
from fedstream.server.spool import SpoolFiles, SpoolFull, UploadSpool
from fedstream.server.transfer import BUCKETS_PER_WINDOW, RateFloor

KIB = 1024


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


# RateFloor alone


def test_a_trickle_is_cut_one_window_in_with_the_rate_the_floor_and_the_window() -> None:
    clock = Clock()
    floor = RateFloor(64 * KIB, 30.0, clock)
    with pytest.raises(TransferStalled) as cut:
        for _ in range(100):  # one byte every five seconds
            clock.now += 5.0
            floor.add(1)
    assert clock.now - 1000.0 == 30.0  # the first judgement, one window in
    message = str(cut.value)
    assert "6 bytes in the last 30s (0 B/s), below the floor of 65536 B/s" in message


def test_the_first_window_is_not_judged() -> None:
    clock = Clock()
    floor = RateFloor(64 * KIB, 30.0, clock)
    clock.now += 29.9
    floor.add(1)
    floor.check()


def test_a_slow_steady_transfer_above_the_floor_runs_for_ever() -> None:
    clock = Clock()
    floor = RateFloor(64 * KIB, 30.0, clock)
    for _ in range(10_000):  # 1000 s at 70 KiB/s, in 7 KiB chunks every 0.1 s
        clock.now += 0.1
        floor.add(7 * KIB)
    assert floor.total == 10_000 * 7 * KIB


def test_a_fast_start_does_not_pay_for_a_later_stall() -> None:
    """The floor judges the last window, not the average since the start."""
    clock = Clock()
    floor = RateFloor(64 * KIB, 30.0, clock)
    floor.add(1 << 30)  # a gigabyte at once
    clock.now += 100.0
    with pytest.raises(TransferStalled, match="0 bytes in the last 30s"):
        floor.check()


def test_a_silent_transfer_is_cut_by_check() -> None:
    clock = Clock()
    floor = RateFloor(100.0, 10.0, clock)
    clock.now += 5.0
    floor.add(2000)  # 400 B/s so far
    clock.now += 5.0
    floor.check()  # 2000 bytes in 10 s: 200 B/s
    clock.now += 10.0
    with pytest.raises(TransferStalled, match="0 bytes in the last 10s"):
        floor.check()


def test_a_zero_floor_never_cuts() -> None:
    clock = Clock()
    floor = RateFloor(0.0, 1.0, clock)
    clock.now += 1e6
    floor.add(0)
    floor.check()


def test_samples_stay_bounded_per_window() -> None:
    clock = Clock()
    floor = RateFloor(1.0, 1.0, clock)
    for _ in range(100_000):
        clock.now += 0.001
        floor.add(10)
    assert len(floor._buckets) <= BUCKETS_PER_WINDOW + 1


# RateLimitedLog alone


def test_one_record_per_key_per_interval_and_the_count_of_the_rest(
    caplog: pytest.LogCaptureFixture,
) -> None:
    clock = Clock()
    limited = RateLimitedLog(logging.getLogger("t.limited"), interval=60.0, clock=clock)
    with caplog.at_level(logging.WARNING, "t.limited"):
        assert limited.log(logging.WARNING, "c1", "refused %s", "c1")
        for _ in range(5):
            clock.now += 1.0
            assert not limited.log(logging.WARNING, "c1", "refused %s", "c1")
        assert limited.log(logging.WARNING, "c2", "refused %s", "c2")
        clock.now += 60.0
        assert limited.log(logging.WARNING, "c1", "refused %s", "c1")
    assert [r.getMessage() for r in caplog.records] == [
        "refused c1",
        "refused c2",
        "refused c1 (and 5 like it in the 60s before, not logged)",
    ]


def test_a_flood_of_keys_is_forgotten_oldest_first() -> None:
    clock = Clock()
    limited = RateLimitedLog(logging.getLogger("t.flood"), max_keys=3, clock=clock)
    for key in range(10):
        assert limited.log(logging.DEBUG, key, "k")
    assert len(limited._keys) == 3
    assert limited.log(logging.DEBUG, 0, "k")  # forgotten, so logged again
    assert not limited.log(logging.DEBUG, 9, "k")


# The intake


def model() -> dict[str, torch.Tensor]:
    return {"w": torch.zeros(64), "b": torch.zeros(16)}


MANIFEST = Manifest.from_tensors(model())


def intake_of(spool_dir: Path, **bounds: object) -> UploadIntake:
    return UploadIntake(UplinkConfig(), MANIFEST, spool_dir, **bounds)  # type: ignore[arg-type]


async def chunks_of(tensors: dict[str, torch.Tensor], size: int) -> AsyncIterator[memoryview]:
    for piece in iter_chunks(list(tensors.values()), size):
        yield memoryview(piece)


async def receive(intake: UploadIntake, chunks: AsyncIterator[memoryview]) -> int:
    async with intake.receive("u", "c", 1, {}, MANIFEST, chunks) as update:
        return update.nbytes


def test_an_upload_below_the_floor_is_cut_and_its_spool_kept_for_the_next(
    tmp_path: Path,
) -> None:
    clock = Clock()
    intake = intake_of(tmp_path, min_rate=1000.0, window=30.0, clock=clock)

    async def trickle() -> AsyncIterator[memoryview]:
        for piece in iter_chunks(list(model().values()), 1):
            clock.now += 5.0
            yield memoryview(piece)

    with pytest.raises(TransferStalled, match=r"6 bytes in the last 30s .* floor of 1000 B/s"):
        asyncio.run(receive(intake, trickle()))
    assert intake._files.idle() == 1
    assert asyncio.run(receive(intake, chunks_of(model(), 100))) == MANIFEST.total_bytes
    intake.close()


def test_uploads_past_max_uploads_wait_for_a_slot(tmp_path: Path) -> None:
    intake = intake_of(tmp_path, max_uploads=1)
    pieces = list(iter_chunks(list(model().values()), 64))
    first_started = asyncio.Event()
    first_may_end = asyncio.Event()
    second_started = asyncio.Event()

    async def held() -> AsyncIterator[memoryview]:
        first_started.set()
        for piece in pieces:
            await first_may_end.wait()
            yield memoryview(piece)

    async def waiting() -> AsyncIterator[memoryview]:
        second_started.set()
        for piece in pieces:
            yield memoryview(piece)

    async def scenario() -> None:
        first = asyncio.create_task(receive(intake, held()))
        second = asyncio.create_task(receive(intake, waiting()))
        await asyncio.wait_for(first_started.wait(), 10)
        for _ in range(20):  # give the second every chance to start
            await asyncio.sleep(0)
        assert not second_started.is_set()
        first_may_end.set()
        await asyncio.wait_for(asyncio.gather(first, second), 10)
        assert second_started.is_set()

    asyncio.run(scenario())
    intake.close()


def test_idle_spool_files_are_bounded_by_max_idle(tmp_path: Path) -> None:
    files = SpoolFiles(tmp_path, max_idle=2)
    taken = [files.take() for _ in range(5)]
    for f in taken:
        f.write(b"x" * 4096)
        files.give_back(f)
    assert files.idle() == 2
    assert sum(f.closed for f in taken) == 3


@pytest.fixture
def tiny_fs(tmp_path: Path) -> Iterator[Path]:
    """A 1 MiB tmpfs: a disk that fills up."""
    where = tmp_path / "tiny"
    where.mkdir()
    mounted = subprocess.run(
        ["mount", "-t", "tmpfs", "-o", "size=1m", "tmpfs", str(where)],
        capture_output=True,
        check=False,
    )
    if mounted.returncode != 0:
        pytest.skip(f"cannot mount a 1 MiB tmpfs (needs root): {mounted.stderr.decode()[:200]}")
    try:
        yield where
    finally:
        subprocess.run(["umount", "--lazy", str(where)], check=True)


def big_model() -> dict[str, torch.Tensor]:
    return {"w": torch.zeros(512 * KIB), "b": torch.zeros(16)}  # 2 MiB


def test_a_full_spool_disk_refuses_each_upload_and_logs_once(
    tiny_fs: Path, caplog: pytest.LogCaptureFixture
) -> None:
    manifest = Manifest.from_tensors(big_model())
    intake = UploadIntake(UplinkConfig(), manifest, tiny_fs / "spool")

    async def upload() -> None:
        async with intake.receive("u", "c", 1, {}, manifest, chunks_of(big_model(), 1 << 16)):
            pass

    try:
        with caplog.at_level(logging.ERROR, "fedstream.server.intake"):
            for _ in range(5):
                with pytest.raises(SpoolFull, match="is full .No space left on device"):
                    asyncio.run(upload())
    finally:
        intake.close()
    full = [r for r in caplog.records if "uploads refused" in r.getMessage()]
    assert len(full) == 1, [r.getMessage() for r in caplog.records]
    assert str(tiny_fs / "spool") in full[0].getMessage()


class QuotaFile:
    """A spool file on a filesystem whose quota is spent."""

    closed = False

    def write(self, data: memoryview) -> int:
        raise OSError(errno.EDQUOT, "Disk quota exceeded")

    def seek(self, offset: int) -> int:
        return 0


def test_a_spent_quota_is_a_full_spool(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    files = SpoolFiles(tmp_path)
    monkeypatch.setattr(files, "take", QuotaFile)
    spool = UploadSpool(files, "u", MANIFEST)
    with pytest.raises(SpoolFull, match="Disk quota exceeded"):
        spool.write(memoryview(b"\0" * 8))
