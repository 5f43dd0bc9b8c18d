"""Ingest does not wait for the broker's acknowledgement of a batch before reading and
processing the next ones (monitor/ingest.py: up to ``MAX_UNACKNOWLEDGED`` batches in
flight, each committed once it and every batch before it are acknowledged). When the
broker refuses a write, nothing after it may be committed: the loop rewinds to the last
commit and every input is processed again. Real broker, real worker: the patient stream
is given a ``max.message.bytes`` smaller than any observation, so every write to it fails
until the limit is raised; the inputs are published in several bursts so that several
batches are refused while in flight."""
from __future__ import annotations

import json
import time
import uuid
from datetime import datetime, timedelta, timezone

import pytest
from kafka.admin import ConfigResource, ConfigResourceType, KafkaAdminClient

from kafka_broker import read_topic
from test_changelog_refused_broker import _committed_and_ends
from test_clinical_broker import INPUTS, OUTPUTS, result, send
from workers import service_env, wait_committed

pytestmark = pytest.mark.integration


def _observation_ids(bootstrap: str, topic: str) -> list[str]:
    return [json.loads(m.value)["observation_id"] for m in read_topic(bootstrap, topic)]


def test_a_refused_write_commits_nothing_after_it_and_every_input_arrives(kafka_bootstrap, topic_factory,
                                                                          worker_factory):
    prefix = f"irf{uuid.uuid4().hex[:8]}"
    topics = topic_factory(*INPUTS, *OUTPUTS, prefix=prefix)
    stream = topics["observations"]
    admin = KafkaAdminClient(bootstrap_servers=kafka_bootstrap)
    try:
        admin.alter_configs([ConfigResource(ConfigResourceType.TOPIC, stream, {"max.message.bytes": "200"})])
        w = worker_factory(service_env(topics, app_id=prefix), name="w1")
        now = datetime.now(timezone.utc)
        expected = []
        for burst in range(5):  # several batches, refused while others are in flight
            records = []
            for i in range(20):
                pid = f"irf-{i % 7}"
                eid = f"plt-{burst}-{i}"
                expected.append(eid)
                records.append((topics["lab-results"], pid,
                                result(pid, eid, "platelets", 200 + i, now - timedelta(hours=burst, minutes=i),
                                       150, 450)))
            send(kafka_bootstrap, records)
            time.sleep(0.3)
        w.wait_logged(b"ingest write failed")
        time.sleep(3)  # several rewinds and retries
        committed, end = _committed_and_ends(kafka_bootstrap, f"{prefix}-ingest", topics["lab-results"])
        assert end == len(expected) and committed == 0, (committed, end)
        assert _observation_ids(kafka_bootstrap, stream) == []
        assert w.metric("monitor_rollbacks_total", stage="ingest", reason="write_refused") >= 1

        # the broker takes the stream again: every input arrives and everything is committed
        admin.alter_configs([ConfigResource(ConfigResourceType.TOPIC, stream, {"max.message.bytes": "1048588"})])
        wait_committed(kafka_bootstrap, f"{prefix}-ingest", [topics["lab-results"]], timeout=60)
    finally:
        admin.close()
    seen = _observation_ids(kafka_bootstrap, stream)
    assert set(seen) == set(expected), sorted(set(expected) - set(seen))
    # per patient, the stream holds the results in the order they were published
    order = {eid: n for n, eid in enumerate(expected)}
    first_seen = list(dict.fromkeys(seen))
    for pid in {f"irf-{i}" for i in range(7)}:
        mine = [e for e in first_seen if int(e.split("-")[2]) % 7 == int(pid.split("-")[1])]
        assert mine == sorted(mine, key=order.__getitem__), pid
