"""The tensor wire codec: a manifest, then the tensors' raw bytes as one chunked stream.

A model never travels as one message. The sender describes every tensor in a
`Manifest` (name, dtype, shape, byte length, in stream order), then sends the
concatenation of the tensors' native bytes cut into chunks (`iter_chunks`). The
receiver validates the manifest before allocating anything (`Manifest.from_proto`),
then writes each chunk where it belongs as it arrives (a client into its held copy of
the model, `client/held_model.py`; the coordinator into an upload's spool).

Bytes are always taken through a `torch.uint8` view, never through a numpy array of the
tensor's own dtype: numpy has no bfloat16, and the raw bits are what must survive.
"""

from __future__ import annotations

import hashlib
import math
from collections.abc import Iterable, Iterator, Mapping
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

    @cached_property
    def total_bytes(self) -> int:
        return sum(entry.nbytes for entry in self.entries)

    @cached_property
    def names(self) -> tuple[str, ...]:
        return tuple(entry.name for entry in self.entries)

    @classmethod
    def from_tensors(cls, tensors: Mapping[str, torch.Tensor], codec: str = "raw") -> Manifest:
        """The manifest of `tensors`, in the mapping's order."""
        entries = []
        for name, tensor in tensors.items():
            dtype_name(tensor.dtype)
            entries.append(TensorEntry(name, tensor.dtype, tuple(tensor.shape)))
        return cls(tuple(entries), codec)

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
        return cls(tuple(entries), msg.codec)

    def digest(self) -> str:
        """Hex SHA-256 of this layout (names, dtypes, shapes, codec): two models with the
        same digest exchange the same tensors."""
        return hashlib.sha256(self.to_proto().SerializeToString(deterministic=True)).hexdigest()

    def require_same_layout(self, other: Manifest) -> None:
        """Raise InvalidManifest naming the first way `other` differs from this layout.

        `self` is the expected layout (the global model), `other` the received one.
        The codec is not compared: it says how the bytes are encoded, not what they are.
        """
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


def tensor_bytes(t: torch.Tensor) -> memoryview:
    """A zero-copy, writable, flat uint8 view of a contiguous CPU tensor's bytes.

    The memoryview keeps the tensor's memory alive for as long as it exists.
    """
    if not t.is_contiguous():
        raise ValueError("tensor_bytes needs a contiguous tensor; call .contiguous() first")
    if t.device.type != "cpu":
        raise ValueError(f"tensor_bytes needs a CPU tensor, got one on {t.device}")
    # Flatten with explicit unit strides first: a 0-d tensor, or a contiguous one whose
    # size-0 or size-1 dimensions carry other strides, cannot be viewed as uint8 directly.
    flat = t.detach().as_strided((t.numel(),), (1,))
    return flat.view(torch.uint8).numpy().data


def iter_chunks(
    tensors: Iterable[torch.Tensor], chunk_size: int, offset: int = 0
) -> Iterator[memoryview | bytes]:
    """The concatenated bytes of `tensors` from byte `offset` on, in chunks of `chunk_size`.

    Every chunk but the last is exactly `chunk_size` bytes. A chunk inside one tensor
    is a zero-copy memoryview slice of it; one that spans tensors is joined into a new
    `bytes` (one copy of those bytes). Non-contiguous tensors are made contiguous one
    at a time as they are reached, so the whole stream never exists at once.
    """
    if chunk_size <= 0:
        raise ValueError(f"chunk_size must be positive, got {chunk_size}")
    if offset < 0:
        raise ValueError(f"offset must not be negative, got {offset}")
    return _iter_chunks(tensors, chunk_size, offset)


def _iter_chunks(
    tensors: Iterable[torch.Tensor], chunk_size: int, offset: int
) -> Iterator[memoryview | bytes]:
    skip = offset
    # The start of the next chunk when it spans tensors: views, copied only once complete.
    parts: list[memoryview] = []
    pending = 0
    for tensor in tensors:
        size = tensor.numel() * tensor.element_size()
        if skip >= size:
            skip -= size
            continue
        view = tensor_bytes(tensor.contiguous())
        pos, skip = skip, 0  # skip is only ever non-zero while parts is empty
        if parts:
            take = min(chunk_size - pending, size)
            parts.append(view[:take])
            pending += take
            pos = take
            if pending < chunk_size:
                continue
            yield b"".join(parts)
            parts, pending = [], 0
        while size - pos >= chunk_size:
            yield view[pos : pos + chunk_size]
            pos += chunk_size
        if pos < size:
            parts.append(view[pos:])
            pending = size - pos
    if skip:
        raise ValueError(f"offset {offset} is past the end of the stream")
    if len(parts) == 1:
        yield parts[0]
    elif parts:
        yield b"".join(parts)
