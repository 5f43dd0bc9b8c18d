"""A patient whose changelog value this release cannot read, on a real broker.

The changelog holds a version-2 value for one patient (what a newer release would write,
read here after a rollback). A clinical runner restores the partition, then reads a dose
and a liver result for that patient and for one with no stored state. The first patient's
records end on the dead-letter topic with their original bytes and the reason
``patient_state_unreadable``, its changelog value is never overwritten, the other patient's
alert is written, the stream is committed past both, and the worker's
``monitor_clinical_patients_unreadable`` says 1.
"""
from __future__ import annotations

import asyncio
import json
import uuid

import pytest
from kafka import KafkaProducer, TopicPartition

from alerts.lifecycle import AlertBook
from alerts.state import PatientState
from alerts.testkit import dose, obs
from monitor.clinical.processor import KIND_TREATMENT, routed_headers
from monitor.clinical.runner import ClinicalRunner
from monitor.clinical.store import FORMAT_VERSION, InMemoryPatientStore, encode
from monitor.metrics import REGISTRY
from workers import runner_processor, runner_settings, until

pytestmark = pytest.mark.integration

UNREADABLE, READABLE, PARTITION = "ur1", "ur2", 1


def newer_release_value() -> bytes:
    d = json.loads(encode(PatientState(UNREADABLE), AlertBook(patient_id=UNREADABLE)))
    d["v"] = FORMAT_VERSION + 1
    return json.dumps(d).encode()


def test_an_unreadable_patient_is_dead_lettered_and_counted_the_others_judged(kafka_bootstrap, topic_factory):
    from kafka_broker import read_topic

    s, topics = runner_settings(kafka_bootstrap, f"urs{uuid.uuid4().hex[:8]}", topic_factory)
    stream, changelog = topics["observations"], topics["patients-changelog"]
    stored = newer_release_value()
    producer = KafkaProducer(bootstrap_servers=kafka_bootstrap, acks="all")
    producer.send(changelog, key=UNREADABLE.encode(), value=stored, partition=PARTITION)
    sent = []
    for pid in (UNREADABLE, READABLE):
        for value, headers in ((dose(patient=pid).model_dump_json().encode(),
                                routed_headers(KIND_TREATMENT, "treatments", 0, len(sent))),
                               (obs("alt", 400, 5, high=40, patient=pid).model_dump_json().encode(), None)):
            producer.send(stream, key=pid.encode(), value=value, partition=PARTITION, headers=headers)
            sent.append((pid, value))
    producer.flush()
    producer.close()

    store = InMemoryPatientStore()
    processor = runner_processor(s, store, clock_settle_seconds=0.0)

    async def run() -> float:
        runner = ClinicalRunner(s, processor, store)
        task = asyncio.ensure_future(runner.run())
        try:
            await until(task, lambda: runner.positions.committed.get(TopicPartition(stream, PARTITION)) == 4
                        and not runner.pending, "the stream committed past all four records")
            await runner.tick()  # the clock goes over both patients: the unreadable one is skipped
            return REGISTRY.get_sample_value("monitor_clinical_patients_unreadable")
        finally:
            await runner.stop()
            task.cancel()
            await asyncio.gather(task, return_exceptions=True)

    assert asyncio.run(run()) == 1.0
    dead = read_topic(kafka_bootstrap, topics["dead-letter"], expected=2)
    assert [r.value for r in dead] == [v for pid, v in sent if pid == UNREADABLE]
    for r in dead:
        headers = dict(r.headers)
        assert headers["dlq.reason"] == b"patient_state_unreadable", headers
        assert headers["dlq.source.topic"] in (b"treatments", stream.encode())
    alerts = [json.loads(r.value) for r in read_topic(kafka_bootstrap, topics["alerts"], expected=1)]
    assert {a["patient_id"] for a in alerts} == {READABLE}
    values = {r.key: r.value for r in read_topic(kafka_bootstrap, changelog)}
    assert values[UNREADABLE.encode()] == stored  # never overwritten with a guessed state
    assert READABLE.encode() in values
