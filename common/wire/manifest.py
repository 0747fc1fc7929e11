"""The wire format of a model: a manifest, then the tensors' raw bytes as one chunked stream.

A model never travels as one message. The sender describes every tensor in a
`Manifest` (name, dtype, shape, byte length, in stream order), then sends the
concatenation of the tensors' native bytes cut into chunks (`wire/stream.py`). The
receiver validates the manifest before allocating anything (`Manifest.from_proto`),
then writes each chunk where it belongs as it arrives (a client into its held copy of
the model, `client/held_model.py`; the coordinator into an upload's spool).

Tensors that share memory (tied weights) travel once: the manifest lists the first in
the stream and names the others as its ties (`TensorTie`, found by `find_ties`). The
ties are part of the layout, and so of its digest: a receiver whose model is tied
differently is refused before any byte moves.

Bytes are always taken through a `torch.uint8` view, never through a numpy array of the
tensor's own dtype: numpy has no bfloat16, and the raw bits are what must survive.
"""

from __future__ import annotations

import hashlib
import math
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from functools import cached_property

import torch

from fedstream.common.errors import InvalidManifest, LimitExceeded
from fedstream.common.proto.v1 import coordinator_pb2 as pb

DTYPES: dict[str, torch.dtype] = {
    "F64": torch.float64,
    "F32": torch.float32,
    "F16": torch.float16,
    "BF16": torch.bfloat16,
    "I64": torch.int64,
    "I32": torch.int32,
    "I16": torch.int16,
    "I8": torch.int8,
    "U8": torch.uint8,
    "BOOL": torch.bool,
}
"""Wire dtypes by their safetensors names."""

_DTYPE_NAMES: dict[torch.dtype, str] = {dtype: name for name, dtype in DTYPES.items()}


def dtype_name(dtype: torch.dtype) -> str:
    """The wire (safetensors) name of `dtype`; InvalidManifest if it cannot travel."""
    try:
        return _DTYPE_NAMES[dtype]
    except KeyError:
        raise InvalidManifest(f"dtype {dtype} is not supported on the wire") from None


@dataclass(frozen=True)
class TensorEntry:
    """One tensor of a manifest."""

    name: str
    dtype: torch.dtype
    shape: tuple[int, ...]

    @property
    def numel(self) -> int:
        return math.prod(self.shape)

    @property
    def nbytes(self) -> int:
        return self.numel * self.dtype.itemsize


@dataclass(frozen=True)
class TensorTie:
    """A tensor that does not travel: `name` is the same memory as `source`, which does."""

    name: str
    source: str


def find_ties(tensors: Mapping[str, torch.Tensor]) -> dict[str, str]:
    """{name: source} for every tensor of `tensors` that is the very same view of memory
    (storage, offset, shape, strides, dtype) as an earlier one, its source.

    Tensors that merely overlap are not ties; they travel separately, as any others do.
    """
    first: dict[tuple[object, ...], str] = {}
    ties: dict[str, str] = {}
    for name, tensor in tensors.items():
        key = (
            tensor.device,
            tensor.untyped_storage().data_ptr(),
            tensor.storage_offset(),
            tuple(tensor.shape),
            tensor.stride(),
            tensor.dtype,
        )
        if tensor.numel() and key in first:
            ties[name] = first[key]
        else:
            first.setdefault(key, name)
    return ties


@dataclass(frozen=True)
class ManifestLimits:
    """Bounds a received manifest must respect before anything is allocated for it."""

    max_tensors: int = 100_000
    max_ndim: int = 16
    max_name_bytes: int = 1024
    max_total_bytes: int = 1 << 40
    max_tensor_bytes: int = 1 << 40


def _short(name: str) -> str:
    """`name` quoted for an error message, cut short if a hostile peer made it huge."""
    return repr(name if len(name) <= 80 else name[:80] + "...")


@dataclass(frozen=True)
class Manifest:
    """The tensors of a byte stream, in stream order, and the codec of the stream."""

    entries: tuple[TensorEntry, ...]
    codec: str = "raw"
    ties: tuple[TensorTie, ...] = ()

    @cached_property
    def total_bytes(self) -> int:
        return sum(entry.nbytes for entry in self.entries)

    @cached_property
    def names(self) -> tuple[str, ...]:
        return tuple(entry.name for entry in self.entries)

    @classmethod
    def from_tensors(
        cls,
        tensors: Mapping[str, torch.Tensor],
        codec: str = "raw",
        ties: Mapping[str, str] | None = None,
    ) -> Manifest:
        """The manifest of `tensors`, in the mapping's order, with `ties` ({name: source},
        sources among `tensors`) riding along."""
        entries = []
        for name, tensor in tensors.items():
            dtype_name(tensor.dtype)
            entries.append(TensorEntry(name, tensor.dtype, tuple(tensor.shape)))
        tied = tuple(TensorTie(name, source) for name, source in (ties or {}).items())
        for tie in tied:
            if tie.source not in tensors or tie.name in tensors:
                raise ValueError(f"tie {tie.name!r} -> {tie.source!r} is not onto a tensor sent")
        return cls(tuple(entries), codec, tied)

    @classmethod
    def of_model(cls, state: Mapping[str, torch.Tensor], names: Iterable[str]) -> Manifest:
        """The manifest of the tensors `names` of a model's `state`: a tensor that shares
        memory with an earlier one of them is not sent but named as its tie."""
        chosen = {name: state[name] for name in names}
        ties = find_ties(chosen)
        sent = {name: tensor for name, tensor in chosen.items() if name not in ties}
        return cls.from_tensors(sent, ties=ties)

    def to_proto(self) -> pb.Manifest:
        return pb.Manifest(
            tensors=[
                pb.TensorSpec(
                    name=entry.name,
                    dtype=dtype_name(entry.dtype),
                    shape=entry.shape,
                    nbytes=entry.nbytes,
                )
                for entry in self.entries
            ],
            codec=self.codec,
            ties=[pb.TensorTie(name=tie.name, source=tie.source) for tie in self.ties],
        )

    @classmethod
    def from_proto(cls, msg: pb.Manifest, limits: ManifestLimits = ManifestLimits()) -> Manifest:
        """Validate a manifest that came over the network and build it.

        This is the trust boundary: every count and size is checked here, with Python
        ints (no int64 overflow), before anyone allocates memory for the stream.
        Raises LimitExceeded for a bound and InvalidManifest for anything malformed.
        """
        if len(msg.tensors) > limits.max_tensors:
            raise LimitExceeded(
                f"manifest lists {len(msg.tensors)} tensors; the limit is {limits.max_tensors}"
            )
        if not msg.codec:
            raise InvalidManifest("manifest codec is empty")
        entries = []
        seen: set[str] = set()
        total = 0
        for index, spec in enumerate(msg.tensors):
            name = spec.name
            where = f"tensor {index} ({_short(name)})"
            if not name:
                raise InvalidManifest(f"tensor {index}: name is empty")
            if len(name.encode()) > limits.max_name_bytes:
                raise LimitExceeded(
                    f"{where}: name is {len(name.encode())} bytes; "
                    f"the limit is {limits.max_name_bytes}"
                )
            if name in seen:
                raise InvalidManifest(f"{where}: duplicate name")
            seen.add(name)
            dtype = DTYPES.get(spec.dtype)
            if dtype is None:
                raise InvalidManifest(
                    f"{where}: dtype {_short(spec.dtype)} is not one of {', '.join(DTYPES)}"
                )
            if len(spec.shape) > limits.max_ndim:
                raise LimitExceeded(
                    f"{where}: shape has {len(spec.shape)} dimensions; "
                    f"the limit is {limits.max_ndim}"
                )
            shape = tuple(spec.shape)
            if any(dim < 0 for dim in shape):
                raise InvalidManifest(f"{where}: shape {list(shape)} has a negative dimension")
            entry = TensorEntry(name, dtype, shape)
            if spec.nbytes != entry.nbytes:
                raise InvalidManifest(
                    f"{where}: nbytes is {spec.nbytes} but shape {list(shape)} of "
                    f"{spec.dtype} takes {entry.nbytes}"
                )
            if entry.nbytes > limits.max_tensor_bytes:
                raise LimitExceeded(
                    f"{where}: nbytes {entry.nbytes} exceeds the per-tensor limit of "
                    f"{limits.max_tensor_bytes}"
                )
            total += entry.nbytes
            if total > limits.max_total_bytes:
                raise LimitExceeded(
                    f"{where}: total bytes reach {total}, over the limit of "
                    f"{limits.max_total_bytes}"
                )
            entries.append(entry)
        return cls(tuple(entries), msg.codec, _ties_from_proto(msg, seen, limits))

    def digest(self) -> str:
        """Hex SHA-256 of this layout (names, dtypes, shapes, codec): two models with the
        same digest exchange the same tensors."""
        return hashlib.sha256(self.to_proto().SerializeToString(deterministic=True)).hexdigest()

    def require_same_layout(self, other: Manifest) -> None:
        """Raise InvalidManifest naming the first way `other` differs from this layout.

        `self` is the expected layout (the global model), `other` the received one.
        The codec is not compared: it says how the bytes are encoded, not what they are.
        The ties are: a model tied differently is a different model.
        """
        if other.ties != self.ties:
            raise InvalidManifest(
                f"expected tied tensors [{_tie_list(self.ties)}], got [{_tie_list(other.ties)}]"
            )
        self.require_same_tensors(other)

    def require_same_tensors(self, other: Manifest) -> None:
        """`require_same_layout` for the tensors of the stream alone, ties not compared (a
        checkpoint, which holds what travels, against the model's layout)."""
        if len(other.entries) != len(self.entries):
            raise InvalidManifest(f"expected {len(self.entries)} tensors, got {len(other.entries)}")
        for index, (want, got) in enumerate(zip(self.entries, other.entries, strict=True)):
            if got.name != want.name:
                raise InvalidManifest(
                    f"tensor {index}: expected name {_short(want.name)}, got {_short(got.name)}"
                )
            where = f"tensor {index} ({_short(want.name)})"
            if got.dtype != want.dtype:
                raise InvalidManifest(
                    f"{where}: expected dtype {dtype_name(want.dtype)}, got {dtype_name(got.dtype)}"
                )
            if got.shape != want.shape:
                raise InvalidManifest(
                    f"{where}: expected shape {list(want.shape)}, got {list(got.shape)}"
                )


def _tie_list(ties: tuple[TensorTie, ...]) -> str:
    shown = ", ".join(f"{_short(t.name)} = {_short(t.source)}" for t in ties[:3])
    return shown + (f", ... ({len(ties)} in all)" if len(ties) > 3 else "")


def _ties_from_proto(
    msg: pb.Manifest, sent: set[str], limits: ManifestLimits
) -> tuple[TensorTie, ...]:
    """The manifest's ties, checked: each names a tensor not in the stream, once, tied
    to one that is."""
    if len(msg.ties) > limits.max_tensors:
        raise LimitExceeded(
            f"manifest lists {len(msg.ties)} tied tensors; the limit is {limits.max_tensors}"
        )
    ties = []
    named: set[str] = set()
    for index, tie in enumerate(msg.ties):
        where = f"tie {index} ({_short(tie.name)})"
        if not tie.name:
            raise InvalidManifest(f"tie {index}: name is empty")
        if len(tie.name.encode()) > limits.max_name_bytes:
            raise LimitExceeded(
                f"{where}: name is {len(tie.name.encode())} bytes; "
                f"the limit is {limits.max_name_bytes}"
            )
        if tie.name in sent or tie.name in named:
            raise InvalidManifest(f"{where}: the name is already in the manifest")
        if tie.source not in sent:
            raise InvalidManifest(f"{where}: source {_short(tie.source)} is not in the stream")
        named.add(tie.name)
        ties.append(TensorTie(tie.name, tie.source))
    return tuple(ties)
