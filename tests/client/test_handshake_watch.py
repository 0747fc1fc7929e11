"""`HandshakeWatch` tells a credential mistake from an outage by the details of the
failed connection attempts: the texts below are what grpcio 1.85 gave a client on
loopback for each mistake (tests/e2e/test_credentials_fail_fast.py runs them for real)."""

from __future__ import annotations

import grpc
import pytest

from fedstream.client.retry import CLOSED_AFTER, DEFINITE_AFTER, HandshakeWatch

UNAVAILABLE = grpc.StatusCode.UNAVAILABLE
FAILED = "failed to connect to all addresses; last error: "
OTHER_CA = (
    FAILED + "UNKNOWN: ipv4:127.0.0.1:1: Tls handshake failed (TSI_PROTOCOL_FAILURE): "
    "SSL_ERROR_SSL: error:1000007d:SSL routines:OPENSSL_internal:CERTIFICATE_VERIFY_FAILED: "
    "unable to get local issuer certificate: OK"
)
NAME = (
    FAILED + "UNKNOWN: ipv4:127.0.0.1:1: Custom verification check failed with error: "
    "UNAUTHENTICATED: Hostname Verification Check failed."
)
NOT_TLS = (
    FAILED + "UNKNOWN: ipv4:127.0.0.1:1: Tls handshake failed (TSI_PROTOCOL_FAILURE): "
    "SSL_ERROR_SSL: error:100000f7:SSL routines:OPENSSL_internal:WRONG_VERSION_NUMBER: "
    "Invalid certificate verification context: OK"
)
CLOSED = FAILED + "UNAVAILABLE: ipv4:127.0.0.1:1: Socket closed"
REFUSED = FAILED + "UNKNOWN: ipv4:127.0.0.1:1: Failed to connect to remote host: Connection refused"


def tries(watch: HandshakeWatch, details: str, times: int) -> list[str | None]:
    return [watch.failed(UNAVAILABLE, details) for _ in range(times)]


@pytest.mark.parametrize(
    ("details", "tls", "mutual", "cause"),
    [
        (OTHER_CA, True, False, "not signed by the CA this client trusts (--ca)"),
        (NAME, True, False, "does not name 127.0.0.1, the host this client dials"),
        (NOT_TLS, True, False, "does not speak TLS and this client does"),
    ],
)
def test_a_named_handshake_failure_gives_up_after_a_few_in_a_row(details, tls, mutual, cause):
    watch = HandshakeWatch("127.0.0.1:1", tls, mutual)
    outcomes = tries(watch, details, DEFINITE_AFTER)
    assert outcomes[:-1] == [None] * (DEFINITE_AFTER - 1)
    assert outcomes[-1] is not None and cause in outcomes[-1]
    assert outcomes[-1].startswith("cannot connect to the coordinator at 127.0.0.1:1: ")


@pytest.mark.parametrize(
    ("tls", "mutual", "cause"),
    [
        (False, False, "speaks TLS and this client plaintext"),
        (True, False, "requires a client certificate (mutual TLS)"),
        (True, True, "does not trust this client's certificate"),
    ],
)
def test_a_closed_handshake_takes_more_tries_and_names_the_likely_cause(tls, mutual, cause):
    watch = HandshakeWatch("127.0.0.1:1", tls, mutual)
    outcomes = tries(watch, CLOSED, CLOSED_AFTER)
    assert outcomes[:-1] == [None] * (CLOSED_AFTER - 1)
    assert outcomes[-1] is not None and cause in outcomes[-1]


def test_an_outage_between_handshake_failures_starts_the_count_again():
    watch = HandshakeWatch("127.0.0.1:1", True, False)
    for _ in range(3):
        assert tries(watch, OTHER_CA, DEFINITE_AFTER - 1) == [None] * (DEFINITE_AFTER - 1)
        assert watch.failed(UNAVAILABLE, REFUSED) is None
        assert watch.failed(grpc.StatusCode.DEADLINE_EXCEEDED, "Deadline Exceeded") is None
    assert tries(watch, REFUSED, 50) == [None] * 50


def test_a_refusal_at_another_address_of_the_name_keeps_the_count():
    """`localhost` dials ::1 as well, where nothing listens: its refusals say nothing of
    the handshakes that 127.0.0.1 keeps closing."""
    watch = HandshakeWatch("localhost:1", True, False)
    elsewhere = (
        FAILED + "UNKNOWN: ipv6:%5B::1%5D:1: Failed to connect to remote host: Connection refused"
    )
    outcomes = []
    for _ in range(CLOSED_AFTER):
        outcomes.append(watch.failed(UNAVAILABLE, CLOSED))
        assert watch.failed(UNAVAILABLE, elsewhere) is None
    assert outcomes[:-1] == [None] * (CLOSED_AFTER - 1) and outcomes[-1] is not None


def test_an_answered_call_starts_the_count_again():
    watch = HandshakeWatch("127.0.0.1:1", True, False)
    tries(watch, OTHER_CA, DEFINITE_AFTER - 1)
    watch.reset()
    assert tries(watch, OTHER_CA, DEFINITE_AFTER - 1) == [None] * (DEFINITE_AFTER - 1)


def test_closes_after_an_answered_call_are_an_outage_but_a_named_cause_still_ends_it():
    """A proxy in front of a restarting coordinator accepts and closes: credentials
    that were answered before are not the cause."""
    watch = HandshakeWatch("127.0.0.1:1", False, False)
    watch.reset()
    assert tries(watch, CLOSED, 50) == [None] * 50
    outcomes = tries(watch, NOT_TLS, DEFINITE_AFTER)
    assert outcomes[-1] is not None and "does not speak TLS" in outcomes[-1]


def test_a_call_broken_after_connecting_is_not_a_handshake_failure():
    watch = HandshakeWatch("127.0.0.1:1", True, False)
    assert tries(watch, "Socket closed", 50) == [None] * 50
