"""The client's side of the uplink codec: encode each update as the round asks.

The coordinator announces its codec in the round config; `UplinkEncoder` encodes the
delta tensor by tensor into the parts the codec's layout names. Stateless codecs encode
afresh on every upload attempt, so a retry costs no memory. A codec with error feedback
(top-k) keeps, per exchanged tensor, the residual the coordinator has not yet received
(`residuals`: a float32 copy of the exchanged tensors, 4 bytes per exchanged parameter,
held for as long as the run uses that codec). Each round's delta is added to it, the
update is encoded from the sum once, and the sent part is taken out of the residual only
after the coordinator has the update, so a failed upload loses nothing.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from dataclasses import dataclass, field

import torch

from fedstream.common.codecs import UplinkCodec
from fedstream.common.codecs.base import Raw
from fedstream.common.wire.manifest import Manifest

Deltas = Callable[..., Iterator[torch.Tensor]]
"""local - global in manifest order: blocks by default, whole tensors given None."""


def _nothing() -> None:
    """Commit of an update that leaves no state behind."""


@dataclass
class EncodedUpdate:
    """An update ready to send: its manifest, its parts, and what to do once delivered."""

    manifest: Manifest
    pieces: Callable[[], Iterator[torch.Tensor]]
    """A fresh iteration over the parts, in manifest order, for each upload attempt."""
    commit: Callable[[], None] = field(default=_nothing)
    """Call once the coordinator holds the update."""


class UplinkEncoder:
    def __init__(self) -> None:
        self.uplink = UplinkCodec(Raw())
        self.residuals: dict[str, torch.Tensor] = {}

    def configure(self, uplink: UplinkCodec) -> None:
        """Use `uplink` from now on; a different codec starts without residuals."""
        if uplink.round_config() != self.uplink.round_config():
            self.residuals = {}
        self.uplink = uplink

    def encode(self, layout: Manifest, deltas: Deltas) -> EncodedUpdate:
        """The update of the tensors `layout` lists, whose deltas `deltas` yields."""
        codec = self.uplink.codec
        manifest = self.uplink.layout(layout)
        if isinstance(codec, Raw):
            return EncodedUpdate(manifest, deltas)
        if not codec.error_feedback:

            def pieces() -> Iterator[torch.Tensor]:
                for delta in deltas(None):
                    yield from codec.encode(delta)

            return EncodedUpdate(manifest, pieces)
        encoded: list[tuple[str, torch.Tensor, tuple[torch.Tensor, ...]]] = []
        for entry, delta in zip(layout.entries, deltas(None), strict=True):
            residual = self.residuals.get(entry.name)
            if residual is None:
                residual = self.residuals[entry.name] = torch.zeros(entry.shape)
            residual.add_(delta)
            parts = tuple(
                part.to(spec.dtype)
                for part, spec in zip(codec.encode(residual), codec.layout(entry), strict=True)
            )
            encoded.append((entry.name, residual, parts))

        def commit() -> None:
            for _, residual, parts in encoded:
                residual.sub_(codec.decode(parts, residual.dtype, tuple(residual.shape)))

        return EncodedUpdate(
            manifest, lambda: (part for _, _, parts in encoded for part in parts), commit
        )
