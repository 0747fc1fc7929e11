"""Tied tensors in the manifest: found from shared memory, sent once, part of the layout."""

from __future__ import annotations

import pytest
import torch

from fedstream.common.errors import InvalidManifest, LimitExceeded
from fedstream.common.proto.v1 import coordinator_pb2 as pb
from fedstream.common.wire.manifest import Manifest, ManifestLimits, TensorTie, find_ties


class Tied(torch.nn.Module):
    """An embedding shared with the output layer, as in most language models."""

    def __init__(self, tie: bool = True) -> None:
        super().__init__()
        self.embed = torch.nn.Embedding(10, 4)
        self.mid = torch.nn.Linear(4, 4)
        self.head = torch.nn.Linear(4, 10, bias=False)
        if tie:
            self.head.weight = self.embed.weight


def test_find_ties_names_each_later_name_of_the_same_memory() -> None:
    base = torch.zeros(6)
    tensors = {
        "a": base,
        "b": torch.zeros(3),
        "a2": base.view(6),  # the same view under another name: a tie
        "half": base[:3],  # overlaps a, but is not a: travels on its own
        "a3": base,
        "empty": torch.zeros(0),
        "empty2": torch.zeros(0),
    }
    assert find_ties(tensors) == {"a2": "a", "a3": "a"}


def test_a_tied_model_sends_its_embedding_once_and_names_the_tie() -> None:
    state = Tied().state_dict()
    manifest = Manifest.of_model(state, list(state))

    assert manifest.names == ("embed.weight", "mid.weight", "mid.bias")
    assert manifest.ties == (TensorTie("head.weight", "embed.weight"),)
    untied = Manifest.of_model(Tied(tie=False).state_dict(), list(state))
    assert untied.total_bytes - manifest.total_bytes == 10 * 4 * 4
    assert Manifest.from_proto(manifest.to_proto()) == manifest


def test_ties_are_part_of_the_layout_and_its_digest() -> None:
    state = {"a": torch.zeros(2), "b": torch.zeros(2)}
    plain = Manifest.from_tensors(state)
    tied = Manifest.from_tensors(state, ties={"c": "a"})
    tied_elsewhere = Manifest.from_tensors(state, ties={"c": "b"})

    assert len({plain.digest(), tied.digest(), tied_elsewhere.digest()}) == 3
    with pytest.raises(InvalidManifest, match=r"expected tied tensors \['c' = 'a'\], got \[\]"):
        tied.require_same_layout(plain)
    with pytest.raises(InvalidManifest, match="got \\['c' = 'b'\\]"):
        tied.require_same_layout(tied_elsewhere)
    tied.require_same_tensors(plain)  # a checkpoint holds what travels: ties not compared


def test_an_untied_manifest_keeps_the_digest_it_had_before_ties_existed() -> None:
    msg = pb.Manifest(codec="raw")
    msg.tensors.add(name="w", dtype="F32", shape=[2], nbytes=8)
    state = {"w": torch.zeros(2)}
    assert Manifest.from_tensors(state).to_proto().SerializeToString() == msg.SerializeToString()


@pytest.mark.parametrize(
    ("ties", "error", "message"),
    [
        ([("", "a")], InvalidManifest, "tie 0: name is empty"),
        ([("a", "a")], InvalidManifest, "tie 0 ('a'): the name is already in the manifest"),
        ([("c", "a"), ("c", "a")], InvalidManifest, "tie 1 ('c'): the name is already"),
        ([("c", "nowhere")], InvalidManifest, "source 'nowhere' is not in the stream"),
        ([("x" * 2000, "a")], LimitExceeded, "name is 2000 bytes"),
        ([(f"t{i}", "a") for i in range(3)], LimitExceeded, "3 tied tensors; the limit is 2"),
    ],
)
def test_received_ties_are_checked(
    ties: list[tuple[str, str]], error: type[Exception], message: str
) -> None:
    msg = Manifest.from_tensors({"a": torch.zeros(2), "b": torch.zeros(2)}).to_proto()
    for name, source in ties:
        msg.ties.add(name=name, source=source)

    with pytest.raises(error, match=message.replace("(", r"\(").replace(")", r"\)")):
        Manifest.from_proto(msg, ManifestLimits(max_tensors=2))


def test_from_tensors_refuses_a_tie_onto_a_tensor_not_sent() -> None:
    with pytest.raises(ValueError, match="not onto a tensor sent"):
        Manifest.from_tensors({"a": torch.zeros(2)}, ties={"b": "c"})
