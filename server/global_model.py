"""The global model: the weights the coordinator owns, and the downloads it serves.

The coordinator encodes nothing per client: a download is a walk over the global tensors'
own memory, chunk by chunk from the requested byte offset (a broken download resumes
where it stopped), for as long as the phase it was opened in stays open.
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable, Iterator, Mapping
from typing import TYPE_CHECKING

import torch

from fedstream.common.wire.manifest import Manifest
from fedstream.common.wire.stream import iter_chunks
from fedstream.server.calls import ModelStream
from fedstream.server.errors import OffsetOutOfRange, UnknownFragment, WrongRound

if TYPE_CHECKING:
    from fedstream.server.fragments import Fragments

MIN_CHUNK_BYTES = 1024


class GlobalModel:
    """The exchanged tensors of the task's model (`exchanged_names`), at `version`.

    The tensors share storage with the model's parameters, so evaluating the module sees
    the current weights and no second copy exists. Tensors not exchanged stay as the
    task built them. Of tensors tied to one another only the first is held and sent; the
    manifest names the others as its ties, and they follow it since they are its memory.
    """

    def __init__(self, module: torch.nn.Module, names: list[str]) -> None:
        self.module = module
        state = module.state_dict()
        self.manifest = Manifest.of_model(state, names)
        self.tensors: dict[str, torch.Tensor] = {name: state[name] for name in self.manifest.names}
        for name, tensor in self.tensors.items():
            if not tensor.is_contiguous():
                raise ValueError(f"model tensor {name!r} is not contiguous")
        self.version = 0
        self._digest: tuple[int, str] | None = None
        self.fragments: Fragments | None = None
        """Streaming: the fragments a download may ask for alone (server/fragments.py)."""
        self._fragment_digests: dict[int, str] = {}
        """Each fragment's SHA-256 at the version `_digest` names."""

    def sha256(self) -> str:
        """Hex SHA-256 of the current version's data stream, computed once per version (a
        pass over the model: call it off the event loop first, as the round opens). A
        client holding a model of this digest needs no download (docs/checkpoints.md)."""
        if self._digest is None or self._digest[0] != self.version:
            # one pass: the fragments are contiguous runs of the stream, so each one's
            # digest is made along with the whole stream's
            whole = hashlib.sha256()
            groups = self.fragments.manifests if self.fragments else [self.manifest]
            parts = {}
            for index, group in enumerate(groups):
                part = hashlib.sha256() if self.fragments else None
                for chunk in iter_chunks([self.tensors[n] for n in group.names], 1 << 20, 0):
                    whole.update(chunk)
                    if part is not None:
                        part.update(chunk)
                if part is not None:
                    parts[index] = part.hexdigest()
            self._digest = (self.version, whole.hexdigest())
            self._fragment_digests = parts
        return self._digest[1]

    def _part(self, fragment: int | None) -> tuple[Manifest, list[torch.Tensor], str]:
        """The manifest, tensors and SHA-256 of a download of the whole model (None) or
        of one fragment of it; UnknownFragment for an index the run does not have."""
        if fragment is None:
            return self.manifest, list(self.tensors.values()), self.sha256()
        count = self.fragments.count if self.fragments is not None else 1
        if self.fragments is None or not 0 <= fragment < count:
            raise UnknownFragment(
                f"fragment {fragment} is out of range: this run's model is in {count} "
                f"fragment{'s' if count > 1 else ''} (0..{count - 1})"
            )
        manifest = self.fragments.manifest(fragment)
        self.sha256()  # the fragments' digests with the whole model's, once per version
        tensors = [self.tensors[name] for name in manifest.names]
        return manifest, tensors, self._fragment_digests[fragment]

    def load(self, tensors: Mapping[str, torch.Tensor]) -> None:
        self._digest = None
        self.manifest.require_same_tensors(Manifest.from_tensors(tensors))
        with torch.no_grad():
            for name, target in self.tensors.items():
                target.copy_(tensors[name])

    def summary(self) -> str:
        params = sum(e.numel for e in self.manifest.entries)
        tied = f" ({len(self.manifest.ties)} more tied to them)" if self.manifest.ties else ""
        return (
            f"{len(self.manifest.entries)} tensors{tied}, {params:,} parameters, "
            f"{self.manifest.total_bytes / 2**20:.1f} MiB exchanged"
        )

    def download(
        self,
        version: int,
        offset: int,
        chunk_bytes: int,
        still_open: Callable[[], bool],
        phase_name: str,
        fragment: int | None = None,
    ) -> ModelStream:
        """Model `version` (only fragment `fragment`'s tensors, when given) from byte
        `offset` of its stream in chunks of `chunk_bytes`, for as long as `still_open()`
        holds (the phase `phase_name` the download belongs to)."""
        if version != self.version:
            raise WrongRound(f"model version {version} is not current (current: {self.version})")
        manifest, tensors, sha256 = self._part(fragment)
        total = manifest.total_bytes
        if offset > total:
            raise OffsetOutOfRange(f"offset {offset} is beyond the model's {total} bytes")
        chunks = iter_chunks(tensors, max(MIN_CHUNK_BYTES, chunk_bytes), offset)
        return ModelStream(
            self.version, manifest, offset, _while_open(chunks, still_open, phase_name), sha256
        )


def _while_open(
    chunks: Iterator[memoryview | bytes], still_open: Callable[[], bool], phase_name: str
) -> Iterator[memoryview | bytes]:
    """The chunks, as long as the phase they belong to is open.

    Aggregation rewrites the global tensors in place once a round closes; a chunk is a view
    of them until it is framed, which happens in the same event-loop step as this check, so
    no download ever reads a tensor that is being rewritten.
    """
    for chunk in chunks:
        if not still_open():
            raise WrongRound(f"{phase_name} closed during the download")
        yield chunk
