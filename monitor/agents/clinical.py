"""The per-patient clinical agent: treatments -> patient state; observations -> findings.

Placeholder wiring for the foundation: treatments are validated here (dead-letter on
failure) and kept in the changelog-backed ``patients`` table.
"""
from __future__ import annotations

import logging
from datetime import datetime, timedelta, timezone

from schemas.errors import Reason, Rejected
from schemas.ingest import Limits, decode

from ..app import app, clinical_topics, dead_letter_topic, settings
from ..dlq import send_dead_letter
from ..metrics import EVENTS_CONSUMED

log = logging.getLogger(__name__)

LIMITS = Limits(
    max_bytes=settings.max_payload_bytes,
    max_depth=settings.max_json_depth,
    max_future=timedelta(seconds=settings.max_future_skew_seconds),
)

patients = app.Table("patients", default=None, partitions=settings.topic_partitions)


@app.agent(clinical_topics)
async def clinical(stream):
    async for event in stream.events():
        msg = event.message
        if msg.topic != settings.topic_treatments:
            continue
        received_at = datetime.now(timezone.utc)
        try:
            treatment = decode("treatments", msg.value, received_at=received_at, limits=LIMITS)
        except Rejected as rej:
            EVENTS_CONSUMED.labels(topic="treatments", format="invalid").inc()
            await send_dead_letter(dead_letter_topic, msg.value, msg.key, rej.reason, rej.message,
                                   msg.topic, msg.partition, msg.offset, received_at)
            continue
        except Exception as exc:
            await send_dead_letter(dead_letter_topic, msg.value, msg.key, Reason.INTERNAL_ERROR,
                                   type(exc).__name__, msg.topic, msg.partition, msg.offset, received_at)
            continue
        EVENTS_CONSUMED.labels(topic="treatments", format="json").inc()
        state = dict(patients[treatment.patient_id] or {})
        state.setdefault("treatments", []).append(treatment.model_dump(mode="json"))
        patients[treatment.patient_id] = state
