"""Nurse inbox: password hashing, sessions, CSRF, roles, throttling; every route refuses anonymous users."""
from __future__ import annotations

import json
import re
from datetime import datetime, timedelta, timezone

import aiohttp
import pytest
from aiohttp.test_utils import TestClient, TestServer

from monitor.inbox.app import create_inbox_app, main as inbox_main
from monitor.inbox.auth import (
    LoginThrottle, SessionStore, User, UserDirectory, allowed_actions, hash_password, may, verify_password,
)
from monitor.inbox.store import InboxStore
from monitor.inbox.views import PROTECTED_ROUTES
from monitor.settings import Settings
from schemas.alert import Alert, AlertAction, AlertText, Role
from schemas.events import DoseEvent
from schemas.findings import Evidence, ProtocolRef

FAST = dict(n=2**14)  # the floor verify_password accepts (the default is 2**17, OWASP)
PW = {"nurse1": "nurse-pass-1", "doc1": "doctor-pass-1", "admin1": "admin-pass-1", "nurse2": "nurse-pass-1",
      "nobody": "nurse-pass-1"}
SECRET = b"test-secret"
NOW = datetime.now(timezone.utc)


def _alert(alert_id: str, patient: str, severity: str = "high", status: str = "firing", version: int = 1) -> Alert:
    return Alert(
        alert_id=alert_id, patient_id=patient, rule_id="liver.alt_increased", episode=1, severity=severity,
        status=status, protocol=ProtocolRef(id="onasemnogene-abeparvovec-iv", version="1.0.0"),
        evidence=[Evidence(observation_id="o1", analyte="alt", value=260, unit="U/L", limit=200, limit_unit="U/L",
                           comparison=">", basis="uln", multiple=6.5, effective_at=NOW)],
        opened_at=NOW - timedelta(hours=2), updated_at=NOW, effective_at=NOW, route={"id": "ward-nurse", "tiers": []},
        text=AlertText(what="ALT is raised <b>6.5x</b>", why="liver injury", action="call the physician"),
        version=version, pseudonym="a-123456789abc", ward="W1", care_team="T1",
    )


@pytest.fixture
def store() -> InboxStore:
    s = InboxStore(SECRET)
    s.apply_treatment(DoseEvent(type="dose", event_id="d1", patient_id="MRN-0001", product="onasemnogene-abeparvovec-iv",
                                administered_at=NOW - timedelta(days=20), birth_date="2024-09-01", weight_kg=7.5,
                                ward="W1", care_team="T1"))
    s.apply_alert(_alert("a" * 32, "MRN-0001", "high"))
    s.apply_alert(_alert("b" * 32, "MRN-0001", "warning"))
    s.apply_alert(_alert("c" * 32, "MRN-0002", "critical"))
    return s


@pytest.fixture
async def ctx(store):
    sent: list[AlertAction] = []

    async def publish(action: AlertAction) -> None:
        sent.append(action)

    users = UserDirectory([User("nurse1", Role.NURSE, hash_password(PW["nurse1"], **FAST), wards=("W1",)),
                           User("doc1", Role.PHYSICIAN, hash_password(PW["doc1"], **FAST), wards=("*",)),
                           User("admin1", Role.ADMIN, hash_password(PW["admin1"], **FAST)),
                           User("nurse2", Role.NURSE, hash_password(PW["nurse1"], **FAST), wards=("W2",)),
                           User("nobody", Role.NURSE, hash_password(PW["nurse1"], **FAST))])
    app = await create_inbox_app(Settings(), users=users, store=store, publish=publish, secret=SECRET,
                                 start_kafka=False, throttle=LoginThrottle(max_failures=3))
    client = TestClient(TestServer(app), cookie_jar=aiohttp.CookieJar(unsafe=True))
    await client.start_server()
    try:
        yield client, sent, store
    finally:
        await client.close()


async def login(client: TestClient, username: str, password: str | None = None) -> str:
    r = await client.get("/login")
    assert r.status == 200
    html = await r.text()
    token = re.search(r'name="csrf_token" value="([^"]+)"', html).group(1)
    r = await client.post("/login", data={"username": username, "password": password or PW[username],
                                          "csrf_token": token}, allow_redirects=False)
    assert r.status == 303, await r.text()
    me = await (await client.get("/api/me")).json()
    return me["csrf_token"]


def _path(template: str, store: InboxStore) -> str:
    return template.replace("{alert_id}", "a" * 32).replace("{ref}", store.ref_of("MRN-0001"))


# --------------------------------------------------------------------------- pure parts


def test_password_hash_roundtrip_and_salt():
    h1 = hash_password("correct horse", **FAST)
    h2 = hash_password("correct horse", **FAST)
    assert h1 != h2  # per-user random salt
    assert h1.startswith("scrypt$16384$8$1$")
    assert verify_password("correct horse", h1) and verify_password("correct horse", h2)
    assert not verify_password("correct horse!", h1)
    assert not verify_password("x", "not-a-hash") and not verify_password("x", "scrypt$1$2$3$$")
    # below the floor (review L1): a hash with N=2^10 is refused even with the right password
    assert not verify_password("correct horse", hash_password("correct horse", n=2**10))
    assert "correct horse" not in h1
    with pytest.raises(ValueError):
        hash_password("")


def test_default_cost_and_hash_password_cli(capsys, monkeypatch):
    import io

    monkeypatch.setattr("sys.stdin", io.StringIO("a-long-password\n"))
    assert inbox_main(["hash-password", "--password-stdin"]) == 0
    out = capsys.readouterr().out.strip()
    assert out.startswith("scrypt$131072$8$1$") and verify_password("a-long-password", out)  # OWASP minimum


def test_users_file_json_and_yaml(tmp_path):
    h = hash_password("pw-123456", **FAST)
    (tmp_path / "u.json").write_text(json.dumps({"users": [{"username": "n", "role": "nurse", "password_hash": h}]}))
    (tmp_path / "u.yaml").write_text(f"users:\n  - username: a\n    role: admin\n    password_hash: '{h}'\n")
    from monitor.inbox.auth import load_users

    assert load_users(tmp_path / "u.json").authenticate("n", "pw-123456").role == Role.NURSE
    assert load_users(tmp_path / "u.yaml").authenticate("a", "pw-123456").role == Role.ADMIN
    assert load_users(tmp_path / "u.yaml").authenticate("a", "wrong") is None
    (tmp_path / "bad.json").write_text(json.dumps([{"username": "x", "role": "king", "password_hash": h}]))
    with pytest.raises(ValueError):
        load_users(tmp_path / "bad.json")
    (tmp_path / "plain.json").write_text(json.dumps([{"username": "x", "role": "nurse", "password_hash": "secret"}]))
    with pytest.raises(ValueError):
        load_users(tmp_path / "plain.json")


def test_session_expiry_idle_and_absolute():
    t = [1000.0]
    s = SessionStore(idle_seconds=60, max_seconds=300, clock=lambda: t[0])
    user = User("n", Role.NURSE, "x")
    tok, sess = s.create(user)
    assert s.get(tok) is sess and len(sess.csrf_token) >= 32
    t[0] += 59
    assert s.get(tok) is sess  # touched
    t[0] += 61
    assert s.get(tok) is None  # idle expiry
    tok, _ = s.create(user)
    for _ in range(7):
        t[0] += 50
        s.get(tok)
    assert s.get(tok) is None  # absolute expiry despite activity
    tok2, _ = s.create(user)
    s.destroy(tok2)
    assert s.get(tok2) is None and s.get("forged") is None and s.get(None) is None


def test_throttle_locks_then_releases():
    t = [0.0]
    th = LoginThrottle(max_failures=3, window_seconds=60, lockout_seconds=120, clock=lambda: t[0])
    for _ in range(3):
        assert th.retry_after("n", "1.2.3.4") == 0
        th.failure("n", "1.2.3.4")
    assert th.retry_after("n", "1.2.3.4") > 0
    # per ACCOUNT now (review H5): another address does not reset the budget; another account is free
    assert th.retry_after("n", "5.6.7.8") > 0
    assert th.retry_after("m", "1.2.3.4") == 0
    t[0] += 121
    assert th.retry_after("n", "1.2.3.4") == 0


def test_role_rules_mirror_lifecycle():
    assert may("nurse", "acknowledge", "critical") and may("nurse", "note", "high") and may("nurse", "escalate", "high")
    assert may("nurse", "resolve", "warning") and not may("nurse", "resolve", "high")
    assert not may("nurse", "resolve", "critical") and may("physician", "resolve", "critical")
    assert not may("nurse", "silence", "info") and not may("physician", "silence", "info") and may("admin", "silence", "info")
    assert not may("nurse", "resolve", None)  # missing severity = critical
    assert "silence" not in allowed_actions("admin", "critical", True)
    assert allowed_actions("nurse", "high", False) == ["note"]


# --------------------------------------------------------------------------- HTTP


async def test_every_protected_route_refuses_anonymous(ctx):
    client, sent, store = ctx
    for method, template in PROTECTED_ROUTES:
        path = _path(template, store)
        r = await client.request(method, path, allow_redirects=False)
        if path.startswith("/api/") or method == "POST":
            assert r.status == 401, (method, path, r.status)
            assert (await r.json())["error"] == "authentication required"
        else:
            assert r.status == 302 and r.headers["Location"] == "/login", (method, path, r.status)
    assert sent == []
    # public: login page, health, static files
    assert (await client.get("/login")).status == 200
    assert (await client.get("/healthz")).status == 200
    assert (await client.get("/static/inbox.css")).status == 200


async def test_forged_session_cookie_is_anonymous(ctx):
    client, _, _ = ctx
    client.session.cookie_jar.update_cookies({"inbox_session": "forged-token"})
    r = await client.get("/api/alerts")
    assert r.status == 401


async def test_login_sets_secure_cookie_flags(ctx):
    client, _, _ = ctx
    r = await client.get("/login")
    token = re.search(r'name="csrf_token" value="([^"]+)"', await r.text()).group(1)
    r = await client.post("/login", data={"username": "nurse1", "password": PW["nurse1"], "csrf_token": token},
                          allow_redirects=False)
    assert r.status == 303
    cookie = [v for k, v in r.headers.items() if k == "Set-Cookie" and v.startswith("inbox_session=")][0]
    assert "HttpOnly" in cookie and "SameSite=Strict" in cookie and "Path=/" in cookie
    assert "Secure" not in cookie  # plain http in the test; https or INBOX_SECURE_COOKIES=true adds it


async def test_secure_flag_when_configured(store):
    users = UserDirectory([User("nurse1", Role.NURSE, hash_password(PW["nurse1"], **FAST))])
    app = await create_inbox_app(Settings(), users=users, store=store, publish=None, secret=SECRET,
                                 start_kafka=False, secure_cookies=True)
    client = TestClient(TestServer(app), cookie_jar=aiohttp.CookieJar(unsafe=True))
    await client.start_server()
    try:
        r = await client.get("/login")
        assert "Secure" in r.headers["Set-Cookie"]
    finally:
        await client.close()


async def test_wrong_password_and_throttle(ctx):
    client, _, _ = ctx
    r = await client.get("/login")
    tok = re.search(r'name="csrf_token" value="([^"]+)"', await r.text()).group(1)
    for _ in range(3):
        r = await client.post("/login", data={"username": "nurse1", "password": "nope", "csrf_token": tok},
                              allow_redirects=False)
        assert r.status == 401
        tok = re.search(r'name="csrf_token" value="([^"]+)"', await r.text()).group(1)
    # locked even with the right password now
    r = await client.post("/login", data={"username": "nurse1", "password": PW["nurse1"], "csrf_token": tok},
                          allow_redirects=False)
    assert r.status == 429 and int(r.headers["Retry-After"]) > 0
    assert (await client.get("/api/alerts")).status == 401


async def test_login_form_needs_its_csrf_cookie(ctx):
    client, _, _ = ctx
    r = await client.post("/login", data={"username": "nurse1", "password": PW["nurse1"], "csrf_token": "guess"},
                          allow_redirects=False)
    assert r.status == 403
    assert (await client.get("/api/alerts")).status == 401


async def test_inbox_api_lists_without_patient_ids(ctx):
    client, _, store = ctx
    await login(client, "nurse1")
    data = await (await client.get("/api/alerts")).json()
    assert [a["severity"] for a in data["alerts"]] == ["critical", "high", "warning"]
    # the raw patient id is never a URL part; an unregistered patient is named as such, with its id,
    # in the signed-in user's view only (issue 14: the nurse must be able to tell who it is)
    for a in data["alerts"]:
        assert "MRN-000" not in a["patient_ref"] and "MRN-000" not in a["alert_id"]
        assert a["patient"]["registered"] is False and a["patient"]["label"].startswith("unregistered patient MRN-000")
    assert data["alerts"][1]["patient_ref"] == store.ref_of("MRN-0001")
    only = await (await client.get("/api/alerts", params={"ward": "W1", "team": "T1"})).json()
    assert only["count"] == 3
    none = await (await client.get("/api/alerts", params={"ward": "W9"})).json()
    assert none["count"] == 0
    page = await (await client.get(f"/alerts/{'a' * 32}")).text()
    assert "Unregistered patient" in page and 'href="/patients/MRN' not in page
    assert "&lt;b&gt;6.5x&lt;/b&gt;" in page and "<b>6.5x" not in page  # escaped
    assert "onasemnogene-abeparvovec-iv version 1.0.0" in page
    tl = await (await client.get(f"/api/patients/{store.ref_of('MRN-0001')}/timeline")).json()
    assert tl["patient"]["registered"] is False and tl["has_dose"]
    assert (await client.get("/patients/MRN-0001")).status == 404  # raw ids do not resolve


async def test_acknowledge_publishes_action(ctx):
    client, sent, store = ctx
    csrf = await login(client, "nurse1")
    r = await client.post(f"/api/alerts/{'a' * 32}/actions", json={"action": "acknowledge"},
                          headers={"X-CSRF-Token": csrf})
    assert r.status == 202, await r.text()
    body = await r.json()
    assert "patient_id" not in body["action"]
    assert len(sent) == 1
    a = sent[0]
    assert (a.action, a.alert_id, a.patient_id, a.by, a.role) == ("acknowledge", "a" * 32, "MRN-0001", "nurse1", Role.NURSE)
    assert a.action_id
    # shown as pending until a newer alert version arrives
    listed = {x["alert_id"]: x for x in (await (await client.get("/api/alerts")).json())["alerts"]}
    assert listed["a" * 32]["pending"][0]["action"] == "acknowledge"
    store.apply_alert(_alert("a" * 32, "MRN-0001", "high", status="acknowledged", version=2))
    listed = {x["alert_id"]: x for x in (await (await client.get("/api/alerts")).json())["alerts"]}
    assert listed["a" * 32]["pending"] == [] and listed["a" * 32]["status"] == "acknowledged"


async def test_form_post_with_csrf_field_redirects(ctx):
    client, sent, _ = ctx
    csrf = await login(client, "nurse1")
    r = await client.post(f"/api/alerts/{'a' * 32}/actions",
                          data={"action": "note", "reason": "called the family", "csrf_token": csrf},
                          allow_redirects=False)
    assert r.status == 303 and r.headers["Location"].endswith("?sent=note")
    assert sent[-1].reason == "called the family"


async def test_post_without_or_with_wrong_csrf_is_refused(ctx):
    client, sent, _ = ctx
    await login(client, "nurse1")
    url = f"/api/alerts/{'a' * 32}/actions"
    assert (await client.post(url, json={"action": "acknowledge"})).status == 403
    assert (await client.post(url, json={"action": "acknowledge"}, headers={"X-CSRF-Token": "forged"})).status == 403
    r = await client.post(url, data={"action": "acknowledge", "csrf_token": "forged"})
    assert r.status == 403
    # logout is a POST too
    assert (await client.post("/logout", allow_redirects=False)).status == 403
    assert sent == []


async def test_cross_origin_post_refused_even_with_token(ctx):
    client, sent, _ = ctx
    csrf = await login(client, "nurse1")
    r = await client.post(f"/api/alerts/{'a' * 32}/actions", json={"action": "acknowledge"},
                          headers={"X-CSRF-Token": csrf, "Origin": "https://evil.example"})
    assert r.status == 403 and sent == []


async def test_csrf_token_is_per_session(ctx, store):
    client, sent, _ = ctx
    csrf_nurse = await login(client, "nurse1")
    other = TestClient(client.server, cookie_jar=aiohttp.CookieJar(unsafe=True))  # a second browser
    try:
        csrf_doc = await login(other, "doc1")
        assert csrf_doc != csrf_nurse
        r = await other.post(f"/api/alerts/{'a' * 32}/actions", json={"action": "acknowledge"},
                             headers={"X-CSRF-Token": csrf_nurse})
        assert r.status == 403 and sent == []
    finally:
        await other.session.close()


async def test_nurse_cannot_reach_admin_actions(ctx):
    client, sent, _ = ctx
    csrf = await login(client, "nurse1")
    until = (datetime.now(timezone.utc) + timedelta(hours=4)).isoformat()
    r = await client.post(f"/api/alerts/{'b' * 32}/actions", json={"action": "silence", "until": until, "reason": "x"},
                          headers={"X-CSRF-Token": csrf})
    assert r.status == 403
    r = await client.post(f"/api/alerts/{'a' * 32}/actions", json={"action": "resolve", "reason": "fine"},
                          headers={"X-CSRF-Token": csrf})
    assert r.status == 403  # a high alert needs a physician
    assert (await client.get("/api/admin/status")).status == 403
    page = await (await client.get(f"/alerts/{'b' * 32}")).text()
    assert 'data-action="silence"' not in page
    assert sent == []


async def test_physician_resolves_and_admin_silences(ctx):
    client, sent, _ = ctx
    csrf = await login(client, "doc1")
    url = f"/api/alerts/{'a' * 32}/actions"
    assert (await client.post(url, json={"action": "resolve"}, headers={"X-CSRF-Token": csrf})).status == 400
    r = await client.post(url, json={"action": "resolve", "reason": "repeat ALT normal"}, headers={"X-CSRF-Token": csrf})
    assert r.status == 202 and sent[-1].role == Role.PHYSICIAN
    await client.post("/logout", headers={"X-CSRF-Token": csrf})
    assert (await client.get("/api/alerts")).status == 401  # session destroyed
    csrf = await login(client, "admin1")
    until = (datetime.now(timezone.utc) + timedelta(hours=4)).isoformat()
    r = await client.post(f"/api/alerts/{'b' * 32}/actions", json={"action": "silence", "until": until,
                                                                    "reason": "known, being handled"},
                          headers={"X-CSRF-Token": csrf})
    assert r.status == 202 and sent[-1].until is not None
    r = await client.post(f"/api/alerts/{'c' * 32}/actions", json={"action": "silence", "until": until, "reason": "x"},
                          headers={"X-CSRF-Token": csrf})
    assert r.status == 409  # critical alerts cannot be silenced
    assert (await client.get("/api/admin/status")).status == 200


async def test_sse_stream_delivers_new_alert(ctx):
    client, _, store = ctx
    await login(client, "nurse1")
    r = await client.get("/api/stream")
    assert r.status == 200 and r.headers["Content-Type"].startswith("text/event-stream")
    first = await r.content.readuntil(b"\n\n")
    assert b"event: hello" in first
    store.apply_alert(_alert("d" * 32, "MRN-0003", "critical"))
    msg = await r.content.readuntil(b"\n\n")
    assert b"event: alert" in msg and b"d" * 32 in msg and b"MRN-0003" not in msg
    r.close()


async def test_security_headers(ctx):
    client, _, _ = ctx
    r = await client.get("/login")
    assert "default-src 'self'" in r.headers["Content-Security-Policy"]
    assert r.headers["X-Frame-Options"] == "DENY" and r.headers["Cache-Control"] == "no-store"


# --------------------------------------------------------------------------- issue 14: identity, ward scoping


async def test_registered_patient_shows_name_mrn_and_birth_date(ctx):
    from schemas.patients import PatientRecord

    client, _, store = ctx
    store.apply_patient(PatientRecord(patient_id="MRN-0001", display_name="Ada <Lovelace>", mrn="H-77",
                                      birth_date="2024-09-01", ward="W1", bed="3"))
    await login(client, "nurse1")
    data = await (await client.get("/api/alerts")).json()
    mine = [a for a in data["alerts"] if a["patient_ref"] == store.ref_of("MRN-0001")]
    assert mine and all(a["patient"]["display_name"] == "Ada <Lovelace>" and a["patient"]["mrn"] == "H-77"
                        and a["patient"]["birth_date"] == "2024-09-01" for a in mine)
    other = [a for a in data["alerts"] if a["patient_ref"] == store.ref_of("MRN-0002")]
    assert other[0]["patient"]["registered"] is False
    page = await (await client.get(f"/alerts/{'a' * 32}")).text()
    assert "Ada &lt;Lovelace&gt;" in page and "H-77" in page and "2024-09-01" in page and "<Lovelace>" not in page
    tl_page = await (await client.get(f"/patients/{store.ref_of('MRN-0001')}")).text()
    assert "Ada &lt;Lovelace&gt;" in tl_page and "H-77" in tl_page and "bed 3" in tl_page
    tl = await (await client.get(f"/api/patients/{store.ref_of('MRN-0001')}/timeline")).json()
    assert tl["patient"]["mrn"] == "H-77"


async def test_ward_scoping_lists_pages_timeline_and_actions(ctx):
    client, sent, store = ctx
    store.apply_alert(_alert("e" * 32, "MRN-0009", "high").model_copy(update={"ward": "W2"}))
    csrf = await login(client, "nurse2")  # W2 only
    data = await (await client.get("/api/alerts")).json()
    assert [a["alert_id"] for a in data["alerts"]] == ["e" * 32] and data["facets"]["wards"] == ["W2"]
    assert (await client.get(f"/alerts/{'a' * 32}")).status == 404  # W1: as if absent
    assert (await client.get(f"/api/alerts/{'a' * 32}")).status == 404
    assert (await client.get(f"/patients/{store.ref_of('MRN-0001')}")).status == 404
    assert (await client.get(f"/api/patients/{store.ref_of('MRN-0001')}/timeline")).status == 404
    r = await client.post(f"/api/alerts/{'a' * 32}/actions", json={"action": "acknowledge"},
                          headers={"X-CSRF-Token": csrf})
    assert r.status == 404 and sent == []
    r = await client.post(f"/api/alerts/{'e' * 32}/actions", json={"action": "acknowledge"},
                          headers={"X-CSRF-Token": csrf})
    assert r.status == 202 and sent[-1].alert_id == "e" * 32


async def test_no_wards_sees_nothing_admin_and_star_see_all(ctx):
    client, _, store = ctx
    await login(client, "nobody")
    assert (await (await client.get("/api/alerts")).json())["count"] == 0
    await client.post("/logout", headers={"X-CSRF-Token": (await (await client.get("/api/me")).json())["csrf_token"]})
    client.session.cookie_jar.clear()
    await login(client, "doc1")
    assert (await (await client.get("/api/alerts")).json())["count"] == 3


async def test_sse_skips_other_wards(ctx):
    client, _, store = ctx
    await login(client, "nurse2")
    r = await client.get("/api/stream")
    await r.content.readuntil(b"\n\n")
    store.apply_alert(_alert("f" * 32, "MRN-0005", "critical"))  # W1: not for nurse2
    store.apply_alert(_alert("g" * 32, "MRN-0006", "critical").model_copy(update={"ward": "W2"}))
    msg = await r.content.readuntil(b"\n\n")
    assert b"g" * 32 in msg and b"f" * 32 not in msg
    r.close()


async def test_census_and_handover_are_ward_scoped_and_show_identity(ctx, monkeypatch):
    from schemas.alert import HistoryEntry
    from schemas.patients import PatientRecord

    monkeypatch.setenv("INBOX_TIMEZONE", "Europe/Berlin")
    client, _, store = ctx
    store.apply_patient(PatientRecord(patient_id="MRN-0001", display_name="Ada Okafor", mrn="H-1",
                                      birth_date="2024-09-01", ward="W1"))
    store.apply_treatment(DoseEvent(type="dose", event_id="d2", patient_id="MRN-0002", product="onasemnogene-abeparvovec-iv",
                                    administered_at=NOW - timedelta(days=3), birth_date="2024-01-01", weight_kg=9,
                                    ward="W2", care_team="T2"))
    acked = _alert("a" * 32, "MRN-0001", "high", status="acknowledged", version=5)
    acked = acked.model_copy(update={"history": [HistoryEntry(at=datetime.now(timezone.utc) - timedelta(hours=1),
                                                              by="nurse1", action="acknowledged", role="nurse")]})
    store.apply_alert(acked)
    await login(client, "nurse1")
    census = await (await client.get("/census")).text()
    assert "Ada Okafor" in census and "H-1" in census and "1 monitored patient" in census
    assert "MRN-0002" not in census  # W2: not on nurse1's wards
    assert "+01:00" in census or "+02:00" in census  # site zone with its offset
    assert 'title="' in census and "UTC" in census  # UTC on hover
    hand = await (await client.get("/handover")).text()
    assert "Ada Okafor" in hand and "nurse1" in hand and "acknowledged" in hand
    assert (await client.get("/census", params={"ward": "W2"})).status == 200
    assert "Ada Okafor" not in await (await client.get("/census", params={"ward": "W2"})).text()


def test_silence_time_is_entered_in_the_site_zone(monkeypatch):
    from monitor.inbox.views import _parse_until

    monkeypatch.setenv("INBOX_TIMEZONE", "America/New_York")
    assert _parse_until("2026-01-15T09:00:00").isoformat() == "2026-01-15T09:00:00-05:00"
    assert _parse_until("2026-01-15T09:00:00Z").utcoffset() == timedelta(0)


def test_ward_visibility_is_the_one_ward_policy():
    """The inbox and the worker's actions API share this function (review M5)."""
    from monitor.inbox.auth import ward_visibility

    nurse = ward_visibility(Role.NURSE, ("W1", "W3"))
    assert nurse("W1") and nurse("W3") and not nurse("W2") and not nurse(None)
    assert not ward_visibility(Role.NURSE, ())("W1")  # no grant: nothing
    everyone = ward_visibility("physician", ("*",))
    assert everyone("W2") and everyone(None)
    admin = ward_visibility(Role.ADMIN, ())
    assert admin("anything") and admin(None)


# --------------------------------------------------------------------------- issue 14 item 7: metrics, readiness


def _samples(app, name: str) -> dict[tuple, float]:
    from monitor.inbox.metrics import METRICS_KEY

    return {tuple(sorted(s.labels.items())): s.value for m in app[METRICS_KEY].registry.collect()
            for s in m.samples if s.name == name}


async def test_inbox_metrics_count_routes_logins_actions_and_store_state(ctx):
    client, sent, store = ctx
    app = client.server.app
    r = await client.get("/login")
    token = re.search(r'name="csrf_token" value="([^"]+)"', await r.text()).group(1)
    r = await client.post("/login", data={"username": "nurse1", "password": "wrong-password", "csrf_token": token},
                          allow_redirects=False)
    assert r.status == 401
    csrf = await login(client, "nurse1")
    assert (await client.get("/alerts/" + "a" * 32)).status == 200
    assert (await client.get("/alerts/" + "d" * 32)).status == 404  # no such alert
    r = await client.post(f"/api/alerts/{'a' * 32}/actions", json={"action": "acknowledge"},
                          headers={"X-CSRF-Token": csrf})
    assert r.status == 202
    r = await client.post(f"/api/alerts/{'a' * 32}/actions", json={"action": "resolve", "reason": "x"},
                          headers={"X-CSRF-Token": csrf})
    assert r.status == 403
    logins = _samples(app, "monitor_inbox_logins_total")
    assert logins[(("outcome", "failed"),)] == 1 and logins[(("outcome", "succeeded"),)] == 1
    assert logins[(("outcome", "throttled"),)] == 0
    reqs = _samples(app, "monitor_inbox_http_requests_total")
    # the route TEMPLATE, never the alert id
    assert reqs[(("method", "GET"), ("route", "/alerts/{alert_id}"), ("status", "200"))] == 1
    assert reqs[(("method", "GET"), ("route", "/alerts/{alert_id}"), ("status", "404"))] == 1
    assert reqs[(("method", "POST"), ("route", "/login"), ("status", "401"))] == 1
    assert not any("a" * 32 in v for k in reqs for _, v in k)
    acts = _samples(app, "monitor_inbox_actions_total")
    assert acts[(("action", "acknowledge"), ("outcome", "sent"))] == 1
    assert acts[(("action", "resolve"), ("outcome", "refused"))] == 1
    open_ = _samples(app, "monitor_inbox_alerts_open")
    assert open_[(("severity", "critical"),)] == 1 and open_[(("severity", "high"),)] == 1
    assert _samples(app, "monitor_inbox_alerts_held")[()] == 3
    assert _samples(app, "monitor_inbox_sessions")[()] == 1
    text = app[__import__("monitor.inbox.metrics", fromlist=["METRICS_KEY"]).METRICS_KEY].exposition().decode()
    assert "MRN-0001" not in text and "nurse1" not in text and "W1" not in text
    # no metrics on the user-facing port
    assert (await client.get("/metrics", allow_redirects=False)).status in (302, 404)


async def test_readyz_waits_for_the_store_to_catch_up(store):
    from monitor.inbox.views import STATUS_KEY

    app = await create_inbox_app(Settings(), users=UserDirectory([]), store=store, publish=None, secret=SECRET,
                                 start_kafka=False)
    client = TestClient(TestServer(app))
    await client.start_server()
    try:
        app[STATUS_KEY]["caught_up"] = False
        r = await client.get("/readyz")
        assert r.status == 503 and (await r.json())["ready"] is False
        assert (await client.get("/healthz")).status == 200  # alive all the same
        app[STATUS_KEY]["caught_up"] = True
        assert (await client.get("/readyz")).status == 200
    finally:
        await client.close()


async def test_transfer_scopes_and_shows_by_the_adt_ward_with_the_dose_ward_beside(ctx):
    """Issue 14 item 4: the patient's ADT record (patients topic) says W2 while the dose and the
    alert say W1: the alert belongs to W2's nurses now, shown with "dose ward W1"."""
    from schemas.patients import PatientRecord

    client, sent, store = ctx
    store.apply_patient(PatientRecord(patient_id="MRN-0001", display_name="Ada Okafor", mrn="H-1",
                                      birth_date="2024-09-01", ward="W2", bed="7"))
    csrf = await login(client, "nurse2")  # W2 only
    data = await (await client.get("/api/alerts")).json()
    moved = {a["alert_id"]: a for a in data["alerts"]}
    assert set(moved) == {"a" * 32, "b" * 32}  # MRN-0001's alerts; MRN-0002 (no ADT record) stays on W1
    assert all(a["ward"] == "W2" and a["dose_ward"] == "W1" for a in moved.values())
    page = await (await client.get(f"/alerts/{'a' * 32}")).text()
    assert "W2 / T1" in page and "(dose ward W1)" in page
    tl = await (await client.get(f"/patients/{store.ref_of('MRN-0001')}")).text()
    assert "W2 / T1" in tl and "(dose ward W1)" in tl
    r = await client.post(f"/api/alerts/{'a' * 32}/actions", json={"action": "acknowledge"},
                          headers={"X-CSRF-Token": csrf})
    assert r.status == 202 and sent[-1].alert_id == "a" * 32
    await client.post("/logout", headers={"X-CSRF-Token": csrf})
    client.session.cookie_jar.clear()
    await login(client, "nurse1")  # W1: the patient has left
    data = await (await client.get("/api/alerts")).json()
    assert [a["alert_id"] for a in data["alerts"]] == ["c" * 32] and data["alerts"][0]["dose_ward"] is None
    assert (await client.get(f"/alerts/{'a' * 32}")).status == 404


def test_store_freshness_is_the_least_recently_fetched_partition():
    """``last_fetch_at`` (metric monitor_inbox_last_fetch_timestamp_seconds, rule InboxStoreStale)
    is the oldest partition's last fetch answer; a partition never fetched leaves it unset."""
    from monitor.inbox.app import KafkaBridge

    class Consumer:  # aiokafka's public assignment() / last_poll_timestamp(tp), nothing else
        def __init__(self, stamps):
            self.stamps = stamps

        def assignment(self):
            return set(self.stamps)

        def last_poll_timestamp(self, tp):
            return self.stamps[tp]

    status: dict = {}
    bridge = KafkaBridge(Settings(), InboxStore(SECRET), status)
    bridge.consumer = Consumer({("alerts", 0): None, ("alerts", 1): 5_000})
    bridge._note_fetch()
    assert "last_fetch_at" not in status
    bridge.consumer = Consumer({("alerts", 0): 9_000, ("alerts", 1): 5_000, ("patients", 0): 7_000})
    bridge._note_fetch()
    assert status["last_fetch_at"] == 5.0
