"""The coordinator's domain errors; `server/servicer.py` maps each to a gRPC status."""

from fedstream.common.errors import FedstreamError


class UnknownClient(FedstreamError):
    """A call without a valid session token (never joined, or joined a previous run)."""


class TaskMismatch(FedstreamError):
    """A client joining with a different task or partition layout than the coordinator's."""


class WrongRound(FedstreamError):
    """An update or download for a round or model version that is not the current one."""


class NotSelected(FedstreamError):
    """A client sending an update for a round it was not selected for."""


class UploadInProgress(FedstreamError):
    """A second upload from a client whose first upload for the round is still streaming."""


class TransferStalled(FedstreamError):
    """A transfer that moved no bytes for longer than the stall timeout."""


class InvalidJoin(FedstreamError):
    """A Join whose fields are out of bounds (its name, task or partition)."""


class InvalidUpdate(FedstreamError):
    """An update header whose fields are out of bounds (examples, metrics, codec)."""


class UpdateTooLarge(InvalidUpdate):
    """An update whose L2 norm is over the run's absolute bound (--max-update-norm)."""


class OffsetOutOfRange(FedstreamError):
    """A download resume offset beyond the end of the model's byte stream, or an upload
    resumed at an offset the coordinator does not hold (`server/partial_uploads.py`)."""


class UnknownFragment(FedstreamError):
    """A download of a fragment the run does not have (an index out of range, or any
    fragment of a run without streaming fragments)."""


class DigestMismatch(FedstreamError):
    """An update whose bytes, kept and resumed parts together, are not the ones its
    trailer's SHA-256 names (or a logged update whose file is not its header's): the
    whole update is refused (DATA_LOSS)."""


class IdentityMismatch(FedstreamError):
    """A Join under a name other than the identity the client authenticated as."""


class AlreadyJoined(FedstreamError):
    """A Join under the name of a live session, without authenticating as that name."""


class TooManyClients(FedstreamError):
    """A Join while the coordinator holds --max-clients live sessions."""
