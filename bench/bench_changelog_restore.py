"""What a restore reads from the patient changelog once patients have many versions.

Run (broker up, ``make kafka``):

    .venv/bin/python bench/bench_changelog_restore.py [--bootstrap 127.0.0.1:9092]
        [--patients 10000] [--versions 20] [--value-bytes 13000] [--partitions 6]
        [--wait 75] [--broker-segment-bytes 1073741824]

Every checkpoint of the clinical stage writes a new version of each patient it changed, so
the changelog holds many versions per patient until the broker compacts them; the broker
compacts closed segments only. The script makes two changelogs with the same partitions:

- ``service``: created by ``ensure_topics``, so with the service's topic settings
  (``segment.bytes`` = ``CHANGELOG_SEGMENT_BYTES``, 16 MiB by default);
- ``broker default``: ``segment.bytes`` = ``--broker-segment-bytes`` (1 GiB: Kafka's default
  ``log.segment.bytes``, which a changelog created without a value of its own gets on a broker
  configured as shipped; the dev broker of ``make kafka`` sets 16 MiB broker-wide).

It writes ``--versions`` versions of each of ``--patients`` patients to both (values of
``--value-bytes``: the median changelog value of 60 days of a simulated course is 13.4 KB,
``bench_clinical.py``), then, every 15 s for ``--wait`` seconds (the broker's cleaner looks
every 15 s, ``log.cleaner.backoff.ms``), has a clinical runner restore each changelog the way
a worker does on assignment (``ClinicalRunner.run`` until ready: it joins its group, restores
its partitions, and stops) and prints the records it read and the restore's own seconds and
CPU seconds. Every restored patient holds its newest version, checked on a sample. Topics and
groups carry one run prefix and are deleted at the end.
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

from common import Kafka  # noqa: E402

from alerts.engine import Engine  # noqa: E402
from alerts.lifecycle import AlertBook  # noqa: E402
from alerts.protocol import default_protocols  # noqa: E402
from alerts.state import PatientState  # noqa: E402
from monitor.clinical.processor import ClinicalProcessor  # noqa: E402
from monitor.clinical.runner import ClinicalRunner  # noqa: E402
from monitor.clinical.store import InMemoryPatientStore, encode  # noqa: E402
from monitor.settings import Settings  # noqa: E402
from monitor.topics_admin import changelog_topic, ensure_topics  # noqa: E402
from monitor.worker import lifecycle_config  # noqa: E402


def value(pid: str, version: int, size: int) -> bytes:
    """A valid changelog value of about ``size`` bytes whose state's weight is ``version``."""
    state = PatientState(pid)
    state.weight = float(version)
    state.ward = ""
    bare = len(encode(state, AlertBook(patient_id=pid)))
    state.ward = "w" * max(0, size - bare)
    return encode(state, AlertBook(patient_id=pid))


async def write(a: argparse.Namespace, topics: list[str]) -> None:
    """``a.versions`` versions of every patient to each topic, oldest first."""
    from aiokafka import AIOKafkaProducer

    producer = AIOKafkaProducer(bootstrap_servers=a.bootstrap, acks="all", linger_ms=20,
                                max_batch_size=512 * 1024, max_request_size=16 * 1024 * 1024)
    await producer.start()
    try:
        template = b'"P999999"'
        for version in range(1, a.versions + 1):
            v = value("P999999", version, a.value_bytes)  # the patient id swapped in below
            sent = []
            for i in range(a.patients):
                pid = f"P{i:06d}"
                mine = v.replace(template, f'"{pid}"'.encode())
                for topic in topics:
                    sent.append(await producer.send(topic, mine, key=pid.encode(), partition=i % a.partitions))
            await asyncio.gather(*sent)
    finally:
        await producer.stop()


async def restore(s: Settings) -> tuple[dict, InMemoryPatientStore, float]:
    protocols = default_protocols()
    store = InMemoryPatientStore()
    processor = ClinicalProcessor(Engine(protocols), lifecycle_config(protocols, s), store,
                                  findings_topic=f"{s.app_id}.unused", alerts_topic=f"{s.app_id}.unused",
                                  dead_letter_topic=f"{s.app_id}.unused")
    runner = ClinicalRunner(s, processor, store)
    cpu = time.process_time()
    task = asyncio.ensure_future(runner.run())
    try:
        await asyncio.wait_for(runner.ready.wait(), 300)
        cpu = time.process_time() - cpu
        return dict(runner.last_restore or {}), store, cpu
    finally:
        await runner.stop()
        task.cancel()
        await asyncio.gather(task, return_exceptions=True)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--bootstrap", default="127.0.0.1:9092")
    ap.add_argument("--patients", type=int, default=10_000)
    ap.add_argument("--versions", type=int, default=20)
    ap.add_argument("--value-bytes", type=int, default=13_000)
    ap.add_argument("--partitions", type=int, default=6)
    ap.add_argument("--wait", type=float, default=75, help="seconds of restores after the writes")
    ap.add_argument("--broker-segment-bytes", type=int, default=1024 ** 3)
    a = ap.parse_args(argv)

    from kafka.admin import NewTopic

    run = f"bcr{uuid.uuid4().hex[:6]}"

    def settings(name: str) -> Settings:
        return Settings(_env_file=None, kafka_bootstrap_servers=a.bootstrap, MONITOR_APP_ID=f"{run}-{name}",
                        topic_observations=f"{run}-{name}.observations", topic_partitions=a.partitions)

    service, default = settings("service"), settings("default")
    kafka = Kafka(a.bootstrap)
    admin = kafka.admin
    try:
        ensure_topics(service, [service.topic_observations, changelog_topic(service)])
        admin.create_topics([NewTopic(default.topic_observations, a.partitions, 1),
                             NewTopic(changelog_topic(default), a.partitions, 1,
                                      topic_configs={"cleanup.policy": "compact", "retention.ms": "-1",
                                                     "segment.bytes": str(a.broker_segment_bytes)})])
        print(f"changelog segment.bytes: service {service.changelog_segment_bytes:,} (CHANGELOG_SEGMENT_BYTES), "
              f"broker default {a.broker_segment_bytes:,}; {a.partitions} partitions")
        t = time.perf_counter()
        asyncio.run(write(a, [changelog_topic(service), changelog_topic(default)]))
        written = a.patients * a.versions
        print(f"wrote {written:,} versions ({a.patients:,} patients x {a.versions}, "
              f"{written * a.value_bytes / 2 ** 20:,.0f} MiB) to each in {time.perf_counter() - t:.1f}s")
        started = time.monotonic()
        while True:
            for name, s in (("service", service), ("broker default", default)):
                info, store, cpu = asyncio.run(restore(s))
                sample = [f"P{i:06d}" for i in range(0, a.patients, max(1, a.patients // 50))]
                newest = all(store.load(pid, int(pid[1:]) % a.partitions)[0].weight == a.versions for pid in sample)
                print(f"  +{time.monotonic() - started:3.0f}s {name:>14}: read {info.get('records', 0):,} of "
                      f"{written:,} records, {len(store):,} patients, restore {info.get('seconds', 0):.2f}s "
                      f"({cpu:.2f}s CPU with the group join); newest version held: {newest}")
                if not newest or len(store) != a.patients:
                    print("  a restored patient does not hold its newest version", file=sys.stderr)
                    return 1
            if time.monotonic() - started >= a.wait:
                return 0
            time.sleep(15)
    finally:
        kafka.delete_prefix(run)
        kafka.delete_groups(g for g in kafka.list_groups() if g.startswith(run))
        kafka.close()


if __name__ == "__main__":
    sys.exit(main())
