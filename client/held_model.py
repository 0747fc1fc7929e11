"""The downloaded global model, held in a temporary file instead of in memory.

A client needs the global weights twice: to load them into its model before training,
and to subtract them from the trained weights for the update it uploads. Holding them in
memory beside the model doubles the client's footprint (8 GB instead of 4 at a billion
float32 parameters), so the download streams into an anonymous file as it arrives (the
page cache keeps it fast while memory is plentiful, and the kernel may write it out when
it is not), the model is loaded from the file, and the delta is computed against it a
block at a time while the upload streams.

With `--model-dir DIR` the download goes to DIR instead, and stays there:

    DIR/model.bin     the model's data stream, as downloaded (tensors in manifest order)
    DIR/model.json    its SHA-256, manifest and version

A restarted client (or one whose coordinator restarted) that is given a task naming a
model of that SHA-256 loads it from DIR and downloads nothing (`HeldModel.kept`, which
hashes the file again rather than trust it); docs/checkpoints.md.
"""

from __future__ import annotations

import base64
import hashlib
import json
import logging
import os
import tempfile
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import BinaryIO

import torch

from fedstream.common.errors import InvalidManifest, WireError
from fedstream.common.proto.v1 import coordinator_pb2 as pb
from fedstream.common.wire.manifest import Manifest, TensorEntry
from fedstream.common.wire.stream import tensor_bytes

BLOCK_ELEMENTS = 1 << 20
"""Elements of the global model read back at a time when loading it onto a device."""
HASH_BYTES = 1 << 20

log = logging.getLogger(__name__)


class HeldModel:
    """One version of the global model: its manifest and its byte stream, on disk."""

    def __init__(self, manifest: Manifest, version: int, directory: Path | None = None) -> None:
        """An empty model to download into: an anonymous file, or DIR/model.part that
        `keep` makes DIR/model.bin."""
        self.manifest = manifest
        self.version = version
        self.bytes_written = 0
        self.directory = directory
        self._sha256 = hashlib.sha256()
        self._kept_digest = ""
        self._file: BinaryIO
        if directory is None:
            self._file = tempfile.TemporaryFile(prefix="fedstream-model-")  # noqa: SIM115
        else:
            directory.mkdir(parents=True, exist_ok=True)
            self._file = open(directory / "model.part", "w+b")  # noqa: SIM115
        self._offsets = _offsets(manifest)

    @property
    def complete(self) -> bool:
        return self.bytes_written == self.manifest.total_bytes

    def write(self, chunk: bytes | memoryview) -> None:
        """Append the next bytes of the stream; WireError, writing nothing, past its end."""
        view = memoryview(chunk).cast("B")
        size = len(view)
        if self.bytes_written + size > self.manifest.total_bytes:
            raise WireError(
                f"chunk of {size} bytes at offset {self.bytes_written} overflows the stream "
                f"of {self.manifest.total_bytes} bytes"
            )
        done = 0
        while done < size:
            done += os.pwrite(self._file.fileno(), view[done:], self.bytes_written + done)
        self._sha256.update(view)
        self.bytes_written += size

    @property
    def sha256(self) -> str:
        """Hex SHA-256 of the data stream (of the bytes written so far while downloading)."""
        return self._kept_digest or self._sha256.hexdigest()

    def keep(self) -> None:
        """A complete download into a directory: make it the directory's kept model."""
        if self.directory is None or not self.complete:
            return
        self._file.flush()
        (self.directory / "model.json").unlink(missing_ok=True)
        os.replace(self.directory / "model.part", self.directory / "model.bin")
        record = {
            "version": self.version,
            "sha256": self.sha256,
            "manifest": base64.b64encode(self.manifest.to_proto().SerializeToString()).decode(),
        }
        tmp = self.directory / "model.json.tmp"
        tmp.write_text(json.dumps(record))
        tmp.replace(self.directory / "model.json")
        self._kept_digest = self.sha256

    @classmethod
    def kept(
        cls, directory: Path, expected: Manifest, version: int, sha256: str
    ) -> HeldModel | None:
        """The model kept in `directory` when it is laid out as `expected` and its bytes
        hash to `sha256` (hashed again here: a file is not trusted by its name); it is
        then model `version`. None otherwise, saying why when one was there."""
        try:
            record = json.loads((directory / "model.json").read_text())
        except (OSError, ValueError):
            return None
        if not isinstance(record, dict) or record.get("sha256") != sha256:
            log.info("the model kept in %s is not model v%d; downloading it", directory, version)
            return None
        try:
            proto = pb.Manifest.FromString(base64.b64decode(record["manifest"]))
            manifest = Manifest.from_proto(proto)
            expected.require_same_layout(manifest)
        except (KeyError, ValueError, InvalidManifest) as exc:
            log.warning("the model kept in %s is not usable (%s); downloading", directory, exc)
            return None
        held = cls.__new__(cls)
        held.manifest, held.version, held.directory = manifest, version, directory
        held._offsets = _offsets(manifest)
        try:
            held._file = open(directory / "model.bin", "rb")  # noqa: SIM115
        except OSError:
            return None
        digest = hashlib.sha256()
        size = 0
        while block := held._file.read(HASH_BYTES):
            digest.update(block)
            size += len(block)
        if size != manifest.total_bytes or digest.hexdigest() != sha256:
            held._file.close()
            log.warning("the model kept in %s does not match its digest; downloading", directory)
            return None
        held.bytes_written = size
        held._sha256 = digest
        held._kept_digest = sha256
        return held

    def _read(self, entry: TensorEntry, start: int, into: torch.Tensor) -> torch.Tensor:
        """Elements [start, start + into.numel()) of tensor `entry`, read into `into`."""
        if not self.complete:
            raise WireError(f"model v{self.version} is incomplete")
        view = tensor_bytes(into)
        offset = self._offsets[entry.name] + start * entry.dtype.itemsize
        done = 0
        while done < len(view):
            n = os.preadv(self._file.fileno(), [view[done:]], offset + done)
            if not n:
                raise WireError("held model file is shorter than its manifest")
            done += n
        return into

    def _blocks(
        self, block_elements: int | None, only: Manifest | None = None
    ) -> Iterator[tuple[TensorEntry, int, int]]:
        """(entry, first element, element count) in stream order; whole tensors for None;
        of the tensors `only` lists, when given."""
        for entry in (only or self.manifest).entries:
            if block_elements is None:
                yield entry, 0, entry.numel
                continue
            for start in range(0, entry.numel, block_elements):
                yield entry, start, min(block_elements, entry.numel - start)

    def load_into(self, state: Mapping[str, torch.Tensor]) -> None:
        """Copy the global weights into the same-named tensors of `state` (any device):
        CPU tensors are read into directly, others through a reused staging block."""
        staging = torch.empty(0, dtype=torch.uint8)
        with torch.no_grad():
            for entry, start, count in self._blocks(BLOCK_ELEMENTS):
                target = state[entry.name].view(-1)[start : start + count]
                if target.device.type == "cpu":
                    self._read(entry, start, target)
                    continue
                nbytes = count * entry.dtype.itemsize
                if nbytes > staging.numel():
                    staging = torch.empty(nbytes, dtype=torch.uint8)
                target.copy_(self._read(entry, start, staging[:nbytes].view(entry.dtype)))

    def read(self, entry: TensorEntry) -> torch.Tensor:
        """The whole global tensor `entry`, shaped, in a new CPU tensor."""
        flat = torch.empty(entry.numel, dtype=entry.dtype)
        return self._read(entry, 0, flat).view(entry.shape)

    def deltas(
        self,
        state: Mapping[str, torch.Tensor],
        block_elements: int | None,
        only: Manifest | None = None,
    ) -> Iterator[torch.Tensor]:
        """`state` minus the global weights, in manifest order, `block_elements` at a time
        (whole tensors, shaped, for None); of the tensors `only` lists (a streaming
        fragment, whose own manifest it is), when given.

        Every block is a new tensor: a chunker may hold on to the tail of one block while
        it takes the next, so blocks must not share a read buffer.
        """
        with torch.no_grad():
            for entry, start, count in self._blocks(block_elements, only):
                delta = self._read(entry, start, torch.empty(count, dtype=entry.dtype))
                local = state[entry.name].detach().reshape(-1)[start : start + count]
                torch.sub(local.to("cpu"), delta, out=delta)  # in the read buffer: no copy
                yield delta.view(entry.shape) if block_elements is None else delta

    def patch(self, entry: TensorEntry, tensor: torch.Tensor) -> None:
        """Overwrite tensor `entry` with `tensor` (a streaming client taking in a new
        global fragment). The file then holds another model than its digest names: a
        kept one stops being kept (its record goes, so no restart trusts it)."""
        if self.directory is not None and self._kept_digest:
            (self.directory / "model.json").unlink(missing_ok=True)
            if self._file.mode == "rb":  # opened by `kept`, to read
                self._file.close()
                self._file = open(self.directory / "model.bin", "r+b")  # noqa: SIM115
        self._kept_digest = "-"
        view = tensor_bytes(tensor.detach().to("cpu", entry.dtype).contiguous())
        done, offset = 0, self._offsets[entry.name]
        while done < len(view):
            done += os.pwrite(self._file.fileno(), view[done:], offset + done)

    def close(self) -> None:
        """Let the model go: a kept one stays in its directory, a part download does not."""
        self._file.close()
        if self.directory is not None and not self._kept_digest:
            (self.directory / "model.part").unlink(missing_ok=True)


def _offsets(manifest: Manifest) -> dict[str, int]:
    """Where each tensor starts in the data stream."""
    offsets: dict[str, int] = {}
    offset = 0
    for entry in manifest.entries:
        offsets[entry.name] = offset
        offset += entry.nbytes
    return offsets
