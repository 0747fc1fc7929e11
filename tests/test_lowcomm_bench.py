"""bench/lowcomm_train.py: the schedule, the fragments and the bytes each row books."""

from __future__ import annotations

import pytest
import torch

from bench.lowcomm_train import LocalSGD, Scale, fragments, local_sgd, schedule

TINY = Scale({"n_layer": "1", "n_head": "2", "n_embd": "16", "block_size": "16"}, steps=8)


def test_plain_diloco_syncs_every_h_steps_and_never_merges_early() -> None:
    assert schedule(30, LocalSGD("d", 10)) == [(10, "sync", 0), (20, "sync", 0), (30, "sync", 0)]


def test_streaming_staggers_fragments_and_ends_with_every_fragment_synced() -> None:
    events = schedule(8, LocalSGD("s", 4, fragments=4, overlap=0))
    assert [e for e in events if e[0] < 8] == [(1, "sync", 0), (2, "sync", 1), (3, "sync", 2),
                                              (4, "sync", 3), (5, "sync", 0), (6, "sync", 1),
                                              (7, "sync", 2)]  # fmt: skip
    assert [e for e in events if e[0] == 8] == [(8, "sync", f) for f in range(4)]
    overlapped = schedule(16, LocalSGD("s", 8, fragments=4, overlap=1))
    assert (3, "merge", 0) in overlapped and (2, "sync", 0) in overlapped
    with pytest.raises(ValueError, match="need F | H"):
        schedule(10, LocalSGD("s", 6, fragments=4))


def test_the_wire_schedule_syncs_each_fragment_on_its_own_turn_alone() -> None:
    events = schedule(8, LocalSGD("s", 4, fragments=4, last_syncs=False))
    # round r of `fedstream server --fragments 4` syncs fragment (r - 1) mod 4 at step r
    assert events == [(r, "sync", (r - 1) % 4) for r in range(1, 9)]


def test_fragments_are_contiguous_and_as_even_as_a_split_by_tensor_can_be() -> None:
    tensors = {
        name: torch.zeros(size) for name, size in zip("abcdef", (5, 1, 1, 1, 1, 5), strict=True)
    }
    assert fragments(tensors, 3) == [["a"], ["b", "c", "d", "e"], ["f"]]
    assert [n for part in fragments(tensors, 4) for n in part] == list(tensors)


def test_a_diloco_row_moves_the_model_and_books_its_bytes() -> None:
    torch.set_num_threads(1)
    run = local_sgd(TINY, LocalSGD("d", 4))
    raw_model = 4 * sum(p.numel() for p in TINY_MODEL().parameters())
    assert run.syncs == 2
    assert run.uplink_bytes == 2 * TINY.clients * raw_model
    assert run.peak_bytes == 2 * TINY.clients * raw_model
    assert run.curve[0].loss < 5.4  # the first sync moved the global model off its init
    int4 = local_sgd(TINY, LocalSGD("d", 4, codec="int4"))
    assert int4.uplink_bytes < 0.13 * run.uplink_bytes


def TINY_MODEL() -> torch.nn.Module:  # noqa: N802 (named as the scale it builds)
    from bench.lowcomm_train import charlm

    return charlm(TINY, keep=False).build_model()
