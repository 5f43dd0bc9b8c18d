"""Alert lifecycle through the real broker: acknowledgement stops escalation; a worker
restart mid-stream pages nothing twice; a webhook that is down receives everything after."""
from __future__ import annotations

import json
import time
import uuid
from collections import Counter
from datetime import datetime, timedelta, timezone
from pathlib import Path

import pytest
import yaml
from kafka import KafkaConsumer, KafkaProducer
from kafka_broker import JsonTopicReader

from receivers import WebhookReceiver
from reliability.harness import LedgerReader, ledger_key
from workers import TEST_WEBHOOK_SECRET, service_env

pytestmark = pytest.mark.integration

ROOT = Path(__file__).resolve().parents[2]
ALL = ("lab-results", "vital-signs", "liver-function", "treatments", "observations", "dead-letter",
       "findings", "alerts", "alert-actions", "patient-ticks", "alert-deliveries")


def fast_protocol(tmp_path: Path) -> str:
    """The shipped IV protocol with escalation timeouts of a few seconds (test clock)."""
    doc = yaml.safe_load((ROOT / "alerts/protocols/onasemnogene-abeparvovec-iv.yaml").read_text())
    for route in doc["routes"]:
        for tier in route["tiers"]:
            tier["escalate_after_minutes"] = {"info": None, "warning": 0.05, "high": 0.05, "critical": 0.05}
    path = tmp_path / "fast-iv.yaml"
    path.write_text(yaml.safe_dump(doc, sort_keys=False))
    return str(path)


def dose(pid, at):
    return {"type": "dose", "event_id": f"dose-{pid}", "patient_id": pid, "product": "onasemnogene-abeparvovec-iv",
            "administered_at": at.isoformat(), "birth_date": (at - timedelta(days=200)).date().isoformat(),
            "weight_kg": 7.5, "ward": "ward-a", "care_team": "team-a"}


def alt(pid, eid, value, at):
    return {"event_id": eid, "patient_id": pid, "loinc": "1742-6", "value": value, "unit": "U/L",
            "reference_range": {"low": 0, "high": 40}, "effective_at": at.isoformat(), "source": "lab-x",
            "status": "final"}


#: every version on the ``alerts`` topic, read from the beginning without a consumer group
AlertReader = JsonTopicReader


def send(bootstrap, records):
    p = KafkaProducer(bootstrap_servers=bootstrap, acks="all")
    for topic, key, value in records:
        p.send(topic, key=key.encode(), value=json.dumps(value).encode())
    p.flush()
    p.close()


def users_file(tmp_path: Path) -> str:
    """The user directory the worker resolves an action's role from (never the message's own role)."""
    path = tmp_path / "users.json"
    path.write_text(json.dumps({"users": [
        {"username": "nurse.jones", "role": "nurse", "password_hash": "scrypt$16384$8$1$AAAA$AAAA"}]}))
    return str(path)


def dead_letter_reasons(bootstrap, topic, want: int, timeout=60.0) -> list[tuple[str, dict]]:
    c = KafkaConsumer(topic, bootstrap_servers=bootstrap, auto_offset_reset="earliest",
                      enable_auto_commit=False, group_id=None, consumer_timeout_ms=300)
    got: list[tuple[str, dict]] = []
    deadline = time.monotonic() + timeout
    try:
        while len(got) < want and time.monotonic() < deadline:
            for m in c:
                got.append((dict(m.headers)["dlq.reason"].decode(), json.loads(m.value)))
    finally:
        c.close()
    return got


def test_acknowledgement_stops_escalation(kafka_bootstrap, topic_factory, worker_factory, tmp_path):
    """Also security review H4: actions forging ``admin`` (from a user the directory does not
    know, and from a nurse) cannot resolve a critical alert and are dead-lettered with their
    reason; the nurse's acknowledgement without any role field is applied as a nurse."""
    prefix = f"ack{uuid.uuid4().hex[:8]}"
    topics = topic_factory(*ALL, prefix=prefix)
    with WebhookReceiver(secret=TEST_WEBHOOK_SECRET) as hook:
        worker_factory(service_env(topics, app_id=prefix, PROTOCOL_FILES=fast_protocol(tmp_path),
                                   INBOX_USERS_FILE=users_file(tmp_path),
                                   TICK_INTERVAL_SECONDS="1", WEBHOOK_URL=hook.url, WEBHOOK_SECRET=TEST_WEBHOOK_SECRET))
        now = datetime.now(timezone.utc)
        d0 = now - timedelta(days=20)
        recs = []
        for pid in ("pat-acked", "pat-ignored"):
            recs.append((topics["treatments"], pid, dose(pid, d0)))
            recs.append((topics["lab-results"], pid, alt(pid, f"{pid}-alt1", 30, d0 - timedelta(days=1))))
            recs.append((topics["lab-results"], pid, alt(pid, f"{pid}-alt2", 1000, now - timedelta(hours=1))))
        send(kafka_bootstrap, recs)
        reader = AlertReader(kafka_bootstrap, topics["alerts"])
        try:
            firing = {a["patient_id"]: a for a in reader.wait_for(
                lambda a: a["rule_id"] == "liver.alt_increased" and a["severity"] == "critical" and a["status"] == "firing")}
            assert set(firing) >= {"pat-acked", "pat-ignored"}
            acked = firing["pat-acked"]
            ignored = firing["pat-ignored"]
            forged = {"action": "resolve", "alert_id": ignored["alert_id"], "patient_id": "pat-ignored",
                      "role": "admin", "reason": "forged", "at": datetime.now(timezone.utc).isoformat()}
            send(kafka_bootstrap, [(topics["alert-actions"], "pat-ignored", {**forged, "by": "mallory"}),
                                   (topics["alert-actions"], "pat-ignored", {**forged, "by": "nurse.jones"})])
            dead = dead_letter_reasons(kafka_bootstrap, topics["dead-letter"], want=2)
            assert sorted((r, v["by"]) for r, v in dead) == [("action_forbidden", "nurse.jones"),
                                                            ("action_unknown_user", "mallory")], dead
            send(kafka_bootstrap, [(topics["alert-actions"], "pat-acked", {
                "action": "acknowledge", "alert_id": acked["alert_id"], "patient_id": "pat-acked",
                "by": "nurse.jones", "at": datetime.now(timezone.utc).isoformat()})])  # no role field
            ack = reader.wait_for(lambda a: a["alert_id"] == acked["alert_id"] and a["status"] == "acknowledged")[0]
            assert any(h.get("by") == "nurse.jones" and h.get("role") == "nurse" for h in ack["history"])
            # the ignored alert climbs the whole route (two tiers of 3 s each, then the failsafe);
            # the acknowledged one, opened in the same batch, stays at its tier: once the
            # ignored one is at the failsafe, both of the acknowledged one's escalation deadlines
            # have passed too, and one more second and a half covers a tick (every 1 s) of
            # its partition
            reader.wait_for(lambda a: a["patient_id"] == "pat-ignored" and a.get("escalation_tier", 0) >= 2, timeout=45)
            time.sleep(1.5)
            reader.poll()
            acked_versions = [a for a in reader.versions if a["alert_id"] == acked["alert_id"]]
            after_ack = [a for a in acked_versions if a["version"] > ack["version"]]
            assert all(a.get("escalation_tier", 0) == ack.get("escalation_tier", 0) for a in after_ack)
            assert ack["status"] == "acknowledged"
            # the forged resolves changed nothing: the critical alert was never resolved
            assert not any(a["alert_id"] == ignored["alert_id"] and a["status"] == "resolved" for a in reader.versions)
        finally:
            reader.close()
        # the webhook saw pages, each version once, signed, without the patient id
        keys = hook.keys()
        assert keys and len(keys) == len(set(keys))
        assert all(r["signature_ok"] for r in hook.received)
        assert not any(b"pat-acked" in r["raw"] or b"pat-ignored" in r["raw"] for r in hook.received)


def test_restart_mid_stream_pages_nothing_twice_and_down_webhook_gets_everything(
        kafka_bootstrap, topic_factory, worker_factory, tmp_path):
    prefix = f"rst{uuid.uuid4().hex[:8]}"
    topics = topic_factory(*ALL, prefix=prefix)
    now = datetime.now(timezone.utc)
    d0 = now - timedelta(days=25)
    patients = [f"pat-{i:02d}" for i in range(12)]

    def batch(values):
        recs = []
        for i, pid in enumerate(patients):
            for j, v in enumerate(values):
                recs.append((topics["lab-results"], pid, alt(pid, f"{pid}-{v}-{j}", v + i, now - timedelta(hours=len(values) - j))))
        return recs

    with WebhookReceiver(secret=TEST_WEBHOOK_SECRET, fail_first=8) as hook:
        # session timeout 6 s (the broker's group.min.session.timeout.ms, not the 10 s default):
        # the restarted worker gets the SIGKILLed one's partitions 4 s sooner
        env = service_env(topics, app_id=prefix, WEBHOOK_URL=hook.url, WEBHOOK_SECRET=TEST_WEBHOOK_SECRET,
                          TICK_INTERVAL_SECONDS="2", KAFKA_SESSION_TIMEOUT_SECONDS="6")
        w1 = worker_factory(env, name="w1")
        send(kafka_bootstrap, [(topics["treatments"], pid, dose(pid, d0)) for pid in patients]
             + [(topics["lab-results"], pid, alt(pid, f"{pid}-base", 30, d0 - timedelta(days=1))) for pid in patients])
        send(kafka_bootstrap, batch([130, 250]))  # grade 2 then grade 3: pages
        reader = AlertReader(kafka_bootstrap, topics["alerts"])
        try:
            ledger = LedgerReader(kafka_bootstrap, topics["alert-deliveries"])
            reader.wait_for(lambda a: a["severity"] == "high", timeout=60)
            w1.kill()  # crash mid-stream, with deliveries possibly in flight
            killed_at = time.time()
            on_ledger = ledger.snapshot()  # what w2 loads: nothing is written until it starts
            ledger.close()
            send(kafka_bootstrap, batch([900, 70]))  # grade 4 then a fall: more versions while it is down
            worker_factory(env, name="w2")
            deadline = time.monotonic() + 90
            while time.monotonic() < deadline:
                reader.poll()
                latest = {}
                for a in reader.versions:
                    if a["version"] >= latest.get(a["alert_id"], {}).get("version", 0):
                        latest[a["alert_id"]] = a
                delivered = set(hook.keys())
                # every version that pages must reach the webhook
                must = {f"{a['alert_id']}:{a['version']}" for a in reader.versions
                        if a.get("notify") or (a.get("previous_status") and a["previous_status"] != a["status"])}
                if must and must <= delivered and len(latest) >= len(patients):
                    break
                time.sleep(0.25)
            keys = hook.keys()
            dupes = [k for k, n in Counter(keys).items() if n > 1]
            # HTTP delivery after a SIGKILL is at least once: a version whose request was in
            # flight when the worker died (answered, but its ledger record not yet on the
            # broker) may be sent again by the next worker, with the same Idempotency-Key.
            # Anything else delivered twice (first sent after the kill, or on the ledger w2
            # loaded) is a bug.
            with hook.lock:
                first_at = {}
                for r in hook.received:
                    first_at.setdefault(r["key"], r["at"])
            unexplained = [k for k in dupes if first_at[k] > killed_at or ledger_key(k) in on_ledger]
            assert not unexplained, f"pages delivered twice, not in flight at the crash: {unexplained}"
            assert len(dupes) <= 8, f"more repeats than requests that can be in flight: {dupes}"
            assert must <= set(keys), f"missing deliveries: {sorted(must - set(keys))[:5]}"
            assert hook.attempts > len(keys), "the webhook was down at first, so some attempts failed"
        finally:
            reader.close()


def test_graceful_restart_mid_stream_pages_nothing_twice(kafka_bootstrap, topic_factory, worker_factory):
    prefix = f"grs{uuid.uuid4().hex[:8]}"
    topics = topic_factory(*ALL, prefix=prefix)
    now = datetime.now(timezone.utc)
    d0 = now - timedelta(days=25)
    patients = [f"gp-{i:02d}" for i in range(12)]
    with WebhookReceiver(secret=TEST_WEBHOOK_SECRET) as hook:
        env = service_env(topics, app_id=prefix, WEBHOOK_URL=hook.url, WEBHOOK_SECRET=TEST_WEBHOOK_SECRET, TICK_INTERVAL_SECONDS="2")
        w1 = worker_factory(env, name="w1")
        send(kafka_bootstrap, [(topics["treatments"], pid, dose(pid, d0)) for pid in patients]
             + [(topics["lab-results"], pid, alt(pid, f"{pid}-base", 30, d0 - timedelta(days=1))) for pid in patients]
             + [(topics["lab-results"], pid, alt(pid, f"{pid}-a", 130 + i, now - timedelta(hours=2)))
                for i, pid in enumerate(patients)])
        reader = AlertReader(kafka_bootstrap, topics["alerts"])
        try:
            reader.wait_for(lambda a: a["severity"] == "warning", timeout=60)
            w1.stop()  # SIGTERM: a restart, not a crash
            send(kafka_bootstrap, [(topics["lab-results"], pid, alt(pid, f"{pid}-b", 900 + i, now - timedelta(hours=1)))
                                   for i, pid in enumerate(patients)])
            worker_factory(env, name="w2")
            deadline = time.monotonic() + 90
            while time.monotonic() < deadline:
                reader.poll()
                must = {f"{a['alert_id']}:{a['version']}" for a in reader.versions
                        if a.get("notify") or (a.get("previous_status") and a["previous_status"] != a["status"])}
                crit = {a["patient_id"] for a in reader.versions if a["severity"] == "critical"}
                if len(crit) >= len(patients) and must <= set(hook.keys()):
                    break
                time.sleep(0.25)
            keys = hook.keys()
            assert must <= set(keys), f"missing deliveries: {sorted(must - set(keys))[:5]}"
            dupes = [k for k, n in Counter(keys).items() if n > 1]
            assert not dupes, f"pages delivered twice across a graceful restart: {dupes}"
        finally:
            reader.close()


def test_outbox_partitions_handed_over_between_live_workers_page_nothing_twice(
        kafka_bootstrap, topic_factory, worker_factory):
    """A second worker joins while the first delivers to a slow webhook (deliveries in
    flight at every hand-over), then the first leaves (SIGTERM): two graceful hand-overs of
    the outbox partitions. Every paging version reaches the webhook, and none twice: the
    worker giving a partition up finishes what it has in flight and commits past it, the
    one taking it reads the delivery ledger to its end before delivering."""
    import threading

    from test_clinical_broker import _send_steadily

    prefix = f"hov{uuid.uuid4().hex[:8]}"
    topics = topic_factory(*ALL, prefix=prefix)
    now = datetime.now(timezone.utc)
    d0 = now - timedelta(days=25)
    patients = [f"hv-{i:02d}" for i in range(24)]
    stop_feed = threading.Event()
    sent = Counter()

    def round_of_results(i: int) -> list:
        # one ALT per patient, alternating CTCAE grade 2 and 3: each changes the patient's
        # alert, about half of them page (severity raised)
        n = i + 1
        sent.update(patients)
        return [(topics["lab-results"], pid, alt(pid, f"{pid}-r{n}", (250 if n % 2 else 130) + j,
                                                  now - timedelta(hours=1) + timedelta(seconds=n)))
                for j, pid in enumerate(patients)]

    with WebhookReceiver(secret=TEST_WEBHOOK_SECRET, delay=1.0) as hook:
        env = service_env(topics, app_id=prefix, WEBHOOK_URL=hook.url, WEBHOOK_SECRET=TEST_WEBHOOK_SECRET)
        w1 = worker_factory(env, name="w1")
        send(kafka_bootstrap, [(topics["treatments"], pid, dose(pid, d0)) for pid in patients]
             + [(topics["lab-results"], pid, alt(pid, f"{pid}-base", 30, d0 - timedelta(days=1))) for pid in patients])
        reader = AlertReader(kafka_bootstrap, topics["alerts"])
        feeder = threading.Thread(target=_send_steadily, daemon=True, args=(
            kafka_bootstrap, round_of_results, lambda i: stop_feed.is_set(), 1.0))  # a round every second
        feeder.start()
        try:
            reader.wait_for(lambda a: a["severity"] == "high", timeout=60)
            time.sleep(2)
            worker_factory(env, name="w2")  # joins: the outbox partitions are shared out
            time.sleep(3)
            w1.stop()  # leaves: w2 takes them all
            time.sleep(2)
        finally:
            stop_feed.set()
            feeder.join(10)
        try:
            deadline = time.monotonic() + 90
            must: set = set()
            while time.monotonic() < deadline:
                reader.poll()
                must = {f"{a['alert_id']}:{a['version']}" for a in reader.versions
                        if a.get("notify") or (a.get("previous_status") and a["previous_status"] != a["status"])}
                if must and must <= set(hook.keys()):
                    break
                time.sleep(0.25)
            keys = hook.keys()
            print(f"\n{sum(sent.values())} results sent, {len(reader.versions)} alert versions, "
                  f"{len(must)} paging, {len(keys)} deliveries")
            assert len(must) >= 40, "too few pages to test the hand-overs"
            assert must <= set(keys), f"missing deliveries: {sorted(must - set(keys))[:5]}"
            dupes = [k for k, n in Counter(keys).items() if n > 1]
            assert not dupes, f"pages delivered twice across graceful hand-overs: {dupes}"
        finally:
            reader.close()
