"""``make demo``: a simulated cohort through the real service, then a summary against ground truth.

1. creates the topics on the local broker (``make kafka`` started it);
2. starts ``monitor worker`` and the nurse inbox (``monitor inbox``) in the background;
3. generates a seeded post-dose cohort (IV and IT, JSON, FHIR and HL7 mixed) with its
   ground truth, and publishes it;
4. waits until the worker has consumed everything, reads the ``alerts`` topic and prints
   alerts by rule and severity against the ground truth (a missed critical alert fails
   the demo), plus dead letters and the inbox address.

The worker and the inbox keep running so you can look around; ``make demo-stop`` stops
them (``make kafka-stop`` stops the broker).
"""
from __future__ import annotations

import argparse
import collections
import json
import os
import secrets
import signal
import subprocess
import sys
import time
import urllib.request
import uuid
from datetime import datetime, timedelta, timezone
from pathlib import Path

from kafka import KafkaConsumer, TopicPartition
from kafka.admin import KafkaAdminClient

from .kafka_config import kafka_python_config
from .settings import get_settings
from .simulate import SEV_RANK, compare, generate_cohort, records
from .topics_admin import ensure_topics, topic_partitions

ROOT = Path(__file__).resolve().parent.parent
STATE = ROOT / ".demo"
DEMO_USERS = {"nurse": "nurse", "physician": "physician", "admin": "admin"}


def _write_users(path: Path) -> dict[str, str]:
    from .inbox.auth import hash_password

    creds = {}
    users = []
    for role in DEMO_USERS:
        password = f"{role}-{secrets.token_hex(3)}"
        creds[role] = password
        # ward scoping (review M5): the demo nurse sees the simulator's two wards, the physician all
        wards = ["*"] if role != "nurse" else ["paediatric-neurology", "adult-neurology"]
        users.append({"username": role, "role": role, "display_name": f"Demo {role}",
                      "password_hash": hash_password(password), "wards": wards})
    path.write_text(json.dumps({"users": users}, indent=2))
    path.chmod(0o600)
    return creds


def _stop_previous() -> None:
    for pidfile in STATE.glob("*.pid"):
        try:
            os.killpg(int(pidfile.read_text()), signal.SIGTERM)
        except (ValueError, ProcessLookupError, PermissionError):
            pass
        pidfile.unlink(missing_ok=True)


def _spawn(name: str, argv: list[str], env: dict[str, str]) -> subprocess.Popen:
    log = open(STATE / f"{name}.log", "ab")
    proc = subprocess.Popen(argv, cwd=ROOT, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    (STATE / f"{name}.pid").write_text(str(proc.pid))
    return proc


def _wait_http(url: str, proc: subprocess.Popen, name: str, timeout: float = 120) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise SystemExit(f"demo: {name} exited with {proc.returncode}; see {STATE / (name + '.log')}")
        try:
            with urllib.request.urlopen(url, timeout=2) as r:
                if r.status == 200:
                    return
        except OSError:
            pass
        time.sleep(0.5)
    raise SystemExit(f"demo: {name} not ready at {url}")


def _group_lag(admin: KafkaAdminClient, consumer: KafkaConsumer, group: str, topics: list[str]) -> int:
    offsets = admin.list_group_offsets(group).get(group, {})
    parts = [TopicPartition(t, p) for t in topics for p in sorted(topic_partitions(consumer, t))]
    ends = consumer.end_offsets(parts)
    lag = 0
    for tp in parts:
        committed = offsets.get(tp)
        lag += ends[tp] - (committed.offset if committed is not None and committed.offset >= 0 else 0)
    return lag


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="monitor demo")
    ap.add_argument("--patients", type=int, default=40)
    ap.add_argument("--days", type=int, default=90)
    ap.add_argument("--seed", type=int, default=2026)
    ap.add_argument("--format", default="mixed", choices=["json", "fhir", "hl7", "mixed"])
    args = ap.parse_args(argv)

    s = get_settings()
    STATE.mkdir(exist_ok=True)
    _stop_previous()
    ensure_topics(s)
    run = uuid.uuid4().hex[:4]
    creds = _write_users(STATE / "users.json")
    inbox_port = int(os.environ.get("INBOX_PORT", "6067"))
    env = {**os.environ, "KAFKA_BOOTSTRAP_SERVERS": s.kafka_bootstrap_servers, "TICK_INTERVAL_SECONDS": "5",
           "INBOX_USERS_FILE": str(STATE / "users.json"), "INBOX_PORT": str(inbox_port),
           # the demo generates its own secrets (the services refuse to start without them)
           "INBOX_SECRET": secrets.token_hex(32), "PSEUDONYM_SECRET": secrets.token_hex(32)}
    if env.get("WEBHOOK_URL") and not env.get("WEBHOOK_SECRET"):
        env["WEBHOOK_SECRET"] = secrets.token_hex(32)
    worker = _spawn("worker", [sys.executable, "-m", "monitor.cli", "worker"], env)
    inbox = _spawn("inbox", [sys.executable, "-m", "monitor.cli", "inbox", "serve"], env)
    t0 = time.monotonic()
    _wait_http(f"http://{s.web_host}:{s.web_port}/readyz", worker, "worker")
    _wait_http(f"http://{s.web_host}:{inbox_port}/healthz", inbox, "inbox")
    print(f"demo: worker and inbox ready in {time.monotonic() - t0:.1f}s")

    # the cohort's "now" is the worker's wall clock, so samples due today are judged alike
    start = datetime.now(timezone.utc) - timedelta(days=args.days, minutes=5)
    cohort = generate_cohort(args.patients, args.seed, start=start, days=args.days, formats=(args.format,),
                             id_prefix=f"demo{run}-")
    consumer = KafkaConsumer(enable_auto_commit=False, group_id=None, **kafka_python_config(s))
    admin = KafkaAdminClient(**kafka_python_config(s))
    alert_parts = [TopicPartition(s.topic_alerts, p) for p in sorted(topic_partitions(consumer, s.topic_alerts))]
    dlq_parts = [TopicPartition(s.topic_dead_letter, p) for p in sorted(topic_partitions(consumer, s.topic_dead_letter))]
    starts = consumer.end_offsets(alert_parts + dlq_parts)

    from kafka import KafkaProducer

    producer = KafkaProducer(acks="all", linger_ms=20, **kafka_python_config(s))
    n = 0
    t_pub = time.monotonic()
    for rec in records(cohort, args.format):
        value = rec["value"]
        raw = value.encode() if isinstance(value, str) else json.dumps(value, separators=(",", ":")).encode()
        producer.send(rec["topic"], key=rec["key"].encode(), value=raw)
        n += 1
    # synthetic demographics (fictional names) on the patients feed, so the inbox shows who each is
    from schemas.patients import PatientRecord

    given = ["Ada", "Ben", "Cara", "Dev", "Ema", "Finn", "Gia", "Hugo", "Isla", "Jon", "Kai", "Lena"]
    family = ["Okafor", "Novak", "Silva", "Tanaka", "Moreau", "Kowalski", "Haddad", "Lindqvist", "Reyes"]
    for i, pt in enumerate(cohort.patients):
        rec = PatientRecord(patient_id=pt.patient_id, display_name=f"{given[i % len(given)]} {family[i % len(family)]}",
                            mrn=f"DEMO-{run}-{i:04d}", birth_date=pt.birth_date, bed=str(i % 20 + 1), source="json",
                            ward="paediatric-neurology" if pt.age_months < 192 else "adult-neurology")
        producer.send(s.topic_patients, key=pt.patient_id.encode(), value=rec.model_dump_json().encode())
    producer.flush()
    producer.close()
    print(f"demo: published {n} events for {args.patients} patients ({args.format}) in {time.monotonic() - t_pub:.1f}s")

    # wait for the worker to consume everything (ingest and clinical groups at lag 0), then let timers run
    inputs = [s.topic_lab_results, s.topic_vital_signs, s.topic_liver_function, s.topic_treatments]
    deadline = time.monotonic() + 300
    while time.monotonic() < deadline:
        lag = (_group_lag(admin, consumer, f"{s.app_id}-ingest", inputs)
               + _group_lag(admin, consumer, f"{s.app_id}-clinical", [s.topic_observations]))
        if lag == 0:
            break
        time.sleep(1)
    print(f"demo: worker caught up {time.monotonic() - t_pub:.1f}s after the first event; waiting for clock ticks")
    time.sleep(12)

    latest: dict[str, dict] = {}
    dead: list = []
    consumer.assign(alert_parts + dlq_parts)
    for tp, off in starts.items():
        consumer.seek(tp, off)
    while True:
        batch = consumer.poll(timeout_ms=1000)
        if not batch:
            break
        for tp, recs in batch.items():
            for r in recs:
                if tp.topic == s.topic_dead_letter:
                    dead.append(dict(r.headers))
                    continue
                take_version(latest, json.loads(r.value), cohort.withdrawn)
    consumer.close()
    admin.close()
    missed_critical = summarise(cohort, latest, dead)
    print(f"\nnurse inbox: http://{s.web_host}:{inbox_port}/  (demo users: "
          + ", ".join(f"{u} / {p}" for u, p in creds.items()) + ")")
    print(f"worker: http://{s.web_host}:{s.web_port}/metrics   logs: {STATE}/   stop: make demo-stop")
    return 1 if missed_critical else 0


def take_version(latest: dict[str, dict], a: dict, withdrawn: set) -> None:
    """Keep the newest version of each alert and the highest severity it reached, not
    counting versions that rested on a result the cohort later corrects or withdraws (a
    mistyped count raises an alert for an hour; the ground truth is about the real values)."""
    prev = latest.get(a["alert_id"])
    sev = a.get("severity") or "critical"
    typo = any((e.get("observation_id"), e.get("value")) in withdrawn
               for e in a.get("evidence") or () if e.get("value") is not None)
    seen = [s for s in ((prev or {}).get("peak_severity"), None if typo else sev) if s]
    peak = max(seen, key=lambda x: SEV_RANK[x]) if seen else None
    if prev is None or a["version"] >= prev["version"]:
        latest[a["alert_id"]] = a
    latest[a["alert_id"]]["peak_severity"] = peak


def summarise(cohort, latest: dict[str, dict], dead: list) -> int:
    pids = {p.patient_id for p in cohort.patients}
    actual: dict[str, dict[str, str]] = {}
    for a in latest.values():
        if a["patient_id"] not in pids or a["status"] == "retracted":
            continue
        if a["rule_id"] == "monitoring.no_dose_record" and a["status"] == "resolved":
            # the demo publishes days of effective time at once: a clock tick between a
            # patient's pre-dose labs and the dose record raises it, and the dose record
            # resolves it; only one still open at the end says something is wrong
            continue
        d = actual.setdefault(a["patient_id"], {})
        sev = a["peak_severity"] or a.get("severity") or "critical"  # the highest severity the alert reached
        if SEV_RANK[sev] > SEV_RANK.get(d.get(a["rule_id"], ""), -1):
            d[a["rule_id"]] = sev
    result = compare(cohort, actual)
    by_rule: dict[str, collections.Counter] = collections.defaultdict(collections.Counter)
    for pid, exp in cohort.expected.items():
        for rule, sev in exp:
            by_rule[rule]["expected"] += 1
    for pid, got in actual.items():
        for rule, sev in got.items():
            by_rule[rule]["alerted"] += 1
            by_rule[rule][f"sev:{sev}"] += 1
    for kind in ("missed", "under", "over", "extra"):
        for pid, rule, *_ in result[kind]:
            by_rule[rule][kind] += 1
    print(f"\nalerts by rule (patients), against the simulator's ground truth; {len(latest)} alerts in all")
    print(f"  {'rule':<38}{'expected':>9}{'alerted':>9}{'missed':>8}{'lower':>7}{'higher':>8}{'extra':>7}  severities")
    for rule in sorted(by_rule):
        c = by_rule[rule]
        sevs = ", ".join(f"{k[4:]} {v}" for k, v in sorted(c.items()) if k.startswith("sev:"))
        print(f"  {rule:<38}{c['expected']:>9}{c['alerted']:>9}{c['missed']:>8}{c['under']:>7}{c['over']:>8}{c['extra']:>7}  {sevs}")
    print(f"\nmatched {result['match']} of {result['expected_total']} expected (rule, severity) pairs; "
          f"missed {len(result['missed'])}, lower severity {len(result['under'])}, "
          f"higher {len(result['over'])}, extra {len(result['extra'])}")
    print(f"missed critical alerts: {len(result['missed_critical'])}")
    reasons = collections.Counter(h.get("dlq.reason", b"").decode() for h in dead)
    print(f"dead letters: {len(dead)} " + (str(dict(reasons)) if reasons else ""))
    if result["missed_critical"]:
        print("DEMO FAILED: a critical alert the ground truth expects was not raised")
        for m in result["missed_critical"]:
            print("   ", m[1], "expected", m[2], "got", m[3])
    return len(result["missed_critical"])


def stop() -> int:
    _stop_previous()
    print("demo: worker and inbox stopped")
    return 0


if __name__ == "__main__":
    if sys.argv[1:2] == ["stop"]:
        sys.exit(stop())
    sys.exit(main(sys.argv[1:]))
