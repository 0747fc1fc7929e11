"""The coordinator's status port seen from outside, on a real federation stepped round by
round (`gated_cluster`): /status.json against its schema, /metrics through
prometheus_client's parser, and `fedstream status --watch` in a pseudo-terminal."""

from __future__ import annotations

import fcntl
import json
import os
import pty
import struct
import subprocess
import sys
import termios
import threading
from pathlib import Path
from typing import Any

import jsonschema
import pytest
from prometheus_client.parser import text_string_to_metric_families

from fedstream.cli import main

pytestmark = pytest.mark.e2e

SCHEMA = json.loads(
    (Path(__file__).resolve().parents[2] / "server" / "status_schema.json").read_text()
)
WATCH_ROWS, WATCH_COLUMNS = 40, 120


def samples(text: str) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    """Every sample of a Prometheus text page, by name and sorted labels."""
    return {
        (sample.name, tuple(sorted(sample.labels.items()))): sample.value
        for family in text_string_to_metric_families(text)
        for sample in family.samples
    }


class PtyProcess:
    """A process whose stdin, stdout and stderr are a pseudo-terminal; a thread drains
    the terminal into `output` so the process never blocks on a full one."""

    def __init__(self, argv: list[str], cwd: Path) -> None:
        master, slave = pty.openpty()
        fcntl.ioctl(slave, termios.TIOCSWINSZ, struct.pack("HHHH", WATCH_ROWS, WATCH_COLUMNS, 0, 0))
        env = {k: v for k, v in os.environ.items() if not k.startswith("FEDSTREAM_")}
        env["TERM"] = "xterm-256color"
        self.proc = subprocess.Popen(
            argv,
            stdin=slave,
            stdout=slave,
            stderr=slave,
            env=env,
            cwd=cwd,
            start_new_session=True,
        )
        os.close(slave)
        self.master = master
        self.chunks: list[bytes] = []
        self.reader = threading.Thread(target=self._drain, daemon=True)
        self.reader.start()

    def _drain(self) -> None:
        while True:
            try:
                data = os.read(self.master, 65536)
            except OSError:  # EIO: the terminal's last writer has gone
                return
            if not data:
                return
            self.chunks.append(data)

    @property
    def output(self) -> str:
        return b"".join(self.chunks).decode("utf-8", errors="replace")

    def close(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
        self.proc.wait(30)
        self.reader.join(10)
        os.close(self.master)


def test_status_json_metrics_and_watch_follow_a_round(gated_cluster: Any) -> None:
    cluster = gated_cluster(2)
    watch = PtyProcess(
        [sys.executable, "-m", "fedstream", "status", "--watch", "--interval", "0.5", "run"],
        cluster.procs.workdir,
    )
    try:
        # Round 1: both clients train, then site-a reports while site-b still trains.
        cluster.wait_training(0, 1)
        cluster.wait_training(1, 1)
        training = cluster.wait_status(
            lambda s: {c["state"] for c in s["clients"]} == {"training"}, "both training"
        )
        jsonschema.validate(training, SCHEMA)
        run = training["run"]
        assert (run["phase"], run["round"], run["attempt"]) == ("training", 1, 1)
        assert run["selected"] == ["site-a", "site-b"] and run["reported"] == []
        assert 0 < run["deadline_in_s"] <= 300
        for client in training["clients"]:  # the model came down this round
            assert client["bytes_down"] == run["model_bytes"] > 0
        cluster.open_gate(0, 1)
        halfway = cluster.wait_status(
            lambda s: s["run"]["reported"] == ["site-a"], "site-a's update booked"
        )
        jsonschema.validate(halfway, SCHEMA)
        states = {c["name"]: c["state"] for c in halfway["clients"]}
        assert states == {"site-a": "reported", "site-b": "training"}
        cluster.wait_for(
            lambda: "reported" in watch.output,
            60,
            f"the watch to show it; it showed:\n{watch.output[-2000:]}",
        )
        assert {c["name"]: c["bytes_up"] for c in halfway["clients"]} == {
            "site-a": run["upload_bytes"],
            "site-b": 0,
        }

        # Round 1 commits; round 2 waits at its gates.
        cluster.open_gate(1, 1)
        committed = cluster.wait_status(
            lambda s: s["run"]["completed"] == 1 and len(s["rounds"]) == 1, "round 1's record"
        )
        jsonschema.validate(committed, SCHEMA)
        record = committed["rounds"][0]
        assert (record["round"], record["updates"]) == (1, 2)
        assert record["bytes_down"] == 2 * run["model_bytes"]
        page = cluster.get("metrics").decode()
        found = samples(page)
        assert found[("fedstream_rounds_completed_total", ())] == 1
        assert found[("fedstream_rounds", ())] == 2
        assert found[("fedstream_round_duration_seconds_count", ())] == 1
        assert found[("fedstream_round_duration_seconds_sum", ())] == record["duration_s"]
        assert found[("fedstream_download_bytes_total", ())] >= 2 * run["model_bytes"]
        assert found[("fedstream_upload_bytes_total", ())] == 2 * run["upload_bytes"]
        assert found[("fedstream_coordinator_resident_memory_bytes", ())] > 10 << 20
        assert found[("process_resident_memory_bytes", ())] > 10 << 20
        by_state = {
            dict(labels)["state"]: value
            for (name, labels), value in found.items()
            if name == "fedstream_clients"
        }
        assert sum(by_state.values()) == 2 and by_state["gone"] == 0
        assert "fedstream_download_rate_bytes_per_second" in page
        assert "fedstream_upload_rate_bytes_per_second" in page
        assert "# TYPE fedstream_rejected_updates_total counter" in page
        codes = cluster.finish()
        assert set(codes.values()) == {0}
        assert watch.proc.wait(60) == 0, watch.output
    finally:
        watch.close()
    screen = watch.output
    print(screen[-3000:])
    assert "\x1b[" in screen, "rich drew no terminal control sequences: not a live view"
    for text in ("site-a", "site-b", "training", "reported", "round 1:", "run complete"):
        assert text in screen, f"{text!r} never shown by fedstream status --watch"


def test_status_without_a_coordinator_says_so(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    assert main(["status", str(tmp_path)]) == 2
    assert "coordinator.json" in capsys.readouterr().err
