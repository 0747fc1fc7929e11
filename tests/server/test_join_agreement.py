"""What must agree between a coordinator and its clients beyond the model's layout (the
task's options but its site ones, and the seed) is checked at Join, over real gRPC: a
client that differs is refused naming the difference and exits 2."""

from __future__ import annotations

import logging
from collections.abc import Callable

import grpc
import pytest

from fedstream.client.connection import Connection
from fedstream.client.loop import EXIT_REFUSED
from fedstream.common.proto.v1 import coordinator_pb2 as pb

from .conftest import ClientThread, RunningCoordinator, TinyTask, client_config, tiny_join


class SiteTinyTask(TinyTask):
    site_options = frozenset({"data"})


def tiny(options: dict[str, str], seed: int = 0, partition: int = 0) -> SiteTinyTask:
    task = SiteTinyTask(options, seed)
    task.load_data(partition, 8)
    return task


def refused_line(caplog: pytest.LogCaptureFixture) -> str:
    errors = [r.getMessage() for r in caplog.records if r.levelno == logging.ERROR]
    assert len(errors) == 1, errors
    return errors[0]


def test_a_client_with_another_task_option_is_refused_naming_it(
    coordinator: Callable[..., RunningCoordinator], caplog: pytest.LogCaptureFixture
) -> None:
    """The option does not change the layout (TinyTask ignores it): only the agreement
    check can tell, and it names the key and both values."""
    running = coordinator(tiny({"width": "3"}), min_clients=2)
    caplog.set_level(logging.ERROR)
    client = ClientThread(
        client_config(running.address, 0, give_up_after=5.0), tiny({"width": "4"})
    )
    assert client.join(timeout=20) == EXIT_REFUSED
    line = refused_line(caplog)
    assert "FAILED_PRECONDITION" in line
    assert "client-0's task options differ from the coordinator's: width=4 (coordinator: 3)" in line
    assert running.coordinator.admission.registry.get("client-0") is None


def test_a_client_with_another_seed_is_refused_naming_both(
    coordinator: Callable[..., RunningCoordinator], caplog: pytest.LogCaptureFixture
) -> None:
    running = coordinator(tiny({}), min_clients=2)
    caplog.set_level(logging.ERROR)
    client = ClientThread(client_config(running.address, 0, give_up_after=5.0), tiny({}, seed=1))
    assert client.join(timeout=20) == EXIT_REFUSED
    assert "client client-0 runs --seed 1; the coordinator runs --seed 0" in refused_line(caplog)


def test_site_options_may_differ_and_a_raw_join_sees_the_status(
    coordinator: Callable[..., RunningCoordinator],
) -> None:
    running = coordinator(tiny({"width": "3", "data": "/coordinator"}), min_clients=3)
    peer = Connection(running.address, 1 << 20, 30.0)
    try:
        agreed = pb.RunAgreement(task_options={"width": "3"}, seed=0)
        request = tiny_join("site-a", 0)
        request.agreement.CopyFrom(agreed)
        assert peer.join(request).client_id == "site-a"
        request = tiny_join("site-b", 1)
        request.agreement.CopyFrom(pb.RunAgreement(task_options={}, seed=0))
        with pytest.raises(grpc.RpcError) as info:
            peer.join(request)
        assert info.value.code() == grpc.StatusCode.FAILED_PRECONDITION  # type: ignore[attr-defined]
        assert "width=(unset) (coordinator: 3)" in info.value.details()  # type: ignore[attr-defined]
        # A client older than the agreement sends none: checked on task and layout alone.
        assert peer.join(tiny_join("site-c", 2)).client_id == "site-c"
    finally:
        peer.close()


def test_an_agreement_out_of_bounds_is_invalid_argument(
    coordinator: Callable[..., RunningCoordinator],
) -> None:
    running = coordinator(tiny({}), min_clients=2)
    peer = Connection(running.address, 1 << 20, 30.0)
    try:
        request = tiny_join("site-a", 0)
        request.agreement.task_options["bad"] = "line\nbreak"
        with pytest.raises(grpc.RpcError) as info:
            peer.join(request)
        assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT  # type: ignore[attr-defined]
    finally:
        peer.close()
