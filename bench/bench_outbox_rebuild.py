"""What a delivery service taking an outbox partition over reads to learn its open alerts.

Run (broker up, ``make kafka``):

    .venv/bin/python bench/bench_outbox_rebuild.py [--bootstrap 127.0.0.1:9092]
        [--versions 200000] [--alerts 50000] [--open 2000] [--history-yield-every 5000]

The worker re-pushes every open alert of its outbox partitions to Alertmanager each
``ALERTMANAGER_REFRESH_SECONDS`` (endsAt four intervals ahead), so a worker taking a partition
over must learn that partition's open alerts; the outbox consumer resumes from its commit, past
alerts opened long ago, and ``alerts`` keeps every version for ever. One partition gets
``--versions`` versions of ``--alerts`` alerts (``--open`` of them still open at the end; the
others resolved), all delivered and committed as a release without the open-alerts index would
leave them. Then three owners take the partition over in turn, each a real ``DeliveryService``
with an Alertmanager sink (a dead address: nothing is pushed in the measured part):

- ``history, as before``: the partition read from its beginning, the event loop given up every
  ``--history-yield-every`` records (5,000: the batch of the read before the index; it writes
  an index of its own, not used again);
- ``history``: the same read as the service now makes it when the index cannot be trusted
  (the loop given up every ``YIELD_EVERY`` records); it then writes the index;
- ``index``: the open-alerts index read instead.

Per owner it prints the seconds and CPU seconds to learn the open alerts, the open alerts
learnt (each must equal ``--open``), and the event loop's longest stall meanwhile (a 5 ms ticker
on the same loop, as the clinical stage shares the worker's loop; the garbage collector tuned as
the worker tunes it). Topics and the group carry
one run prefix and are deleted at the end.
"""
from __future__ import annotations

import argparse
import asyncio
import sys
import time
import uuid
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))

from outbox_samples import alert_version, commit_without_index, paged_alert  # noqa: E402
from common import Kafka  # noqa: E402

from monitor.gc_tuning import tune_garbage_collector  # noqa: E402
from monitor.notify import open_alerts  # noqa: E402
from monitor.notify.outbox import DeliveryService  # noqa: E402
from monitor.settings import Settings  # noqa: E402

def history(a: argparse.Namespace):
    """``a.versions`` versions of ``a.alerts`` alerts, in the order they were written: alerts
    open ``a.open`` at a time (each opened, updated, and resolved at its last version before
    the next ``a.open`` open), the last ``a.open`` still open at the end."""
    base = paged_alert()
    per = max(2, a.versions // a.alerts)
    out = []
    for first in range(0, a.alerts, a.open):
        block = [(n, uuid.uuid4().hex) for n in range(first, min(a.alerts, first + a.open))]
        for v in range(1, per + 1):
            for n, alert_id in block:
                closing = v == per and n < a.alerts - a.open
                out.append(alert_version(base, alert_id, v, closing=closing,
                                         patient_id=f"P-{n:06d}").model_dump_json().encode())
    return out


async def produce(bootstrap: str, topic: str, values: list[bytes]) -> int:
    from aiokafka import AIOKafkaProducer

    p = AIOKafkaProducer(bootstrap_servers=bootstrap, acks="all", linger_ms=20, max_batch_size=512 * 1024)
    await p.start()
    try:
        sent = [await p.send(topic, v, partition=0) for v in values]
        return (await asyncio.gather(*sent))[-1].offset + 1
    finally:
        await p.stop()


async def take_over(settings: Settings) -> dict:
    """A delivery service that takes the partition over: until it knows its open alerts."""
    from aiokafka import TopicPartition

    stalls = [0.0]

    async def ticker():
        last = time.perf_counter()
        while True:
            await asyncio.sleep(0.005)
            now = time.perf_counter()
            stalls[0] = max(stalls[0], now - last - 0.005)
            last = now

    svc = DeliveryService(settings)
    tp = TopicPartition(settings.topic_alerts, 0)
    await svc.start()
    tick = asyncio.create_task(ticker())
    t0, c0 = time.perf_counter(), time.process_time()
    while tp not in svc.open_alerts.built:
        await asyncio.sleep(0.002)
    out = {"seconds": time.perf_counter() - t0, "cpu": time.process_time() - c0,
           "open": len(svc.open_alerts.open.get(tp, {}))}
    tick.cancel()
    out["stall_ms"] = stalls[0] * 1000
    # the index and its marker are written at the next commit (every second)
    await asyncio.sleep(2.5)
    await svc.stop()
    return out


async def main(a: argparse.Namespace) -> None:
    prefix = f"bench-rebuild-{uuid.uuid4().hex[:8]}"
    # an empty index for each owner that reads the history; the last one reads the second's
    topics = {n: f"{prefix}.{n}" for n in ("alerts", "alert-deliveries", "open-alerts-1", "open-alerts-2")}
    kafka = Kafka(a.bootstrap)
    kafka.create_topics(topics.values(), 1, compacted=[t for n, t in topics.items() if n != "alerts"])
    try:
        values = history(a)
        t0 = time.perf_counter()
        end = await produce(a.bootstrap, topics["alerts"], values)
        print(f"{end} versions of {a.alerts} alerts ({sum(map(len, values)) / 2**20:.0f} MiB) on one outbox "
              f"partition in {time.perf_counter() - t0:.1f} s; {a.open} open at the end")
        commit_without_index(a.bootstrap, f"{prefix}-delivery", topics["alerts"], end)
        settings = Settings(kafka_bootstrap_servers=a.bootstrap, MONITOR_APP_ID=prefix, topic_alerts=topics["alerts"],
                            topic_deliveries=topics["alert-deliveries"],
                            alertmanager_url="http://127.0.0.1:9/", alertmanager_refresh_seconds=3600)
        tune_garbage_collector()  # as the worker runs
        print(f"{'owner':<22} {'seconds':>8} {'cpu s':>7} {'open':>6} {'longest loop stall':>19}")
        arms = [("history, as before", a.history_yield_every, "open-alerts-1"),
                ("history", open_alerts.YIELD_EVERY, "open-alerts-2"), ("index", open_alerts.YIELD_EVERY, "open-alerts-2")]
        for name, every, index in arms:
            open_alerts.YIELD_EVERY = every
            settings.topic_open_alerts = topics[index]
            r = await take_over(settings)
            print(f"{name:<22} {r['seconds']:>8.2f} {r['cpu']:>7.2f} {r['open']:>6} {r['stall_ms']:>16.1f} ms")
            assert r["open"] == a.open, r
    finally:
        kafka.delete_prefix(prefix)
        kafka.delete_groups([f"{prefix}-delivery"])
        kafka.close()


if __name__ == "__main__":
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--bootstrap", default="127.0.0.1:9092")
    ap.add_argument("--versions", type=int, default=200_000)
    ap.add_argument("--alerts", type=int, default=50_000)
    ap.add_argument("--open", type=int, default=2_000)
    ap.add_argument("--history-yield-every", type=int, default=5_000)
    asyncio.run(main(ap.parse_args()))
