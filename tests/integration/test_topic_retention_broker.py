"""Records that last (issue 14): `monitor topics` / the worker create the clinical record topics
compacted or without time-based deletion; checked with the admin client on a real broker."""
from __future__ import annotations

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
        obs = cfg[f"{prefix}.observations"]
        assert int(obs["retention.ms"]) == s.observations_retention_days * 86_400_000 >= 180 * 86_400_000
        # a raw input keeps the broker default (time-based deletion)
        assert cfg[f"{prefix}.lab-results"]["retention.ms"] != "-1"
        assert ensure_topics(s) == []  # idempotent
    finally:
        drop_test_topics(kafka_bootstrap, names, [prefix])
