"""Bytes that decode as no message, sent to every RPC: INVALID_ARGUMENT, never UNKNOWN."""

from __future__ import annotations

import grpc
import pytest

from fedstream.common.proto.v1 import coordinator_pb2 as pb
from fedstream.common.service import METHODS, bearer_metadata, stub

from .conftest import tiny_join

JUNK = [b"\xff\xff\xff\xff", b"\x0a\x05ab", b"\x08" + b"\xff" * 11]
"""A truncated varint field, a length past the end, a varint of more than 10 bytes."""


@pytest.mark.parametrize("method", sorted(METHODS))
def test_junk_bytes_to_every_rpc_are_invalid_argument(coordinator, method: str) -> None:
    running = coordinator(rounds=1, min_clients=3)
    with grpc.insecure_channel(running.address) as channel:
        token = stub(channel, "Join")(tiny_join("honest", 0), timeout=5).token
        spec = METHODS[method]
        call = stub(channel, method, request_serializer=lambda raw: raw)
        for junk in JUNK:
            request = iter([junk]) if spec.request_streaming else junk
            with pytest.raises(grpc.RpcError) as info:
                reply = call(request, metadata=bearer_metadata(token), timeout=10)
                if spec.response_streaming:
                    list(reply)
            assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT, (junk, info.value)
        # The coordinator still serves: the honest session polls as before.
        poll = stub(channel, "Poll")
        assert poll(pb.PollRequest(), metadata=bearer_metadata(token), timeout=10).HasField("wait")
