"""Ingest: raw input bytes -> canonical observations on ``observations``, or dead-letter.

Consumes raw bytes so nothing can fail before the agent body; every failure, even an
unexpected one, ends on the dead-letter topic with the original bytes.
"""
from __future__ import annotations

import logging
import time
from datetime import datetime, timedelta, timezone

from schemas.analytes import catalogue
from schemas.errors import Reason, Rejected
from schemas.ingest import Limits, decode

from ..app import app, dead_letter_topic, input_topics, observations_topic, settings
from ..dlq import send_dead_letter
from ..metrics import EVENTS_CONSUMED, OBSERVATIONS, PROCESSING_SECONDS, SOURCE_LAST_EVENT, source_label

log = logging.getLogger(__name__)

LIMITS = Limits(
    max_bytes=settings.max_payload_bytes,
    max_depth=settings.max_json_depth,
    max_future=timedelta(seconds=settings.max_future_skew_seconds),
)

_TOPIC_KIND = {
    settings.topic_lab_results: "lab-results",
    settings.topic_vital_signs: "vital-signs",
    settings.topic_liver_function: "liver-function",
}


async def ingest_one(topic: str, partition: int | None, offset: int | None, key: bytes | None, raw: bytes | None) -> int:
    """Decode one input message and publish what it yields. Returns the observations sent."""
    received_at = datetime.now(timezone.utc)
    started = time.perf_counter()
    kind = _TOPIC_KIND.get(topic, topic)
    try:
        observations = decode(kind, raw, received_at=received_at, limits=LIMITS)
    except Rejected as rej:
        EVENTS_CONSUMED.labels(topic=kind, format="invalid").inc()
        log.info("dead-lettered input from %s[%s]@%s: %s", topic, partition, offset, rej.reason.value)
        await send_dead_letter(dead_letter_topic, raw, key, rej.reason, rej.message, topic, partition, offset, received_at)
        return 0
    except Exception as exc:  # never crash on input
        EVENTS_CONSUMED.labels(topic=kind, format="invalid").inc()
        log.warning("unexpected %s decoding input from %s[%s]@%s", type(exc).__name__, topic, partition, offset)
        await send_dead_letter(
            dead_letter_topic, raw, key, Reason.INTERNAL_ERROR, f"{type(exc).__name__} while decoding",
            topic, partition, offset, received_at,
        )
        return 0
    fmt = observations[0].format if observations else "json"
    EVENTS_CONSUMED.labels(topic=kind, format=fmt).inc()
    cat = catalogue()
    for obs in observations:
        OBSERVATIONS.labels(analyte=obs.analyte, monitored=str(cat.by_key[obs.analyte].monitored).lower()).inc()
        await observations_topic.send(key=obs.patient_id.encode(), value=obs.model_dump_json().encode())
    if observations:
        SOURCE_LAST_EVENT.labels(source=source_label(observations[0].source)).set(received_at.timestamp())
    PROCESSING_SECONDS.labels(stage="ingest").observe(time.perf_counter() - started)
    return len(observations)


@app.agent(input_topics)
async def ingest(stream):
    async for event in stream.events():
        msg = event.message
        await ingest_one(msg.topic, msg.partition, msg.offset, msg.key, msg.value)
