"""Model weights in files a user already holds or wants: a `torch.save` state dict
(`.pt`/`.pth`), a `.safetensors` file, or a fedstream round checkpoint.

`read_weights` takes any of the three (a checkpoint's `strategy/...` tensors are the
strategy's, not the model's, and are left out); `check_weights` says where a file's
tensors first disagree with a model's state dict, naming the tensor. `fedstream server
--init-weights` reads through both, and `fedstream export` writes through `write_weights`.
"""

from __future__ import annotations

import hashlib
import pickle
import zipfile
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

import torch

from fedstream.common.checkpoint import load_checkpoint, save_checkpoint
from fedstream.common.errors import InvalidCheckpoint

STRATEGY_PREFIX = "strategy/"
"""Tensors of a round checkpoint that hold the strategy's state (server optimiser moments)."""
TORCH_SUFFIXES = (".pt", ".pth")
SAFETENSORS_SUFFIX = ".safetensors"


@dataclass
class WeightsFile:
    """The tensors of a weights file, where they came from and the file's SHA-256."""

    tensors: dict[str, torch.Tensor]
    source: str
    sha256: str


def file_sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(1 << 20):
            digest.update(block)
    return digest.hexdigest()


def read_weights(path: Path) -> WeightsFile:
    """The model tensors in `path`: safetensors by its suffix, else a `torch.save` state
    dict loaded with `weights_only=True` (no code in the file runs). InvalidCheckpoint,
    in one line, when the file is not one of those."""
    path = Path(path)
    if not path.is_file():
        raise InvalidCheckpoint(f"{path} is not a readable file")
    if path.suffix == SAFETENSORS_SUFFIX:
        loaded, _ = load_checkpoint(path)
    else:
        try:
            loaded = torch.load(path, map_location="cpu", weights_only=True)
        except (pickle.UnpicklingError, zipfile.BadZipFile, RuntimeError, EOFError) as exc:
            first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
            raise InvalidCheckpoint(
                f"{path} is not a torch.save state dict of tensors: {first}"
            ) from None
    if not isinstance(loaded, Mapping) or not all(
        isinstance(k, str) and isinstance(v, torch.Tensor) for k, v in loaded.items()
    ):
        raise InvalidCheckpoint(f"{path} does not hold a state dict (tensors by name)")
    tensors = {k: v for k, v in loaded.items() if not k.startswith(STRATEGY_PREFIX)}
    return WeightsFile(tensors, str(path.resolve()), file_sha256(path))


def _describe(tensor: torch.Tensor) -> str:
    return f"{str(tensor.dtype).removeprefix('torch.')} {tuple(tensor.shape)}"


def check_weights(
    tensors: Mapping[str, torch.Tensor],
    model_state: Mapping[str, torch.Tensor],
    required: list[str],
) -> None:
    """InvalidCheckpoint naming the first tensor where `tensors` does not fit the model:
    a `required` tensor missing, a tensor the model does not have, a dtype or shape
    other than the model's (in state-dict order), a value that is not finite."""
    wanted = set(required)
    for name, target in model_state.items():
        tensor = tensors.get(name)
        if tensor is None:
            if name in wanted:
                raise InvalidCheckpoint(f"tensor {name!r} ({_describe(target)}) is missing")
            continue
        if tensor.dtype != target.dtype or tensor.shape != target.shape:
            raise InvalidCheckpoint(
                f"tensor {name!r} is {_describe(tensor)}; the model's is {_describe(target)}"
            )
        if tensor.is_floating_point() and not bool(torch.isfinite(tensor).all()):
            raise InvalidCheckpoint(f"tensor {name!r} holds NaN or infinite values")
    extra = [name for name in tensors if name not in model_state]
    if extra:
        raise InvalidCheckpoint(f"tensor {extra[0]!r} is not in the model")


def fit_weights(
    weights: WeightsFile, module: torch.nn.Module, exchanged: list[str]
) -> dict[str, torch.Tensor]:
    """The `exchanged` tensors of `weights`, once they fit `module` (`check_weights`).

    The file may also hold tensors that are not exchanged (a whole state dict, say): each
    process keeps those as the task builds them, so they must equal `module`'s own."""
    state = module.state_dict()
    check_weights(weights.tensors, state, exchanged)
    wanted = set(exchanged)
    for name, tensor in weights.tensors.items():
        if name not in wanted and not torch.equal(tensor, state[name]):
            raise InvalidCheckpoint(
                f"tensor {name!r} is not exchanged (every process keeps the task's own) "
                "and the file's differs from it"
            )
    return {name: weights.tensors[name] for name in exchanged}


def write_weights(path: Path, state: Mapping[str, torch.Tensor], metadata: dict[str, str]) -> None:
    """`state` at `path`, atomically: safetensors (with `metadata`) for a .safetensors
    path, `torch.save` for .pt/.pth. Tied tensors are written once per name."""
    path = Path(path)
    if path.suffix == SAFETENSORS_SUFFIX:
        save_checkpoint(path, state, metadata)
    elif path.suffix in TORCH_SUFFIXES:
        tmp = path.with_name(f".{path.name}.tmp")
        try:
            torch.save({name: tensor.detach() for name, tensor in state.items()}, tmp)
            tmp.replace(path)
        finally:
            tmp.unlink(missing_ok=True)
    else:
        raise ValueError(f"{path}: a weights file ends in .pt, .pth or .safetensors")
