"""The protocol replay's HTML report in real headless Chromium, opened from a file:// URL with
every network request blocked (self-contained, readable without a server): the alert-burden chart
is drawn (one baseline and one candidate bar per rule, with a visible width where the rule has
alerts), the changed patients are listed, the filter works, no script error. A screenshot is
saved to ``artifacts/screenshots/replay-report.png``.

Needs Debian ``chromium`` and the ``playwright`` Python package (the system Chromium is used).
"""
from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
SHOTS = ROOT / "artifacts" / "screenshots"
CHROMIUM = "/usr/bin/chromium"
CHROMIUM_ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                 "--disable-background-networking", "--disable-component-update", "--disable-sync"]

pytestmark = [pytest.mark.timeout(180)]


def _need_browser():
    if not Path(CHROMIUM).exists():
        pytest.skip("Debian chromium is not installed")
    pytest.importorskip("playwright.sync_api")


def test_replay_report_opens_in_chromium_and_shows_the_chart(tmp_path):
    _need_browser()
    from playwright.sync_api import sync_playwright

    sys.path.insert(0, str(ROOT / "tests" / "unit"))
    from test_replay import lowered_alt

    from monitor.cli import main as cli_main
    from monitor.simulate import generate_cohort, write_cohort

    events = write_cohort(generate_cohort(120, 11, days=90, formats=("json",)), tmp_path / "sim")["events_path"]
    out_json, out_html = tmp_path / "report.json", tmp_path / "report.html"
    assert cli_main(["protocol", "replay", "--quiet", "--from-file", events, "--candidate", str(lowered_alt(tmp_path)),
                     "--json", str(out_json), "--html", str(out_html)]) == 0
    data = json.loads(out_json.read_text())
    assert data["differences"] > 0, "the cohort should hold patients between 4x and 5x ULN ALT"
    rules_with_alerts = [r for r, v in data["rules"].items()
                         if v["opened"]["baseline"] or v["opened"]["candidate"]]
    SHOTS.mkdir(parents=True, exist_ok=True)
    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)
        try:
            ctx = browser.new_context(viewport={"width": 1200, "height": 900})
            external: list[str] = []

            def block(route):
                if not route.request.url.startswith("file:"):
                    external.append(route.request.url)
                    return route.abort()
                return route.continue_()

            ctx.route("**/*", block)
            page = ctx.new_page()
            errors: list[str] = []
            page.on("pageerror", lambda e: errors.append(str(e)))
            page.goto(out_html.as_uri())
            chart = page.locator("#burden-chart")
            chart.wait_for(state="visible", timeout=10_000)
            box = chart.bounding_box()
            assert box and box["width"] > 400 and box["height"] > 100
            assert page.locator("#burden-chart rect.bar-baseline").count() == len(data["rules"])
            assert page.locator("#burden-chart rect.bar-candidate").count() == len(data["rules"])
            # bars are drawn: every rule with alerts has a bar of visible width on screen
            widths = page.eval_on_selector_all(
                "#burden-chart rect.bar-baseline, #burden-chart rect.bar-candidate",
                "els => els.map(e => e.getBoundingClientRect().width)")
            assert sum(1 for w in widths if w > 0.5) >= len(rules_with_alerts)
            assert page.locator("#n-differences").inner_text() == str(data["differences"])
            rows = page.locator("#patients tbody tr")
            assert rows.count() == len(data["patients_changed"])
            page.screenshot(path=str(SHOTS / "replay-report.png"), full_page=True)
            # the filter narrows the patient list to one reference
            first = data["patients_changed"][0]["patient"]
            page.fill("[data-filter]", first)
            visible = page.eval_on_selector_all("#patients tbody tr", "rs => rs.filter(r => r.style.display !== 'none').length")
            assert visible == 1
            assert errors == [] and external == []
        finally:
            browser.close()
    assert (SHOTS / "replay-report.png").stat().st_size > 10_000
