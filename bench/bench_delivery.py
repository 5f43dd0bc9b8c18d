"""Time from finding to first delivery, through the real broker and a real worker.

Starts a webhook receiver and one worker on fresh topics, publishes dose events and one
grade-4 ALT result per patient, and for every alert delivered to the webhook measures
(receipt time at the webhook) - (the finding's ``evaluated_at``, read from the
``findings`` topic) and (receipt) - (time the lab result was published). Prints
p50/p95/max.

    python bench/bench_delivery.py --bootstrap 127.0.0.1:9092 --patients 200
"""
from __future__ import annotations

import argparse
import json
import os
import signal
import statistics
import subprocess
import sys
import time
import uuid
from datetime import datetime, timedelta, timezone
from pathlib import Path

from kafka import KafkaConsumer, KafkaProducer
from kafka.admin import KafkaAdminClient, NewTopic

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "tests"))
from receivers import WebhookReceiver  # noqa: E402
from workers import SERVICE_TOPICS, free_port  # noqa: E402


def pct(xs: list[float], p: float) -> float:
    xs = sorted(xs)
    return xs[min(len(xs) - 1, int(round(p / 100 * (len(xs) - 1))))]


BENCH_WEBHOOK_SECRET = "bench-webhook-" + "fedcba9876543210" * 2


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--bootstrap", default=os.environ.get("KAFKA_BOOTSTRAP_SERVERS", "127.0.0.1:9092"))
    ap.add_argument("--patients", type=int, default=200)
    args = ap.parse_args()
    prefix = f"dlv{uuid.uuid4().hex[:6]}"
    topics = {short: f"{prefix}.{short}" for short in SERVICE_TOPICS.values()}
    admin = KafkaAdminClient(bootstrap_servers=args.bootstrap)
    admin.create_topics([NewTopic(t, 3, 1) for t in topics.values()])
    receipts: dict[str, float] = {}
    with WebhookReceiver(secret=BENCH_WEBHOOK_SECRET) as hook:
        env = {**os.environ, "KAFKA_BOOTSTRAP_SERVERS": args.bootstrap, "MONITOR_APP_ID": prefix,
               "WEB_PORT": str(free_port()), "WEBHOOK_URL": hook.url, "WEBHOOK_SECRET": BENCH_WEBHOOK_SECRET, "LOG_LEVEL": "WARNING",
               "PSEUDONYM_SECRET": "bench-pseudonym-" + "0123456789abcdef" * 2}
        env.update({var: topics[short] for var, short in SERVICE_TOPICS.items()})
        proc = subprocess.Popen([sys.executable, "-m", "monitor.cli", "worker", "--loglevel", "WARNING"], cwd=ROOT,
                                env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
        try:
            import urllib.request

            for _ in range(120):
                try:
                    with urllib.request.urlopen(f"http://127.0.0.1:{env['WEB_PORT']}/readyz", timeout=1) as r:
                        if r.status == 200:
                            break
                except OSError:
                    time.sleep(0.5)
            now = datetime.now(timezone.utc)
            d0 = now - timedelta(days=20)
            p = KafkaProducer(bootstrap_servers=args.bootstrap, acks="all")
            pids = [f"b{i:04d}" for i in range(args.patients)]
            for pid in pids:
                p.send(topics["treatments"], key=pid.encode(), value=json.dumps({
                    "type": "dose", "event_id": f"d-{pid}", "patient_id": pid, "product": "onasemnogene-abeparvovec-iv",
                    "administered_at": d0.isoformat(), "birth_date": (d0 - timedelta(days=200)).date().isoformat(),
                    "weight_kg": 7.0}).encode())
            p.flush()
            time.sleep(3)
            published: dict[str, float] = {}
            for pid in pids:
                published[pid] = time.time()
                p.send(topics["lab-results"], key=pid.encode(), value=json.dumps({
                    "event_id": f"alt-{pid}", "patient_id": pid, "loinc": "1742-6", "value": 900, "unit": "U/L",
                    "reference_range": {"low": 0, "high": 40}, "effective_at": now.isoformat(), "source": "bench",
                    "status": "final"}).encode())
                p.flush()
                time.sleep(0.02)
            p.close()
            deadline = time.monotonic() + 60
            def alt_pages() -> int:
                with hook.lock:
                    return sum(1 for r in hook.received if r["body"].get("rule_id") == "liver.alt_increased")

            while time.monotonic() < deadline and alt_pages() < len(pids):
                time.sleep(0.2)
            t_hook = time.time()
            with hook.lock:
                for r in hook.received:
                    if r["body"].get("rule_id") == "liver.alt_increased":
                        receipts.setdefault(r["body"]["alert_id"], r.get("at", t_hook))
            findings = {}
            c = KafkaConsumer(topics["findings"], topics["alerts"], bootstrap_servers=args.bootstrap,
                              auto_offset_reset="earliest", group_id=None, consumer_timeout_ms=2000)
            alert_patient = {}
            for m in c:
                v = json.loads(m.value)
                if m.topic == topics["findings"] and v["rule_id"] == "liver.alt_increased" and v["state"] == "present":
                    findings[v["patient_id"]] = datetime.fromisoformat(v["evaluated_at"]).timestamp()
                elif m.topic == topics["alerts"] and v["rule_id"] == "liver.alt_increased":
                    alert_patient[v["alert_id"]] = v["patient_id"]
            c.close()
        finally:
            os.killpg(proc.pid, signal.SIGTERM)
            proc.wait(30)
            admin.delete_topics([t for t in admin.list_topics() if t.startswith(prefix)])
            admin.close()
    f2d, p2d = [], []
    for alert_id, at in receipts.items():
        pid = alert_patient.get(alert_id)
        if pid in findings:
            f2d.append((at - findings[pid]) * 1000)
            p2d.append((at - published[pid]) * 1000)
    if not f2d:
        print("no deliveries measured")
        return 1
    print(f"deliveries measured: {len(f2d)} of {len(pids)} patients")
    print(f"finding -> webhook receipt:     p50 {pct(f2d, 50):.1f} ms  p95 {pct(f2d, 95):.1f} ms  max {max(f2d):.1f} ms")
    print(f"lab publish -> webhook receipt: p50 {pct(p2d, 50):.1f} ms  p95 {pct(p2d, 95):.1f} ms  max {max(p2d):.1f} ms")
    return 0


if __name__ == "__main__":
    sys.exit(main())
