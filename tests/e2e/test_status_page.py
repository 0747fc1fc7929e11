"""The status page in a real browser: Debian's headless Chromium, driven by Playwright,
on a real federation stepped round by round (`gated_cluster`).

`.ci/system-tools install` installs the `chromium` package (apt-get, as root); the test
skips, saying why, without it or without the `playwright` package. Playwright never
downloads a browser here: it launches /usr/bin/chromium.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import pytest

pytestmark = pytest.mark.e2e

CHROMIUM = Path("/usr/bin/chromium")
CHROMIUM_ARGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
]
WAIT_MS = 120_000

RECORD_STATES = """
window.seenStates = [];
new MutationObserver(() => {
  for (const row of document.querySelectorAll("#clients tbody tr")) {
    const seen = `${row.dataset.client}:${row.dataset.state}`;
    if (window.seenStates.at(-1) !== seen && !window.seenStates.includes(seen)) {
      window.seenStates.push(seen);
    }
  }
}).observe(document, { subtree: true, childList: true });
"""
"""Every client:state the table has shown, in order (the page redraws every second)."""


def wait_row(page: Any, client: str, state: str) -> None:
    """Until the clients table shows `client` in `state`."""
    page.wait_for_selector(f'tr[data-client="{client}"][data-state="{state}"]', timeout=WAIT_MS)


def test_status_page_follows_a_round_in_chromium(gated_cluster: Any, tmp_path: Path) -> None:
    sync_api = pytest.importorskip(
        "playwright.sync_api", reason="needs the playwright package (pip install -e .[dev])"
    )
    if not os.access(CHROMIUM, os.X_OK):
        pytest.skip(f"{CHROMIUM} is missing: install Debian's chromium (.ci/system-tools install)")
    cluster = gated_cluster(2)
    with sync_api.sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=str(CHROMIUM), args=CHROMIUM_ARGS)
        try:
            page = browser.new_page(viewport={"width": 1280, "height": 900})
            errors: list[str] = []
            page.on("pageerror", lambda exc: errors.append(str(exc)))
            page.on(
                "console",
                lambda msg: errors.append(msg.text) if msg.type == "error" else None,
            )
            page.add_init_script(RECORD_STATES)
            page.goto(cluster.status_url)
            assert "gated_train" in page.text_content("#run-task")

            cluster.wait_training(0, 1)
            cluster.wait_training(1, 1)
            wait_row(page, "site-a", "training")
            wait_row(page, "site-b", "training")
            assert "round 1/2" in page.text_content("#run-line")
            cluster.open_gate(0, 1)  # site-a reports; site-b still trains
            wait_row(page, "site-a", "reported")
            assert page.get_attribute('tr[data-client="site-b"]', "data-state") == "training"
            assert page.locator("circle[data-round]").count() == 0

            cluster.open_gate(1, 1)  # round 1 commits; round 2 waits at its gates
            page.wait_for_selector(
                'circle[data-series="train_loss"][data-round="1"]',
                state="attached",
                timeout=WAIT_MS,
            )
            cluster.wait_training(0, 2)
            cluster.wait_training(1, 2)
            page.locator("#run-line", has_text="round 2/2").wait_for(timeout=WAIT_MS)
            panels = page.eval_on_selector_all("figure", "fs => fs.map(f => f.dataset.panel)")
            assert panels == ["loss", "bytes per round", "round time"]
            for series in ("bytes_down", "bytes_up", "duration_s"):
                assert page.locator(f'circle[data-series="{series}"][data-round="1"]').count() == 1
            seen = page.evaluate("window.seenStates")
            screenshot = tmp_path / "status-page.png"
            page.screenshot(path=str(screenshot), full_page=True)
            print(f"status page screenshot: {screenshot}")
        finally:
            browser.close()
    assert screenshot.stat().st_size > 10_000
    a_states = [s.split(":")[1] for s in seen if s.startswith("site-a:")]
    assert a_states.index("training") < a_states.index("reported"), seen
    assert not errors, errors
    assert set(cluster.finish().values()) == {0}
