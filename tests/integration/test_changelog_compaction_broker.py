"""The changelog a restore reads stays bounded (issue 13: restart to processing <= 10 s).

Every checkpoint writes a new version of each changed patient to the compacted changelog,
and a broker compacts closed segments only. On a broker's default segment (1 GiB) a
patient's versions since the last roll all stay, and a restore reads them all: 200,000
records and 7.5-8.6 s for 10,000 patients x 20 versions, against 11,839 records and 0.4-0.6 s
with 16 MiB segments (``bench/bench_changelog_restore.py``). The service creates the
changelog with ``segment.bytes`` = ``CHANGELOG_SEGMENT_BYTES``.

Here, on a real broker, the clinical runner restores a changelog that ``ensure_topics``
created (1 MiB segments) and one created as a broker default would leave it (1 GiB), after
the same 30 versions of 300 patients were written to both: the first reads a fraction of
the records once the broker's cleaner has run, the second reads every one, and both hold
each patient's newest version.
"""
from __future__ import annotations

import asyncio
import time
import uuid

import pytest
from kafka import KafkaProducer
from kafka.admin import KafkaAdminClient, NewTopic

from alerts.state import PatientState
from alerts.lifecycle import AlertBook
from monitor.clinical.runner import ClinicalRunner
from monitor.clinical.store import InMemoryPatientStore, encode

pytestmark = pytest.mark.integration

PATIENTS, VERSIONS, PARTITIONS = 300, 30, 3
MIB = 1024 * 1024
#: a patient value of about 3 KB (the ward padded; a real one is 6-13 KB, bench_clinical):
#: 300 x 30 x 3 KB is about 9 segments of 1 MiB per partition
PADDING = "paediatric neurology " * 140


def value(pid: str, version: int) -> bytes:
    state = PatientState(pid)
    state.weight = float(version)  # which version a restored patient holds
    state.ward = PADDING
    return encode(state, AlertBook(patient_id=pid))


def settings(bootstrap: str, prefix: str, **extra):
    from monitor.settings import Settings

    return Settings(_env_file=None, kafka_bootstrap_servers=bootstrap, MONITOR_APP_ID=prefix,
                    topic_observations=f"{prefix}.observations", topic_partitions=PARTITIONS,
                    changelog_segment_bytes=MIB, max_message_bytes=MIB, **extra)


async def restore_once(s) -> tuple[int, InMemoryPatientStore]:
    """A clinical runner joins its group, restores its partitions, and stops."""
    from alerts.engine import Engine
    from alerts.protocol import default_protocols
    from monitor.clinical.processor import ClinicalProcessor
    from monitor.worker import lifecycle_config

    protocols = default_protocols()
    store = InMemoryPatientStore()
    processor = ClinicalProcessor(Engine(protocols), lifecycle_config(protocols, s), store,
                                  findings_topic="unused.findings", alerts_topic="unused.alerts",
                                  dead_letter_topic="unused.dead-letter")  # no input: it writes nothing
    runner = ClinicalRunner(s, processor, store)
    task = asyncio.ensure_future(runner.run())
    try:
        await asyncio.wait_for(runner.ready.wait(), 60)
        assert runner.last_restore is not None
        return runner.last_restore["records"], store
    finally:
        await runner.stop()
        task.cancel()
        await asyncio.gather(task, return_exceptions=True)


def test_a_restore_reads_the_compacted_changelog_not_every_version(kafka_bootstrap):
    from kafka_broker import drop_test_topics

    from monitor.topics_admin import changelog_topic, ensure_topics

    service = settings(kafka_bootstrap, f"cmp{uuid.uuid4().hex[:8]}")
    broker_default = settings(kafka_bootstrap, f"cmd{uuid.uuid4().hex[:8]}")
    names = [service.topic_observations, changelog_topic(service),
             broker_default.topic_observations, changelog_topic(broker_default)]
    try:
        assert sorted(ensure_topics(service, [service.topic_observations, changelog_topic(service)])) == sorted(
            names[:2])
        admin = KafkaAdminClient(bootstrap_servers=kafka_bootstrap)
        try:
            admin.create_topics([
                NewTopic(broker_default.topic_observations, PARTITIONS, 1),
                NewTopic(changelog_topic(broker_default), PARTITIONS, 1,
                         topic_configs={"cleanup.policy": "compact", "retention.ms": "-1",
                                        "segment.bytes": str(1024 * MIB)})])
        finally:
            admin.close()
        producer = KafkaProducer(bootstrap_servers=kafka_bootstrap, acks="all", linger_ms=20,
                                 batch_size=256 * 1024)
        for version in range(1, VERSIONS + 1):
            for i in range(PATIENTS):
                pid = f"cp{i:04d}"
                v = value(pid, version)
                for s in (service, broker_default):
                    producer.send(changelog_topic(s), key=pid.encode(), value=v, partition=i % PARTITIONS)
        producer.flush()
        producer.close()
        written = PATIENTS * VERSIONS

        # the broker's cleaner looks every 15 s (log.cleaner.backoff.ms): restore until it ran
        deadline = time.monotonic() + 90
        while True:
            records, store = asyncio.run(restore_once(service))
            if records <= written // 4 or time.monotonic() > deadline:
                break
            time.sleep(5)
        assert records <= written // 4, f"the restore read {records} of {written} records after 90 s"
        control, control_store = asyncio.run(restore_once(broker_default))
        assert control == written  # 1 GiB segments: nothing was compacted, every version read

        for s_store in (store, control_store):
            assert len(s_store) == PATIENTS
            for i in range(0, PATIENTS, 37):
                pid = f"cp{i:04d}"
                state, _ = s_store.load(pid, i % PARTITIONS)
                assert state.weight == float(VERSIONS), (pid, state.weight)
    finally:
        drop_test_topics(kafka_bootstrap, names, [service.app_id, broker_default.app_id])
