"""A real client against a real coordinator on loopback, refused at Join."""

from __future__ import annotations

from collections.abc import Callable

from fedstream.client.loop import EXIT_REFUSED

from .conftest import ClientThread, RunningCoordinator, client_config, wide_task


def test_a_client_with_another_model_layout_is_refused_at_join_and_exits_2(
    coordinator: Callable[..., RunningCoordinator],
) -> None:
    """min_clients=2 and one client: no round starts, so no download could reveal the
    mismatch; only the coordinator's check of Join's model digest ends this client."""
    running = coordinator(min_clients=2)
    client = ClientThread(client_config(running.address, 0, give_up_after=5.0), wide_task(0))
    assert client.join(timeout=20) == EXIT_REFUSED
    assert running.coordinator.round is None
