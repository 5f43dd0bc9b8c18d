"""Create the service's topics (idempotent) with kafka-python's admin client."""
from __future__ import annotations

import logging

from kafka.admin import KafkaAdminClient, NewTopic
from kafka.errors import TopicAlreadyExistsError

from .kafka_config import kafka_python_config
from .settings import Settings

log = logging.getLogger(__name__)


def service_topics(s: Settings) -> list[str]:
    return [
        s.topic_lab_results, s.topic_vital_signs, s.topic_liver_function, s.topic_treatments,
        s.topic_observations, s.topic_dead_letter, s.topic_findings, s.topic_alerts,
        s.topic_alert_actions, s.topic_ticks, s.topic_deliveries,
    ]


def ensure_topics(s: Settings, names: list[str] | None = None) -> list[str]:
    """Create missing topics; returns the names created."""
    names = names or service_topics(s)
    admin = KafkaAdminClient(client_id=f"{s.app_id}-admin", **kafka_python_config(s))
    try:
        existing = set(admin.list_topics())
        missing = [n for n in names if n not in existing]
        if missing:
            try:
                admin.create_topics([
                    NewTopic(n, s.topic_partitions, s.topic_replication_factor,
                             topic_configs=({"cleanup.policy": "compact"} if n == s.topic_deliveries else {}))
                    for n in missing
                ])
            except TopicAlreadyExistsError:
                pass
            log.info("created %d topics", len(missing))
        return missing
    finally:
        admin.close()
