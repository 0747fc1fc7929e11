"""The codec interface: one small class per compression scheme, two methods each.

A codec turns one delta tensor into a few *parts* (plain tensors that travel as
manifest entries) and back. `layout` says, from the model tensor alone, exactly which
parts an encoding has (names, dtypes, shapes): the coordinator derives the expected
upload manifest from the global model with it, so every size is known and checked
before a byte is spooled.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Sequence
from typing import ClassVar

import torch

from fedstream.common.wire.manifest import TensorEntry


class Codec(ABC):
    """Encodes a delta tensor into parts and decodes parts back into a delta tensor."""

    name: ClassVar[str]
    """The codec's name in `--uplink-codec` and in the manifest's codec field."""
    error_feedback: ClassVar[bool] = False
    """Whether a client should carry this codec's error into its next update."""

    @abstractmethod
    def layout(self, entry: TensorEntry) -> tuple[TensorEntry, ...]:
        """The parts that encode model tensor `entry`, in stream order."""

    @abstractmethod
    def encode(self, tensor: torch.Tensor) -> tuple[torch.Tensor, ...]:
        """The parts of `tensor` (a CPU tensor), shaped and typed as `layout` says."""

    @abstractmethod
    def decode(
        self, parts: Sequence[torch.Tensor], dtype: torch.dtype, shape: tuple[int, ...]
    ) -> torch.Tensor:
        """The tensor of `dtype` and `shape` that `parts` encode.

        `parts` match `layout` in dtype and shape (the manifest was checked) but their
        values came over the network: a value that cannot be decoded raises WireError.
        """


class Raw(Codec):
    """The delta's own bytes: exact, and the default."""

    name = "raw"

    def layout(self, entry: TensorEntry) -> tuple[TensorEntry, ...]:
        return (entry,)

    def encode(self, tensor: torch.Tensor) -> tuple[torch.Tensor, ...]:
        return (tensor,)

    def decode(
        self, parts: Sequence[torch.Tensor], dtype: torch.dtype, shape: tuple[int, ...]
    ) -> torch.Tensor:
        return parts[0].to(dtype).reshape(shape)
