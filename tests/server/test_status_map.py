"""The one place domain errors become gRPC statuses: each error the servicer maps gets the
status a client's retry logic relies on, a subclass gets its base's, the rest INTERNAL."""

from __future__ import annotations

import inspect

import grpc
import pytest

from fedstream.common import errors as common_errors
from fedstream.common.errors import (
    FedstreamError,
    InvalidCheckpoint,
    InvalidManifest,
    LimitExceeded,
    NonFiniteValues,
    WireError,
)
from fedstream.server import errors as server_errors
from fedstream.server.errors import (
    InvalidUpdate,
    NotSelected,
    OffsetOutOfRange,
    TaskMismatch,
    TransferStalled,
    UnknownClient,
    UploadInProgress,
    WrongRound,
)
from fedstream.server.servicer import STATUS_OF, status_of

sc = grpc.StatusCode

EXPECTED: dict[type[FedstreamError], grpc.StatusCode] = {
    UnknownClient: sc.UNAUTHENTICATED,  # the client re-joins
    TaskMismatch: sc.FAILED_PRECONDITION,  # the client gives up: never retried
    WrongRound: sc.FAILED_PRECONDITION,
    NotSelected: sc.PERMISSION_DENIED,
    UploadInProgress: sc.ABORTED,  # retried
    TransferStalled: sc.DEADLINE_EXCEEDED,  # retried
    OffsetOutOfRange: sc.OUT_OF_RANGE,
    InvalidUpdate: sc.INVALID_ARGUMENT,
    InvalidManifest: sc.INVALID_ARGUMENT,
    WireError: sc.INVALID_ARGUMENT,
    NonFiniteValues: sc.INVALID_ARGUMENT,
    LimitExceeded: sc.RESOURCE_EXHAUSTED,
}


def errors_defined_in(module: object) -> list[type[FedstreamError]]:
    return [
        cls
        for _, cls in inspect.getmembers(module, inspect.isclass)
        if issubclass(cls, FedstreamError)
        and cls is not FedstreamError
        and cls.__module__ == getattr(module, "__name__", None)
    ]


@pytest.mark.parametrize(
    ("error", "code"), [pytest.param(e, c, id=e.__name__) for e, c in EXPECTED.items()]
)
def test_each_mapped_error_gets_its_status(
    error: type[FedstreamError], code: grpc.StatusCode
) -> None:
    assert STATUS_OF[error] == code
    assert status_of(error("what went wrong")) == code


def test_every_coordinator_error_has_a_status() -> None:
    """server/errors.py holds the coordinator's refusals: none may fall through to
    INTERNAL, which a client can neither act on nor tell apart from a crash."""
    defined = errors_defined_in(server_errors)
    assert defined, "found no errors in server/errors.py"
    assert [cls.__name__ for cls in defined if cls not in STATUS_OF] == []


def test_the_common_errors_of_the_wire_are_mapped() -> None:
    wire = {InvalidManifest, WireError, LimitExceeded, NonFiniteValues}
    assert wire <= set(errors_defined_in(common_errors))
    assert wire <= set(STATUS_OF)


@pytest.mark.parametrize(
    ("base", "code"),
    [
        (WrongRound, sc.FAILED_PRECONDITION),
        (LimitExceeded, sc.RESOURCE_EXHAUSTED),
        (WireError, sc.INVALID_ARGUMENT),
        (UnknownClient, sc.UNAUTHENTICATED),
    ],
    ids=lambda v: v.__name__ if isinstance(v, type) else v.name,
)
def test_a_subclass_inherits_its_bases_status(
    base: type[FedstreamError], code: grpc.StatusCode
) -> None:
    subclass = type(f"Special{base.__name__}", (base,), {})
    assert subclass not in STATUS_OF
    assert status_of(subclass("narrower")) == code


class Unforeseen(FedstreamError):
    """A failure no one mapped to a status."""


@pytest.mark.parametrize(
    "error",
    [FedstreamError("bare"), Unforeseen("new"), InvalidCheckpoint("on disk, not on the wire")],
    ids=["FedstreamError", "unmapped-subclass", "InvalidCheckpoint"],
)
def test_an_unmapped_error_is_internal(error: FedstreamError) -> None:
    assert status_of(error) == sc.INTERNAL
