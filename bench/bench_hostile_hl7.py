"""Hostile HL7 v2 input (security review H1): what one crafted message costs, and
whether it delays anyone else. Prints figures; not a test.

    .venv/bin/python bench/bench_hostile_hl7.py [--bootstrap host:port] [--skip-worker]

1. In-process: decode + ACK of each hostile payload (time, tracemalloc peak, RSS growth)
   and the reason it is rejected with. Targets: the crafted ~1 MiB message
   (``NTE|1|`` + ``^&~`` repeated) rejected in <= 50 ms with <= 20 MiB extra memory.
2. MLLP: connection A sends the crafted message, connection B a normal result right
   after; B's ACK latency (target <= 1 s) through the real listener and a real broker.
3. Worker: through a real broker and the worker's ingest stage, the crafted message and
   then a normal observation for the same patient (same partition) on ``lab-results``;
   time until the normal observation is on ``observations`` (target <= 1 s), against a
   baseline of two normal messages.

Without ``--bootstrap`` (or ``KAFKA_BOOTSTRAP_SERVERS``) a throw-away broker is started
with tests/kafka_broker.py and stopped at the end.
"""
from __future__ import annotations

import argparse
import asyncio
import json
import logging
import os
import resource
import secrets
import sys
import tempfile
import time
import tracemalloc
import uuid
from datetime import datetime, timezone
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "tests"))

from schemas.errors import Rejected  # noqa: E402
from schemas.hl7v2 import build_ack  # noqa: E402
from schemas.ingest import decode  # noqa: E402

HEAD = ("MSH|^~\\&|LIS|CENTRAL LAB|MONITOR|GTX|20240502091500+0200||ORU^R01^ORU_R01|{ctl}|P|2.5.1\r"
        "PID|1||{mrn}^^^CENTRAL^MR\r")
ORU = HEAD + (
    "OBR|1|PL-{n}|FL-{n}|24325-3^Hepatic function panel^LN|||20240502080000+0200\r"
    "OBX|1|NM|1742-6^ALT^LN||{alt}|U/L|10-40|H|||F|||20240502080000+0200\r"
)


def crafted(ctl: str = "EVIL", mrn: str = "MRN-H") -> bytes:
    return (HEAD.format(ctl=ctl, mrn=mrn) + "NTE|1|" + "^&~" * 340_000 + "\r").encode()


PAYLOADS = {
    "crafted 1 MiB NTE|1|^&~...": lambda: crafted(),
    "1 MiB of '|' (1M empty fields)": lambda: (HEAD.format(ctl="P", mrn="M") + "NTE|" + "|" * 1_000_000).encode(),
    "255 KiB ^&~ storm (under the HL7 cap)": lambda: (HEAD.format(ctl="S", mrn="M") + "NTE|1|"
                                                      + "^&~" * 87_000 + "\r").encode(),
    "255 KiB of 2,000 segments x 61 fields": lambda: (HEAD.format(ctl="F", mrn="M")
                                                      + ("NTE|1|" + "x|" * 60 + "\r") * 1_990).encode()[:262_000],
    "benign ORU (2 results)": lambda: ORU.format(ctl="B", mrn="MRN-1", n=1, alt=55).encode(),
}


def rss_mib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def part1() -> None:  # noqa: C901
    print("## 1. decode + ACK in-process (best / worst of 5; tracemalloc peak; process peak RSS growth)")
    now = datetime.now(timezone.utc)
    for name, make in PAYLOADS.items():
        raw = make()
        times, peaks = [], []
        rss0 = rss_mib()
        outcome = ""
        def once() -> bytes:
            nonlocal outcome
            try:
                decode("lab-results", raw, received_at=now)
                ack = build_ack(raw, "AA")
                outcome = "accepted"
            except Rejected as rej:
                ack = build_ack(raw, "AE", str(rej), reason=rej.reason)
                outcome = f"{rej.reason.value}: {rej.message[:70]}"
            assert b"MSA|" in ack
            return ack

        for _ in range(5):  # timing without tracemalloc (it slows every allocation)
            t0 = time.perf_counter()
            once()
            times.append(time.perf_counter() - t0)
        tracemalloc.start()
        once()
        peaks.append(tracemalloc.get_traced_memory()[1])
        tracemalloc.stop()
        print(f"- {name} ({len(raw):,} B): {min(times) * 1000:.2f} / {max(times) * 1000:.2f} ms, "
              f"peak {max(peaks) / 2**20:.1f} MiB, RSS +{rss_mib() - rss0:.1f} MiB -> {outcome}")


async def _send(port: int, payload: bytes, timeout: float = 30.0) -> tuple[float, bytes]:
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    try:
        t0 = time.perf_counter()
        writer.write(b"\x0b" + payload + b"\x1c\r")
        await writer.drain()
        ack = await asyncio.wait_for(reader.readuntil(b"\x1c\r"), timeout)
        return time.perf_counter() - t0, ack
    finally:
        writer.close()


async def part2(bootstrap: str, rounds: int = 10) -> None:
    from kafka_broker import create_topics, delete_topics

    from monitor.mllp import serve_mllp

    print("## 2. MLLP: another connection's ACK while the crafted frame is handled (real broker)")
    prefix = f"benchh-{uuid.uuid4().hex[:6]}"
    obs_t, dlq_t = f"{prefix}.observations", f"{prefix}.dead-letter"
    create_topics(bootstrap, [obs_t, dlq_t], partitions=1)
    server = await serve_mllp("127.0.0.1", 0, bootstrap=bootstrap, observations_topic=obs_t, dead_letter_topic=dlq_t)
    try:
        await _send(server.port, ORU.format(ctl="W", mrn="MRN-W", n=0, alt=50).encode())  # warm-up
        evil_lat, other_lat, codes = [], [], set()
        for i in range(rounds):
            evil = asyncio.create_task(_send(server.port, crafted(ctl=f"EVIL{i}")))
            await asyncio.sleep(0.005)
            lat, ack = await _send(server.port, ORU.format(ctl=f"OK{i}", mrn="MRN-2", n=i + 1, alt=60).encode())
            e_lat, e_ack = await evil
            other_lat.append(lat)
            evil_lat.append(e_lat)
            codes.add((e_ack[e_ack.find(b"MSA|") + 4:][:2].decode(), ack[ack.find(b"MSA|") + 4:][:2].decode()))
        print(f"- crafted frame ACK: median {sorted(evil_lat)[rounds // 2] * 1000:.1f} ms, "
              f"max {max(evil_lat) * 1000:.1f} ms (includes the dead-letter write)")
        print(f"- other connection's ACK: median {sorted(other_lat)[rounds // 2] * 1000:.1f} ms, "
              f"max {max(other_lat) * 1000:.1f} ms; ack codes (crafted, other) {sorted(codes)}")
    finally:
        await server.stop()
        delete_topics(bootstrap, [obs_t, dlq_t])


def part3(bootstrap: str, rounds: int = 5) -> None:
    from kafka import KafkaConsumer, KafkaProducer
    from kafka_broker import create_topics, delete_topics
    from workers import SERVICE_TOPICS, WorkerProcess, service_env

    print("## 3. Worker ingest stage: next observation of the same partition after the crafted message")
    prefix = f"benchw-{uuid.uuid4().hex[:6]}"
    topics = {short: f"{prefix}.{short}" for short in SERVICE_TOPICS.values()}
    create_topics(bootstrap, list(topics.values()), partitions=1)
    workdir = Path(tempfile.mkdtemp(prefix="bench-hostile-"))
    env = service_env(topics, f"{prefix}-app", PSEUDONYM_SECRET=secrets.token_hex(32),
                      INBOX_SECRET=secrets.token_hex(32))
    worker = WorkerProcess(bootstrap, env, workdir)
    producer = KafkaProducer(bootstrap_servers=bootstrap, acks="all", max_request_size=4 * 1024 * 1024)
    consumer = KafkaConsumer(topics["observations"], bootstrap_servers=bootstrap, auto_offset_reset="latest",
                             enable_auto_commit=False, group_id=None, consumer_timeout_ms=200)
    try:
        worker.start()
        consumer.poll(1000)

        def benign(i: int) -> bytes:
            return json.dumps({"event_id": f"b{prefix}-{i}", "patient_id": "P-1", "loinc": "1742-6", "value": 30 + i,
                               "unit": "U/L", "effective_at": datetime.now(timezone.utc).isoformat(),
                               "source": "bench", "status": "final"}).encode()

        def wait_for(event_id: str, timeout: float = 60.0) -> float:
            deadline = time.monotonic() + timeout
            while time.monotonic() < deadline:
                for batch in consumer.poll(200).values():
                    for rec in batch:
                        if json.loads(rec.value).get("event_id") == event_id:
                            return time.perf_counter()
            raise TimeoutError(event_id)

        # warm-up: the first observation through the worker
        producer.send(topics["lab-results"], key=b"P-1", value=benign(0)).get(30)
        wait_for(f"b{prefix}-0", 120)
        results: dict[str, list[float]] = {"baseline (normal, normal)": [], "crafted, normal": []}
        for i in range(1, rounds + 1):
            for label, first in (("baseline (normal, normal)", benign(1000 + i)), ("crafted, normal", crafted())):
                n = i * 10 + (0 if first is not None and label.startswith("baseline") else 1)
                t0 = time.perf_counter()
                producer.send(topics["lab-results"], key=b"P-1", value=first)
                producer.send(topics["lab-results"], key=b"P-1", value=benign(n)).get(30)
                results[label].append(wait_for(f"b{prefix}-{n}") - t0)
        for label, vals in results.items():
            vals.sort()
            print(f"- {label}: publish -> next observation on 'observations' median {vals[len(vals) // 2] * 1000:.0f} ms,"
                  f" max {vals[-1] * 1000:.0f} ms over {len(vals)} rounds")
        dead = KafkaConsumer(topics["dead-letter"], bootstrap_servers=bootstrap, auto_offset_reset="earliest",
                             enable_auto_commit=False, group_id=None, consumer_timeout_ms=3000)
        reasons = sorted({dict(r.headers).get("dlq.reason", b"?").decode() for r in dead})
        dead.close()
        print(f"- dead-letter reasons seen: {reasons}; worker peak RSS {worker_peak_rss(worker):.0f} MiB")
    finally:
        consumer.close()
        producer.close()
        worker.stop()
        delete_topics(bootstrap, list(topics.values()))


def worker_peak_rss(worker) -> float:
    try:
        for line in Path(f"/proc/{worker.proc.pid}/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024
    except OSError:
        pass
    return float("nan")


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--bootstrap", default=os.environ.get("KAFKA_BOOTSTRAP_SERVERS", ""))
    ap.add_argument("--skip-worker", action="store_true")
    ap.add_argument("--skip-broker", action="store_true", help="only the in-process figures")
    args = ap.parse_args()
    logging.basicConfig(level=logging.WARNING)
    part1()
    if args.skip_broker:
        return 0
    from kafka_broker import Broker

    broker = Broker.external(args.bootstrap) if args.bootstrap else Broker().start()
    try:
        asyncio.run(part2(broker.bootstrap))
        if not args.skip_worker:
            part3(broker.bootstrap)
    finally:
        broker.stop()
    return 0


if __name__ == "__main__":
    sys.exit(main())
