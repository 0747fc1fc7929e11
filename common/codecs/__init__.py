"""Uplink compression: a run's codec, chosen by the coordinator and named in each upload.

Each codec encodes one delta tensor as a few parts that travel as ordinary manifest
entries (manifest, then the parts' bytes, as for raw updates):

    raw    NAME                              the delta in the model tensor's dtype
    fp16   NAME F16, bf16  NAME BF16         same shape                 (halfprec.py)
    int8   NAME::scales F32, NAME::values I8  a scale per 256 elements   (int8.py)
    int4   NAME::scales F32, NAME::values U8  two 4-bit values a byte    (int4.py)
    topk   NAME::indices I32, NAME::values   k = ceil(fraction * n)      (topk.py)
    topk2  NAME::indices, ::scales, ::values top-k, 2-bit values          (topk2.py)

and `+zstd` compresses the whole stream of parts losslessly (zstd.py). The upload
manifest's codec field carries the spec (`int8`, `topk+zstd`); the coordinator accepts
only its own run's spec and only the exact layout it derives from the global model
(`UplinkCodec.layout`). Clients learn the spec from the round config
(`uplink_codec`, `uplink_topk_fraction`).
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator, Mapping
from dataclasses import dataclass
from typing import BinaryIO

import torch

from fedstream.common.codecs import zstd
from fedstream.common.codecs.base import Codec, Raw
from fedstream.common.codecs.halfprec import BFloat16, Float16
from fedstream.common.codecs.int4 import Int4
from fedstream.common.codecs.int8 import Int8
from fedstream.common.codecs.topk import TopK
from fedstream.common.codecs.topk2 import TopK2
from fedstream.common.round_config import ConfigScalar
from fedstream.common.wire.manifest import Manifest
from fedstream.common.wire.stream import iter_chunks

CODEC_NAMES = ("raw", "fp16", "bf16", "int8", "int4", "topk", "topk2")
ZSTD_SUFFIX = "+zstd"
CODEC_KEY = "uplink_codec"
"""Round-config key announcing the uplink spec to clients."""
TOPK_FRACTION_KEY = "uplink_topk_fraction"
"""Round-config key announcing the top-k fraction to clients."""


def make_codec(name: str, topk_fraction: float = 0.01) -> Codec:
    """The codec called `name`; ValueError for an unknown one."""
    simple: dict[str, type[Codec]] = {
        "raw": Raw,
        "fp16": Float16,
        "bf16": BFloat16,
        "int8": Int8,
        "int4": Int4,
    }
    if name in ("topk", "topk2"):
        return (TopK2 if name == "topk2" else TopK)(topk_fraction)
    if name not in simple:
        raise ValueError(f"unknown uplink codec {name!r}: use one of {', '.join(CODEC_NAMES)}")
    return simple[name]()


@dataclass(frozen=True)
class UplinkCodec:
    """A run's uplink encoding: a codec, and whether zstd compresses its byte stream."""

    codec: Codec
    zstd: bool = False

    @property
    def spec(self) -> str:
        """The name announced in the round config and in every upload manifest."""
        return self.codec.name + (ZSTD_SUFFIX if self.zstd else "")

    @property
    def is_raw(self) -> bool:
        return isinstance(self.codec, Raw) and not self.zstd

    @classmethod
    def parse(cls, spec: str, topk_fraction: float = 0.01) -> UplinkCodec:
        """`int8`, `topk+zstd`, ... back into an UplinkCodec; ValueError if unknown."""
        name, compressed = spec, spec.endswith(ZSTD_SUFFIX)
        if compressed:
            name = spec[: -len(ZSTD_SUFFIX)]
        return cls(make_codec(name, topk_fraction), compressed)

    def round_config(self) -> dict[str, ConfigScalar]:
        """The round-config entries that tell clients how to encode their updates."""
        config: dict[str, ConfigScalar] = {CODEC_KEY: self.spec}
        if isinstance(self.codec, TopK):
            config[TOPK_FRACTION_KEY] = self.codec.fraction
        return config

    @classmethod
    def from_round_config(cls, config: Mapping[str, ConfigScalar]) -> UplinkCodec:
        """The uplink a round config announces; raw when it announces none."""
        return cls.parse(
            str(config.get(CODEC_KEY, "raw")), float(config.get(TOPK_FRACTION_KEY, 0.01))
        )

    def layout(self, model: Manifest) -> Manifest:
        """The exact upload manifest for an update of `model`'s tensors."""
        parts = tuple(part for entry in model.entries for part in self.codec.layout(entry))
        return Manifest(parts, self.spec)

    def max_wire_bytes(self, layout: Manifest) -> int:
        """The most data bytes an upload with manifest `layout` may carry."""
        total = layout.total_bytes
        return zstd.compressed_bound(total) if self.zstd else total

    def reader(self, source: BinaryIO) -> BinaryIO:
        """A reader of the parts' bytes from a spooled upload's bytes."""
        return zstd.decompressing_reader(source) if self.zstd else source


def wire_chunks(
    manifest: Manifest, pieces: Iterable[torch.Tensor], chunk_size: int
) -> Iterator[memoryview | bytes]:
    """The data chunks of an upload: the bytes of `pieces`, zstd-compressed when the
    manifest's codec says so."""
    chunks = iter_chunks(pieces, chunk_size)
    if not manifest.codec.endswith(ZSTD_SUFFIX):
        return chunks
    return zstd.compress_chunks(chunks, manifest.total_bytes, chunk_size)


__all__ = [
    "CODEC_KEY",
    "CODEC_NAMES",
    "TOPK_FRACTION_KEY",
    "BFloat16",
    "Codec",
    "Float16",
    "Int4",
    "Int8",
    "Raw",
    "TopK",
    "TopK2",
    "UplinkCodec",
    "make_codec",
    "wire_chunks",
]
