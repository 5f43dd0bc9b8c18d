"""The clinical runner on a real broker when a patient's state cannot be rebuilt in place
after an internal error (``PatientStateLost``, monitor/clinical/processor.py ``_recover``):
the partition is restored from the changelog and read again from its committed offset, and
every record ends up applied once in the patient's state, its alerts written, nothing
dead-lettered and nothing committed past the changelog.

The runner runs in the test's process (a real aiokafka consumer and producer against the
test broker) so that the engine can fail on purpose: the second and third evaluations of
the run raise, i.e. the second record of a patient fails part-way and applying the first
one again fails too."""
from __future__ import annotations

import asyncio
import json
import uuid
import pytest
from kafka import KafkaConsumer, KafkaProducer, TopicPartition

from alerts.engine import Engine
from alerts.protocol import default_protocols
from alerts.testkit import dose, obs
from monitor.clinical.processor import KIND_TREATMENT, ClinicalProcessor, routed_headers
from monitor.clinical.runner import ClinicalRunner
from monitor.clinical.store import InMemoryPatientStore, decode
from monitor.worker import lifecycle_config
from workers import runner_settings

pytestmark = pytest.mark.integration

PARTITIONS = 3


def _read(bootstrap: str, topic: str) -> list:
    from kafka_broker import read_topic

    return list(read_topic(bootstrap, topic))


def test_a_patient_that_cannot_be_rebuilt_in_place_is_restored_from_the_changelog(kafka_bootstrap, topic_factory,
                                                                                 caplog):
    prefix = f"rec{uuid.uuid4().hex[:8]}"
    s, topics = runner_settings(kafka_bootstrap, prefix, topic_factory, partitions=PARTITIONS)
    protocols = default_protocols()
    engine = Engine(protocols)
    calls = {"n": 0}
    real = engine.evaluate_observation

    def second_and_third_fail(state, o, now):
        calls["n"] += 1
        if calls["n"] in (2, 3):
            raise RuntimeError("injected")
        return real(state, o, now)

    engine.evaluate_observation = second_and_third_fail
    store = InMemoryPatientStore()
    assert s.app_id == prefix
    processor = ClinicalProcessor(engine, lifecycle_config(protocols, s), store, findings_topic=s.topic_findings,
                                  alerts_topic=s.topic_alerts, dead_letter_topic=s.topic_dead_letter,
                                  clock_settle_seconds=3600)
    d = dose(patient="rc1")
    results = [obs("platelets", 320, -1, low=150, high=450, patient="rc1"),
               obs("platelets", 40, 5, low=150, high=450, patient="rc1"),
               obs("platelets", 30, 6, low=150, high=450, patient="rc1")]
    producer = KafkaProducer(bootstrap_servers=kafka_bootstrap, acks="all")
    stream = topics["observations"]
    producer.send(stream, key=b"rc1", value=d.model_dump_json().encode(), partition=1,
                  headers=routed_headers(KIND_TREATMENT, "treatments", 0, 1))
    for o in results:
        producer.send(stream, key=b"rc1", value=o.model_dump_json().encode(), partition=1)
    producer.flush()
    producer.close()

    async def run() -> None:
        runner = ClinicalRunner(s, processor, store)
        task = asyncio.ensure_future(runner.run())
        try:
            deadline = asyncio.get_running_loop().time() + 60
            while True:
                assert not task.done(), task.exception()
                if runner.positions.committed.get(TopicPartition(stream, 1)) == 4 and not runner.pending:
                    break
                assert asyncio.get_running_loop().time() < deadline, "the stream was not committed within 60 s"
                await asyncio.sleep(0.1)
        finally:
            await runner.stop()
            task.cancel()
            await asyncio.gather(task, return_exceptions=True)

    from monitor.metrics import REGISTRY

    def counted() -> tuple[float, float]:
        rollbacks = REGISTRY.get_sample_value("monitor_rollbacks_total", {"stage": "clinical", "reason": "state_lost"})
        restores = REGISTRY.get_sample_value("monitor_clinical_restore_seconds_count", {"cause": "rollback"})
        return rollbacks or 0, restores or 0

    before = counted()
    with caplog.at_level("WARNING"):
        asyncio.run(run())
    assert "not recoverable in place" in caplog.text  # the rollback path was taken
    # ... and counted for operations: one rollback, one restore of its partitions
    assert counted() == (before[0] + 1, before[1] + 1), (before, counted())
    assert calls["n"] >= 5  # the failures, then every result applied again after the restore
    # nothing dead-lettered: no record was bad, and none was lost
    assert _read(kafka_bootstrap, topics["dead-letter"]) == []
    alerts = [json.loads(m.value) for m in _read(kafka_bootstrap, topics["alerts"])]
    assert any(a["rule_id"] == "heme.platelets_decreased" and a["patient_id"] == "rc1" for a in alerts)
    # the changelog's last value for the patient holds every result once
    values = [m.value for m in _read(kafka_bootstrap, topics["patients-changelog"]) if m.key == b"rc1"]
    state, book = decode(values[-1])
    held = sorted(e[2] for e in state.hist.get("platelets", []))
    assert held == sorted(o.observation_id for o in results)
    assert "heme.platelets_decreased" in {a.rule_id for a in book.open_alerts()}
    # the committed offset is the end of the stream
    c = KafkaConsumer(bootstrap_servers=kafka_bootstrap, group_id=f"{prefix}-clinical", enable_auto_commit=False)
    try:
        assert c.committed(TopicPartition(stream, 1)) == 4
    finally:
        c.close()
