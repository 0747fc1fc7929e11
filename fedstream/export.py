"""`fedstream export RUN_DIR --out PATH`: a run's model as a plain model, outside fedstream.

A round checkpoint holds what travelled (the exchanged tensors) and the strategy's state;
a user wants the task's whole model. Export rebuilds it from the checkpoint's metadata
(task, options, seed: `build_model` gives the tensors that never travel, such as integer
buffers or a frozen base), loads the checkpoint's tensors into it, and writes its state
dict: one that `task.build_model().load_state_dict(..., strict=True)` takes.

    .pt / .pth       torch.save of the state dict
    .safetensors     safetensors, with the run's task, options, seed and round as metadata
    anything else    a directory in the task's own pretrained format (Task.save_pretrained)
"""

from __future__ import annotations

import inspect
import json
from dataclasses import dataclass, field
from pathlib import Path

import torch

from fedstream.common.checkpoint import read_checkpoint_metadata
from fedstream.common.config import DEFAULT_HELP, ConfigError
from fedstream.common.errors import InvalidCheckpoint
from fedstream.common.weights import (
    SAFETENSORS_SUFFIX,
    TORCH_SUFFIXES,
    fit_weights,
    read_weights,
    write_weights,
)
from fedstream.common.wire.manifest import Manifest
from fedstream.server.run_store import CHECKPOINT_FORMAT, list_checkpoints
from fedstream.tasks import Task, exchanged_names, load_task

EXPORT_FORMAT = "fedstream-export/1"


@dataclass
class ExportConfig:
    run_dir: Path = Path("runs/latest")
    """The run directory to export from."""
    round: int | None = field(default=None, metadata={DEFAULT_HELP: "the newest checkpoint"})
    """Round whose model is exported; its checkpoint must still be in RUN_DIR/checkpoints
    (see the server's --keep-checkpoints)."""
    out: Path | None = None
    """Where to write (required): FILE.pt or FILE.pth (torch.save), FILE.safetensors, or
    any other path for a directory in the task's own pretrained format; missing parent
    directories are made."""
    merge_adapters: bool = False
    """Merge the task's adapters (LoRA) into its base weights before writing."""
    base_model: str | None = field(
        default=None, metadata={DEFAULT_HELP: "the task's own choice (hf-causal-lm: model_dir)"}
    )
    """For an adapter directory: the base model its config names, as whoever loads it will
    find it (a hub name, or a path relative to where it is loaded), so the directory can
    move."""

    def validate(self) -> None:
        if self.out is None or not str(self.out):
            raise ConfigError("--out PATH is required: FILE.pt, FILE.safetensors or a directory")
        if self.round is not None and self.round < 0:
            raise ConfigError(f"round must be 0 or more, got {self.round}")


def checkpoint_of(run_dir: Path, round_number: int | None) -> Path:
    """The checkpoint of `round_number` (the newest when None) in `run_dir`."""
    found = dict(list_checkpoints(run_dir / "checkpoints"))
    if not found:
        raise ConfigError(f"{run_dir} holds no checkpoints: is it a fedstream run directory?")
    if round_number is None:
        return found[max(found)]
    if round_number not in found:
        kept = ", ".join(str(r) for r in sorted(found))
        raise ConfigError(f"{run_dir} has no checkpoint of round {round_number} (it has {kept})")
    return found[round_number]


def export(config: ExportConfig) -> str:
    """Write the model of the chosen checkpoint to `config.out`; what was written."""
    out = config.out
    if out is None:
        raise ConfigError("--out PATH is required")
    path = checkpoint_of(config.run_dir, config.round)
    metadata = read_checkpoint_metadata(path)
    if metadata.get("format") != CHECKPOINT_FORMAT:
        raise InvalidCheckpoint(f"{path} is not a fedstream round checkpoint")
    task = load_task(metadata["task"], json.loads(metadata["task_opt"]), int(metadata["seed"]))
    model = task.build_model()
    # A tied tensor (GPT-2's output layer is its token embedding) travels, and is
    # checkpointed, once: under its source's name.
    travelled = Manifest.of_model(model.state_dict(), exchanged_names(task, model)).names
    try:
        fitted = fit_weights(read_weights(path), model, list(travelled))
    except InvalidCheckpoint as exc:
        raise InvalidCheckpoint(f"{path} does not fit task {metadata['task']}: {exc}") from None
    state = model.state_dict()
    with torch.no_grad():
        for name, tensor in fitted.items():
            state[name].copy_(tensor)
    try:
        return _write(config, task, model, metadata, out)
    except OSError as exc:
        raise ConfigError(f"cannot write {out}: {exc.strerror or exc}") from None


def _write(
    config: ExportConfig, task: Task, model: torch.nn.Module, metadata: dict[str, str], out: Path
) -> str:
    """Write `model` to `out` in the format its suffix names, making missing parent
    directories first (as the server makes its --run-dir): the path says what is wanted."""
    out.parent.mkdir(parents=True, exist_ok=True)
    if out.suffix not in (*TORCH_SUFFIXES, SAFETENSORS_SUFFIX):
        extra = {}
        if config.base_model is not None:
            if "base_model" not in inspect.signature(task.save_pretrained).parameters:
                raise ConfigError(f"task {metadata['task']} does not name a base model")
            extra["base_model"] = config.base_model
        task.save_pretrained(model, out, merge_adapters=config.merge_adapters, **extra)
        return f"round {metadata['round']} of {config.run_dir} -> {out}/ (task's own format)"
    if config.merge_adapters:
        model = task.merge_adapters(model)
    written = model.state_dict()
    info = {
        "format": EXPORT_FORMAT,
        **{k: metadata.get(k, "") for k in ("task", "task_opt", "seed", "strategy", "round")},
    }
    write_weights(out, written, info)
    params = sum(t.numel() for t in written.values())
    return (
        f"round {metadata['round']} of {config.run_dir} -> {out}: "
        f"{len(written)} tensors, {params:,} parameters"
    )


def main(config: ExportConfig) -> int:
    print(f"fedstream export: {export(config)}")
    return 0
