"""Prometheus metrics of the live state, made when scraped (`/metrics`).

A collector reads `LiveState.snapshot()` at scrape time, so nothing is counted twice and
the transfer path pays nothing for monitoring. The registry is the status server's own,
not prometheus_client's global one: two coordinators in one process (tests) never mix.
"""

from __future__ import annotations

from collections.abc import Iterator

from prometheus_client import CollectorRegistry, ProcessCollector
from prometheus_client.core import (
    CounterMetricFamily,
    GaugeMetricFamily,
    HistogramMetricFamily,
    Metric,
)
from prometheus_client.registry import Collector

from fedstream.server.live_state import CLIENT_STATES, PHASES, LiveState

ROUND_SECONDS_BUCKETS = (1.0, 5.0, 15.0, 30.0, 60.0, 120.0, 300.0, 600.0, 1800.0, 3600.0)


class LiveCollector(Collector):
    def __init__(self, live: LiveState) -> None:
        self.live = live

    def collect(self) -> Iterator[Metric]:
        snapshot = self.live.snapshot()
        run, totals, records = snapshot["run"], snapshot["totals"], snapshot["rounds"]
        yield CounterMetricFamily(
            "fedstream_rounds_completed", "Training rounds committed.", value=run["completed"]
        )
        yield GaugeMetricFamily(
            "fedstream_rounds", "Training rounds the run is configured for.", value=run["rounds"]
        )
        current = GaugeMetricFamily("fedstream_round", "The round in flight or next.")
        current.add_metric([], run["round"] if run["round"] is not None else run["completed"])
        yield current
        phase = GaugeMetricFamily(
            "fedstream_phase", "1 for the phase the coordinator is in.", labels=["phase"]
        )
        for name in PHASES:
            phase.add_metric([name], 1.0 if run["phase"] == name else 0.0)
        yield phase
        yield _round_durations([r["duration_s"] for r in records if "duration_s" in r])
        clients = GaugeMetricFamily(
            "fedstream_clients", "Joined clients, by state.", labels=["state"]
        )
        for state in CLIENT_STATES:
            count = sum(1 for c in snapshot["clients"] if c["state"] == state)
            clients.add_metric([state], count)
        yield clients
        yield CounterMetricFamily(
            "fedstream_download_bytes", "Model bytes sent to clients.", value=totals["bytes_down"]
        )
        yield CounterMetricFamily(
            "fedstream_upload_bytes",
            "Update bytes received from clients.",
            value=totals["bytes_up"],
        )
        yield GaugeMetricFamily(
            "fedstream_download_rate_bytes_per_second",
            "Bytes per second being sent to clients now.",
            value=totals["down_rate_Bps"],
        )
        yield GaugeMetricFamily(
            "fedstream_upload_rate_bytes_per_second",
            "Bytes per second being received from clients now.",
            value=totals["up_rate_Bps"],
        )
        rejected = CounterMetricFamily(
            "fedstream_rejected_updates", "Uploads refused, by reason.", labels=["reason"]
        )
        for reason, count in totals["rejected_updates"].items():
            rejected.add_metric([reason], count)
        yield rejected
        yield GaugeMetricFamily(
            "fedstream_coordinator_resident_memory_bytes",
            "The coordinator's resident memory now.",
            value=totals["resident_memory_bytes"],
        )
        yield GaugeMetricFamily(
            "fedstream_coordinator_peak_resident_memory_bytes",
            "The coordinator's peak resident memory.",
            value=totals["peak_resident_memory_bytes"],
        )


def _round_durations(seconds: list[float]) -> HistogramMetricFamily:
    buckets: list[tuple[str, float]] = [
        (f"{bound:g}", sum(1 for s in seconds if s <= bound)) for bound in ROUND_SECONDS_BUCKETS
    ]
    buckets.append(("+Inf", len(seconds)))
    return HistogramMetricFamily(
        "fedstream_round_duration_seconds",
        "Seconds from a round's opening to its commit.",
        buckets=buckets,
        sum_value=sum(seconds),
    )


def metrics_registry(live: LiveState) -> CollectorRegistry:
    """A registry of the live state's metrics and the standard process metrics."""
    registry = CollectorRegistry()
    registry.register(LiveCollector(live))
    ProcessCollector(registry=registry)
    return registry
