"""(b) of the benchmark: a bare faust passthrough, the yardstick of faust's per-message path.

Raw bytes in (the service's input topics), forwarded unchanged to one output topic by one
agent; memory store. The app takes the worker's runtime settings
(``monitor.app.faust_app_kwargs``) plus the Kafka settings the clinical agent ran with
while it was a faust agent (``FAUST_KAFKA`` below: the worker itself no longer starts
faust's Kafka clients). Only the app id comes from ``MONITOR_APP_ID`` like the service.

Environment: the service's (``KAFKA_BOOTSTRAP_SERVERS``, ``MONITOR_APP_ID``, ``WEB_PORT``,
``DATA_DIR``, ``TOPIC_PARTITIONS``) plus ``BENCH_IN_TOPICS`` (comma-separated) and
``BENCH_OUT_TOPIC``; ``BENCH_FAUST_OVERRIDES`` (a JSON object of faust settings) is for
experiments by hand and is never set by ``run_all.py``.

    python bench/bare_faust.py worker -l warning
"""
from __future__ import annotations

import json
import os
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

import faust  # noqa: E402

from monitor.app import faust_app_kwargs  # noqa: E402
from monitor.kafka_config import broker_url, faust_credentials  # noqa: E402
from monitor.settings import get_settings  # noqa: E402

settings = get_settings()

#: the faust Kafka settings of the clinical agent before it moved to aiokafka (f91789f)
FAUST_KAFKA = dict(
    broker=broker_url(settings), broker_credentials=faust_credentials(settings), store="memory://",
    topic_partitions=settings.topic_partitions,
    topic_replication_factor=settings.topic_replication_factor, topic_allow_declare=True,
    topic_disable_leader=True, consumer_auto_offset_reset="earliest", producer_acks=-1,
    processing_guarantee="at_least_once", table_standby_replicas=0, broker_max_poll_interval=300.0,
    stream_wait_empty=False, producer_linger=0.005, producer_max_batch_size=512 * 1024,
    producer_max_request_size=settings.max_message_bytes, consumer_max_fetch_size=settings.max_message_bytes,
)

APP_KWARGS = {**faust_app_kwargs(settings), **FAUST_KAFKA}
APP_KWARGS_FROM = "monitor.app.faust_app_kwargs + FAUST_KAFKA"

#: for experiments only (run_all.py never sets it): JSON object of faust settings to override
APP_KWARGS.update(json.loads(os.environ.get("BENCH_FAUST_OVERRIDES") or "{}"))

app = faust.App(settings.app_id, **APP_KWARGS)


def _raw(*names: str) -> faust.TopicT:
    return app.topic(*names, key_type=bytes, value_type=bytes, key_serializer="raw", value_serializer="raw",
                     partitions=settings.topic_partitions, internal=False)


IN_TOPICS = [t for t in os.environ.get("BENCH_IN_TOPICS", "").split(",") if t]
OUT_TOPIC = os.environ.get("BENCH_OUT_TOPIC", "")
if not IN_TOPICS or not OUT_TOPIC:
    raise SystemExit("set BENCH_IN_TOPICS and BENCH_OUT_TOPIC")

source = _raw(*IN_TOPICS)
sink = _raw(OUT_TOPIC)


@app.agent(source)
async def passthrough(stream):
    async for event in stream.events():
        msg = event.message
        await sink.send(key=msg.key, value=msg.value)


if __name__ == "__main__":
    app.main()
