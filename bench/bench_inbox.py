"""Benchmark the nurse inbox: page load time with 100 open alerts and a patient with 90 days of data.

Run: .venv/bin/python bench/bench_inbox.py [--alerts 100] [--days 90] [--runs 30] [--browser]

Builds the in-memory views directly (no broker: this measures the web tier), serves the app on a
local port and times, over ``--runs`` requests each (median and p95):

* the bytes the store holds per observation it keeps (``tracemalloc``);
* the inbox page and its ``/api/alerts`` JSON (100 open alerts);
* the alert detail page and the ``/api/patients/{ref}/timeline`` JSON of a patient with 90 days
  of labs and 4-hourly vitals;
* the full patient timeline page;
* with ``--browser``: a real headless Chromium (Playwright) load of the inbox until the rows are
  shown, and of the patient timeline until every chart is drawn.

``scenario()`` is also used by the end-to-end test to build realistic data.
"""
from __future__ import annotations

import argparse
import asyncio
import random
import statistics
import sys
import time
from datetime import date, datetime, timedelta, timezone
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from alerts.engine import Engine  # noqa: E402
from alerts.lifecycle import AlertBook, apply_finding  # noqa: E402
from alerts.state import PatientState  # noqa: E402
from schemas.alert import Alert  # noqa: E402
from schemas.analytes import catalogue  # noqa: E402
from schemas.events import DoseEvent, Observation, ReferenceRange, SteroidEvent, SteroidPhase  # noqa: E402
from schemas.ingest import build_observation  # noqa: E402

LABS = {"alt": (30, (None, 40)), "ast": (45, (None, 60)), "bilirubin_total": (0.5, (None, 1.2)),
        "platelets": (300, (150, 450)), "hemoglobin": (115, (95, 140)), "creatinine": (0.25, (0.1, 0.4)),
        "troponin_i": (10, (None, 40)), "inr": (1.0, (0.8, 1.2)), "pt": (12, (10, 13.5))}
VITALS = {"heart_rate": 130, "respiratory_rate": 38, "systolic_bp": 90, "spo2": 98, "temperature": 36.9}


def scenario(patient_id: str, dose_at: datetime, days: int, *, ward: str = "paediatric-neurology",
             care_team: str = "sma-gene-therapy", alt_peak: float = 260.0, vitals_every_hours: float = 4.0,
             seed: int = 1) -> tuple[list, list[Observation], list[Alert]]:
    """(treatment events, observations, alert versions) of one patient: weekly labs with an ALT
    rise peaking in week 3, vitals every few hours, prednisolone full dose then taper; alerts
    made by the real rule engine and lifecycle."""
    rnd = random.Random(seed)
    cat = catalogue().by_key
    dose = DoseEvent(type="dose", event_id=f"dose-{patient_id}", patient_id=patient_id,
                     product="onasemnogene-abeparvovec-iv", administered_at=dose_at,
                     birth_date=(dose_at - timedelta(days=240)).date(), weight_kg=7.9, ward=ward, care_team=care_team)
    treatments: list = [
        SteroidEvent(type="steroid", event_id=f"st-{patient_id}-1", patient_id=patient_id, dose_mg_per_kg_day=1.0,
                     phase=SteroidPhase.FULL, at=dose_at - timedelta(days=1)),
        dose,
    ]
    if days > 60:
        treatments.append(SteroidEvent(type="steroid", event_id=f"st-{patient_id}-2", patient_id=patient_id,
                                       dose_mg_per_kg_day=0.5, phase=SteroidPhase.TAPER, at=dose_at + timedelta(days=58)))
        treatments.append(SteroidEvent(type="steroid", event_id=f"st-{patient_id}-3", patient_id=patient_id,
                                       dose_mg_per_kg_day=0.0, phase=SteroidPhase.STOPPED, at=dose_at + timedelta(days=86)))
    obs: list[Observation] = []
    n = 0

    def add(analyte: str, value: float, t: datetime, rr=None) -> None:
        nonlocal n
        n += 1
        a = cat[analyte]
        oid = f"{patient_id}-o{n}"
        obs.append(build_observation(
            observation_id=oid, event_id=oid, patient_id=patient_id, loinc=a.loinc[0], value=round(value, 3),
            unit=a.canonical_unit, reference_range=ReferenceRange(low=rr[0], high=rr[1]) if rr else None,
            effective_at=t, status="final", corrects=None, source="bench", fmt="json", received_at=t,
            on_oxygen=None))

    def alt_factor(day: float) -> float:  # transaminase rise peaking on day 21
        return 1.0 + (alt_peak / 30.0 - 1.0) * max(0.0, 1 - abs(day - 21) / 10.0)

    lab_days = [-2] + list(range(0, min(days, 30) + 1, 7)) + list(range(30, days + 1, 14))
    for d in sorted(set(lab_days)):
        t = dose_at + timedelta(days=d, hours=8)
        for analyte, (typ, rr) in LABS.items():
            v = typ * (1 + rnd.uniform(-0.08, 0.08))
            if analyte in ("alt", "ast"):
                v *= alt_factor(d) * (1.0 if analyte == "alt" else 0.7)
            if analyte == "platelets" and d == 7:
                v = 128
            add(analyte, v, t, rr)
    steps = int(days * 24 / vitals_every_hours)
    for i in range(steps + 1):
        t = dose_at + timedelta(hours=i * vitals_every_hours)
        for analyte, typ in VITALS.items():
            v = typ + (rnd.uniform(-0.3, 0.3) if analyte == "temperature" else typ * rnd.uniform(-0.04, 0.04))
            if analyte == "spo2":
                v = min(100.0, v)
            add(analyte, v, t)
    obs.sort(key=lambda o: o.effective_at)
    # the real engine and lifecycle make the alerts
    engine = Engine()
    state = PatientState(patient_id)
    book = AlertBook(patient_id=patient_id)
    alerts: list[Alert] = []
    now = dose_at + timedelta(days=days)
    for ev in treatments:
        for f in engine.apply_treatment(state, ev, now):
            alerts += apply_finding(book, f, now)
    for o in obs:
        for f in engine.evaluate_observation(state, o, now):
            alerts += apply_finding(book, f, now)
    return treatments, obs, alerts


def _stats(xs: list[float]) -> str:
    xs = sorted(xs)
    p95 = xs[min(len(xs) - 1, int(round(0.95 * (len(xs) - 1))))]
    return f"median {statistics.median(xs) * 1000:7.1f} ms   p95 {p95 * 1000:7.1f} ms"


def bytes_per_observation(obs: list[Observation]) -> float:
    """What a store holds per observation it keeps, measured by ``tracemalloc``."""
    import tracemalloc

    from monitor.inbox.store import InboxStore

    raws = [o.model_dump_json().encode() for o in obs]
    store = InboxStore(b"bench-secret")
    tracemalloc.start()
    try:
        before = tracemalloc.get_traced_memory()[0]
        for raw in raws:
            store.apply_observation_bytes(raw)
        return (tracemalloc.get_traced_memory()[0] - before) / len(raws)
    finally:
        tracemalloc.stop()


async def run(args: argparse.Namespace) -> None:
    import aiohttp
    from aiohttp.test_utils import TestServer

    from monitor.inbox.app import create_inbox_app
    from monitor.inbox.auth import MIN_SCRYPT_N, SessionStore, User, UserDirectory, hash_password
    from monitor.inbox.store import InboxStore
    from monitor.settings import Settings
    from schemas.alert import Role

    now = datetime.now(timezone.utc)
    store = InboxStore(b"bench-secret")
    t_build = time.perf_counter()
    # the 90-day patient
    tr, obs, alerts = scenario("bench-patient-90", now - timedelta(days=args.days), args.days)
    for ev in tr:
        store.apply_treatment(ev)
    for o in obs:
        store.apply_observation(o)
    for a in alerts:
        store.apply_alert(a)
    focus = next((a for a in reversed(list(store.alerts.values())) if a.rule_id.startswith("liver")),
                 next(iter(store.alerts.values())))
    # other patients until there are N open alerts
    i = 0
    while len(store.open_alerts()) < args.alerts:
        i += 1
        tr2, obs2, al2 = scenario(f"bench-p{i:03d}", now - timedelta(days=25), 25, seed=i,
                                  ward=f"ward-{i % 4}", care_team=f"team-{i % 3}", vitals_every_hours=24)
        for ev in tr2:
            store.apply_treatment(ev)
        for o in obs2:
            store.apply_observation(o)
        for a in al2:
            store.apply_alert(a)
    n_open = len(store.open_alerts())
    print(f"data: {n_open} open alerts over {len(store.patients)} patients; focus patient "
          f"{len(obs)} observations over {args.days} days, {len(alerts)} alert versions "
          f"(built in {time.perf_counter() - t_build:.1f} s)")
    print(f"store: {bytes_per_observation(obs):.0f} bytes held per observation (the focus patient's, applied "
          f"from their JSON as the consumer applies them)")

    pw = "bench-password-1"
    users = UserDirectory([User("nurse1", Role.NURSE, hash_password(pw, n=MIN_SCRYPT_N), wards=("*",))])
    app = await create_inbox_app(Settings(), users=users, store=store, publish=_nopublish, secret=b"bench-secret",
                                 start_kafka=False, sessions=SessionStore())
    server = TestServer(app, host="127.0.0.1", port=0)
    await server.start_server()
    base = str(server.make_url("/")).rstrip("/")
    ref = store.ref_of(focus.patient_id)
    try:
        async with aiohttp.ClientSession(cookie_jar=aiohttp.CookieJar(unsafe=True)) as http:
            async with http.get(base + "/login") as r:
                csrf = r.cookies["inbox_login_csrf"].value
            async with http.post(base + "/login", data={"username": "nurse1", "password": pw, "csrf_token": csrf},
                                 allow_redirects=False) as r:
                assert r.status == 303, r.status
            targets = [("inbox page  /", "/"), ("inbox API   /api/alerts", "/api/alerts"),
                       ("detail page /alerts/{id}", f"/alerts/{focus.alert_id}"),
                       ("detail API  /api/alerts/{id}", f"/api/alerts/{focus.alert_id}"),
                       ("patient page /patients/{ref}", f"/patients/{ref}"),
                       ("timeline API (90 d)", f"/api/patients/{ref}/timeline")]
            print(f"\nHTTP (server time + transfer, {args.runs} runs each):")
            for label, path in targets:
                times = []
                size = 0
                for _ in range(args.runs):
                    t = time.perf_counter()
                    async with http.get(base + path) as r:
                        body = await r.read()
                        assert r.status == 200, (path, r.status)
                    times.append(time.perf_counter() - t)
                    size = len(body)
                print(f"  {label:32s} {_stats(times)}   {size / 1024:7.1f} KiB")
        if args.browser:
            await asyncio.get_running_loop().run_in_executor(None, _browser, base, pw, focus.alert_id, ref, args.runs)
    finally:
        await server.close()


async def _nopublish(action) -> None:
    return None


CHROMIUM_ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                 "--disable-background-networking", "--disable-component-update", "--disable-sync"]


def _browser(base: str, pw: str, alert_id: str, ref: str, runs: int) -> None:
    from playwright.sync_api import sync_playwright

    runs = max(3, min(runs, 10))
    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path="/usr/bin/chromium", args=CHROMIUM_ARGS)
        page = browser.new_page(viewport={"width": 1024, "height": 768})
        page.goto(base + "/login")
        page.fill("#username", "nurse1")
        page.fill("#password", pw)
        page.click("button[type=submit]")
        page.wait_for_url(base + "/")
        print(f"\nheadless Chromium, 1024x768 ({runs} loads each; navigation start to content drawn):")
        for label, path, ready in [
            ("inbox (rows shown)", "/", "#alert-rows tr[data-alert-id]"),
            ("alert detail (chart drawn)", f"/alerts/{alert_id}", "#charts[data-rendered]"),
            ("patient timeline (all charts)", f"/patients/{ref}", "#charts[data-rendered]"),
        ]:
            times = []
            for _ in range(runs):
                t = time.perf_counter()
                page.goto(base + path)
                page.wait_for_selector(ready, timeout=30_000)
                times.append(time.perf_counter() - t)
            print(f"  {label:32s} {_stats(times)}")
        browser.close()


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--alerts", type=int, default=100)
    ap.add_argument("--days", type=int, default=90)
    ap.add_argument("--runs", type=int, default=30)
    ap.add_argument("--browser", action="store_true", help="also time real headless Chromium loads")
    asyncio.run(run(ap.parse_args()))


if __name__ == "__main__":
    main()
