"""Per-patient order by construction (issue 13): ingest routes treatments and actions into
the patient stream ``observations`` keyed by patient, so a dose sent WITHOUT a key (or by a
client with another partitioner) still lands on the partition of the patient's labs, and
the clinical stage evaluates post-dose labs against the dose, not as pre-dose baselines."""
from __future__ import annotations

import json
import uuid
from datetime import datetime, timedelta, timezone

import pytest
from kafka import KafkaProducer

from test_clinical_broker import INPUTS, OUTPUTS, Reader, dose, result
from workers import service_env, wait_ingested

pytestmark = pytest.mark.integration


def send_dose_then_low_platelets(p: KafkaProducer, topics: dict, pid: str, now: datetime, dose_key: bytes | None):
    """A dose 5 days ago (sent first and acknowledged), then platelets of 320 six days ago (the
    baseline) and 40 a day ago (grade 3); the producer is closed after."""
    p.send(topics["treatments"], key=dose_key, value=json.dumps(dose(pid, now - timedelta(days=5))).encode()).get(30)
    for eid, value, day in ((f"{pid}-plt0", 320, 6), (f"{pid}-plt", 40, 1)):
        p.send(topics["lab-results"], key=pid.encode(),
               value=json.dumps(result(pid, eid, "platelets", value, now - timedelta(days=day), 150, 450)).encode())
    p.flush()
    p.close()


def platelets_alert(bootstrap: str, topics: dict, pid: str) -> dict:
    """The patient's first firing platelets-decreased alert version."""
    alerts = Reader(bootstrap, topics["alerts"])
    try:
        return alerts.wait_for(lambda x: x["patient_id"] == pid and x["rule_id"] == "heme.platelets_decreased"
                               and x["status"] == "firing")[0]
    finally:
        alerts.close()


def test_a_dose_without_key_reaches_the_patients_partition(kafka_bootstrap, topic_factory, worker_factory):
    prefix = f"pst{uuid.uuid4().hex[:8]}"
    topics = topic_factory(*INPUTS, *OUTPUTS, prefix=prefix)
    worker_factory(service_env(topics, app_id=prefix), name="w1")
    now = datetime.now(timezone.utc)
    pid = "ps-nokey"
    p = KafkaProducer(bootstrap_servers=kafka_bootstrap, acks="all")
    # the dose first, with no key at all: the client spreads it over partitions
    send_dose_then_low_platelets(p, topics, pid, now, dose_key=None)
    a = platelets_alert(kafka_bootstrap, topics, pid)
    assert a["grade"] == 3 and f"{pid}-plt" in {e["observation_id"] for e in a["evidence"]}
    # on the patient stream the routed dose sits on the same partition as the labs, before them
    # (ingest committed every input: the stream holds all it will get from them)
    from kafka_broker import read_topic

    wait_ingested(kafka_bootstrap, prefix, [topics["treatments"], topics["lab-results"]])
    seen = [(m.partition, m.offset, dict(m.headers or []).get("kind"), m.key)
            for m in read_topic(kafka_bootstrap, topics["observations"])]
    mine = [s for s in seen if s[3] == pid.encode()]
    assert {s[0] for s in mine} and len({s[0] for s in mine}) == 1, mine
    kinds = [s[2] for s in sorted(mine, key=lambda s: s[1])]
    assert kinds[0] == b"treatment" and kinds.count(None) == 2, kinds


def test_a_garbled_record_on_the_patient_stream_is_a_dead_letter_not_a_stalled_stage(kafka_bootstrap, topic_factory,
                                                                                     worker_factory):
    """Records on the patient stream that ingest did not write (found by the patient stream's
    fuzz target): routed headers whose coordinates are not numbers used to raise out of the
    clinical processor, so the clinical loop stopped, restarted from its commit, met the same
    record and stopped again, and no patient of its partitions was judged; and a source header
    naming another topic was believed, so its dead letter pointed ``monitor dlq replay`` at it."""
    prefix = f"psg{uuid.uuid4().hex[:8]}"
    topics = topic_factory(*INPUTS, *OUTPUTS, prefix=prefix)
    worker = worker_factory(service_env(topics, app_id=prefix), name="w1")
    now = datetime.now(timezone.utc)
    pid = "ps-garbled"
    p = KafkaProducer(bootstrap_servers=kafka_bootstrap, acks="all")
    # straight onto the patient stream, on the patient's partition, ahead of its inputs
    garbled = [("kind", b"treatment"), ("src.topic", topics["treatments"].encode()), ("src.partition", b"abc"),
               ("src.offset", b"-")]
    forged = [("kind", b"action"), ("src.topic", topics["alerts"].encode()), ("src.partition", b"0"),
              ("src.offset", b"1")]
    p.send(topics["observations"], key=pid.encode(), value=b"{}", headers=garbled).get(30)
    p.send(topics["observations"], key=pid.encode(), value=b'{"action": "acknowledge"}', headers=forged).get(30)
    send_dose_then_low_platelets(p, topics, pid, now, dose_key=pid.encode())
    platelets_alert(kafka_bootstrap, topics, pid)  # the patient is judged: the stage went past the garbled records
    from kafka_broker import read_topic

    dead = [{k: v.decode() for k, v in m.headers}
            for m in read_topic(kafka_bootstrap, topics["dead-letter"], expected=2) if m.key == pid.encode()]
    by_source = {d["dlq.source.topic"]: d for d in dead}
    assert len(dead) == 2 and set(by_source) == {topics["treatments"], topics["observations"]}, dead
    # a routed treatment points at its source, without the coordinates that are not numbers
    routed = by_source[topics["treatments"]]
    assert (routed["dlq.source.partition"], routed["dlq.source.offset"]) == ("", "")
    # the forged source is not believed: the record's own place on the patient stream
    assert by_source[topics["observations"]]["dlq.source.offset"] == "1"
    assert worker.metric("monitor_loop_restarts_total", loop="clinical") == 0
