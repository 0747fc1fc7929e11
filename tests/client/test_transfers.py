"""A download that breaks resumes from its last byte: after a dropped link, after a stall
the watchdog cancels, but not after the coordinator cancels it (the round closed). The
replies cross the real Download deserializer (tests/client/fakes.py)."""

from __future__ import annotations

import threading
from collections.abc import Iterator
from typing import Any

import grpc
import pytest
import torch

from fedstream.client import transfers
from fedstream.client.session import Session
from fedstream.common.progress import ProgressView
from fedstream.common.proto.v1 import coordinator_pb2 as pb
from fedstream.common.service import stub
from fedstream.common.wire.manifest import Manifest

from .fakes import FakeChannel, FakeRpcError, assert_holds, download_answer, model

CHUNK = 1024


class BreakingStream:
    """The replies of one Download, broken before item `at`: with status `code`, or (code
    None) by going silent until the call is cancelled, as a stalled link does."""

    def __init__(self, items: list[Any], at: int, code: grpc.StatusCode | None) -> None:
        self.items = items
        self.at = at
        self.code = code
        self.cancelled = threading.Event()

    def __iter__(self) -> Iterator[Any]:
        yield from self.items[: self.at]
        if self.code is None:
            if not self.cancelled.wait(10.0):
                raise AssertionError("the stalled download was never cancelled")
            raise FakeRpcError(grpc.StatusCode.CANCELLED, "cancelled by the client")
        raise FakeRpcError(self.code)

    def cancel(self) -> None:
        self.cancelled.set()


class Coordinator:
    """Serves `tensors` as model v4; the first Download breaks before item `at`, as `code`
    says (BreakingStream)."""

    def __init__(
        self, tensors: dict[str, torch.Tensor], at: int, code: grpc.StatusCode | None
    ) -> None:
        self.served = stub(
            FakeChannel({"Download": download_answer(tensors, version=4)}), "Download"
        )
        self.at = at
        self.code = code
        self.requests: list[pb.DownloadRequest] = []

    def __call__(self, request: pb.DownloadRequest, metadata: Any = None) -> Any:
        self.requests.append(request)
        items = list(self.served(request, metadata=metadata))
        if len(self.requests) == 1:
            return BreakingStream(items, self.at, self.code)
        return iter(items)


def fetch(coordinator: Coordinator, tensors: dict[str, torch.Tensor]) -> Any:
    session = Session("c-1", "tok", "run", chunk_bytes=CHUNK)
    return transfers.download(
        coordinator, session, 4, Manifest.from_tensors(tensors), 0.2, ProgressView([])
    )


@pytest.mark.parametrize(
    "code", [grpc.StatusCode.UNAVAILABLE, None], ids=["link-dropped", "stalled"]
)
def test_a_broken_download_resumes_from_its_last_byte(code: grpc.StatusCode | None) -> None:
    tensors = model()
    coordinator = Coordinator(tensors, at=4, code=code)  # the header and three chunks

    held = fetch(coordinator, tensors)
    try:
        first, second = coordinator.requests
        assert (first.offset, second.offset) == (0, 3 * CHUNK)
        assert second.chunk_bytes == CHUNK and second.model_version == 4
        assert_holds(held, tensors)
    finally:
        held.close()


def test_a_download_the_coordinator_cancels_is_not_resumed() -> None:
    tensors = model()
    coordinator = Coordinator(tensors, at=2, code=grpc.StatusCode.CANCELLED)
    with pytest.raises(grpc.RpcError) as raised:
        fetch(coordinator, tensors)
    assert raised.value.code() == grpc.StatusCode.CANCELLED  # type: ignore[attr-defined]
    assert len(coordinator.requests) == 1
