"""The clinical runner writes a batch's changelog in the background, while the next batch is
read and processed (monitor/clinical/runner.py). When the broker refuses that changelog,
nothing may be committed past it and no state built on it may be kept: the batches are
restored from the durable changelog and processed again. Real broker, real worker: the
changelog topic is created with a ``max.message.bytes`` smaller than any patient's state,
so every changelog write fails until the limit is raised."""
from __future__ import annotations

import json
import time
import uuid
from datetime import datetime, timedelta, timezone

import pytest
from kafka import KafkaConsumer, TopicPartition
from kafka.admin import ConfigResource, ConfigResourceType, KafkaAdminClient, NewTopic

from test_clinical_broker import INPUTS, OUTPUTS, dose, result, send
from workers import service_env

pytestmark = pytest.mark.integration


def _committed_and_ends(bootstrap: str, group: str, topic: str) -> tuple[int, int]:
    c = KafkaConsumer(bootstrap_servers=bootstrap, group_id=group, enable_auto_commit=False)
    try:
        tps = [TopicPartition(topic, p) for p in sorted(c.partitions_for_topic(topic) or ())]
        ends = c.end_offsets(tps)
        return sum(c.committed(tp) or 0 for tp in tps), sum(ends.values())
    finally:
        c.close()


def _alerts(bootstrap: str, topic: str) -> list[dict]:
    c = KafkaConsumer(topic, bootstrap_servers=bootstrap, auto_offset_reset="earliest", enable_auto_commit=False,
                      group_id=None, consumer_timeout_ms=1500)
    try:
        return [json.loads(m.value) for m in c]
    finally:
        c.close()


def test_a_refused_changelog_holds_the_commit_and_the_state_back(kafka_bootstrap, topic_factory, worker_factory):
    prefix = f"clr{uuid.uuid4().hex[:8]}"
    topics = topic_factory(*INPUTS, *OUTPUTS, prefix=prefix)
    changelog = f"{prefix}-patients-changelog"
    admin = KafkaAdminClient(bootstrap_servers=kafka_bootstrap)
    try:
        admin.create_topics([NewTopic(changelog, 3, 1, topic_configs={"cleanup.policy": "compact",
                                                                      "max.message.bytes": "200"})])
        # a refused changelog is noticed, and its batches rolled back and processed again, at
        # the next batch or clock tick: ticks every 2 s (not the default 30 s) so that the
        # retries below do not wait for a tick
        w = worker_factory(service_env(topics, app_id=prefix, TICK_INTERVAL_SECONDS="2"), name="w1")
        now = datetime.now(timezone.utc)
        d = now - timedelta(days=5)
        send(kafka_bootstrap, [(topics["treatments"], "clr-1", dose("clr-1", d))])
        send(kafka_bootstrap, [(topics["lab-results"], "clr-1", result("clr-1", "plt-0", "platelets", 320,
                                                                      d - timedelta(days=1), 150, 450)),
                               (topics["lab-results"], "clr-1", result("clr-1", "plt-1", "platelets", 40,
                                                                      now - timedelta(days=1), 150, 450))])
        # every changelog write is refused: the worker says so, rolls back, and commits nothing
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline and b"clinical changelog not acknowledged" not in w.log_path.read_bytes():
            time.sleep(0.5)
        assert b"clinical changelog not acknowledged" in w.log_path.read_bytes()
        time.sleep(3)  # several rollbacks and retries
        committed, end = _committed_and_ends(kafka_bootstrap, f"{prefix}-clinical", topics["observations"])
        assert end >= 3 and committed == 0, (committed, end)
        # the outputs went out before the state (each retry emits the same alert version again)
        first = [a for a in _alerts(kafka_bootstrap, topics["alerts"]) if a["rule_id"] == "heme.platelets_decreased"]
        assert first and {a["version"] for a in first} == {1}

        # the broker takes the changelog again: everything is committed, the state is durable
        admin.alter_configs([ConfigResource(ConfigResourceType.TOPIC, changelog, {"max.message.bytes": "1048588"})])
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            committed, end = _committed_and_ends(kafka_bootstrap, f"{prefix}-clinical", topics["observations"])
            if committed == end:
                break
            time.sleep(0.5)
        assert committed == end, (committed, end)
    finally:
        admin.close()

    # a new worker process restores that state: the next result updates the same alert
    w.stop()
    worker_factory(service_env(topics, app_id=prefix), name="w2")
    send(kafka_bootstrap, [(topics["lab-results"], "clr-1", result("clr-1", "plt-2", "platelets", 30, now, 150, 450))])
    deadline = time.monotonic() + 60
    versions: set = set()
    while time.monotonic() < deadline:
        alerts = [a for a in _alerts(kafka_bootstrap, topics["alerts"]) if a["rule_id"] == "heme.platelets_decreased"]
        versions = {(a["alert_id"], a["version"]) for a in alerts}
        if any(v > 1 for _id, v in versions):
            break
    assert len({i for i, _v in versions}) == 1, versions  # one alert, not a second one opened afresh
    assert max(v for _i, v in versions) == 2, versions
    last = max(alerts, key=lambda a: a["version"])
    assert "plt-2" in {e["observation_id"] for e in last["evidence"]}
