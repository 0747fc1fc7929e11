"""Weights files in and out: what fits a model, what is refused and how it is named."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from torch import nn

from fedstream.common.errors import InvalidCheckpoint
from fedstream.common.weights import (
    WeightsFile,
    check_weights,
    fit_weights,
    read_weights,
    write_weights,
)


def model() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(3, 4), nn.BatchNorm1d(4), nn.Linear(4, 2))


def exchanged(module: nn.Module) -> list[str]:
    return [k for k, v in module.state_dict().items() if v.is_floating_point()]


def test_a_whole_state_dict_fits_and_gives_the_exchanged_tensors() -> None:
    module = model()
    state = {k: v.clone() for k, v in model().state_dict().items()}
    fitted = fit_weights(WeightsFile(state, "x", ""), module, exchanged(module))
    assert list(fitted) == exchanged(module)
    assert "1.num_batches_tracked" not in fitted  # an integer buffer: never exchanged


@pytest.mark.parametrize(
    ("change", "message"),
    [
        (lambda s: s.pop("0.bias"), "tensor '0.bias' (float32 (4,)) is missing"),
        (
            lambda s: s.__setitem__("2.weight", torch.zeros(2, 5)),
            "tensor '2.weight' is float32 (2, 5); the model's is float32 (2, 4)",
        ),
        (
            lambda s: s.__setitem__("0.weight", torch.zeros(4, 3, dtype=torch.float16)),
            "tensor '0.weight' is float16 (4, 3); the model's is float32 (4, 3)",
        ),
        (lambda s: s.__setitem__("head.weight", torch.zeros(1)), "tensor 'head.weight' is not in"),
        (
            lambda s: s["1.running_mean"].fill_(float("nan")),
            "tensor '1.running_mean' holds NaN",
        ),
    ],
)
def test_the_first_misfit_is_named(change, message: str) -> None:
    module = model()
    state = {k: v.clone() for k, v in module.state_dict().items()}
    change(state)
    with pytest.raises(InvalidCheckpoint, match=f"^{message.replace('(', '.').replace(')', '.')}"):
        check_weights(state, module.state_dict(), exchanged(module))


def test_a_non_exchanged_tensor_must_equal_the_tasks_own() -> None:
    module = model()
    state = {k: v.clone() for k, v in module.state_dict().items()}
    state["1.num_batches_tracked"] += 5
    with pytest.raises(InvalidCheckpoint, match="'1.num_batches_tracked' is not exchanged"):
        fit_weights(WeightsFile(state, "x", ""), module, exchanged(module))


@pytest.mark.parametrize("suffix", [".pt", ".pth", ".safetensors"])
def test_tied_weights_round_trip_and_load_strictly(tmp_path: Path, suffix: str) -> None:
    tied = nn.Sequential(nn.Embedding(5, 3), nn.Linear(3, 5, bias=False))
    tied[1].weight = tied[0].weight
    path = tmp_path / f"w{suffix}"
    write_weights(path, tied.state_dict(), {"format": "test"})
    weights = read_weights(path)
    assert list(weights.tensors) == ["0.weight", "1.weight"]
    assert len(weights.sha256) == 64 and weights.source == str(path.resolve())
    fresh = nn.Sequential(nn.Embedding(5, 3), nn.Linear(3, 5, bias=False))
    fresh.load_state_dict(weights.tensors, strict=True)
    assert torch.equal(fresh.state_dict()["1.weight"], tied.state_dict()["0.weight"])


def test_a_pickle_that_is_not_plain_tensors_is_refused_in_one_line(tmp_path: Path) -> None:
    path = tmp_path / "code.pt"
    torch.save({"w": torch.zeros(2), "fn": Path("x")}, path)  # an object weights_only refuses
    with pytest.raises(InvalidCheckpoint) as refused:
        read_weights(path)
    assert "is not a torch.save state dict of tensors" in str(refused.value)
    assert "\n" not in str(refused.value)
    junk = tmp_path / "junk.pth"
    junk.write_bytes(b"not a zip file")
    with pytest.raises(InvalidCheckpoint, match="junk.pth is not a torch.save state dict"):
        read_weights(junk)
    with pytest.raises(InvalidCheckpoint, match="is not a readable safetensors file"):
        (tmp_path / "junk.safetensors").write_bytes(b"\x00" * 16)
        read_weights(tmp_path / "junk.safetensors")
