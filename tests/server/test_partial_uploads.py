"""Cut uploads are kept within their bounds: time, bytes, one per client, one round."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from fedstream.common.wire.manifest import Manifest
from fedstream.server.errors import OffsetOutOfRange
from fedstream.server.partial_uploads import PartialUploads, UploadKey
from fedstream.server.spool import SpoolFiles, UploadSpool

KEY = UploadKey(round=3, attempt=1, model_version=2)
MANIFEST = Manifest.from_tensors({"w": torch.zeros(64)})


class Clock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


def cut(files: SpoolFiles, nbytes: int) -> UploadSpool:
    spool = UploadSpool(files, "cut", MANIFEST)
    spool.write(memoryview(bytes(nbytes)))
    return spool


def test_a_cut_upload_is_kept_for_its_time_then_dropped(tmp_path: Path) -> None:
    files, clock = SpoolFiles(tmp_path), Clock()
    kept = PartialUploads(max_seconds=60.0, max_bytes=1 << 20, clock=clock)
    assert kept.keep("a", KEY, b"m", cut(files, 100))
    assert kept.offset("a", KEY) == 100 and kept.held_bytes() == 100
    assert kept.offset("b", KEY) == 0
    assert kept.offset("a", UploadKey(3, 2, 2)) == 0  # another attempt: nothing held
    clock.now += 60.0
    assert kept.offset("a", KEY) == 0 and kept.held_bytes() == 0
    assert files.idle() == 1  # its file went back to the pool


def test_bounds_refuse_to_keep(tmp_path: Path) -> None:
    files = SpoolFiles(tmp_path)
    assert not PartialUploads(60.0, 99).keep("a", KEY, b"m", cut(files, 100))
    assert not PartialUploads(0.0, 1 << 20).keep("a", KEY, b"m", cut(files, 100))
    assert not PartialUploads(60.0, 1 << 20).keep("a", KEY, b"m", cut(files, 0))


def test_one_per_client_and_round(tmp_path: Path) -> None:
    files = SpoolFiles(tmp_path)
    kept = PartialUploads(60.0, 1 << 20)
    kept.keep("a", KEY, b"m", cut(files, 100))
    kept.keep("a", KEY, b"m", cut(files, 40))  # a newer cut replaces the older
    kept.keep("b", UploadKey(2, 1, 1), b"m", cut(files, 10))
    assert kept.held_bytes() == 50
    kept.retain(KEY)  # round 3 opened: round 2's cut goes
    assert kept.offset("a", KEY) == 40 and kept.held_bytes() == 40


def test_a_resume_must_match_what_is_kept(tmp_path: Path) -> None:
    files = SpoolFiles(tmp_path)
    kept = PartialUploads(60.0, 1 << 20)
    spool = cut(files, 100)
    kept.keep("a", KEY, b"m", spool)
    for offset, manifest in ((99, b"m"), (100, b"other")):
        with pytest.raises(OffsetOutOfRange, match="holds 100 bytes"):
            kept.take("a", KEY, manifest, offset)
    assert kept.take("a", KEY, b"m", 100) is spool
    assert kept.resumed == 1 and kept.offset("a", KEY) == 0
