"""The nurse inbox end to end: real broker, a real worker, the inbox as its own process, real
headless Chromium.

Main flow: a worker (``monitor worker``) and the inbox run over the same topics. A nurse signs in;
a dose and then lab results and vitals are published as raw inputs (``treatments``,
``lab-results``, ``vital-signs``); the worker ingests them and opens the alert, which appears in the
open page live (server-sent events, no reload). The nurse opens it, the chart is drawn, she
acknowledges it; the inbox publishes the action on ``alert-actions``, the worker applies it, and the
test sees status ``acknowledged`` with the nurse in the history on the ``alerts`` topic through the
real broker, while the alert page and the inbox list (another tab) update live to acknowledged.
Also: anonymous requests to every route get 401/redirect, a nurse is refused admin actions, a POST
without the CSRF token is refused. Screenshots are saved to ``artifacts/screenshots/``.

Needs Debian ``chromium`` (``deploy/local/install-debs.sh chromium chromium-driver``) and the
``playwright`` Python package (no ``playwright install``: the system Chromium is used).
"""
from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
import uuid
from datetime import datetime, timedelta, timezone
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
SHOTS = ROOT / "artifacts" / "screenshots"
CHROMIUM = "/usr/bin/chromium"
CHROMIUM_ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                 "--disable-background-networking", "--disable-component-update", "--disable-sync"]
PASSWORDS = {"nurse1": "nurse-pass-e2e", "admin1": "admin-pass-e2e", "nurse2": "nurse2-pass-e2e"}

pytestmark = [pytest.mark.integration, pytest.mark.timeout(240)]

#: every service topic: the main flow runs a real worker over them
ALL_TOPICS = ("lab-results", "vital-signs", "liver-function", "treatments", "observations", "dead-letter",
              "findings", "alerts", "alert-actions", "patients", "alert-deliveries")


def _need_browser():
    if not Path(CHROMIUM).exists():
        subprocess.run([str(ROOT / "deploy/local/install-debs.sh"), "chromium", "chromium-driver"], check=False)
    if not Path(CHROMIUM).exists():
        pytest.skip("Debian chromium is not installed")
    pytest.importorskip("playwright.sync_api")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _scenario(patient: str, days: int):
    sys.path.insert(0, str(ROOT / "bench"))
    from bench_inbox import scenario

    return scenario(patient, datetime.now(timezone.utc) - timedelta(days=days), days, ward="picu",
                    care_team="sma-gene-therapy", vitals_every_hours=12)


def _write_users(tmp: Path) -> Path:
    """The users file of the inbox and the worker (written once per test directory)."""
    from monitor.inbox.auth import hash_password

    users_file = tmp / "users.json"
    if not users_file.exists():
        users = [{"username": "nurse1", "role": "nurse", "display_name": "Nina Nurse", "wards": ["picu"],
                  "password_hash": hash_password(PASSWORDS["nurse1"], n=2**14)},
                 {"username": "nurse2", "role": "nurse", "display_name": "Walter Ward", "wards": ["W2"],
                  "password_hash": hash_password(PASSWORDS["nurse2"], n=2**14)},
                 {"username": "admin1", "role": "admin", "password_hash": hash_password(PASSWORDS["admin1"], n=2**12)}]
        users_file.write_text(json.dumps({"users": users}))
    return users_file


class InboxProcess:
    def __init__(self, bootstrap: str, topics: dict[str, str], tmp: Path):
        users_file = _write_users(tmp)
        self.port = _free_port()
        self.base = f"http://127.0.0.1:{self.port}"
        env = dict(os.environ, KAFKA_BOOTSTRAP_SERVERS=bootstrap, TOPIC_ALERTS=topics["alerts"],
                   TOPIC_ALERT_ACTIONS=topics["alert-actions"], TOPIC_OBSERVATIONS=topics["observations"],
                   TOPIC_TREATMENTS=topics["treatments"], TOPIC_PATIENTS=topics["patients"],
                   INBOX_USERS_FILE=str(users_file),
                   INBOX_SECRET=uuid.uuid4().hex, INBOX_PORT=str(self.port), INBOX_HOST="127.0.0.1",
                   PYTHONPATH=str(ROOT))
        self.log = open(tmp / "inbox.log", "wb")
        self.proc = subprocess.Popen([sys.executable, "-m", "monitor.inbox.app", "serve"], cwd=ROOT, env=env,
                                     stdout=self.log, stderr=subprocess.STDOUT)
        self.tmp = tmp

    def wait_ready(self, timeout: float = 60) -> dict:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError("inbox exited: " + (self.tmp / "inbox.log").read_text()[-3000:])
            try:
                with urllib.request.urlopen(self.base + "/healthz", timeout=2) as r:
                    status = json.loads(r.read())
                if status.get("caught_up"):
                    return status
            except (urllib.error.URLError, ConnectionError, OSError):
                pass
            time.sleep(0.1)
        raise TimeoutError("inbox not ready: " + (self.tmp / "inbox.log").read_text()[-3000:])

    def stop(self) -> None:
        self.proc.terminate()
        try:
            self.proc.wait(10)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait(5)
        self.log.close()


def _producer(bootstrap: str):
    from kafka import KafkaProducer

    return KafkaProducer(bootstrap_servers=bootstrap, acks="all")


def _send(producer, topic: str, key: str, payload: str) -> None:
    producer.send(topic, key=key.encode(), value=payload.encode()).get(timeout=30)


def _actions(bootstrap: str, topic: str, timeout: float = 30.0) -> list:
    from kafka import KafkaConsumer

    consumer = KafkaConsumer(topic, bootstrap_servers=bootstrap, auto_offset_reset="earliest", group_id=None,
                             enable_auto_commit=False, consumer_timeout_ms=int(timeout * 1000))
    out = []
    try:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline and not out:
            for tp, msgs in consumer.poll(timeout_ms=1000).items():
                out.extend(msgs)
    finally:
        consumer.close()
    return out


def _processed(worker, stage: str) -> int:
    """How many events the worker's clinical agent has processed in ``stage`` (from /metrics)."""
    status, body = worker.get("/metrics")
    if status != 200:
        return 0
    prefix = f'monitor_processing_seconds_count{{stage="{stage}"}} '
    for line in body.decode().splitlines():
        if line.startswith(prefix):
            return int(float(line[len(prefix):]))
    return 0


def _wait_processed(worker, stage: str, count: int, timeout: float = 60.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if _processed(worker, stage) >= count:
            return
        time.sleep(0.2)
    raise AssertionError(f"worker processed {_processed(worker, stage)}/{count} {stage} events:\n{worker.tail()}")


def _raw_input(o) -> tuple[str, dict]:
    """The raw input (topic short name, JSON) a lab system or monitor would send for an observation."""
    rec = {"event_id": o.event_id, "patient_id": o.patient_id, "loinc": o.loinc, "value": o.value, "unit": o.unit,
           "effective_at": o.effective_at.isoformat(), "status": "final", "source": "e2e-lab"}
    if o.kind == "lab":
        if o.reference_range is not None:
            rec["reference_range"] = o.reference_range.model_dump()
        return "lab-results", rec
    return "vital-signs", rec


def _send_all(producer, records) -> None:
    for topic, key, payload in records:
        producer.send(topic, key=key.encode(), value=payload.encode())
    producer.flush(timeout=60)


def _alert_versions(bootstrap: str, topic: str, pred, timeout: float = 30.0) -> list[dict]:
    """Alert versions on ``topic`` (from the beginning, no group) once one matches ``pred``."""
    from kafka import KafkaConsumer

    consumer = KafkaConsumer(topic, bootstrap_servers=bootstrap, auto_offset_reset="earliest", group_id=None,
                             enable_auto_commit=False)
    seen: list[dict] = []
    try:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            for _tp, msgs in consumer.poll(timeout_ms=500).items():
                seen.extend(json.loads(m.value) for m in msgs)
            if any(pred(a) for a in seen):
                return seen
    finally:
        consumer.close()
    raise AssertionError(f"no matching alert on {topic} within {timeout}s; saw "
                         f"{[(a['rule_id'], a['status'], a['version']) for a in seen]}")


@pytest.fixture
def inbox(kafka_bootstrap, topic_factory, tmp_path):
    _need_browser()
    topics = topic_factory(*ALL_TOPICS, prefix=f"inbox{uuid.uuid4().hex[:8]}")
    procs = []

    def start() -> InboxProcess:
        p = InboxProcess(kafka_bootstrap, topics, tmp_path)
        procs.append(p)
        p.wait_ready()
        return p

    yield topics, start
    for p in procs:
        p.stop()


def _login(page, base: str, user: str) -> None:
    page.goto(base + "/login")
    page.get_by_label("User name").fill(user)
    page.get_by_label("Password").fill(PASSWORDS[user])
    page.keyboard.press("Enter")  # keyboard only
    page.wait_for_url(base + "/")


def _canvas_ink(page, selector: str) -> int:
    """Number of painted (non-transparent) pixels in the first canvas under ``selector``."""
    return page.evaluate("""(sel) => {
        const c = document.querySelector(sel + ' canvas');
        if (!c || !c.width || !c.height) return 0;
        const d = c.getContext('2d').getImageData(0, 0, c.width, c.height).data;
        let n = 0; for (let i = 3; i < d.length; i += 4) if (d[i] > 0) n++;
        return n; }""", selector)


def test_nurse_sees_live_alert_opens_chart_and_acknowledges(inbox, kafka_bootstrap, worker_factory, tmp_path):
    from playwright.sync_api import sync_playwright

    from workers import service_env

    topics, start = inbox
    SHOTS.mkdir(parents=True, exist_ok=True)
    # the worker: a long clock tick keeps escalation and schedule versions out of this flow; it
    # resolves the roles of actions from the same users file as the inbox (security review H4)
    worker = worker_factory(service_env(topics, app_id=topics["alerts"].split(".")[0],
                                        TICK_INTERVAL_SECONDS="600",
                                        INBOX_USERS_FILE=str(_write_users(tmp_path))), wait=False)
    patient = f"e2e-{uuid.uuid4().hex[:8]}"
    treatments, observations, expected = _scenario(patient, 30)
    assert any(a.is_open and a.rule_id.startswith("liver.") for a in expected), [a.rule_id for a in expected]
    proc = start()  # the inbox starts while the worker does
    worker.wait_ready(90)
    producer = _producer(kafka_bootstrap)

    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)
        ctx = browser.new_context(viewport={"width": 1024, "height": 768})  # landscape tablet
        page = ctx.new_page()
        errors: list[str] = []
        page.on("pageerror", lambda e: errors.append(str(e)))
        _login(page, proc.base, "nurse1")
        page.wait_for_selector("#live-state.on", timeout=15_000)  # SSE connected
        page.wait_for_selector("#no-alerts:not(.hidden)")
        page.screenshot(path=str(SHOTS / "01-inbox-empty.png"))
        page.evaluate("window.__noReload = 'still-here'")

        # who the patient is: an ADT^A01 through the patients feed (as `monitor patients load` does)
        from monitor.patients import route
        from monitor.settings import Settings

        adt = (f"MSH|^~\\&|ADT|HOSP|MON|HOSP|20260101120000||ADT^A01|1|P|2.5\r"
               f"PID|1||{patient}^^^HOSP^PI~MRN-E2E-7^^^HOSP^MR||Okafor^Ada||20240901|F\rPV1|1|I|picu^1^B4\r")
        _, key, value, headers, rec = route(adt.encode(), Settings())
        assert rec is not None and headers is None
        _send(producer, topics["patients"], patient, value.decode())

        # raw inputs while the page is open: the dose first (the worker must know it before the
        # labs are judged against days since dose), then lab results and vitals
        _send_all(producer, [(topics["treatments"], patient, ev.model_dump_json()) for ev in treatments])
        _wait_processed(worker, "treatment", len(treatments))
        raw = [_raw_input(o) for o in observations]
        _send_all(producer, [(topics[t], patient, json.dumps(rec)) for t, rec in raw])
        _wait_processed(worker, "evaluate", len(observations), timeout=90)

        # the alert the worker made: its newest open liver alert of the highest severity
        versions = _alert_versions(kafka_bootstrap, topics["alerts"],
                                   lambda a: a["patient_id"] == patient and a["rule_id"].startswith("liver."))
        latest: dict[str, dict] = {}
        for a in versions:
            if a["version"] >= latest.get(a["alert_id"], {}).get("version", 0):
                latest[a["alert_id"]] = a
        rank = {"info": 0, "warning": 1, "high": 2, "critical": 3}
        open_liver = [a for a in latest.values()
                      if a["rule_id"].startswith("liver.") and a["status"] == "firing"]
        assert open_liver, [(a["rule_id"], a["status"]) for a in latest.values()]
        alert = max(open_liver, key=lambda a: (rank[a["severity"]], a["version"]))
        alert_id = alert["alert_id"]

        row = page.wait_for_selector(f'tr[data-alert-id="{alert_id}"]', timeout=20_000)
        assert page.evaluate("window.__noReload") == "still-here"  # live, no reload
        assert alert["text"]["what"].split(".")[0] in row.inner_text()
        assert patient not in page.content()
        row_text = page.inner_text(f'tr[data-alert-id="{alert_id}"]')  # issue 14: who it is, on the row
        assert "Ada Okafor" in row_text and "MRN-E2E-7" in row_text and "2024-09-01" in row_text, row_text
        page.screenshot(path=str(SHOTS / "02-inbox-live-alert.png"))

        # a second tab keeps the inbox list open, to see the acknowledgement arrive live
        inbox_tab = ctx.new_page()
        inbox_tab.on("pageerror", lambda e: errors.append(str(e)))
        inbox_tab.goto(proc.base + "/")
        inbox_tab.wait_for_selector("#live-state.on", timeout=15_000)
        inbox_tab.wait_for_selector(f'tr[data-alert-id="{alert_id}"] .status-firing', timeout=15_000)
        inbox_tab.evaluate("window.__noReload = 'list-here'")

        # open it (keyboard: focus the link, Enter)
        page.bring_to_front()
        page.focus(f'tr[data-alert-id="{alert_id}"] a.what')
        page.keyboard.press("Enter")
        page.wait_for_url(f"{proc.base}/alerts/{alert_id}")
        assert patient not in page.url
        page.wait_for_selector("#charts[data-rendered]", timeout=15_000)
        assert int(page.get_attribute("#charts", "data-rendered")) >= 1
        assert _canvas_ink(page, '#charts [data-panel="liver"]') > 2000, "liver chart not drawn"
        assert page.inner_text("#protocol") == f"{alert['protocol']['id']} version {alert['protocol']['version']}"
        assert alert["text"]["action"][:30] in page.inner_text(".nurse-text")
        assert page.locator("table.evidence tbody tr").count() == len(alert["evidence"])
        assert page.locator('[data-action="silence"]').count() == 0  # nurse: no admin action
        assert page.inner_text("#alert-status") == "firing"
        banner = page.inner_text("#patient-banner")
        assert "Ada Okafor" in banner and "MRN-E2E-7" in banner and "2024-09-01" in banner, banner
        page.screenshot(path=str(SHOTS / "03-alert-detail.png"), full_page=True)

        page.click("#btn-acknowledge")
        page.wait_for_selector("#action-status .notice", timeout=15_000)
        # the worker applies it and emits the acknowledged version; the page updates live. The
        # worker is fast: the new version can reach the page (SSE) before or after the answer to
        # the POST, so the notice shows either message and the status either order of updates.
        page.wait_for_function(
            "() => document.querySelector('#alert-status').textContent.trim().startsWith('acknowledged')",
            timeout=30_000)
        notice = page.inner_text("#action-status")
        assert "Acknowledge sent" in notice or "(acknowledged)" in notice, notice
        page.screenshot(path=str(SHOTS / "04-acknowledged.png"), full_page=True)

        # the inbox list in the other tab shows it acknowledged, without a reload
        inbox_tab.bring_to_front()
        inbox_tab.wait_for_selector(f'tr[data-alert-id="{alert_id}"] .status-acknowledged', timeout=30_000)
        assert inbox_tab.evaluate("window.__noReload") == "list-here"
        assert inbox_tab.inner_text(f'tr[data-alert-id="{alert_id}"] .status') == "acknowledged"
        inbox_tab.screenshot(path=str(SHOTS / "04b-inbox-acknowledged-live.png"))
        inbox_tab.close()

        # the timeline page, portrait tablet
        page.bring_to_front()
        page.set_viewport_size({"width": 768, "height": 1024})
        page.click("#timeline-link")
        page.wait_for_selector("#charts[data-rendered]", timeout=15_000)
        assert int(page.get_attribute("#charts", "data-rendered")) >= 7
        assert _canvas_ink(page, '#charts [data-panel="liver"]') > 2000
        assert patient not in page.url and patient not in page.content()
        banner = page.inner_text("#patient-banner")
        assert "Ada Okafor" in banner and "MRN-E2E-7" in banner and "2024-09-01" in banner, banner
        page.screenshot(path=str(SHOTS / "05-patient-timeline-portrait.png"), full_page=True)
        timeline_url = page.url

        # the census: the patient by name and MRN, day since dose, open alerts
        page.set_viewport_size({"width": 1024, "height": 768})
        page.click("#nav-census")
        page.wait_for_selector("#census-table")
        census_row = page.inner_text(f'#census-table tr[data-patient-ref="{timeline_url.rsplit("/", 1)[1]}"]')
        assert "Ada Okafor" in census_row and "MRN-E2E-7" in census_row and "picu" in census_row, census_row
        page.screenshot(path=str(SHOTS / "06-census.png"), full_page=True)

        # ward scoping (review M5): a nurse of another ward sees neither the row nor the pages
        other = browser.new_context(viewport={"width": 1024, "height": 768})
        page2 = other.new_page()
        _login(page2, proc.base, "nurse2")
        page2.wait_for_selector("#live-state.on", timeout=15_000)
        page2.wait_for_selector("#no-alerts:not(.hidden)")
        assert page2.locator(f'tr[data-alert-id="{alert_id}"]').count() == 0
        assert "Ada Okafor" not in page2.content()
        assert page2.goto(f"{proc.base}/alerts/{alert_id}").status == 404
        assert page2.goto(timeline_url).status == 404
        page2.goto(f"{proc.base}/census")
        assert "Ada Okafor" not in page2.content() and "No monitored patients" in page2.inner_text("#census-table")
        other.close()
        assert not errors, errors
        browser.close()
    producer.close()

    # the action the inbox published, through the real broker
    msgs = _actions(kafka_bootstrap, topics["alert-actions"])
    assert len(msgs) == 1, msgs
    m = msgs[0]
    assert m.key == patient.encode()
    action = json.loads(m.value)
    assert action["action"] == "acknowledge"
    assert action["alert_id"] == alert_id
    assert action["by"] == "nurse1" and action["role"] == "nurse"
    assert action["patient_id"] == patient and action["action_id"]

    # the acknowledgement the worker applied, on the alerts topic through the real broker
    versions = _alert_versions(kafka_bootstrap, topics["alerts"],
                               lambda a: a["alert_id"] == alert_id and a["status"] == "acknowledged")
    acked = [a for a in versions if a["alert_id"] == alert_id and a["status"] == "acknowledged"][0]
    assert acked["previous_status"] == "firing" and acked["version"] > alert["version"]
    entry = [h for h in acked["history"] if h["action"] == "acknowledged"]
    assert len(entry) == 1, acked["history"]
    assert entry[0]["by"] == "nurse1" and entry[0]["role"] == "nurse"
    assert entry[0]["from_status"] == "firing" and entry[0]["to_status"] == "acknowledged"
    assert acked["next_escalation_at"] is None  # acknowledged: escalation stopped


def test_routes_refuse_anonymous_nurse_refused_admin_and_forged_post(inbox, kafka_bootstrap):
    from playwright.sync_api import sync_playwright

    from monitor.inbox.views import PROTECTED_ROUTES

    topics, start = inbox
    patient = f"e2e-{uuid.uuid4().hex[:8]}"
    treatments, observations, alerts = _scenario(patient, 21)
    alert = [a for a in alerts if a.is_open][-1]
    producer = _producer(kafka_bootstrap)
    for ev in treatments:
        _send(producer, topics["treatments"], patient, ev.model_dump_json())
    _send(producer, topics["alerts"], patient, alert.model_dump_json())
    producer.close()
    proc = start()

    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)
        ctx = browser.new_context()
        page = ctx.new_page()
        # anonymous: every page redirects to login, every API answers 401
        for method, template in PROTECTED_ROUTES:
            path = template.replace("{alert_id}", alert.alert_id).replace("{ref}", "p-" + "0" * 24)
            r = ctx.request.fetch(proc.base + path, method=method, max_redirects=0)
            if path.startswith("/api/") or method == "POST":
                assert r.status == 401, (method, path, r.status)
            else:
                assert r.status == 302 and r.headers["location"] == "/login", (method, path, r.status)
        page.goto(proc.base + f"/alerts/{alert.alert_id}")
        assert page.url == proc.base + "/login"
        page.screenshot(path=str(SHOTS / "00-login.png"))

        _login(page, proc.base, "nurse1")
        url = f"{proc.base}/api/alerts/{alert.alert_id}/actions"
        csrf = page.get_attribute('meta[name="csrf-token"]', "content")
        # forged: no token, wrong token, another origin
        r = ctx.request.post(url, data=json.dumps({"action": "acknowledge"}),
                             headers={"Content-Type": "application/json"})
        assert r.status == 403
        r = ctx.request.post(url, form={"action": "acknowledge", "csrf_token": "forged"})
        assert r.status == 403
        r = ctx.request.post(url, data=json.dumps({"action": "acknowledge"}),
                             headers={"Content-Type": "application/json", "X-CSRF-Token": csrf,
                                      "Origin": "https://evil.example"})
        assert r.status == 403
        # a nurse cannot reach admin actions, even with a valid token
        until = (datetime.now(timezone.utc) + timedelta(hours=2)).isoformat()
        r = ctx.request.post(url, data=json.dumps({"action": "silence", "until": until, "reason": "x"}),
                             headers={"Content-Type": "application/json", "X-CSRF-Token": csrf})
        assert r.status == 403
        assert ctx.request.get(proc.base + "/api/admin/status").status == 403
        page.goto(proc.base + f"/alerts/{alert.alert_id}")
        assert page.locator('[data-action="silence"]').count() == 0
        browser.close()
    # every refusal above was answered before anything was published (an accepted action is
    # answered only once the broker has it): the topic, read to its end, holds nothing
    from kafka_broker import read_topic

    assert read_topic(kafka_bootstrap, topics["alert-actions"]) == []


#: records what the page's own code does with the Notification and Web Audio APIs (it still
#: calls the real ones): injected before any page script runs (DevTools, unaffected by the CSP)
NOTIFY_PROBE = """(() => {
  window.__notes = []; window.__permAsks = 0; window.__tones = 0;
  const Real = window.Notification;
  if (Real) {
    function Probe(title, options) {
      window.__notes.push({title: String(title), body: String((options || {}).body || ''), tag: (options || {}).tag});
      return new Real(title, options);
    }
    Object.defineProperty(Probe, 'permission', {get: () => Real.permission});
    Probe.requestPermission = function () { window.__permAsks += 1; return Real.requestPermission.apply(Real, arguments); };
    window.Notification = Probe;
  }
  const AC = window.AudioContext || window.webkitAudioContext;
  if (AC) {
    const make = AC.prototype.createOscillator;
    AC.prototype.createOscillator = function () { window.__tones += 1; return make.call(this); };
  }
})();"""


def test_new_critical_alert_notifies_opted_in_user_of_its_ward_only(inbox, kafka_bootstrap):
    """Issue 14 item 8: after a real sign-in a nurse opts in (the only moment permission is asked);
    a critical alert for her ward published on the alerts topic through the real broker raises a
    notification (rule, severity, ward and bed; no name, MRN or patient id) and a tone, and the
    title count goes from "(1) Inbox" to "(2) Inbox". A nurse of another ward, also opted in, gets
    neither. The preference survives a reload (localStorage, per user) without asking again."""
    from playwright.sync_api import sync_playwright

    from monitor.patients import route
    from monitor.settings import Settings
    from schemas.alert import Alert

    topics, start = inbox
    patient = f"e2e-{uuid.uuid4().hex[:8]}"
    treatments, _observations, alerts = _scenario(patient, 21)
    existing = [a for a in alerts if a.is_open][-1]
    assert existing.ward == "picu"
    producer = _producer(kafka_bootstrap)
    adt = (f"MSH|^~\\&|ADT|HOSP|MON|HOSP|20260101120000||ADT^A01|1|P|2.5\r"
           f"PID|1||{patient}^^^HOSP^PI~MRN-NOTE-4^^^HOSP^MR||Okafor^Ada||20240901|F\rPV1|1|I|picu^1^B4\r")
    _, _, value, _, rec = route(adt.encode(), Settings())
    assert rec is not None
    _send(producer, topics["patients"], patient, value.decode())
    for ev in treatments:
        _send(producer, topics["treatments"], patient, ev.model_dump_json())
    _send(producer, topics["alerts"], patient, existing.model_dump_json())
    proc = start()

    def new_alert(severity: str) -> Alert:
        return Alert.model_validate({**existing.model_dump(mode="json"), "alert_id": uuid.uuid4().hex,
                                     "severity": severity, "status": "firing", "version": 1, "ward": "picu"})

    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)
        pages = {}
        for user in ("nurse1", "nurse2"):
            ctx = browser.new_context(permissions=["notifications"])
            ctx.add_init_script(NOTIFY_PROBE)
            page = ctx.new_page()
            errors: list[str] = []
            page.on("pageerror", lambda e, errors=errors: errors.append(str(e)))
            _login(page, proc.base, user)
            page.wait_for_selector("#live-state.on", timeout=15_000)
            assert page.evaluate("window.__permAsks") == 0, "permission asked before the user opted in"
            assert not page.is_checked("#notify-opt")
            page.check("#notify-opt")
            page.wait_for_function("() => document.getElementById('notify-state').textContent === 'On.'")
            assert page.evaluate("window.__permAsks") == 1
            pages[user] = (page, errors)
        nina, nina_errors = pages["nurse1"]
        walter, walter_errors = pages["nurse2"]
        nina.wait_for_function("() => document.title === '(1) Inbox - SMA monitor'", timeout=15_000)
        assert walter.title() == "Inbox - SMA monitor"  # nothing open on his ward
        assert nina.evaluate("window.__notes") == []  # open at page load: no ring
        tones = {u: pg.evaluate("window.__tones") for u, (pg, _) in pages.items()}

        critical = new_alert("critical")
        _send(producer, topics["alerts"], patient, critical.model_dump_json())
        nina.wait_for_function("() => window.__notes.length >= 1", timeout=20_000)
        nina.wait_for_function("() => document.title === '(2) Inbox - SMA monitor'", timeout=10_000)
        notes = nina.evaluate("window.__notes")
        assert len(notes) == 1, notes
        note = notes[0]
        assert note["tag"] == critical.alert_id
        assert note["title"] == "Critical alert \u00b7 picu, bed B4", note
        assert critical.rule_id in note["body"] and critical.pseudonym in note["body"], note
        for secret in ("Ada", "Okafor", "MRN-NOTE-4", patient, "2024-09-01"):
            assert secret not in note["title"] + note["body"], (secret, note)
        assert nina.evaluate("window.__tones") >= tones["nurse1"] + 3  # critical: three pips
        nina.wait_for_selector(f'tr[data-alert-id="{critical.alert_id}"]')
        # the other ward's nurse: no notification, no tone, no count (the server never sends it to her page)
        nina.wait_for_timeout(2_000)
        assert walter.evaluate("window.__notes") == []
        assert walter.evaluate("window.__tones") == tones["nurse2"]
        assert walter.title() == "Inbox - SMA monitor"

        # the preference is kept for this user across a reload; permission is not asked again
        nina.reload()
        nina.wait_for_selector("#live-state.on", timeout=15_000)
        assert nina.is_checked("#notify-opt") and nina.evaluate("window.__permAsks") == 0
        nina.wait_for_function("() => document.title === '(2) Inbox - SMA monitor'", timeout=10_000)
        high = new_alert("high")
        _send(producer, topics["alerts"], patient, high.model_dump_json())
        nina.wait_for_function("() => window.__notes.length >= 1", timeout=20_000)
        assert [n["tag"] for n in nina.evaluate("window.__notes")] == [high.alert_id]
        assert nina.evaluate("window.__notes")[0]["title"].startswith("High alert \u00b7 picu")
        nina.wait_for_function("() => document.title === '(3) Inbox - SMA monitor'", timeout=10_000)
        nina.screenshot(path=str(SHOTS / "07-inbox-notifications-opt-in.png"))
        assert not nina_errors and not walter_errors, (nina_errors, walter_errors)
        browser.close()
    producer.close()
