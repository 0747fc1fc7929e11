"""The exceptions fedstream raises for its own failures.

Each subclass names one kind of failure, so the gRPC layer can map a class to a status
code in one place instead of matching message text.
"""


class FedstreamError(Exception):
    """Base class of every error fedstream raises on purpose."""


class InvalidManifest(FedstreamError):
    """A manifest that is malformed or does not describe the expected tensors."""


class WireError(FedstreamError):
    """A byte stream that does not match its manifest (overflow, truncation)."""


class LimitExceeded(FedstreamError):
    """A size or count beyond a configured bound."""


class NonFiniteValues(FedstreamError):
    """Tensor values that are NaN or infinite where finite values are required."""


class InvalidCheckpoint(FedstreamError):
    """A checkpoint file that cannot be read back as it was written."""


class TaskError(FedstreamError, ValueError):
    """A task name or option that cannot be used."""
