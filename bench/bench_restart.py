"""Restart to processing again, with N monitored patients (issue 13 target: <= 10 s for 10,000).

Run (broker up, ``make kafka``):

    .venv/bin/python bench/bench_restart.py [--bootstrap 127.0.0.1:9092] [--patients 10000]
                                            [--labs 6] [--partitions 6] [--kill]

Publishes, for each patient, a dose and ``--labs`` lab results (so each patient has a
real state and an alert book in the changelog), starts one worker and waits until the
clinical stage has consumed everything (its group's lag on ``observations`` = 0). Then it
stops the worker (SIGTERM, or SIGKILL with ``--kill``), starts a new one, and measures:

- start -> ``/readyz`` 200 (the changelog of every assigned partition restored);
- start -> the first alert of a lab result published right after the start (the worker
  processes new input again);
- the restore the worker logged (records, seconds) and its peak RSS.

Every topic and consumer group carries one run prefix and is deleted at the end.
"""
from __future__ import annotations

import argparse
import json
import secrets
import sys
import time
import uuid
from datetime import datetime, timedelta, timezone
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import SERVICE_TOPICS, Child, Kafka, free_port, http_ok, publish  # noqa: E402
from workers import raw_alt, raw_dose  # noqa: E402

PY = sys.executable


def dose(pid: str, at: datetime) -> dict:
    return raw_dose(pid, at)


def lab(pid: str, eid: str, value: float, at: datetime) -> dict:
    return raw_alt(pid, eid, value, at, source="bench")


def main(argv=None) -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--bootstrap", default="127.0.0.1:9092")
    ap.add_argument("--patients", type=int, default=10_000)
    ap.add_argument("--labs", type=int, default=6)
    ap.add_argument("--partitions", type=int, default=6)
    ap.add_argument("--kill", action="store_true", help="SIGKILL instead of SIGTERM")
    ap.add_argument("--probe-seconds", type=float, default=0.0,
                    help="after the first new alert, publish a new patient's dose and an alerting lab result "
                         "every --probe-every seconds for this long, through the worker's first clock passes "
                         "(TICK_INTERVAL_SECONDS=30) and the checkpoints after them, and report publish -> alert "
                         "of each (to the alert record's create time; the stalls a restart leaves behind readiness)")
    ap.add_argument("--probe-every", type=float, default=0.25)
    a = ap.parse_args(argv)
    prefix = f"bench-restart-{uuid.uuid4().hex[:6]}"
    topics = {short: f"{prefix}.{short}" for short in SERVICE_TOPICS.values()}
    kafka = Kafka(a.bootstrap)
    tmp = Path(f"/tmp/{prefix}")
    tmp.mkdir(parents=True, exist_ok=True)
    children: list[Child] = []
    try:
        kafka.create_topics(topics.values(), a.partitions, compacted=[topics["alert-deliveries"]])
        now = datetime.now(timezone.utc)
        d0 = now - timedelta(days=10)
        items = []
        for i in range(a.patients):
            pid = f"RB{i:06d}"
            items.append((topics["treatments"], pid.encode(), json.dumps(dose(pid, d0)).encode()))
            for k in range(a.labs):
                v = 30 if k < a.labs - 1 or i % 10 else 150  # every 10th patient ends with an ALT alert
                items.append((topics["lab-results"], pid.encode(),
                              json.dumps(lab(pid, f"{pid}-l{k}", v, d0 + timedelta(days=k - 1))).encode()))
        t = time.monotonic()
        n = publish(a.bootstrap, items)
        print(f"published {n:,} records for {a.patients:,} patients in {time.monotonic() - t:.1f}s", flush=True)

        # the worker refuses to start without it; the same for both workers (keyed alert ids)
        pseudonym_secret = secrets.token_hex(32)

        def start(name: str) -> tuple[Child, str]:
            port = free_port()
            env = {var: topics[short] for var, short in SERVICE_TOPICS.items()}
            env.update({"KAFKA_BOOTSTRAP_SERVERS": a.bootstrap, "MONITOR_APP_ID": prefix,
                        "TOPIC_PARTITIONS": str(a.partitions), "WEB_HOST": "127.0.0.1", "WEB_PORT": str(port),
                        "DATA_DIR": str(tmp / name), "LOG_LEVEL": "INFO", "TICK_INTERVAL_SECONDS": "30",
                        "PSEUDONYM_SECRET": pseudonym_secret})
            c = Child(name, [PY, "-m", "monitor.cli", "worker"], env, tmp / f"{name}.log")
            children.append(c)
            return c, f"http://127.0.0.1:{port}/readyz"

        w1, url1 = start("w1")
        t0 = time.monotonic()
        while True:
            lag, _ = kafka.group_lag(f"{prefix}-clinical", topics["observations"])
            ends = kafka.end_total(topics["observations"])
            if ends >= n and lag == 0:
                break
            if time.monotonic() - t0 > 900 or not w1.alive():
                raise SystemExit(f"first worker did not finish: lag {lag}\n{w1.tail()}")
            time.sleep(0.5)
        print(f"first worker processed everything in {time.monotonic() - t0:.1f}s "
              f"(peak RSS {w1.peak_rss_mb():.0f} MiB)", flush=True)
        time.sleep(2)
        if a.kill:
            import os
            import signal
            os.killpg(w1.pid, signal.SIGKILL)
            w1.proc.wait(10)
        else:
            w1.stop()
        from kafka import KafkaConsumer

        reader = KafkaConsumer(topics["alerts"], bootstrap_servers=a.bootstrap, group_id=None,
                               auto_offset_reset="latest", enable_auto_commit=False, consumer_timeout_ms=200)
        reader.poll(timeout_ms=1000)  # positioned at the end
        t_start = time.monotonic()
        w2, url2 = start("w2")
        probe = "RB-PROBE"
        publish(a.bootstrap, [(topics["treatments"], probe.encode(), json.dumps(dose(probe, d0)).encode()),
                              (topics["lab-results"], probe.encode(),
                               json.dumps(lab(probe, "probe-l", 400, now - timedelta(hours=1))).encode())])
        ready_s = alert_s = None
        while time.monotonic() - t_start < 300 and (ready_s is None or alert_s is None):
            if ready_s is None and http_ok(url2):
                ready_s = time.monotonic() - t_start
            for m in reader:
                if alert_s is None and json.loads(m.value).get("patient_id") == probe:
                    alert_s = time.monotonic() - t_start
            if not w2.alive():
                raise SystemExit(f"second worker exited\n{w2.tail()}")
        restore = [ln for ln in (tmp / "w2.log").read_text(errors="replace").splitlines() if "restored" in ln]
        print(f"restart ({'SIGKILL' if a.kill else 'SIGTERM'}) with {a.patients:,} patients: "
              f"ready after {ready_s:.2f}s, first new alert after {alert_s:.2f}s; peak RSS {w2.peak_rss_mb():.0f} MiB")
        for ln in restore:
            print("  worker log:", ln.split("monitor.clinical.runner", 1)[-1].strip())
        if a.probe_seconds > 0:
            probe_latencies(a, topics, reader, d0, now, t_start, w2)
        return 0
    finally:
        for c in children:
            c.stop()
        try:
            kafka.delete_prefix(prefix)
            kafka.delete_groups([g for g in kafka.list_groups() if g.startswith(prefix)])
        except Exception as exc:
            print(f"cleanup: {exc}", file=sys.stderr)
        kafka.close()


def probe_latencies(a, topics: dict, reader, d0: datetime, now: datetime, t_start: float, worker) -> None:
    """Publish -> alert of a new patient's alerting result, one every ``--probe-every`` s."""
    from kafka import KafkaProducer

    producer = KafkaProducer(bootstrap_servers=a.bootstrap, acks="all", linger_ms=0)
    sent: dict[str, float] = {}  # monotonic, for the pacing and the report
    published: dict[str, float] = {}  # wall clock, against the alert record's create time
    got: dict[str, float] = {}
    try:
        t_end = time.monotonic() + a.probe_seconds
        k = 0
        while time.monotonic() < t_end or (len(got) < len(sent) and time.monotonic() < t_end + 30):
            if time.monotonic() < t_end and (
                    not sent or time.monotonic() - max(sent.values()) >= a.probe_every):
                pid = f"RB-P{k:05d}"
                k += 1
                published[pid] = time.time()
                producer.send(topics["treatments"], key=pid.encode(), value=json.dumps(dose(pid, d0)).encode())
                producer.send(topics["lab-results"], key=pid.encode(),
                              value=json.dumps(lab(pid, f"{pid}-l", 400, now - timedelta(hours=1))).encode())
                producer.flush()
                sent[pid] = time.monotonic()
            for batch in reader.poll(timeout_ms=20).values():
                for m in batch:
                    pid = m.key.decode() if m.key else None  # alerts are keyed by patient id
                    if pid in sent and pid not in got:
                        # the alert record's create time (set by the worker's producer): the
                        # reader's own lag behind a flood of alerts is not counted
                        got[pid] = sent[pid] + (m.timestamp / 1000 - published[pid])
            if not worker.alive():
                raise SystemExit(f"second worker exited\n{worker.tail()}")
    finally:
        producer.close()
    lat = sorted((got[p] - sent[p]) * 1000 for p in got)
    slow = sorted(((sent[p] - t_start, (got[p] - sent[p]) * 1000) for p in got if got[p] - sent[p] > 0.5))
    missing = len(sent) - len(got)

    def pct(q: float) -> float:
        return lat[min(len(lat) - 1, int(q * len(lat)))] if lat else float("nan")

    print(f"probe: {len(sent)} results over {a.probe_seconds:.0f}s after the first new alert, {missing} without an "
          f"alert; publish -> alert p50 {pct(0.5):.0f} ms, p99 {pct(0.99):.0f} ms, max {lat[-1] if lat else 0:.0f} ms",
          flush=True)
    for at, ms in slow:
        print(f"  over 500 ms: published {at:.1f}s after the start, {ms:.0f} ms")


if __name__ == "__main__":
    sys.exit(main())
