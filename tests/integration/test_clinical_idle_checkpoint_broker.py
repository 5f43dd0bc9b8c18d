"""The clinical runner's checkpoint at an idle poll (``ClinicalRunner.checkpoint_idle``),
against a real broker: once input stops, the patients changed since the last checkpoint are
encoded a slice per poll (``ENCODE_SLICE``), the polls between slices not waiting for input,
and the changelog is written once, holding each patient's state after its last result, with
the offsets committed to the stream's end. Encoding them all in one poll held the event loop,
and any result arriving, for as long as it took (99-283 us a patient of the simulated cohort:
10,000 marked behind a slow changelog write or a backlog would take 1.0-2.8 s)."""
from __future__ import annotations

import asyncio
import uuid

import pytest
from kafka import KafkaConsumer, KafkaProducer, TopicPartition

from alerts.testkit import dose, obs
from monitor.clinical.processor import KIND_TREATMENT, routed_headers
from monitor.clinical.runner import ClinicalRunner
from monitor.clinical.store import InMemoryPatientStore, decode
from workers import durable_to, runner_processor, runner_settings, stop_runner, until as wait_until

pytestmark = pytest.mark.integration

PATIENTS = [f"idle{i}" for i in range(11)]
SLICE = 3


def test_an_idle_checkpoint_encodes_a_slice_per_poll_and_writes_every_patient_once(kafka_bootstrap, topic_factory):
    from kafka_broker import read_topic

    prefix = f"idc{uuid.uuid4().hex[:8]}"
    s, topics = runner_settings(kafka_bootstrap, prefix, topic_factory, partitions=1)
    # never due by time or size while batches come: the checkpoint is the idle poll's
    s = s.model_copy(update={"clinical_checkpoint_interval_seconds": 3600.0})
    store = InMemoryPatientStore()
    processor = runner_processor(s, store)
    stream = topics["observations"]
    tp = TopicPartition(stream, 0)
    producer = KafkaProducer(bootstrap_servers=kafka_bootstrap, acks="all")
    events: list[tuple] = []  # ("take", patients encoded) | ("poll", timeout_ms) | ("write", patients)

    async def run() -> None:
        runner = ClinicalRunner(s, processor, store)
        runner.ENCODE_SLICE = SLICE
        take_changed, write_changelog = store.take_changed, runner._write_changelog

        def took(limit=None):
            got = take_changed(limit=limit)
            if got:
                events.append(("take", len(got)))
            return got

        async def recorded(changed):
            events.append(("write", sorted(pid for pid, _p, _v in changed)))
            await write_changelog(changed)

        store.take_changed = took
        runner._write_changelog = recorded
        task = asyncio.ensure_future(runner.run())
        try:
            await wait_until(task, lambda: runner.consumer is not None, "the runner started")
            getmany = runner.consumer.getmany

            async def polled(*args, timeout_ms=0, **kw):
                events.append(("poll", timeout_ms))
                return await getmany(*args, timeout_ms=timeout_ms, **kw)

            runner.consumer.getmany = polled
            n = 0
            for pid in PATIENTS:
                producer.send(stream, key=pid.encode(), value=dose(patient=pid).model_dump_json().encode(),
                              partition=0, headers=routed_headers(KIND_TREATMENT, "treatments", 0, 1))
                producer.send(stream, key=pid.encode(), partition=0, value=obs(
                    "platelets", 40, 5, low=150, high=450, patient=pid, oid=f"{pid}-r").model_dump_json().encode())
                n += 2
            producer.flush()
            await wait_until(task, lambda: durable_to(runner, store, tp, n), "the stream committed to its end")
        finally:
            await stop_runner(runner, task)
            producer.close()

    asyncio.run(run())
    writes = [e[1] for e in events if e[0] == "write"]
    assert writes == [sorted(PATIENTS)], writes  # one checkpoint, every patient once
    first = next(i for i, e in enumerate(events) if e[0] == "take")
    last = next(i for i, e in enumerate(events) if e[0] == "write")
    idle = events[first:last]
    takes = [e[1] for e in idle if e[0] == "take"]
    assert sum(takes) == len(PATIENTS) and max(takes) <= SLICE, idle
    # between two slices the loop polled for input, without waiting
    at = [i for i, e in enumerate(idle) if e[0] == "take"]
    assert len(at) >= 4, idle
    for i in at[:-1]:
        assert idle[i + 1] == ("poll", 0), idle
    # the changelog holds each patient's state after its last result, with its alert
    values = {m.key.decode(): m.value for m in read_topic(kafka_bootstrap, topics["patients-changelog"])}
    assert sorted(values) == sorted(PATIENTS)
    for pid in PATIENTS:
        state, book = decode(values[pid])
        assert f"{pid}-r" in {e[2] for e in state.hist.get("platelets", [])}
        assert "heme.platelets_decreased" in {a.rule_id for a in book.open_alerts()}, pid
    c = KafkaConsumer(bootstrap_servers=kafka_bootstrap, group_id=f"{prefix}-clinical", enable_auto_commit=False)
    try:
        assert c.committed(tp) == 2 * len(PATIENTS)
    finally:
        c.close()
