"""The clinical runner's due checkpoint, encoded a slice of patients after each batch
(``ClinicalRunner._encode_slice``), against a real broker: results arrive in rounds while
the runner runs; a checkpoint that became due is written only once all of its patients are
encoded, commits the offsets of when it became due, and after the input stops the changelog
holds every patient's state after its last result and the committed offsets are the stream's end."""
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

PATIENTS = [f"sl{i}" for i in range(8)]
ROUNDS = 4


def test_a_due_checkpoint_is_encoded_in_slices_and_commits_only_what_its_values_hold(kafka_bootstrap,
                                                                                    topic_factory):
    from kafka_broker import read_topic

    prefix = f"slc{uuid.uuid4().hex[:8]}"
    s, topics = runner_settings(kafka_bootstrap, prefix, topic_factory, partitions=1)
    s = s.model_copy(update={"clinical_checkpoint_interval_seconds": 0.0})  # due after every batch
    store = InMemoryPatientStore()
    processor = runner_processor(s, store)
    stream = topics["observations"]
    tp = TopicPartition(stream, 0)
    producer = KafkaProducer(bootstrap_servers=kafka_bootstrap, acks="all")
    sent = {"n": 0}

    def send(pid: str, value: bytes, headers=None) -> None:
        producer.send(stream, key=pid.encode(), value=value, partition=0, headers=headers)
        sent["n"] += 1

    writes: list[list[str]] = []  # the patients of each changelog write
    slices = {"n": 0}

    async def run() -> None:
        runner = ClinicalRunner(s, processor, store)
        runner.ENCODE_SLICE = 3  # 8 patients: a due checkpoint takes three batches
        write_changelog, encode_slice = runner._write_changelog, runner._encode_slice

        async def recorded(changed):
            writes.append([pid for pid, _p, _v in changed])
            await write_changelog(changed)

        def counted():
            slices["n"] += 1
            encode_slice()

        runner._write_changelog = recorded
        runner._encode_slice = counted
        task = asyncio.ensure_future(runner.run())

        def until(condition, what: str):
            return wait_until(task, condition, what, poll=0.02)

        try:
            for pid in PATIENTS:
                send(pid, dose(patient=pid).model_dump_json().encode(),
                     headers=routed_headers(KIND_TREATMENT, "treatments", 0, 1))
            producer.flush()
            await until(lambda: runner.processed >= len(PATIENTS), "the doses processed")
            for r in range(ROUNDS):
                # one patient's result per batch: the checkpoint due after the doses is
                # encoded a slice after each of these batches
                for pid in PATIENTS:
                    send(pid, obs("platelets", 300 - 60 * r, r + 1, low=150, high=450, patient=pid,
                                  oid=f"{pid}-{r}").model_dump_json().encode())
                    producer.flush()
                    n = sent["n"]
                    await until(lambda: runner.processed >= n, "a result processed")
            await until(lambda: durable_to(runner, store, tp, sent["n"]), "the stream committed to its end")
        finally:
            await stop_runner(runner, task)
            producer.close()

    asyncio.run(run())
    assert slices["n"] >= 3, slices  # at least one checkpoint took more than one slice
    # every checkpoint wrote each patient once
    assert all(len(pids) == len(set(pids)) for pids in writes), writes
    # the changelog's last value of every patient is the state after its last result
    values: dict[str, bytes] = {}
    for m in read_topic(kafka_bootstrap, topics["patients-changelog"]):
        values[m.key.decode()] = m.value
    assert sorted(values) == sorted(PATIENTS)
    for pid in PATIENTS:
        state, book = decode(values[pid])
        assert state.dose_at is not None
        held, _book = store.load(pid, 0)  # what the runner holds after the last batch
        assert [e[2] for e in state.hist.get("platelets", [])] == [e[2] for e in held.hist.get("platelets", [])]
        assert f"{pid}-{ROUNDS - 1}" in {e[2] for e in state.hist.get("platelets", [])}
        assert "heme.platelets_decreased" in {a.rule_id for a in book.open_alerts()}, pid
    c = KafkaConsumer(bootstrap_servers=kafka_bootstrap, group_id=f"{prefix}-clinical", enable_auto_commit=False)
    try:
        assert c.committed(tp) == sent["n"]
    finally:
        c.close()
