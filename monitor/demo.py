"""``make demo``: run a worker on the local broker, publish a sample patient's first month, summarise.

Prints what came out: observations by analyte, dead letters by reason, findings and
alerts by rule and severity.
"""
from __future__ import annotations

import collections
import json
import os
import signal
import subprocess
import sys
import tempfile
import time
import urllib.request
import uuid
from datetime import datetime, timezone
from pathlib import Path

from kafka import KafkaConsumer, TopicPartition

from schemas.errors import Rejected
from schemas.ingest import decode

from .kafka_config import kafka_python_config
from .publish import iter_records, publish_file
from .sample import write_sample
from .settings import get_settings
from .topics_admin import ensure_topics

ROOT = Path(__file__).resolve().parent.parent


def end_offsets(consumer: KafkaConsumer, topic: str) -> dict[TopicPartition, int]:
    parts = [TopicPartition(topic, p) for p in sorted(consumer.partitions_for_topic(topic) or [])]
    return consumer.end_offsets(parts)


def read_from(consumer: KafkaConsumer, starts: dict[TopicPartition, int]) -> list:
    consumer.assign(list(starts))
    for tp, off in starts.items():
        consumer.seek(tp, off)
    out = []
    while True:
        batch = consumer.poll(timeout_ms=500)
        if not batch:
            return out
        for records in batch.values():
            out.extend(records)


def wait_ready(url: str, proc: subprocess.Popen, timeout: float = 90) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise SystemExit(f"worker exited with {proc.returncode}")
        try:
            with urllib.request.urlopen(url + "/readyz", timeout=2) as r:
                if r.status == 200:
                    return
        except OSError:
            pass
        time.sleep(0.5)
    raise SystemExit("worker did not become ready")


def main() -> int:
    s = get_settings()
    ensure_topics(s)
    run = uuid.uuid4().hex[:6]
    patient = f"demo-{run}"
    workdir = Path(tempfile.mkdtemp(prefix="monitor-demo-"))
    sample = workdir / "sample.jsonl"
    n_events = write_sample(sample, patient_id=patient)
    expected_obs = expected_dead = 0
    now = datetime.now(timezone.utc)
    for topic, _key, raw in iter_records(sample.read_text().splitlines(), s):
        try:
            d = decode(topic, raw, received_at=now)
            expected_obs += len(d) if isinstance(d, list) else 0
        except Rejected:
            expected_dead += 1

    consumer = KafkaConsumer(enable_auto_commit=False, group_id=None, **kafka_python_config(s))
    watched = [s.topic_observations, s.topic_dead_letter, s.topic_findings, s.topic_alerts]
    starts = {}
    for t in watched:
        starts.update(end_offsets(consumer, t))

    env = {**os.environ, "KAFKA_BOOTSTRAP_SERVERS": s.kafka_bootstrap_servers, "WEB_PORT": str(s.web_port)}
    log = open(workdir / "worker.log", "wb")
    print(f"demo: starting worker (log {workdir / 'worker.log'})")
    proc = subprocess.Popen([sys.executable, "-m", "monitor.cli", "worker"], cwd=ROOT, env=env,
                            stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    url = f"http://{s.web_host}:{s.web_port}"
    try:
        t0 = time.monotonic()
        wait_ready(url, proc)
        print(f"demo: worker ready in {time.monotonic() - t0:.1f}s at {url}")
        counts = publish_file(sample, s)
        print(f"demo: published {n_events} events for patient {patient}: {counts}")
        deadline = time.monotonic() + 90
        records: list = []
        quiet_since = time.monotonic()
        last_n = -1
        while time.monotonic() < deadline:
            records = read_from(consumer, starts)
            n_obs = sum(1 for r in records if r.topic == s.topic_observations)
            n_dead = sum(1 for r in records if r.topic == s.topic_dead_letter)
            if len(records) != last_n:
                last_n, quiet_since = len(records), time.monotonic()
            if n_obs >= expected_obs and n_dead >= expected_dead and time.monotonic() - quiet_since > 5:
                break
            time.sleep(1)
        summarise(records, s, expected_obs, expected_dead)
    finally:
        os.killpg(proc.pid, signal.SIGTERM)
        try:
            proc.wait(20)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
        consumer.close()
    return 0


def summarise(records: list, s, expected_obs: int, expected_dead: int) -> None:
    by_topic = collections.defaultdict(list)
    for r in records:
        by_topic[r.topic].append(r)
    obs = [json.loads(r.value) for r in by_topic[s.topic_observations]]
    print(f"\nobservations: {len(obs)} (expected {expected_obs})")
    for analyte, n in sorted(collections.Counter(o["analyte"] for o in obs).items()):
        print(f"  {analyte:<18} {n}")
    dead = by_topic[s.topic_dead_letter]
    print(f"dead letters: {len(dead)} (expected {expected_dead})")
    for r in dead:
        h = dict(r.headers)
        print(f"  {h.get('dlq.reason', b'').decode():<22} {h.get('dlq.message', b'').decode()[:90]}")
    findings = [json.loads(r.value) for r in by_topic[s.topic_findings]]
    print(f"findings: {len(findings)}")
    fc = collections.Counter((f["rule_id"], f.get("severity") or "critical", f.get("state", "present")) for f in findings)
    for (rule, sev, state), n in sorted(fc.items()):
        print(f"  {rule:<40} {sev:<9} {state:<10} {n}")
    alerts = {}
    for r in by_topic[s.topic_alerts]:
        a = json.loads(r.value)
        alerts[a["alert_id"]] = a
    print(f"alerts: {len(alerts)} (latest version of each)")
    for a in sorted(alerts.values(), key=lambda a: (a["rule_id"], a["opened_at"])):
        print(f"  {a['rule_id']:<40} {a['severity']:<9} {a['status']:<13} v{a.get('version', '?')}")


if __name__ == "__main__":
    sys.exit(main())
