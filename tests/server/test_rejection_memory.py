"""A refused upload frees what it held: a coordinator's memory does not grow with the
number of large messages it refuses (docs/architecture.md, "Trust boundary").

Measured in a real coordinator process over real gRPC: its resident set (/proc/PID/status)
before the first and after 100 refused messages: data chunks of 60 MiB (over the
coordinator's message bound, refused by grpc as their length arrives) and undecodable
messages of 15 MiB (within it, refused by the servicer). Without the fix each one stayed
resident (grpc.aio's request receiver holds the last message in a reference cycle that
only the cyclic collector frees): +3.0 GB after 100, +4.2 GB at the peak.
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import grpc
import pytest

from fedstream.common.proto.v1 import coordinator_pb2 as pb
from fedstream.common.service import METHODS, bearer_metadata, stub
from fedstream.common.wire.framing import frame_data
from fedstream.common.wire.manifest import Manifest
from fedstream.tasks import load_task
from fedstream.tasks.task import exchanged_names

MIB = 1 << 20
MESSAGE_BYTES = 60 * MIB
REFUSALS = 100
MAX_GROWTH = 150 * MIB
TASK_OPT = {"params": "1000"}

pytestmark = pytest.mark.skipif(
    not Path("/proc/self/status").exists(), reason="reads a process's RSS from /proc"
)


def rss_bytes(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) * 1024
    raise AssertionError(f"no VmRSS for pid {pid}")


def model_digest() -> str:
    task = load_task("synthetic", TASK_OPT, 0)
    model = task.build_model()
    state = model.state_dict()
    return Manifest.from_tensors({n: state[n] for n in exchanged_names(task, model)}).digest()


class Uploader:
    """A joined client whose round is open, able to send any bytes as an upload."""

    def __init__(self, address: str) -> None:
        options = [("grpc.max_send_message_length", 2 * MESSAGE_BYTES)]
        self.channel = grpc.insecure_channel(address, options=options)
        joined = stub(self.channel, "Join")(
            pb.JoinRequest(
                name="refused", task="synthetic", num_partitions=1, model_digest=model_digest()
            ),
            timeout=20,
        )
        self.metadata = bearer_metadata(joined.token)
        deadline = time.monotonic() + 60
        while True:
            reply = stub(self.channel, "Poll")(pb.PollRequest(), metadata=self.metadata, timeout=30)
            if reply.WhichOneof("action") == "train":
                break
            assert time.monotonic() < deadline, "no round opened for the client"
        task = reply.train
        download = stub(self.channel, "Download")
        header = next(
            iter(
                download(
                    pb.DownloadRequest(model_version=task.model_version),
                    metadata=self.metadata,
                    timeout=20,
                )
            )
        )
        self.header = pb.UpdateChunk(
            header=pb.UpdateHeader(
                round=task.round,
                model_version=task.model_version,
                num_examples=1,
                manifest=header.manifest,
            )
        ).SerializeToString()
        self._upload = self.channel.stream_unary(
            METHODS["Upload"].path,
            request_serializer=lambda raw: raw,
            response_deserializer=METHODS["Upload"].response_deserializer,
        )

    def refused(self, messages: list[bytes]) -> grpc.StatusCode:
        try:
            self._upload(iter(messages), metadata=self.metadata, timeout=30)
        except grpc.RpcError as exc:
            return exc.code()  # type: ignore[no-any-return]
        raise AssertionError("the upload was accepted")


def measure(server: Any, send: Callable[[], grpc.StatusCode]) -> int:
    """Growth of the server's RSS over REFUSALS refusals, from before the first."""
    before = rss_bytes(server.pid)
    codes = {send() for _ in range(REFUSALS)}
    assert len(codes) == 1, codes  # every one refused the same way
    # What a refusal holds is freed just after it is answered: poll a few seconds for it.
    deadline = time.monotonic() + 5
    while rss_bytes(server.pid) - before >= MAX_GROWTH and time.monotonic() < deadline:
        time.sleep(0.1)
    return rss_bytes(server.pid) - before


@pytest.fixture
def coordinator(procs: Any, wait_for: Any) -> tuple[Any, str]:
    server = procs(
        "server",
        "server",
        "--run-dir", "run",
        "--task", "synthetic",
        "--task-opt", "params=1000",
        "--address", "127.0.0.1:0",
        "--min-clients", "1",
        "--max-chunk-bytes", str(16 * MIB),
        "--log-level", "ERROR",
    )  # fmt: skip
    info = procs.workdir / "run" / "coordinator.json"
    wait_for(info.exists, 60, "the coordinator to listen", alive=[server])
    return server, json.loads(info.read_text())["address"]


@pytest.mark.e2e
def test_refused_oversized_data_chunks_leave_no_memory_behind(
    coordinator: tuple[Any, str],
) -> None:
    server, address = coordinator
    client = Uploader(address)
    oversized = frame_data(b"\0" * MESSAGE_BYTES)  # over --max-chunk-bytes
    started = time.monotonic()

    growth = measure(server, lambda: client.refused([client.header, oversized]))

    assert client.refused([client.header, oversized]) == grpc.StatusCode.RESOURCE_EXHAUSTED
    assert growth < MAX_GROWTH, f"{growth / MIB:.0f} MiB kept after {REFUSALS} refusals"
    assert time.monotonic() - started < 50


@pytest.mark.e2e
def test_refused_undecodable_headers_leave_no_memory_behind(
    coordinator: tuple[Any, str],
) -> None:
    """Refused by the servicer before any byte reaches the intake: within the message
    bound (max_chunk_bytes and a header's room), so grpc hands it over whole."""
    server, address = coordinator
    client = Uploader(address)
    junk = b"\xff" * (15 * MIB)  # neither a data frame nor an UpdateChunk

    growth = measure(server, lambda: client.refused([junk]))

    assert client.refused([junk]) == grpc.StatusCode.INVALID_ARGUMENT
    assert growth < MAX_GROWTH, f"{growth / MIB:.0f} MiB kept after {REFUSALS} refusals"
