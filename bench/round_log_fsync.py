"""What logging an acknowledged update costs, with and without fsync (`server/round_log.py`).

    python -m bench.round_log_fsync                  64 MiB updates, 5 of each
    python -m bench.round_log_fsync --mib 400 --repeat 3 --dir /data/run

Each try spools a random raw float32 update of the given size as an upload would
(`UploadSpool` over `SpoolFiles`, in --dir), then times `RoundLog.append` of it: the
in-kernel copy of its bytes to the log and its header, then, with fsync, waiting for the
disk. The median of each is printed, per update and per GiB; docs/checkpoints.md quotes
the figures.
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from pathlib import Path

import torch

from fedstream.common.proto.v1 import coordinator_pb2 as pb
from fedstream.common.wire.manifest import Manifest
from fedstream.common.wire.stream import iter_chunks
from fedstream.server.round_log import RoundLog
from fedstream.server.spool import SpoolFiles, UploadSpool
from fedstream.server.updates import VerifiedUpdate


def logged_seconds(directory: Path, mib: int, fsync: bool, seed: int) -> float:
    """Seconds one `RoundLog.append` of a fresh `mib` MiB update took."""
    update = {"w": torch.randn(mib << 18, generator=torch.Generator().manual_seed(seed))}
    manifest = Manifest.from_tensors(update)
    files = SpoolFiles(directory / "spool")
    spool = UploadSpool(files, f"bench-{seed}", manifest)
    for chunk in iter_chunks(list(update.values()), 1 << 20):
        spool.write(memoryview(chunk))
    spool.finish()
    verified = VerifiedUpdate("bench", 1, {}, spool.bytes_written, spool, spool.norm)
    log = RoundLog(directory / f"run-{seed}", {"bench": True}, fsync=fsync)
    log.begin(1, 1, 0, ["bench"])
    proto: pb.Manifest = manifest.to_proto()
    started = time.perf_counter()
    log.append(1, 1, 0, verified, proto)
    elapsed = time.perf_counter() - started
    log.committed(1)
    spool.discard()
    files.close()
    return elapsed


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--mib", type=int, default=64, help="update size in MiB")
    parser.add_argument("--repeat", type=int, default=5)
    parser.add_argument("--dir", type=Path, default=None, help="where to spool and log")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(dir=args.dir) as tmp:
        for fsync in (False, True):
            times = [
                logged_seconds(Path(tmp), args.mib, fsync, seed) for seed in range(args.repeat)
            ]
            median = statistics.median(times)
            print(
                f"fsync={'on ' if fsync else 'off'}  {args.mib} MiB update: "
                f"{median * 1e3:8.1f} ms median ({median / (args.mib / 1024):6.2f} s/GiB), "
                f"tries {', '.join(f'{t * 1e3:.1f}' for t in times)} ms"
            )


if __name__ == "__main__":
    main()
