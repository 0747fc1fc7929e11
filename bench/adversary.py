"""The attacker's tools for `bench/attacks.py`: the model bytes a digits client would send,
a coordinator and clients as real `python -m fedstream` processes, and a hand-driven peer
that speaks the service through its own stubs (`fedstream.common.service`)."""

from __future__ import annotations

import json
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import grpc
import torch

from fedstream.common.proto.v1 import coordinator_pb2 as pb
from fedstream.common.service import METHODS, bearer_metadata, stub
from fedstream.common.wire.manifest import Manifest
from fedstream.tasks import exchanged_names, load_task

MIB = 1 << 20
TASK = "digits"
JUNK = b"\x0a\xff\xff\xff\x7fjunk"
"""Undecodable as any message: field 1 claims 256 MiB of bytes and four follow."""


def log(message: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {message}", file=sys.stderr, flush=True)


# ---- the model a digits client would send -----------------------------------------------


def layout(options: dict[str, str] | None = None) -> dict[str, torch.Tensor]:
    """Zeros in the layout of the tensors a digits client exchanges (an update of 0)."""
    task = load_task(TASK, options or {}, 0)
    model = task.build_model()
    state = model.state_dict()
    return {n: torch.zeros_like(state[n]) for n in exchanged_names(task, model)}


def digest(options: dict[str, str] | None = None) -> str:
    return Manifest.from_tensors(layout(options)).digest()


def header(tensors: dict[str, torch.Tensor], round_number: int = 1) -> bytes:
    msg = pb.UpdateHeader(round=round_number, model_version=0, num_examples=10)
    msg.manifest.CopyFrom(Manifest.from_tensors(tensors).to_proto())
    return pb.UpdateChunk(header=msg).SerializeToString()


def update_bytes(tensors: dict[str, torch.Tensor]) -> bytes:
    return b"".join(t.contiguous().view(torch.uint8).numpy().tobytes() for t in tensors.values())


# ---- processes ------------------------------------------------------------------------


def fedstream(*args: str) -> list[str]:
    return [sys.executable, "-m", "fedstream", *args]


class Coordinator:
    """`fedstream server` as a child process, its output in a log file."""

    def __init__(self, work: Path, name: str, *args: str, wait: bool = True) -> None:
        self.run_dir = work / name
        self.run_dir.mkdir(parents=True, exist_ok=True)
        self.log_path = work / f"{name}.server{len(list(work.glob(name + '.server*')))}.log"
        with open(self.log_path, "wb") as out:
            self.proc = subprocess.Popen(
                fedstream(
                    "server",
                    "--address", "127.0.0.1:0",
                    "--run-dir", str(self.run_dir),
                    "--task", TASK,
                    "--poll-timeout", "1",
                    "--done-grace", "2",
                    "--threads", "1",
                    *args,
                ),
                stdout=out,
                stderr=subprocess.STDOUT,
            )  # fmt: skip
        self.address = self._address() if wait else ""

    def _address(self, timeout: float = 60.0) -> str:
        path = self.run_dir / "coordinator.json"
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"server exited with {self.proc.returncode}: {self.tail()}")
            if path.exists():
                try:
                    info = json.loads(path.read_text())
                except ValueError:
                    info = {}
                if info.get("pid") == self.proc.pid:
                    return str(info["address"])
            time.sleep(0.1)
        raise TimeoutError(f"server did not listen in {timeout:.0f}s: {self.tail()}")

    def text(self) -> str:
        return self.log_path.read_text(errors="replace")

    def lines(self) -> list[str]:
        return self.text().splitlines()

    def tail(self, n: int = 3) -> str:
        return " / ".join(line.strip() for line in self.lines()[-n:])

    def rss_mib(self) -> tuple[float, float]:
        """(VmRSS, VmHWM) of the coordinator, in MiB."""
        fields = {}
        for line in Path(f"/proc/{self.proc.pid}/status").read_text().splitlines():
            key, _, value = line.partition(":")
            fields[key] = value
        return int(fields["VmRSS"].split()[0]) / 1024, int(fields["VmHWM"].split()[0]) / 1024

    def wait_log(self, fragment: str, timeout: float) -> bool:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if fragment in self.text():
                return True
            if self.proc.poll() is not None:
                return fragment in self.text()
            time.sleep(0.1)
        return False

    def wait_exit(self, timeout: float) -> int | None:
        try:
            return self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            return None

    def metrics(self) -> list[dict[str, Any]]:
        path = self.run_dir / "metrics.jsonl"
        if not path.exists():
            return []
        return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            if self.wait_exit(15) is None:
                self.proc.kill()
                self.proc.wait()


def start_client(work: Path, address: str, name: str, *args: str) -> subprocess.Popen[bytes]:
    with open(work / f"client-{name}.log", "wb") as out:
        return subprocess.Popen(
            fedstream(
                "client",
                "--server", address,
                "--task", TASK,
                "--name", name,
                "--partition", "0",
                "--num-partitions", "2",
                "--give-up-after", "30",
                "--max-backoff", "1",
                "--threads", "1",
                *args,
            ),
            stdout=out,
            stderr=subprocess.STDOUT,
        )  # fmt: skip


def reap(proc: subprocess.Popen[bytes], timeout: float) -> int | None:
    try:
        return proc.wait(timeout)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()
        return None


# ---- a hand-driven peer ---------------------------------------------------------------


def code_of(call: Callable[[], object]) -> str:
    """The status name a call ends with ("OK" when it succeeds)."""
    try:
        call()
    except grpc.RpcError as exc:
        return str(exc.code().name)  # type: ignore[attr-defined]
    return "OK"


class Peer:
    def __init__(self, address: str) -> None:
        self.channel = grpc.insecure_channel(
            address,
            options=[
                ("grpc.max_send_message_length", 256 * MIB),
                ("grpc.max_receive_message_length", 256 * MIB),
            ],
        )
        self.join_call = stub(self.channel, "Join")
        self.poll_call = stub(self.channel, "Poll")
        self.download_call = stub(self.channel, "Download")
        self.upload_call = self.channel.stream_unary(
            METHODS["Upload"].path,
            request_serializer=lambda raw: raw,
            response_deserializer=METHODS["Upload"].response_deserializer,
        )
        self.token = ""

    def join(
        self, name: str, model_digest: str, token: str | None = None, timeout: float = 10
    ) -> str:
        request = pb.JoinRequest(
            name=name, task=TASK, partition=0, num_partitions=1, model_digest=model_digest
        )
        metadata = bearer_metadata(token) if token else ()
        reply = self.join_call(request, metadata=metadata, timeout=timeout)
        self.token = str(reply.token)
        return self.token

    def poll(self) -> str:
        reply = self.poll_call(pb.PollRequest(), metadata=bearer_metadata(self.token), timeout=10)
        return str(reply.WhichOneof("action"))

    def until_train(self, timeout: float = 60) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.poll() == "train":
                return
        raise TimeoutError("no train task")

    def download(self) -> int:
        request = pb.DownloadRequest(model_version=0)
        return len(
            list(self.download_call(request, metadata=bearer_metadata(self.token), timeout=10))
        )

    def upload(self, messages: Iterator[bytes], timeout: float = 60) -> object:
        return self.upload_call(messages, metadata=bearer_metadata(self.token), timeout=timeout)

    def close(self) -> None:
        self.channel.close()


def junk_status(channel: grpc.Channel, name: str, token: str) -> str:
    """The status RPC `name` answers undecodable request bytes with."""
    method = METHODS[name]
    call = stub(channel, name, request_serializer=lambda raw: raw, response_deserializer=bytes)
    request: Any = iter([JUNK]) if method.request_streaming else JUNK
    meta = bearer_metadata(token)
    if method.response_streaming:
        return code_of(lambda: list(call(request, metadata=meta, timeout=10)))
    return code_of(lambda: call(request, metadata=meta, timeout=10))


# ---- the table -----------------------------------------------------------------------


@dataclass
class Row:
    number: int
    attack: str
    now: str
    figure: str


ROWS: list[Row] = []
NOTES: list[str] = []


def row(number: int, attack: str, now: str, figure: str) -> None:
    log(f"{number}. {attack}: {now} | {figure}")
    ROWS.append(Row(number, attack, now, figure))
