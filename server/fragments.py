"""Streaming fragments on the coordinator: a fragment's round is a round.

Round r synchronises fragment f = (r - 1) mod F (`common/fragments.py`): its round config
names f, its upload manifest is fragment f's (`UploadIntake.begin_round`, so an update of
any other tensors is refused on the manifest path), and the strategy steps fragment f's
tensors of the global model and nothing else (`FragmentedStrategy`). A strategy's state
is per tensor (DiLoCo's outer momentum, say), so it is per fragment. Spools, safeguards,
the round's log, checkpoints and resume follow the round's manifest and number, so they
work per fragment unchanged: a coordinator killed in round r resumes into round r and so
into fragment f. Downloads may ask for one fragment's tensors (`GlobalModel.download`).
"""

from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence

import torch

from fedstream.common.fragments import (
    FRAGMENT,
    StreamPlan,
    fragment_manifests,
    fragment_of_round,
)
from fedstream.common.round_config import ConfigScalar
from fedstream.common.wire.manifest import Manifest
from fedstream.server.strategies import Strategy
from fedstream.server.strategies.base import MeanOfUpdates
from fedstream.server.updates import EvaluationReport, VerifiedUpdate

log = logging.getLogger(__name__)


class Fragments:
    """The model's manifest cut into `count` fragments, and the mixing factor clients use."""

    def __init__(self, manifest: Manifest, count: int, alpha: float) -> None:
        self.count = count
        self.alpha = alpha
        self.manifests = fragment_manifests(manifest, count)

    def of_round(self, round_number: int) -> int:
        return fragment_of_round(round_number, self.count)

    def manifest(self, index: int) -> Manifest:
        return self.manifests[index]

    def round_config(self, round_number: int) -> dict[str, ConfigScalar]:
        """What round `round_number`'s config tells its clients."""
        return StreamPlan(self.of_round(round_number), self.count, self.alpha).round_config()

    def summary(self) -> str:
        sizes = ", ".join(f"{m.total_bytes / 2**20:.1f}" for m in self.manifests)
        return f"{self.count} fragments of {sizes} MiB"


class FragmentedStrategy(Strategy):
    """`inner` over one fragment a round: its round config names the fragment, and the
    global tensors it begins and aggregates over are that fragment's alone (the narrowest
    change: the fragment's tensors are passed where the whole model's are)."""

    def __init__(self, inner: Strategy, fragments: Fragments) -> None:
        self.inner = inner
        self.fragments = fragments
        self.holds_updates = inner.holds_updates  # type: ignore[misc]
        self.index = 0
        """The fragment of the round configured last."""

    def _restricted(self, global_tensors: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        return {name: global_tensors[name] for name in self.fragments.manifest(self.index).names}

    def configure_round(
        self, round_number: int, base: Mapping[str, ConfigScalar]
    ) -> dict[str, ConfigScalar]:
        self.index = self.fragments.of_round(round_number)
        return {
            **self.inner.configure_round(round_number, base),
            **self.fragments.round_config(round_number),
        }

    def begin_round(self, global_tensors: Mapping[str, torch.Tensor]) -> None:
        self.inner.begin_round(self._restricted(global_tensors))

    def accept(self, update: VerifiedUpdate) -> None:
        self.inner.accept(update)

    def aggregate(
        self, updates: Sequence[VerifiedUpdate], global_tensors: Mapping[str, torch.Tensor]
    ) -> None:
        self.inner.aggregate(updates, self._restricted(global_tensors))

    def abort_round(self) -> None:
        self.inner.abort_round()

    def round_metrics(self, round_number: int) -> dict[str, float]:
        """The inner strategy's, and the fragment the round synchronised."""
        return {
            **self.inner.round_metrics(round_number),
            FRAGMENT: self.fragments.of_round(round_number),
        }

    def configure_evaluation(self, round_number: int, candidates: frozenset[str]) -> frozenset[str]:
        return self.inner.configure_evaluation(round_number, candidates)

    def aggregate_evaluation(self, reports: Sequence[EvaluationReport]) -> dict[str, float]:
        return self.inner.aggregate_evaluation(reports)

    def state_tensors(self) -> dict[str, torch.Tensor]:
        return self.inner.state_tensors()

    def load_state_tensors(self, tensors: Mapping[str, torch.Tensor]) -> None:
        self.inner.load_state_tensors(tensors)


class FragmentedMean(FragmentedStrategy, MeanOfUpdates):
    """`FragmentedStrategy` over a weighted mean, and a weighted mean itself: its running
    sums and weights are the inner strategy's, so the guarded aggregate folds its updates
    on arrival and corrects the sums after the review as for any weighted mean
    (`server/fold_corrections.py`)."""

    def __init__(self, inner: MeanOfUpdates, fragments: Fragments) -> None:
        super().__init__(inner, fragments)
        self.mean = inner
        self.running = inner.running

    def weight(self, client: str, num_examples: int) -> float:
        return self.mean.weight(client, num_examples)

    def apply(
        self, global_tensors: Mapping[str, torch.Tensor], mean: dict[str, torch.Tensor]
    ) -> None:
        self.mean.apply(self._restricted(global_tensors), mean)


def fragmented(inner: Strategy, fragments: Fragments) -> FragmentedStrategy:
    """`inner` over one fragment a round; a weighted mean stays one."""
    if isinstance(inner, MeanOfUpdates):
        return FragmentedMean(inner, fragments)
    return FragmentedStrategy(inner, fragments)
