"""The actions API on the worker's web server, through a real worker and the real broker.

A dose and ALT results open a critical ``liver.alt_increased`` alert; then, over HTTP Basic
against a users file hashed with the inbox's helpers: anonymous and wrong-password requests
get 401, a nurse cannot silence or resolve the critical alert (403, nothing published), a nurse's
acknowledgement (with a forged ``role``/``by`` in the body) is applied as that nurse, and a
physician's resolution with a reason resolves it; all seen on the ``alerts`` topic. Ward
scoping (review M5, the inbox's ward policy): a nurse of another ward gets 403 on the alert
(read and act), nothing is published, and the refusal is logged without the patient id.
"""
from __future__ import annotations

import base64
import json
import urllib.error
import urllib.request
import uuid
from datetime import datetime, timedelta, timezone
from pathlib import Path

import pytest
from kafka import KafkaProducer
from kafka_broker import JsonTopicReader

from monitor.inbox.auth import hash_password
from workers import raw_alt, raw_dose, service_env

pytestmark = [pytest.mark.integration, pytest.mark.timeout(300)]

PW = {"nurse1": "nurse-pass-api", "doc1": "doctor-pass-api", "admin1": "admin-pass-api", "nurse2": "nurse2-pass-api",
      "nurse3": "nurse3-pass-api"}
ROLES = {"nurse1": "nurse", "doc1": "physician", "admin1": "admin", "nurse2": "nurse", "nurse3": "nurse"}
#: the dose (tests/workers.raw_dose) puts the patient on ward-a; nurse3 works on ward-b only,
#: the physician is granted every ward ("*"), the admin needs no grant
WARDS = {"nurse1": ["ward-a"], "doc1": ["*"], "admin1": [], "nurse2": ["ward-a"], "nurse3": ["ward-b"]}


ALL = ("lab-results", "vital-signs", "liver-function", "treatments", "observations", "dead-letter",
       "findings", "alerts", "alert-actions", "patient-ticks", "alert-deliveries")


def dose(pid: str, at: datetime) -> dict:
    return raw_dose(pid, at)


def alt(pid: str, eid: str, value: float, at: datetime) -> dict:
    return raw_alt(pid, eid, value, at, source="lab-x")


def send(bootstrap: str, records) -> None:
    p = KafkaProducer(bootstrap_servers=bootstrap, acks="all")
    try:
        for topic, key, value in records:
            p.send(topic, key=key.encode(), value=json.dumps(value).encode())
        p.flush()
    finally:
        p.close()


#: every version on the ``alerts`` topic, read from the beginning without a consumer group
AlertReader = JsonTopicReader


def users_file(tmp_path: Path) -> Path:
    users = [{"username": u, "role": ROLES[u], "wards": WARDS[u], "password_hash": hash_password(pw, n=2**14)}
             for u, pw in PW.items()]
    path = tmp_path / "users.json"
    path.write_text(json.dumps({"users": users}))
    return path


def call(base: str, method: str, path: str, body=None, user: str | None = None, password: str | None = None,
         headers: dict | None = None, raw: bytes | None = None) -> tuple[int, dict, dict]:
    h = {"Accept": "application/json", **(headers or {})}
    data = raw
    if body is not None:
        data = json.dumps(body).encode()
        h.setdefault("Content-Type", "application/json")
    if user is not None:
        token = base64.b64encode(f"{user}:{password if password is not None else PW[user]}".encode()).decode()
        h["Authorization"] = f"Basic {token}"
    req = urllib.request.Request(base + path, data=data, method=method, headers=h)
    try:
        with urllib.request.urlopen(req, timeout=20) as r:
            return r.status, dict(r.headers), json.loads(r.read() or b"{}")
    except urllib.error.HTTPError as e:
        payload = e.read()
        try:
            parsed = json.loads(payload or b"{}")
        except ValueError:
            parsed = {"raw": payload.decode(errors="replace")}
        return e.code, dict(e.headers), parsed


def read_actions(bootstrap: str, topic: str) -> list:
    """Every action on ``topic``, read to its end offsets. The API answers 202 only once the
    broker has the action, and publishes nothing for a refused one, so after its answers
    the topic holds all it will ever get from them."""
    from kafka_broker import read_topic

    return read_topic(bootstrap, topic)


def open_critical_alert(bootstrap: str, topics: dict[str, str], patient: str, reader: AlertReader) -> dict:
    now = datetime.now(timezone.utc)
    d0 = now - timedelta(days=20)
    send(bootstrap, [(topics["treatments"], patient, dose(patient, d0)),
                     (topics["lab-results"], patient, alt(patient, f"{patient}-alt1", 30, d0 - timedelta(days=1))),
                     (topics["lab-results"], patient, alt(patient, f"{patient}-alt2", 1000, now - timedelta(hours=1)))])
    return reader.wait_for(lambda a: a["patient_id"] == patient and a["rule_id"] == "liver.alt_increased"
                           and a["severity"] == "critical" and a["status"] == "firing")[-1]


def test_actions_api_roles_and_acknowledgement_through_the_broker(kafka_bootstrap, topic_factory, worker_factory,
                                                                  tmp_path):
    prefix = f"api{uuid.uuid4().hex[:8]}"
    topics = topic_factory(*ALL, prefix=prefix)
    # a long tick interval: no escalation versions interleave with the ones the test checks
    w = worker_factory(service_env(topics, app_id=prefix, INBOX_USERS_FILE=str(users_file(tmp_path)),
                                   TICK_INTERVAL_SECONDS="600"))
    base = w.url
    patient = f"pat-api-{uuid.uuid4().hex[:6]}"
    reader = AlertReader(kafka_bootstrap, topics["alerts"])
    try:
        alert = open_critical_alert(kafka_bootstrap, topics, patient, reader)
        aid = alert["alert_id"]
        actions = f"/api/alerts/{aid}/actions"
        ack = {"action": "acknowledge"}

        # --- unauthenticated, wrong password, unknown user: 401 with a Basic challenge
        for status, headers, _ in (call(base, "POST", actions, ack),
                                   call(base, "GET", f"/api/alerts/{aid}"),
                                   call(base, "POST", actions, ack, user="nurse1", password="wrong-password"),
                                   call(base, "POST", actions, ack, user="nobody", password="whatever-pass"),
                                   call(base, "POST", actions, ack, headers={"Authorization": "Basic !!!"})):
            assert status == 401
            assert headers.get("WWW-Authenticate", "").startswith("Basic realm=")
        # the worker's own health pages stay public
        assert w.get("/healthz")[0] == 200

        # --- GET: the alert this worker holds, with the caller's allowed actions
        status, _, got = call(base, "GET", f"/api/alerts/{aid}", user="nurse1")
        assert status == 200 and got["alert_id"] == aid and got["status"] == "firing"
        assert "patient_id" not in got  # review L6 (observation ids in evidence are the sender's, here made from it)
        assert "silence" not in got["allowed_actions"] and "resolve" not in got["allowed_actions"]
        assert call(base, "GET", "/api/alerts/" + "0" * 32, user="nurse1")[0] == 404

        # --- invalid bodies: 400 (415 when not JSON)
        assert call(base, "POST", actions, raw=b"{not json", user="nurse1",
                    headers={"Content-Type": "application/json"})[0] == 400
        assert call(base, "POST", actions, ["acknowledge"], user="nurse1")[0] == 400
        assert call(base, "POST", actions, {"action": "approve"}, user="nurse1")[0] == 400
        assert call(base, "POST", actions, raw=b"action=acknowledge", user="nurse1",
                    headers={"Content-Type": "application/x-www-form-urlencoded"})[0] == 415
        status, _, err = call(base, "POST", "/api/alerts/" + "f" * 32 + "/actions", ack, user="nurse1")
        assert status == 400 and "patient_id" in err["error"]
        assert call(base, "POST", actions, {"action": "acknowledge", "patient_id": "someone-else"},
                    user="nurse1")[0] == 400
        assert call(base, "POST", actions, {"action": "note"}, user="nurse1")[0] == 400  # a note needs text

        # --- wrong role: 403, also with a forged role in the body; nothing published
        until = (datetime.now(timezone.utc) + timedelta(hours=2)).isoformat()
        status, _, err = call(base, "POST", actions, {"action": "silence", "until": until, "reason": "night"},
                              user="nurse1")
        assert status == 403, err
        status, _, err = call(base, "POST", actions, {"action": "resolve", "reason": "looks fine"}, user="nurse1")
        assert status == 403 and "critical" in err["error"], err
        status, _, err = call(base, "POST", actions, {"action": "resolve", "reason": "x", "role": "physician"},
                              user="nurse1")
        assert status == 403, err
        # an admin may silence, but never a critical alert
        assert call(base, "POST", actions, {"action": "silence", "until": until, "reason": "night"},
                    user="admin1")[0] == 409
        # --- another ward's nurse: 403 on the alert, to read or to act (review M5)
        status, _, err = call(base, "GET", f"/api/alerts/{aid}", user="nurse3")
        assert status == 403 and "ward" in err["error"], err
        status, _, err = call(base, "POST", actions, ack, user="nurse3")
        assert status == 403 and "not on your wards" in err["error"], err
        status, _, err = call(base, "POST", actions, {"action": "note", "reason": "x", "patient_id": patient},
                              user="nurse3")
        assert status == 403, err
        # an alert this worker does not hold has no known ward: a ward-scoped nurse cannot act on it
        status, _, err = call(base, "POST", "/api/alerts/" + "f" * 32 + "/actions",
                              {"action": "acknowledge", "patient_id": patient}, user="nurse1")
        assert status == 403 and "ward" in err["error"], err
        assert read_actions(kafka_bootstrap, topics["alert-actions"]) == [], "a refused action was published"

        # --- nurse acknowledges (body forges role and by: ignored) -> 202, then the alerts topic shows it
        status, _, accepted = call(base, "POST", actions,
                                   {"action": "acknowledge", "role": "admin", "by": "mallory",
                                    "reason": "seen, calling the doctor"}, user="nurse1")
        assert status == 202, accepted
        assert accepted["action_id"] and accepted["by"] == "nurse1" and accepted["role"] == "nurse"
        acked = reader.wait_for(lambda a: a["alert_id"] == aid and a["status"] == "acknowledged", timeout=30)[0]
        entry = [h for h in acked["history"] if h["action"] == "acknowledged"][-1]
        assert entry["by"] == "nurse1" and entry["role"] == "nurse"
        assert not any(h["by"] == "mallory" for h in acked["history"])
        published = read_actions(kafka_bootstrap, topics["alert-actions"])
        assert len(published) == 1
        msg = json.loads(published[0].value)
        assert published[0].key == patient.encode()
        assert msg["by"] == "nurse1" and msg["role"] == "nurse" and msg["action_id"] == accepted["action_id"]
        assert msg["patient_id"] == patient
        status, _, got = call(base, "GET", f"/api/alerts/{aid}", user="doc1")
        assert status == 200 and got["status"] == "acknowledged" and "resolve" in got["allowed_actions"]

        # --- physician resolves with a reason (patient_id from the worker's table) -> resolved
        assert call(base, "POST", actions, {"action": "resolve"}, user="doc1")[0] == 400  # reason required
        status, _, accepted = call(base, "POST", actions,
                                   {"action": "resolve", "reason": "reviewed: lab artefact, repeat normal",
                                    "role": "nurse"}, user="doc1")
        assert status == 202, accepted
        resolved = reader.wait_for(lambda a: a["alert_id"] == aid and a["status"] == "resolved", timeout=30)[0]
        entry = [h for h in resolved["history"] if h["action"] == "resolved"][-1]
        assert entry["by"] == "doc1" and entry["role"] == "physician"
        assert "lab artefact" in (entry["note"] or "")
        # now closed: further actions other than notes conflict
        assert call(base, "POST", actions, ack, user="nurse1")[0] == 409
        assert call(base, "POST", actions, {"action": "note", "reason": "family informed"}, user="nurse1")[0] == 202
        noted = reader.wait_for(lambda a: a["alert_id"] == aid and any(
            h["action"] == "note" and h["by"] == "nurse1" for h in a["history"]), timeout=30)
        assert noted[-1]["status"] == "resolved"
        assert len(read_actions(kafka_bootstrap, topics["alert-actions"])) == 3

        # --- throttling: repeated failures lock the user name at this address out (429), even
        # with the right password afterwards; other users from elsewhere are unaffected
        for _ in range(5):
            assert call(base, "GET", f"/api/alerts/{aid}", user="nurse2", password="guess-guess")[0] == 401
        status, headers, _ = call(base, "GET", f"/api/alerts/{aid}", user="nurse2")
        assert status == 429 and int(headers["Retry-After"]) > 0
    finally:
        reader.close()
    log = w.log_path.read_text(errors="replace")
    for secret in list(PW.values()) + ["guess-guess", "wrong-password"]:
        assert secret not in log
    assert patient not in log, "patient id logged by the worker"
    assert "acknowledge refused: ward 'ward-a' is not among the user's wards, user nurse3" in log, log[-3000:]
    assert aid not in log, "alert id logged at INFO (review L6)"


def test_actions_api_disabled_without_users(kafka_bootstrap, topic_factory, worker_factory):
    prefix = f"apioff{uuid.uuid4().hex[:6]}"
    topics = topic_factory(*ALL, prefix=prefix)
    w = worker_factory(service_env(topics, app_id=prefix, INBOX_USERS_FILE="", TICK_INTERVAL_SECONDS="600"))
    token = base64.b64encode(b"nurse1:nurse-pass-api").decode()
    for method, path, body in (("POST", "/api/alerts/abc/actions", {"action": "acknowledge", "patient_id": "p"}),
                               ("GET", "/api/alerts/abc", None)):
        status, _, err = call(w.url, method, path, body, headers={"Authorization": f"Basic {token}"})
        assert status == 503 and err["error"] == "actions API disabled: no users configured"
    assert read_actions(kafka_bootstrap, topics["alert-actions"]) == []
