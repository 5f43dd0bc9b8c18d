"""Observations/s of one worker on a pre-published file of N events (default 100,000).

Publishes N lab/vital/panel events to fresh topics on the broker at --bootstrap, then
starts one `monitor worker` and measures the time from its first observation to the
N-th. Prints the figures. Not a test.

    python bench/bench_ingest.py --bootstrap 127.0.0.1:9092 --events 100000
"""
from __future__ import annotations

import argparse
import json
import os
import random
import signal
import subprocess
import sys
import time
import uuid
from pathlib import Path

from kafka import KafkaConsumer, KafkaProducer
from kafka.admin import KafkaAdminClient, NewTopic

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "tests"))
from workers import SERVICE_TOPICS, free_port  # noqa: E402


def make_events(n: int, patients: int = 500):
    rnd = random.Random(7)
    for i in range(n):
        pid = f"bench-{i % patients:05d}"
        t = f"2026-10-{1 + (i // patients) % 28:02d}T{(i // 7) % 24:02d}:00:00+00:00"
        kind = i % 3
        if kind == 0:
            yield "lab-results", pid, {"event_id": f"e{i}", "patient_id": pid, "loinc": "1742-6",
                                       "value": rnd.uniform(10, 400), "unit": "U/L",
                                       "reference_range": {"low": 0, "high": 40}, "effective_at": t, "source": "bench",
                                       "status": "final"}
        elif kind == 1:
            yield "vital-signs", pid, {"event_id": f"e{i}", "patient_id": pid, "loinc": "8867-4",
                                       "value": rnd.uniform(60, 180), "unit": "/min", "effective_at": t, "source": "bench"}
        else:
            yield "lab-results", pid, {"event_id": f"e{i}", "patient_id": pid, "loinc": "777-3",
                                       "value": rnd.uniform(20, 400), "unit": "10*3/uL", "effective_at": t, "source": "bench",
                                       "status": "final"}


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--bootstrap", default=os.environ.get("KAFKA_BOOTSTRAP_SERVERS", "127.0.0.1:9092"))
    ap.add_argument("--events", type=int, default=100_000)
    ap.add_argument("--partitions", type=int, default=3)
    ap.add_argument("--profile", default="", help="write py-spy collapsed stacks of the worker to this file")
    args = ap.parse_args()
    prefix = f"bench{uuid.uuid4().hex[:6]}"
    topics = {short: f"{prefix}.{short}" for short in SERVICE_TOPICS.values()}
    admin = KafkaAdminClient(bootstrap_servers=args.bootstrap)
    admin.create_topics([NewTopic(t, args.partitions, 1) for t in topics.values()])
    producer = KafkaProducer(bootstrap_servers=args.bootstrap, acks="all", linger_ms=20, batch_size=512 * 1024)
    t0 = time.perf_counter()
    for topic, key, value in make_events(args.events):
        producer.send(topics[topic], key=key.encode(), value=json.dumps(value).encode())
    producer.flush()
    print(f"published {args.events} events in {time.perf_counter() - t0:.1f}s")

    env = {**os.environ, "KAFKA_BOOTSTRAP_SERVERS": args.bootstrap, "MONITOR_APP_ID": prefix,
           "WEB_PORT": str(free_port()), "TOPIC_PARTITIONS": str(args.partitions), "LOG_LEVEL": "WARNING",
           "PSEUDONYM_SECRET": "bench-pseudonym-" + "0123456789abcdef" * 2}
    env.update({var: topics[short] for var, short in SERVICE_TOPICS.items()})
    consumer = KafkaConsumer(topics["observations"], bootstrap_servers=args.bootstrap, auto_offset_reset="earliest",
                             enable_auto_commit=False, group_id=None, consumer_timeout_ms=500)
    proc = subprocess.Popen([sys.executable, "-m", "monitor.cli", "worker", "--loglevel", "WARNING"], cwd=ROOT,
                            env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    spy = None
    if args.profile:
        spy = subprocess.Popen([str(Path(sys.executable).parent / "py-spy"), "record", "--pid", str(proc.pid),
                                "--format", "raw", "-o", args.profile, "--rate", "200", "--duration", "40"],
                               stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    seen = 0
    first = last = None
    deadline = time.monotonic() + 900
    try:
        while seen < args.events and time.monotonic() < deadline:
            for _ in consumer:
                seen += 1
                now = time.perf_counter()
                first = first or now
                last = now
                if seen >= args.events:
                    break
    finally:
        if spy is not None:
            spy.wait(60)
        os.killpg(proc.pid, signal.SIGTERM)
        proc.wait(30)
        consumer.close()
        extra = [t for t in admin.list_topics() if t.startswith(prefix)]
        admin.delete_topics(extra)
        admin.close()
    if seen and last and first and last > first:
        print(f"observations: {seen}/{args.events}; {seen / (last - first):,.0f} observations/s "
              f"(first to last observation, one worker, {args.partitions} partitions)")
    else:
        print(f"observations: {seen}/{args.events}")
    return 0 if seen >= args.events else 1


if __name__ == "__main__":
    sys.exit(main())
