"""The alert reader of ``run_all.py``'s latency test, as its own process.

Run by ``run_all.AlertReader``: ``python bench/alert_reader.py BOOTSTRAP TOPIC PARTITIONS [OBSERVATIONS]``.
Reads partitions 0..PARTITIONS-1 of TOPIC from the start (aiokafka, no group) and prints, per latency event
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
"""
from __future__ import annotations

import asyncio
import re
import sys
import time

from aiokafka import AIOKafkaConsumer
from aiokafka.structs import TopicPartition

LAT_ID = re.compile(rb'"observation_id":"(lat-(\d+)-(\d+))"')


async def main(bootstrap: str, topic: str, partitions: int, observations: str = "") -> None:
    c = AIOKafkaConsumer(bootstrap_servers=bootstrap, group_id=None, enable_auto_commit=False,
                         fetch_max_wait_ms=5, client_id="bench-alerts")
    await c.start()
    try:
        # the topic exists (run_all created it); its partitions are given, not looked up
        tps = [TopicPartition(t, p) for t in filter(None, (topic, observations)) for p in range(partitions)]
        c.assign(tps)
        await c.seek_to_beginning(*tps)
        print("READY", flush=True)
        seen: set[int] = set()
        seen_obs: set[int] = set()
        alerts = 0
        out = sys.stdout
        while True:
            batch = await c.getmany(timeout_ms=50)
            now = time.time()
            lines = []
            for tp, recs in batch.items():
                if tp.topic != topic:  # the patient stream: when ingest wrote each observation
                    for r in recs:
                        m = LAT_ID.search(r.value or b"")
                        if m and int(m.group(2)) not in seen_obs:
                            seen_obs.add(int(m.group(2)))
                            lines.append(f"O {m.group(2).decode()} {r.timestamp / 1000.0 - int(m.group(3)) / 1e9:.6f}\n")
                    continue
                for r in recs:
                    alerts += 1
                    for m in LAT_ID.finditer(r.value or b""):
                        seq = int(m.group(2))
                        if seq not in seen:
                            seen.add(seq)
                            pub = int(m.group(3)) / 1e9
                            lines.append(f"{seq} {now - pub:.6f} {r.timestamp / 1000.0 - pub:.6f}\n")
            if lines or batch:
                lines.append(f"A {alerts}\n")
                out.write("".join(lines))
                out.flush()
    finally:
        await c.stop()


if __name__ == "__main__":
    try:
        asyncio.run(main(sys.argv[1], sys.argv[2], int(sys.argv[3]), *sys.argv[4:5]))
    except (KeyboardInterrupt, BrokenPipeError):
        pass
