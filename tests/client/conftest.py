"""The fake channels a client's Connection opens in these tests (see fakes.py)."""

from __future__ import annotations

import grpc
import pytest

from fedstream.client import connection

from .fakes import FakeChannel


@pytest.fixture
def fake_channels(monkeypatch: pytest.MonkeyPatch) -> dict[str, FakeChannel]:
    """The control and bulk channels a Connection opens, by name, answering nothing yet."""
    channels: dict[str, FakeChannel] = {}

    def open_channel(
        target: str, name: str, credentials: grpc.ChannelCredentials | None
    ) -> FakeChannel:
        channels[name] = FakeChannel({}, credentials)
        return channels[name]

    monkeypatch.setattr(connection, "_channel", open_channel)
    return channels
