"""The clinical stage takes its own ingest's acknowledged writes instead of fetching them
back (``monitor.clinical.own_writes``), against a real broker. Whatever the mix of this
worker's ingest and another writer on the patient stream (an MLLP listener, another worker),
every record of the stream is processed exactly once and in offset order; a record someone
else wrote is processed even when this worker's ingest writes nothing more (the end check),
and the offsets committed reach the stream's end."""
from __future__ import annotations

import asyncio
import json
import uuid
from datetime import datetime, timedelta, timezone

import pytest
from kafka import KafkaProducer, TopicPartition

from alerts.testkit import obs
from monitor.clinical.own_writes import OwnWrites, StreamRecord
from monitor.clinical.runner import ClinicalRunner
from monitor.clinical.store import InMemoryPatientStore
from monitor.ingest import IngestService
from monitor.settings import Settings
from workers import raw_alt, raw_dose, runner_processor, until as wait_until

pytestmark = pytest.mark.integration

PATIENTS = [f"ow{i}" for i in range(10)]


def test_own_writes_and_another_writers_records_are_each_processed_once_in_offset_order(kafka_bootstrap,
                                                                                        topic_factory):
    prefix = f"own{uuid.uuid4().hex[:8]}"
    topics = topic_factory("lab-results", "vital-signs", "liver-function", "treatments", "alert-actions",
                           "observations", "findings", "alerts", "dead-letter", "patients-changelog",
                           partitions=2, prefix=prefix)
    s = Settings(_env_file=None, kafka_bootstrap_servers=kafka_bootstrap, MONITOR_APP_ID=prefix,
                 topic_lab_results=topics["lab-results"], topic_vital_signs=topics["vital-signs"],
                 topic_liver_function=topics["liver-function"], topic_treatments=topics["treatments"],
                 topic_alert_actions=topics["alert-actions"], topic_observations=topics["observations"],
                 topic_findings=topics["findings"], topic_alerts=topics["alerts"],
                 topic_dead_letter=topics["dead-letter"], topic_patient_changelog=topics["patients-changelog"],
                 clinical_checkpoint_interval_seconds=0.2)
    stream = topics["observations"]
    store = InMemoryPatientStore()
    processor = runner_processor(s, store)
    seen: dict[int, list[tuple[int, str]]] = {0: [], 1: []}  # partition -> (offset, how it came)
    values: dict[tuple[int, int], bytes] = {}  # (partition, offset) -> the value processed
    process = processor.process

    def recorded(records, now=None):
        records = list(records)
        for r in records:
            seen[r.partition].append((r.offset, "taken" if isinstance(r, StreamRecord) else "fetched"))
            values[(r.partition, r.offset)] = r.value
        return process(records, now)

    processor.process = recorded
    producer = KafkaProducer(bootstrap_servers=kafka_bootstrap, acks="all")
    t0 = datetime.now(timezone.utc) - timedelta(days=3)
    n = {"alt": 0, "foreign": 0}

    def publish_alts(k: int) -> None:
        """``k`` ALT results per patient through this worker's ingest."""
        for _ in range(k):
            n["alt"] += 1
            for pid in PATIENTS:
                producer.send(topics["lab-results"], key=pid.encode(), value=json.dumps(
                    raw_alt(pid, f"{pid}-alt{n['alt']}", 30 + n["alt"], t0 + timedelta(minutes=n["alt"]), "lab-a")
                ).encode())
        producer.flush()

    def publish_foreign(pid: str) -> None:
        """An observation written straight to the patient stream, as an MLLP listener does."""
        n["foreign"] += 1
        o = obs("alt", 45 + n["foreign"], 1.0, patient=pid, oid=f"{pid}-mllp{n['foreign']}")
        producer.send(stream, key=pid.encode(), value=o.model_dump_json().encode())
        producer.flush()

    def ends() -> dict[int, int]:
        from kafka import KafkaConsumer

        c = KafkaConsumer(bootstrap_servers=kafka_bootstrap)
        try:
            e = c.end_offsets([TopicPartition(stream, p) for p in (0, 1)])
        finally:
            c.close()
        return {tp.partition: off for tp, off in e.items()}

    def processed_to_end(e: dict[int, int]) -> bool:
        return all(len(seen[p]) >= e[p] for p in e)

    async def run() -> None:
        runner = ClinicalRunner(s, processor, store)
        runner.DIRECT_RETRY_SECONDS = 0.5
        own = runner.own_writes = OwnWrites(stream, owned=lambda p: p in runner.owned)
        ingest = IngestService(s, None, own)
        tasks = [asyncio.ensure_future(runner.run()), asyncio.ensure_future(ingest.run())]
        gathered = asyncio.gather(*tasks)

        def until(condition, what: str, seconds: float = 60):
            return wait_until(gathered, condition, what, seconds=seconds, poll=0.02)

        async def caught_up(what: str) -> dict[int, int]:
            e = await asyncio.to_thread(ends)
            await until(lambda: processed_to_end(e), what)
            return e

        async def caught_up_until(condition, what: str) -> dict[int, int]:
            """``caught_up``, then more input (up to ten times) until ``condition`` holds: a
            partition turns direct once a fetched batch ends where ingest's offers go on, and
            on a loaded machine all records may be fetched before that (the partitions'
            metadata late, offers made before the runner owned them)."""
            e = await caught_up(what)
            for _ in range(10):
                if condition():
                    break
                publish_alts(1)
                e = await caught_up(what)
            return e

        try:
            await until(lambda: runner.ready.is_set() and ingest.ready.is_set(), "the runner and ingest ready")
            for pid in PATIENTS:
                producer.send(topics["treatments"], key=pid.encode(),
                              value=json.dumps(raw_dose(pid, t0)).encode())
            producer.flush()
            publish_alts(3)
            await until(lambda: sum(map(len, seen.values())) >= 4 * len(PATIENTS), "the first records processed")
            publish_alts(3)
            await caught_up_until(lambda: own.taken > 0 and set(runner._direct) == {0, 1},
                                  "ingest's writes processed")
            assert own.taken > 0, "no record was taken from this worker's own writes"
            assert set(runner._direct) == {0, 1}, runner._direct

            # another writer, and this worker's ingest quiet: the end check finds its record
            foreign = PATIENTS[0]
            publish_foreign(foreign)
            await caught_up("the other writer's record processed without more input")

            # both writers at once
            for i in range(6):
                publish_alts(1)
                publish_foreign(PATIENTS[i % len(PATIENTS)])
            await caught_up("both writers' records processed")

            # after the holes, the partitions are taken from this worker's writes again
            taken = own.taken
            await asyncio.sleep(runner.DIRECT_RETRY_SECONDS + 0.2)
            publish_alts(2)
            publish_alts(2)
            e = await caught_up_until(lambda: own.taken > taken, "ingest's writes processed again")
            assert own.taken > taken, "the partitions did not return to this worker's own writes"
            await until(lambda: all(runner.positions.committed.get(TopicPartition(stream, p)) == e[p] for p in e),
                        "the stream committed to its end")
            lag = runner.lag()
            assert all(lag.get((stream, p), 0) == 0 for p in e), lag
        finally:
            await ingest.stop()
            await runner.stop()
            for t in tasks:
                t.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)
            producer.close()

    asyncio.run(run())
    e = ends()
    for p, end in e.items():
        offsets = [off for off, _how in seen[p]]
        assert offsets == list(range(end)), (p, offsets)  # each once, in offset order
    # what was processed at each offset is what the broker holds there
    from kafka_broker import read_topic

    held = {(m.partition, m.offset): m.value for m in read_topic(kafka_bootstrap, stream)}
    assert held == values
    hows = {how for p in seen for _off, how in seen[p]}
    assert hows == {"taken", "fetched"}, hows
    assert n["foreign"] == 7
