"""The committed stubs under common/proto/ are what protos/generate.py makes today."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
COMMITTED = ROOT / "common" / "proto" / "v1"


def test_generated_stubs_match_the_protos(tmp_path: Path) -> None:
    subprocess.run(
        [sys.executable, str(ROOT / "protos" / "generate.py"), "--out", str(tmp_path)],
        check=True,
        capture_output=True,
    )
    fresh = {p.name: p.read_text() for p in tmp_path.iterdir() if p.is_file()}
    committed = {p.name: p.read_text() for p in COMMITTED.iterdir() if p.is_file()}
    assert sorted(fresh) == sorted(committed), "stub files differ: run `make protos`"
    stale = [name for name in fresh if fresh[name] != committed[name]]
    assert not stale, f"stale generated stubs {stale}: run `make protos` and commit"


def test_stubs_import_through_the_fedstream_namespace() -> None:
    from fedstream.common.proto.v1 import coordinator_pb2, coordinator_pb2_grpc

    assert coordinator_pb2_grpc.CoordinatorStub is not None
    assert coordinator_pb2.DESCRIPTOR.package == "fedstream.v1"
