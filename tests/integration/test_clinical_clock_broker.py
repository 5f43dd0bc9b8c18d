"""The clinical clock on a real broker while a changelog write is in flight
(monitor/clinical/runner.py, ``tick``): a clock chunk does not wait for that write, its
outputs reach the alerts topic at once, and the patients it changed are written to the
changelog by a later checkpoint once the input is idle, so a clock-raised alert is durable
without any further record.

The runner runs in the test's process (a real aiokafka consumer and producers against the
test broker) so that the changelog write can be held on purpose: the checkpoint of a second
patient's batch waits at a gate until the test opens it, after the clock has run."""
from __future__ import annotations

import asyncio
import json
import uuid
from datetime import datetime, timedelta, timezone

import pytest
from kafka import KafkaProducer

from alerts.testkit import T0, dose, obs
from monitor.clinical.processor import KIND_TREATMENT, routed_headers
from monitor.clinical.runner import ClinicalRunner
from monitor.clinical.store import InMemoryPatientStore, decode
from workers import runner_processor, runner_settings, until as wait_until

pytestmark = pytest.mark.integration


def _day(t: datetime) -> float:
    """``alerts.testkit`` times are days after its T0."""
    return (t - T0).total_seconds() / 86400


def test_a_clock_alert_does_not_wait_for_the_changelog_and_is_written_once_the_input_is_idle(
        kafka_bootstrap, topic_factory):
    from kafka_broker import read_topic

    prefix = f"clk{uuid.uuid4().hex[:8]}"
    s, topics = runner_settings(kafka_bootstrap, prefix, topic_factory)
    store = InMemoryPatientStore()
    processor = runner_processor(s, store, clock_settle_seconds=0)
    now = datetime.now(timezone.utc)
    d0 = now - timedelta(days=20)
    # weekly liver tests, the last 8 days ago: due again 7 days + 24 h grace after it, i.e. an
    # hour from now. Nothing is overdue when the records are processed; the clock, run for a
    # time two hours ahead, raises schedule.overdue (liver)
    last = now - timedelta(days=8) + timedelta(hours=1)
    stream = topics["observations"]
    producer = KafkaProducer(bootstrap_servers=kafka_bootstrap, acks="all")
    producer.send(stream, key=b"ck1", value=dose(patient="ck1", day=_day(d0)).model_dump_json().encode(),
                  partition=0, headers=routed_headers(KIND_TREATMENT, "treatments", 0, 1))
    for i, t in enumerate([d0 - timedelta(days=1), d0 + timedelta(days=6), last]):
        for a, v, hi in (("alt", 30, 40), ("ast", 40, 60), ("bilirubin_total", 0.4, 1.2)):
            producer.send(stream, key=b"ck1", partition=0, value=obs(
                a, v, _day(t), high=hi, patient="ck1", oid=f"ck1-{i}-{a}").model_dump_json().encode())
    producer.flush()

    gate = asyncio.Event()
    seen: dict = {}

    async def run() -> None:
        runner = ClinicalRunner(s, processor, store)
        write_changelog = runner._write_changelog

        async def held(changed):  # the changelog write waits for the test to open the gate
            await gate.wait()
            await write_changelog(changed)

        task = asyncio.ensure_future(runner.run())

        def until(condition, what: str):
            return wait_until(task, condition, what)

        try:
            await until(lambda: "ck1" in store.patient_ids(runner.owned) and runner._persist_task is None
                        and not runner.pending and not runner._encoded and not store.changed_count(),
                        "ck1 processed and checkpointed")
            runner._write_changelog = held
            # a second patient's result: its checkpoint's changelog write is now held in flight
            p2 = KafkaProducer(bootstrap_servers=kafka_bootstrap, acks="all")
            p2.send(stream, key=b"ck2", partition=1,
                    value=obs("platelets", 300, _day(now - timedelta(hours=2)), low=150, high=450,
                              patient="ck2", oid="ck2-0").model_dump_json().encode())
            p2.flush()
            p2.close()
            await until(lambda: runner._persist_task is not None and not runner._persist_task.done(),
                        "a checkpoint held in flight")
            # the clock runs while that write is held: it must not wait for it
            await asyncio.wait_for(runner.tick(now + timedelta(hours=2)), 10)
            seen["held_after_tick"] = runner._persist_task is not None and not runner._persist_task.done()
            # the clock's change waits, marked, for the next checkpoint
            seen["kept_for_checkpoint"] = store.is_changed("ck1")
            gate.set()
            # the input is idle: a checkpoint writes the clock's change without another record
            await until(lambda: runner._persist_task is None and not runner._encoded and not runner.pending
                        and not store.changed_count(), "the clock's change checkpointed")
        finally:
            gate.set()
            await runner.stop()
            task.cancel()
            await asyncio.gather(task, return_exceptions=True)

    asyncio.run(run())
    assert seen == {"held_after_tick": True, "kept_for_checkpoint": True}, seen
    overdue = [a for a in (json.loads(m.value) for m in read_topic(kafka_bootstrap, topics["alerts"]))
               if a["patient_id"] == "ck1" and a["rule_id"] == "schedule.overdue" and a["dedupe_key"] == "liver"]
    assert overdue and overdue[-1]["status"] == "firing", overdue
    # the changelog's last value for ck1 holds the alert the clock raised
    values = [m.value for m in read_topic(kafka_bootstrap, topics["patients-changelog"]) if m.key == b"ck1"]
    _state, book = decode(values[-1])
    assert overdue[-1]["alert_id"] in {a.alert_id for a in book.open_alerts() if a.rule_id == "schedule.overdue"}
