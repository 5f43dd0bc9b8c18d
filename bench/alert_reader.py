"""The alert reader of ``run_all.py``'s latency test, as its own process.

Run by ``run_all.AlertReader``: ``python bench/alert_reader.py [--client kcat|aiokafka]
BOOTSTRAP TOPIC PARTITIONS [OBSERVATIONS]``. Reads partitions 0..PARTITIONS-1 of TOPIC from the
start (no group) and prints, per latency event
id seen for the first time in an alert's evidence, ``seq receive_latency_s
record_time_latency_s``; and ``A <alerts read>`` after each fetch with alerts. With
OBSERVATIONS (the service's patient stream) it also prints ``O seq record_time_latency_s`` per
latency observation written by ingest: publish -> ingest's write, so the publish -> alert
time splits into the ingest stage and the clinical stage. The
publish time is the nanosecond stamp in the event id (``lat-<seq>-<publish ns>``).

A process of its own, not a thread beside the publisher: in one process the kafka-python
reader and the publisher shared one interpreter lock, and on this 2-core machine the
reader fell seconds behind at 2,000 alerts/s (receive p50 1.1 s while the alerts' record
timestamps showed p50 53 ms), so the test measured its reader, not the service.

``--client kcat`` (run_all's default): the records come from one ``kcat`` consumer child over
both topics (librdkafka; every partition, so PARTITIONS is not used), which takes a fraction
of aiokafka's CPU on the machine the service is measured on (``kcat_clients``); this process
only matches the ids in kcat's lines. ``--client aiokafka``: the reading is done here, as before.
"""
from __future__ import annotations

import asyncio
import os
import re
import signal
import subprocess
import sys
import time

LAT_ID = re.compile(rb'"observation_id":"(lat-(\d+)-(\d+))"')


class Matcher:
    """The output lines for the records read, whichever client read them: ``seq receive_s
    record_time_s`` the first time an alert names a latency event, ``O seq record_time_s`` the
    first time the patient stream holds it, ``A <alerts read>`` after each read with alerts."""

    def __init__(self) -> None:
        self.seen: set[int] = set()
        self.seen_obs: set[int] = set()
        self.alerts = 0

    def observation(self, value: bytes, ts: float, lines: list[str]) -> None:
        m = LAT_ID.search(value)
        if m and int(m.group(2)) not in self.seen_obs:
            self.seen_obs.add(int(m.group(2)))
            lines.append(f"O {m.group(2).decode()} {ts - int(m.group(3)) / 1e9:.6f}\n")

    def alert(self, value: bytes, ts: float, now: float, lines: list[str]) -> None:
        self.alerts += 1
        for m in LAT_ID.finditer(value):
            seq = int(m.group(2))
            if seq not in self.seen:
                self.seen.add(seq)
                pub = int(m.group(3)) / 1e9
                lines.append(f"{seq} {now - pub:.6f} {ts - pub:.6f}\n")


async def main(bootstrap: str, topic: str, partitions: int, observations: str = "") -> None:
    from aiokafka import AIOKafkaConsumer
    from aiokafka.structs import TopicPartition

    c = AIOKafkaConsumer(bootstrap_servers=bootstrap, group_id=None, enable_auto_commit=False,
                         fetch_max_wait_ms=5, client_id="bench-alerts")
    await c.start()
    try:
        # the topic exists (run_all created it); its partitions are given, not looked up
        tps = [TopicPartition(t, p) for t in filter(None, (topic, observations)) for p in range(partitions)]
        c.assign(tps)
        await c.seek_to_beginning(*tps)
        print("READY", flush=True)
        match = Matcher()
        out = sys.stdout
        while True:
            batch = await c.getmany(timeout_ms=50)
            now = time.time()
            lines: list[str] = []
            for tp, recs in batch.items():
                if tp.topic != topic:  # the patient stream: when ingest wrote each observation
                    for r in recs:
                        match.observation(r.value or b"", r.timestamp / 1000.0, lines)
                    continue
                for r in recs:
                    match.alert(r.value or b"", r.timestamp / 1000.0, now, lines)
            if lines or batch:
                lines.append(f"A {match.alerts}\n")
                out.write("".join(lines))
                out.flush()
    finally:
        await c.stop()


def main_kcat(bootstrap: str, topic: str, observations: str = "") -> None:
    """The same lines as ``main``, from one ``kcat`` consumer child over both topics (every
    partition)."""
    from kcat_clients import consumer_argv

    out = sys.stdout
    match = Matcher()
    alerts_topic = topic.encode()
    # consumer_argv fails here, before READY, when kcat is not installed
    p = subprocess.Popen(consumer_argv(bootstrap, [t for t in (topic, observations) if t], "bench-alerts"),
                         stdout=subprocess.PIPE, stderr=subprocess.DEVNULL)

    def _term(signum, frame):  # run_all stops this reader with SIGTERM: the kcat child goes too
        raise SystemExit(0)

    signal.signal(signal.SIGTERM, _term)
    print("READY", flush=True)
    try:
        assert p.stdout is not None
        fd = p.stdout.fileno()
        rest = b""
        while True:
            chunk = os.read(fd, 1 << 20)  # what kcat has written so far, up to 1 MiB
            if not chunk:
                return
            now = time.time()
            data = rest + chunk
            cut = data.rfind(b"\n") + 1
            rest = data[cut:]
            lines: list[str] = []
            alerts_before = match.alerts
            for rec in data[:cut - 1].split(b"\n") if cut else ():
                t, _, rec = rec.partition(b" ")
                ts_ms, _, value = rec.partition(b" ")
                if t == alerts_topic:
                    match.alert(value, int(ts_ms) / 1000.0, now, lines)
                else:  # the patient stream: when ingest wrote each observation
                    match.observation(value, int(ts_ms) / 1000.0, lines)
            if match.alerts != alerts_before:
                lines.append(f"A {match.alerts}\n")
            if lines:
                out.write("".join(lines))
                out.flush()
    finally:
        p.kill()
        p.wait()


if __name__ == "__main__":
    args = sys.argv[1:]
    client = "aiokafka"
    if args[:1] == ["--client"]:
        client, args = args[1], args[2:]
    try:
        if client == "kcat":  # kcat reads every partition: PARTITIONS is not needed
            main_kcat(args[0], args[1], *args[3:4])
        else:
            asyncio.run(main(args[0], args[1], int(args[2]), *args[3:4]))
    except (KeyboardInterrupt, BrokenPipeError):
        pass
