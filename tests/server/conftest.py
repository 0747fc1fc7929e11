"""A coordinator served over real gRPC on loopback, in a background thread, and a tiny task."""

from __future__ import annotations

import asyncio
import contextlib
import threading
from collections.abc import Callable, Iterator, Mapping
from pathlib import Path
from typing import Any

import pytest
import torch

from fedstream.client.config import ClientConfig
from fedstream.client.loop import FederatedClient
from fedstream.common.proto.v1 import coordinator_pb2 as pb
from fedstream.common.wire.manifest import Manifest
from fedstream.server.config import ServerConfig
from fedstream.server.daemon import CoordinatorDaemon
from fedstream.tasks import ConfigScalar, EvalResult, Task, TrainResult, exchanged_names
from tests.conftest import wait_for as wait_for  # re-exported for the tests here


class TinyModel(torch.nn.Module):
    def __init__(self, seed: int) -> None:
        super().__init__()
        generator = torch.Generator().manual_seed(seed)
        self.w = torch.nn.Parameter(torch.randn(4, 3, generator=generator))
        self.h = torch.nn.Parameter(torch.randn(5, generator=generator).to(torch.bfloat16))
        self.register_buffer("steps", torch.zeros((), dtype=torch.int64))


class TinyTask(Task):
    """Training adds 0.125 * (partition + 1) to every weight: FedAvg results are exact.
    The gradient (FedSGD) is 0.25 * (partition + 1) everywhere; the local evaluation
    reports 5 * (partition + 1) examples with loss = partition."""

    def build_model(self) -> torch.nn.Module:
        return TinyModel(self.seed)

    def load_data(self, partition: int, num_partitions: int) -> None:
        self.partition = partition

    def train(self, model: torch.nn.Module, config: Mapping[str, ConfigScalar]) -> TrainResult:
        with torch.no_grad():
            for p in model.parameters():
                p.add_(0.125 * (self.partition + 1))
        self.last_config = dict(config)
        return TrainResult(10 * (self.partition + 1), {"loss": float(self.partition)})

    def compute_gradient(
        self, model: torch.nn.Module, config: Mapping[str, ConfigScalar]
    ) -> TrainResult:
        for p in model.parameters():
            p.grad = torch.full_like(p, 0.25 * (self.partition + 1))
        self.last_config = dict(config)
        return TrainResult(10 * (self.partition + 1), {"loss": float(self.partition)})

    def evaluate(self, model: torch.nn.Module) -> EvalResult:
        return EvalResult(1, {"loss": float(model.get_parameter("w").detach().sum())})

    def evaluate_local(self, model: torch.nn.Module) -> EvalResult:
        self.evaluated_w = model.get_parameter("w").detach().clone()
        return EvalResult(5 * (self.partition + 1), {"loss": float(self.partition)})


class WideTask(TinyTask):
    """TinyTask with an 8 MiB tensor, so a download cannot sit whole in socket buffers."""

    def build_model(self) -> torch.nn.Module:
        model = TinyModel(self.seed)
        model.wide = torch.nn.Parameter(torch.zeros(2 << 20))
        return model


def wide_task(partition: int = 0) -> WideTask:
    task = WideTask({}, 0)
    task.load_data(partition, 8)
    return task


def layout_digest(task: Task) -> str:
    """The model digest a client running `task` sends with its Join."""
    model = task.build_model()
    state = model.state_dict()
    return Manifest.from_tensors({n: state[n] for n in exchanged_names(task, model)}).digest()


TINY_DIGEST = layout_digest(TinyTask({}, 0))


def tiny_join(name: str, partition: int, digest: str = TINY_DIGEST) -> pb.JoinRequest:
    """A raw Join of a TinyTask client (what a FederatedClient sends, model digest included)."""
    return pb.JoinRequest(
        name=name, task="tiny", partition=partition, num_partitions=8, model_digest=digest
    )


def tiny_task(partition: int = 0, seed: int = 0) -> TinyTask:
    task = TinyTask({}, seed)
    task.load_data(partition, 8)
    return task


class RunningCoordinator:
    """A CoordinatorDaemon on its own event loop in a thread, reachable at `address`."""

    def __init__(self, config: ServerConfig, task: Task) -> None:
        self.config = config
        self.task = task
        self.ready = threading.Event()
        self.error: BaseException | None = None
        self._thread = threading.Thread(target=self._main, daemon=True)
        self._thread.start()
        if not self.ready.wait(30):
            raise RuntimeError("coordinator did not start")
        if self.error is not None:
            raise self.error

    def _main(self) -> None:
        try:
            asyncio.run(self._serve())
        except BaseException as exc:  # noqa: BLE001 (reported to the test thread)
            self.error = exc
            self.ready.set()

    async def _serve(self) -> None:
        self.loop = asyncio.get_running_loop()
        self.daemon = CoordinatorDaemon(self.config, self.task)
        self.coordinator = self.daemon.coordinator
        self.address = await self.daemon.start()
        self.run_task = asyncio.ensure_future(self.daemon.run())
        self.ready.set()
        try:
            with contextlib.suppress(asyncio.CancelledError):
                await self.run_task
        finally:
            await self.daemon.stop()

    def wait_done(self, timeout: float) -> None:
        self._thread.join(timeout)
        if self._thread.is_alive():
            raise AssertionError(f"coordinator still running after {timeout}s")
        if self.error is not None:
            raise self.error

    def stop(self) -> None:
        if self._thread.is_alive():
            self.loop.call_soon_threadsafe(self.run_task.cancel)
            self._thread.join(30)


@pytest.fixture
def coordinator(tmp_path: Path) -> Iterator[Callable[..., RunningCoordinator]]:
    started: list[RunningCoordinator] = []

    def start(task: Task | None = None, **overrides: Any) -> RunningCoordinator:
        settings: dict[str, Any] = {
            "address": "127.0.0.1:0",
            "run_dir": tmp_path / "run",
            "rounds": 2,
            "min_clients": 2,
            "round_timeout": 20.0,
            "poll_timeout": 1.0,
            "done_grace": 5.0,
            "task": "tiny",
        }
        settings.update(overrides)
        config = ServerConfig(**settings)
        config.validate()
        running = RunningCoordinator(config, task or tiny_task())
        started.append(running)
        return running

    yield start
    for running in started:
        running.stop()


def client_config(address: str, partition: int, **overrides: Any) -> ClientConfig:
    settings: dict[str, Any] = {
        "server": address,
        "task": "tiny",
        "partition": partition,
        "num_partitions": 8,
        "name": f"client-{partition}",
        "give_up_after": 20.0,
        "max_backoff": 1.0,
    }
    settings.update(overrides)
    config = ClientConfig(**settings)
    config.validate()
    return config


class ClientThread:
    """A FederatedClient running its real loop in a thread; `code` is its exit code."""

    def __init__(self, config: ClientConfig, task: Task) -> None:
        self.client = FederatedClient(config, task)
        self.code: int | None = None
        self._thread = threading.Thread(target=self._main, daemon=True)
        self._thread.start()

    def _main(self) -> None:
        self.code = self.client.run()

    def join(self, timeout: float) -> int:
        self._thread.join(timeout)
        if self._thread.is_alive() or self.code is None:
            raise AssertionError(f"client still running after {timeout}s")
        return self.code


def start_client(address: str, partition: int, **overrides: Any) -> ClientThread:
    return ClientThread(client_config(address, partition, **overrides), tiny_task(partition))
