"""The Faust application: settings, topics and tables. Agents live in ``monitor.agents``."""
from __future__ import annotations

import logging

import faust

from .kafka_config import broker_url, faust_credentials
from .settings import get_settings

settings = get_settings()

app = faust.App(
    settings.app_id,
    broker=broker_url(settings),
    broker_credentials=faust_credentials(settings),
    store=settings.table_store,
    datadir=settings.data_dir,
    topic_partitions=settings.topic_partitions,
    topic_replication_factor=settings.topic_replication_factor,
    topic_allow_declare=True,
    topic_disable_leader=True,
    web_enabled=True,
    web_host=settings.web_host,
    web_port=settings.web_port,
    web_bind=settings.web_host,
    web_tables_enabled=False,
    web_in_thread=False,
    consumer_auto_offset_reset="earliest",
    producer_acks=-1,
    processing_guarantee="at_least_once",
    table_standby_replicas=0,
    autodiscover=False,
    # stop consumer-group churn from turning one slow batch into a rebalance storm
    broker_max_poll_interval=300.0,
    # a crashed worker's partitions move to the survivors within seconds, not a minute
    broker_session_timeout=settings.kafka_session_timeout_seconds,
    broker_heartbeat_interval=max(1.0, settings.kafka_session_timeout_seconds / 3),
    # a rebalance does not wait for the batch in flight (faust's wait_empty is reported to
    # hang rebalances: robinhood/faust#402, faust-streaming/faust#133); the clinical agent
    # re-reads its backlog after every assignment and keeps only safe cached state instead
    stream_wait_empty=False,
    # batch produce requests: one request per message costs more than the processing
    producer_linger=0.005,
    producer_max_batch_size=512 * 1024,
    # oversized inputs must still reach the dead-letter topic with their original bytes
    producer_max_request_size=settings.max_message_bytes,
    consumer_max_fetch_size=settings.max_message_bytes,
)


def raw_topic(*names: str) -> faust.TopicT:
    """A topic of raw bytes: decoding and validation happen in the agent, never before it."""
    return app.topic(
        *names,
        key_type=bytes,
        value_type=bytes,
        key_serializer="raw",
        value_serializer="raw",
        partitions=settings.topic_partitions,
        internal=False,
    )


dead_letter_topic = raw_topic(settings.topic_dead_letter)
findings_topic = raw_topic(settings.topic_findings)
alerts_topic = raw_topic(settings.topic_alerts)
# the clinical agent reads observations, treatments, actions and clock ticks for its patients
clinical_topics = raw_topic(
    settings.topic_observations, settings.topic_treatments, settings.topic_alert_actions, settings.topic_ticks
)
ticks_topic = raw_topic(settings.topic_ticks)

log = logging.getLogger("monitor")


@app.task
async def _quiet_library_loggers() -> None:
    """Client libraries log per message at DEBUG; never let that reach a production worker."""
    level = max(logging.INFO, logging.getLogger().getEffectiveLevel())
    for name in ("aiokafka", "kafka", "faust.topics", "faust.transport", "mode"):
        logging.getLogger(name).setLevel(max(level, logging.INFO))

# register agents, timers and web views
from . import agents  # noqa: E402,F401
from . import web  # noqa: E402,F401
from . import ops  # noqa: E402,F401
from . import actions_api  # noqa: E402,F401
