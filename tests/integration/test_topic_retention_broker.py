"""Records that last (issue 14): `monitor topics` / the worker create the clinical record topics
compacted or without time-based deletion; checked with the admin client on a real broker."""
from __future__ import annotations

import time
import uuid

import pytest

pytestmark = pytest.mark.integration


def _configs(bootstrap: str, names: list[str]) -> dict[str, dict[str, str]]:
    from kafka.admin import ConfigResource, ConfigResourceType, KafkaAdminClient

    admin = KafkaAdminClient(bootstrap_servers=bootstrap)
    try:
        # kafka-python 3: {resource type: {resource name: {config key: {"value": ..., ...}}}}
        got = admin.describe_configs([ConfigResource(ConfigResourceType.TOPIC, n) for n in names],
                                     config_filter="all")
        out: dict[str, dict[str, str]] = {}
        for by_name in got.values():
            for name, entries in by_name.items():
                out[name] = {k: (v.get("value") if isinstance(v, dict) else v) for k, v in entries.items()}
        return out
    finally:
        admin.close()


def test_record_topics_never_expire(kafka_bootstrap):
    from kafka_broker import drop_test_topics

    from monitor.settings import SERVICE_TOPICS, Settings
    from monitor.topics_admin import changelog_topic, ensure_topics, service_topics

    prefix = f"ret{uuid.uuid4().hex[:8]}"
    s = Settings(kafka_bootstrap_servers=kafka_bootstrap, MONITOR_APP_ID=prefix,
                 **{field: f"{prefix}.{short}" for short, field in SERVICE_TOPICS.items()})
    created = ensure_topics(s)
    names = [*service_topics(s), changelog_topic(s)]
    try:
        assert sorted(created) == sorted(names) and f"{prefix}.patient-ticks" not in names
        cfg = _configs(kafka_bootstrap, names)
        for short in ("alerts", "alert-actions", "treatments"):
            c = cfg[f"{prefix}.{short}"]
            assert c["retention.ms"] == "-1" and c["retention.bytes"] == "-1", (short, c["retention.ms"])
        for name in (f"{prefix}.patients", f"{prefix}.alert-deliveries", changelog_topic(s)):
            assert cfg[name]["cleanup.policy"] == "compact" and cfg[name]["retention.ms"] == "-1", name
        # the changelog's segment bounds what a restore reads (test_changelog_compaction_broker)
        assert cfg[changelog_topic(s)]["segment.bytes"] == str(s.changelog_segment_bytes)
        obs = cfg[f"{prefix}.observations"]
        assert int(obs["retention.ms"]) == s.observations_retention_days * 86_400_000 >= 180 * 86_400_000
        # a raw input keeps the broker default (time-based deletion)
        assert cfg[f"{prefix}.lab-results"]["retention.ms"] != "-1"
        assert ensure_topics(s) == []  # idempotent
    finally:
        drop_test_topics(kafka_bootstrap, names, [prefix])


def test_upgrade_lengthens_the_retention_of_existing_record_topics(kafka_bootstrap):
    """Topics created by an older release with the broker's 7-day default are brought up to
    the retention the service needs; a retention an operator lengthened is kept."""
    from kafka.admin import KafkaAdminClient, NewTopic
    from kafka_broker import drop_test_topics

    from monitor.settings import SERVICE_TOPICS, Settings
    from monitor.topics_admin import changelog_topic, ensure_topics, service_topics

    prefix = f"upg{uuid.uuid4().hex[:8]}"
    s = Settings(kafka_bootstrap_servers=kafka_bootstrap, MONITOR_APP_ID=prefix,
                 **{field: f"{prefix}.{short}" for short, field in SERVICE_TOPICS.items()})
    week = str(7 * 86_400_000)
    old = {f"{prefix}.alerts": {"retention.ms": week}, f"{prefix}.treatments": {},
           f"{prefix}.patients": {"cleanup.policy": "delete", "retention.ms": week},
           f"{prefix}.observations": {"retention.ms": week},
           f"{prefix}.alert-actions": {"retention.ms": str(400 * 86_400_000)}}  # lengthened by hand, still finite
    admin = KafkaAdminClient(bootstrap_servers=kafka_bootstrap)
    try:
        admin.create_topics([NewTopic(n, 1, 1, topic_configs=c) for n, c in old.items()])
        # listed by the broker before the upgrade looks (a loaded broker showed them late, and
        # ensure_topics counted them as created)
        deadline = time.monotonic() + 15
        while not set(old) <= set(admin.list_topics()) and time.monotonic() < deadline:
            time.sleep(0.1)
    finally:
        admin.close()
    names = [*service_topics(s), changelog_topic(s)]
    try:
        created = ensure_topics(s)
        assert sorted(created) == sorted(n for n in names if n not in old), (created, names)
        # the topics holding another's state per partition are created with that one's partitions
        # (1, made by the older release), not TOPIC_PARTITIONS (3)
        admin = KafkaAdminClient(bootstrap_servers=kafka_bootstrap)
        try:
            counts = {d["name"]: len(d["partitions"])
                      for d in admin.describe_topics([changelog_topic(s), f"{prefix}.open-alerts", f"{prefix}.findings"])}
        finally:
            admin.close()
        assert counts == {changelog_topic(s): 1, f"{prefix}.open-alerts": 1, f"{prefix}.findings": s.topic_partitions}
        # an alteration is applied through the broker's metadata log: read until it shows (at most 15 s)
        deadline = time.monotonic() + 15
        while True:
            cfg = _configs(kafka_bootstrap, list(old))
            if cfg[f"{prefix}.patients"]["cleanup.policy"] == "compact" and all(
                    cfg[n]["retention.ms"] != week for n in old) or time.monotonic() > deadline:
                break
            time.sleep(0.3)
        assert cfg[f"{prefix}.alerts"]["retention.ms"] == "-1"
        assert cfg[f"{prefix}.treatments"]["retention.ms"] == "-1"
        assert cfg[f"{prefix}.alert-actions"]["retention.ms"] == "-1"  # finite -> unlimited: records never expire
        assert cfg[f"{prefix}.patients"]["cleanup.policy"] == "compact"
        assert int(cfg[f"{prefix}.observations"]["retention.ms"]) == s.observations_retention_days * 86_400_000
        # an operator's longer observation retention is kept on the next start
        admin = KafkaAdminClient(bootstrap_servers=kafka_bootstrap)
        try:
            from kafka.admin import ConfigResource, ConfigResourceType

            longer = str(3 * s.observations_retention_days * 86_400_000)
            admin.alter_configs([ConfigResource(ConfigResourceType.TOPIC, f"{prefix}.observations",
                                                {"retention.ms": longer})])
        finally:
            admin.close()
        deadline = time.monotonic() + 15
        while _configs(kafka_bootstrap, [f"{prefix}.observations"])[f"{prefix}.observations"]["retention.ms"] != longer:
            assert time.monotonic() < deadline, "the operator's alteration never showed"
            time.sleep(0.3)
        assert ensure_topics(s) == []
        time.sleep(1)  # an alteration (there must be none) would show within this
        assert _configs(kafka_bootstrap, [f"{prefix}.observations"])[f"{prefix}.observations"]["retention.ms"] == longer
    finally:
        drop_test_topics(kafka_bootstrap, names, [prefix])


def test_upgrade_sets_the_changelog_segment_unless_the_topic_has_its_own(kafka_bootstrap):
    """A changelog created by an older release has the broker's segment size (1 GiB on a
    default broker; 16 MiB on the test broker, so the service asks for 8 MiB here): it gets
    the service's. One whose segment size an operator set on the topic keeps it."""
    from kafka.admin import KafkaAdminClient, NewTopic
    from kafka_broker import drop_test_topics

    from monitor.settings import Settings
    from monitor.topics_admin import changelog_topic, ensure_topics

    def settings(prefix: str) -> Settings:
        return Settings(kafka_bootstrap_servers=kafka_bootstrap, MONITOR_APP_ID=prefix,
                        changelog_segment_bytes=8 * 1024 * 1024, max_message_bytes=8 * 1024 * 1024)

    old, own = settings(f"sgo{uuid.uuid4().hex[:8]}"), settings(f"sgn{uuid.uuid4().hex[:8]}")
    operator_value = str(64 * 1024 * 1024)
    admin = KafkaAdminClient(bootstrap_servers=kafka_bootstrap)
    try:
        admin.create_topics([
            NewTopic(changelog_topic(old), 1, 1, topic_configs={"cleanup.policy": "compact", "retention.ms": "-1"}),
            NewTopic(changelog_topic(own), 1, 1, topic_configs={"cleanup.policy": "compact", "retention.ms": "-1",
                                                                 "segment.bytes": operator_value})])
    finally:
        admin.close()
    names = [changelog_topic(old), changelog_topic(own)]
    try:
        before = _configs(kafka_bootstrap, names)
        assert before[changelog_topic(old)]["segment.bytes"] != str(old.changelog_segment_bytes)
        for s in (old, own):
            assert ensure_topics(s, [changelog_topic(s)]) == []
        deadline = time.monotonic() + 15
        while _configs(kafka_bootstrap, names)[changelog_topic(old)]["segment.bytes"] != str(8 * 1024 * 1024):
            assert time.monotonic() < deadline, "the changelog's segment size was not set"
            time.sleep(0.3)
        time.sleep(1)  # an alteration of the other (there must be none) would show within this
        assert _configs(kafka_bootstrap, names)[changelog_topic(own)]["segment.bytes"] == operator_value
    finally:
        drop_test_topics(kafka_bootstrap, names, [old.app_id, own.app_id])
