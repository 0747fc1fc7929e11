"""The coordinator's live state: one snapshot of the run, its clients and its rounds.

Most of what an operator wants to see the coordinator already keeps as it goes: the phase
and its deadline, whom a round selected and who has reported, each client's last call,
and the record of every committed round (`RunStore.history`, what metrics.jsonl holds).
`LiveState.snapshot` reads all of that when asked; it keeps only what nothing else does:

- each client's bytes moved (`TransferMeter`): the servicer adds each chunk's length to
  a plain integer, the whole cost of a transfer's visibility (no lock, no allocation);
  rates are worked out by the reader from two readings at least a second apart;
- where each client's counters stood when the phase opened (`on_phase`, the
  coordinator's phase observer), so a snapshot shows the bytes moved this round;
- uploads refused, by reason.

A snapshot is plain JSON data described by `server/status_schema.json`; the status page,
`/status.json`, `/metrics` and `fedstream status` all show it.
"""

from __future__ import annotations

import re
import time
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import psutil

from fedstream.common.memory import peak_rss_bytes
from fedstream.server.phases import Aggregating, Done, OpenEvaluation, OpenRound, Phase, Waiting

if TYPE_CHECKING:
    from fedstream.server.admission.sessions import ClientRecord
    from fedstream.server.coordinator import Coordinator

SCHEMA_VERSION = 1
CLIENT_STATES = ("joined", "downloading", "training", "uploading", "reported", "evaluating", "gone")
PHASES = ("waiting", "training", "aggregating", "evaluating", "done")
RATE_WINDOW_S = 1.0
"""A rate is the bytes moved between two readings at least this far apart."""


@dataclass
class Rate:
    """Bytes per second of a growing total, from readings at least RATE_WINDOW_S apart."""

    at: float = 0.0
    total: int = 0
    value: float = 0.0

    def read(self, total: int, now: float) -> float:
        if total < self.total:  # a counter that went back (a new meter): start again
            self.at, self.total, self.value = now, total, 0.0
        elif now - self.at >= RATE_WINDOW_S:
            self.value = (total - self.total) / (now - self.at) if self.at else 0.0
            self.at, self.total = now, total
        return self.value


@dataclass
class TransferMeter:
    """One client's transfers. The servicer adds to `down` / `up` per chunk and counts
    the streams it has open; nothing else is touched on the transfer path."""

    down: int = 0
    """Model bytes sent to the client, all phases."""
    up: int = 0
    """Update bytes received from the client, all phases."""
    downloads: int = 0
    """Download streams open now."""
    uploads: int = 0
    """Upload streams open now."""
    booked: int = 0
    """Updates of this client's uploads booked since the coordinator started (an update
    taken from the round's log after a restart is not one)."""
    down_at_phase: int = 0
    up_at_phase: int = 0
    """`down` and `up` when the current phase opened."""
    down_rate: Rate = field(default_factory=Rate)
    up_rate: Rate = field(default_factory=Rate)
    moved_at: float = 0.0
    """When a reading last found bytes moved (a long stream calls nothing else)."""
    last_read: int = 0


def snake_case(name: str) -> str:
    """`TransferStalled` -> `transfer_stalled`."""
    return re.sub(r"(?<!^)(?=[A-Z])", "_", name).lower()


class LiveState:
    """What the coordinator is doing now, for people and monitoring to read."""

    def __init__(self, coordinator: Coordinator) -> None:
        self.coordinator = coordinator
        self.meters: dict[str, TransferMeter] = {}
        self.rejected_updates: dict[str, int] = {}
        """Uploads refused, by reason (the domain error, in snake case)."""
        self.started = time.time()
        self.phase_entered = coordinator.clock.now()
        self._process = psutil.Process()
        coordinator.observers.append(self.on_phase)

    # ---- fed by the coordinator and the servicer ----------------------------------------

    def on_phase(self, phase: Phase) -> None:
        """The coordinator entered `phase`: counters start again for it."""
        self.phase_entered = self.coordinator.clock.now()
        if isinstance(phase, OpenRound | OpenEvaluation):
            for meter in self.meters.values():
                meter.down_at_phase, meter.up_at_phase = meter.down, meter.up

    def meter(self, client: str) -> TransferMeter:
        """The meter of `client`'s transfers (made on first use)."""
        meter = self.meters.get(client)
        if meter is None:
            meter = self.meters[client] = TransferMeter()
        return meter

    def rejected_update(self, error: BaseException) -> None:
        reason = snake_case(type(error).__name__)
        self.rejected_updates[reason] = self.rejected_updates.get(reason, 0) + 1

    # ---- read -------------------------------------------------------------------------

    def snapshot(self) -> dict[str, Any]:
        """The whole live state as JSON data (`server/status_schema.json`)."""
        coordinator = self.coordinator
        now = coordinator.clock.now()
        clients = [self._client(record, now) for record in coordinator.admission.registry.all()]
        rss = self._process.memory_info().rss
        return {
            "schema_version": SCHEMA_VERSION,
            "time": time.time(),
            "run": self._run(now),
            "clients": clients,
            "totals": {
                "bytes_down": sum(m.down for m in self.meters.values()),
                "bytes_up": sum(m.up for m in self.meters.values()),
                "down_rate_Bps": sum(c["down_rate_Bps"] for c in clients),
                "up_rate_Bps": sum(c["up_rate_Bps"] for c in clients),
                "rejected_updates": dict(sorted(self.rejected_updates.items())),
                "resident_memory_bytes": rss,
                "peak_resident_memory_bytes": max(peak_rss_bytes(), rss),
            },
            "rounds": [dict(record) for record in list(coordinator.store.history)],
        }

    def _run(self, now: float) -> dict[str, Any]:
        coordinator = self.coordinator
        phase = coordinator.phase
        open_phase = phase.round if isinstance(phase, Aggregating) else phase
        run: dict[str, Any] = {
            "run_id": coordinator.run_id,
            "task": coordinator.store.identity.task,
            "strategy": coordinator.store.identity.strategy,
            "rounds": coordinator.rounds.rounds,
            "completed": coordinator.completed,
            "phase": phase_name(phase),
            "phase_seconds": round(now - self.phase_entered, 3),
            "round": None,
            "attempt": None,
            "deadline_in_s": None,
            "selected": [],
            "reported": [],
            "model_bytes": coordinator.model.manifest.total_bytes,
            "upload_bytes": upload_bytes(coordinator),
            "started": self.started,
        }
        if isinstance(open_phase, OpenRound | OpenEvaluation):
            run["round"] = open_phase.number
            run["selected"] = sorted(open_phase.selected)
            run["reported"] = sorted(open_phase.reported)
            if open_phase.accepting:
                run["deadline_in_s"] = round(open_phase.deadline - now, 3)
        if isinstance(open_phase, OpenRound):
            run["attempt"] = open_phase.attempt
        elif (
            isinstance(phase, Waiting | Done) and coordinator.completed < coordinator.rounds.rounds
        ):
            run["round"] = coordinator.completed + 1
        return run

    def _client(self, record: ClientRecord, now: float) -> dict[str, Any]:
        meter = self.meter(record.name)
        moved = meter.down + meter.up
        if moved != meter.last_read:
            meter.last_read, meter.moved_at = moved, now
        state = self._state(record)
        down_rate = meter.down_rate.read(meter.down, now)
        up_rate = meter.up_rate.read(meter.up, now)
        return {
            "name": record.name,
            "state": state,
            "partition": record.partition,
            "bytes_down": meter.down - meter.down_at_phase,
            "bytes_up": meter.up - meter.up_at_phase,
            "down_rate_Bps": round(down_rate, 1) if meter.downloads else 0.0,
            "up_rate_Bps": round(up_rate, 1) if meter.uploads else 0.0,
            "last_seen_s": round(max(0.0, now - max(record.last_seen, meter.moved_at)), 3),
            "updates_booked": meter.booked,
        }

    def _state(self, record: ClientRecord) -> str:
        coordinator = self.coordinator
        name = record.name
        if not coordinator.admission.alive(name):
            return "gone"
        meter = self.meter(name)
        if meter.uploads:
            return "uploading"
        if meter.downloads:
            return "downloading"
        phase = coordinator.phase
        open_phase = phase.round if isinstance(phase, Aggregating) else phase
        if isinstance(open_phase, OpenRound | OpenEvaluation) and name in open_phase.reported:
            return "reported"
        if record.busy and isinstance(phase, OpenRound):
            return "training"
        if record.busy and isinstance(phase, OpenEvaluation):
            return "evaluating"
        return "joined"


def phase_name(phase: Phase) -> str:
    if isinstance(phase, Waiting):
        return "waiting"
    if isinstance(phase, OpenRound):
        return "training"
    if isinstance(phase, Aggregating):
        return "aggregating"
    if isinstance(phase, OpenEvaluation):
        return "evaluating"
    return "done"


def upload_bytes(coordinator: Coordinator) -> int:
    """Bytes one update takes on the wire, or 0 where zstd makes that vary by update (the
    page and `fedstream status` then show bytes moved but no fraction done)."""
    return 0 if coordinator.intake.uplink.zstd else coordinator.intake.layout.total_bytes
