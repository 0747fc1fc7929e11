"""The status page's script run by Node.js (where present) on made-up rounds: round labels
thinned so they never overlap, federated-evaluation metrics given their panels."""

from __future__ import annotations

import json
import shutil
import subprocess
from pathlib import Path

import pytest

SCRIPT = Path(__file__).resolve().parents[2] / "server" / "status_page" / "status.js"
NODE = shutil.which("node") or shutil.which("nodejs")
HARNESS = """
const vm = require("vm");
const stub = { textContent: "", hidden: true, replaceChildren() {} };
const context = {
  document: { getElementById: () => stub },
  fetch: () => Promise.reject(new Error("no server here")),
  setTimeout: () => 0,
};
vm.createContext(context);
vm.runInContext(require("fs").readFileSync(process.argv[1], "utf8"), context);
const call = JSON.parse(process.argv[2]);
process.stdout.write(JSON.stringify(context[call.name](...call.args)));
"""

pytestmark = pytest.mark.skipif(NODE is None, reason="needs node (Node.js)")


def call(name: str, *args: object) -> object:
    assert NODE is not None
    result = subprocess.run(
        [NODE, "-e", HARNESS, str(SCRIPT), json.dumps({"name": name, "args": list(args)})],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert result.returncode == 0, result.stderr
    return json.loads(result.stdout)


@pytest.mark.parametrize("count", [1, 5, 8, 9, 10, 16, 40, 101])
def test_round_labels_are_at_most_8_evenly_spaced_first_and_last_kept(count: int) -> None:
    rounds = list(range(1, count + 1))
    labels = call("roundLabels", rounds)
    assert isinstance(labels, list)
    assert labels[0] == 1 and labels[-1] == count
    assert len(labels) <= 8
    assert labels == sorted(set(labels))
    if count <= 8:
        assert labels == rounds
    gaps = [b - a for a, b in zip(labels, labels[1:], strict=False)]
    assert len(set(gaps[:-1])) <= 1  # evenly spaced, then the last round, never closer
    assert not gaps[:-1] or gaps[0] <= gaps[-1] < 2 * gaps[0]


def test_federated_evaluation_metrics_get_panels_and_their_counts_do_not() -> None:
    rounds = [
        {"round": 1, "train_loss": 1.0, "eval_loss": 0.9, "fed_eval_loss": 0.8,
         "fed_eval_accuracy": 0.5, "fed_eval_clients": 3, "fed_eval_examples": 90,
         "fed_eval_bytes_down": 4096, "bytes_down": 4096, "bytes_up": 4096, "duration_s": 1.0},
    ]  # fmt: skip
    panels = call("panels", rounds)
    assert isinstance(panels, list)
    titles = [p["title"] for p in panels]
    assert titles == ["accuracy", "loss", "bytes per round", "round time"]
    assert panels[1]["series"] == ["train_loss", "eval_loss", "fed_eval_loss"]
    assert "fed_eval_bytes_down" in panels[2]["series"]
