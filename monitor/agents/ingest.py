"""Ingest: raw input bytes -> canonical observations on ``observations``, or dead-letter.

Ingest is stateless, so it runs as a batched consume -> decode -> produce -> commit loop
on aiokafka inside the worker process rather than as a per-message faust agent: the
profile of the faust agent showed the time going to per-message stream, conductor and
producer overhead, not to decoding (see README, "Performance"). Guarantees:

- at least once: a batch's offsets are committed only after the broker acknowledged
  every observation and dead letter produced from it; on a failed write the consumer
  rewinds to the last commit and the batch is processed again (ids are stable, so
  downstream stages see the same observation ids);
- nothing lost: every input ends as observations or as a dead letter with its original
  bytes, source topic/partition/offset and a reason; nothing raised by decoding can stop
  the loop;
- keyed by patient: observations are produced with ``patient_id`` as key.
"""
from __future__ import annotations

import asyncio
import logging
import time
from datetime import datetime, timedelta, timezone

from aiokafka import AIOKafkaConsumer, AIOKafkaProducer

from schemas.analytes import catalogue
from schemas.errors import Reason, Rejected
from schemas.ingest import Limits, decode

from ..app import app, settings
from ..dlq import dead_letter_headers
from ..kafka_config import aiokafka_config
from ..metrics import DEAD_LETTERS, EVENTS_CONSUMED, OBSERVATIONS, PROCESSING_SECONDS, SOURCE_LAST_EVENT, source_label

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

_MONITORED = {a.key: str(a.monitored).lower() for a in catalogue().by_key.values()}


class _Counters:
    """Metric children cached by label values: ``labels()`` costs more than the increment."""

    def __init__(self) -> None:
        self._events: dict[tuple, object] = {}
        self._obs: dict[str, object] = {}
        self._dead: dict[tuple, object] = {}

    def event(self, kind: str, fmt: str) -> None:
        c = self._events.get((kind, fmt))
        if c is None:
            c = self._events[(kind, fmt)] = EVENTS_CONSUMED.labels(topic=kind, format=fmt)
        c.inc()

    def observation(self, analyte: str) -> None:
        c = self._obs.get(analyte)
        if c is None:
            c = self._obs[analyte] = OBSERVATIONS.labels(analyte=analyte, monitored=_MONITORED.get(analyte, "false"))
        c.inc()

    def dead(self, topic: str, reason: str) -> None:
        c = self._dead.get((topic, reason))
        if c is None:
            c = self._dead[(topic, reason)] = DEAD_LETTERS.labels(topic=topic, reason=reason)
        c.inc()


COUNTERS = _Counters()


def ingest_record(topic: str, partition: int | None, offset: int | None, key: bytes | None, raw: bytes | None,
                  received_at: datetime) -> list[tuple[str, bytes | None, bytes, list | None]]:
    """Pure step: one input message -> the records to produce (topic, key, value, headers)."""
    kind = _TOPIC_KIND.get(topic, topic)
    try:
        observations = decode(kind, raw, received_at=received_at, limits=LIMITS)
    except Rejected as rej:
        reason, message = rej.reason, rej.message
    except Exception as exc:  # never crash on input
        log.warning("unexpected %s decoding input from %s[%s]@%s", type(exc).__name__, topic, partition, offset)
        reason, message = Reason.INTERNAL_ERROR, f"{type(exc).__name__} while decoding"
    else:
        COUNTERS.event(kind, observations[0].format if observations else "json")
        out = []
        for obs in observations:
            COUNTERS.observation(obs.analyte)
            out.append((settings.topic_observations, obs.patient_id.encode(), obs.model_dump_json().encode(), None))
        if observations:
            SOURCE_LAST_EVENT.labels(source=source_label(observations[0].source)).set(received_at.timestamp())
        return out
    COUNTERS.event(kind, "invalid")
    COUNTERS.dead(topic, reason.value)
    log.info("dead-lettered input from %s[%s]@%s: %s", topic, partition, offset, reason.value)
    return [(settings.topic_dead_letter, key, raw if raw is not None else b"",
             dead_letter_headers(reason, message, topic, partition, offset, received_at))]


class IngestService:
    """The batched ingest loop; one consumer group ``<app id>-ingest`` across workers."""

    MAX_BATCH = 2000

    def __init__(self) -> None:
        self.consumer: AIOKafkaConsumer | None = None
        self.producer: AIOKafkaProducer | None = None
        self.ready = asyncio.Event()
        self.processed = 0
        #: next offset to read per partition, as last committed by this worker
        self.committed: dict = {}

    async def start(self) -> None:
        cfg = aiokafka_config(settings)
        self.producer = AIOKafkaProducer(
            acks="all", enable_idempotence=True, linger_ms=5, max_batch_size=512 * 1024,
            max_request_size=settings.max_message_bytes, **cfg)
        await self.producer.start()
        self.consumer = AIOKafkaConsumer(
            *_TOPIC_KIND, group_id=f"{settings.app_id}-ingest", enable_auto_commit=False,
            auto_offset_reset="earliest", max_partition_fetch_bytes=settings.max_message_bytes,
            fetch_max_bytes=max(settings.max_message_bytes, 50 * 1024 * 1024), **cfg)
        await self.consumer.start()
        self.ready.set()
        await self.run()

    async def run(self) -> None:
        assert self.consumer is not None and self.producer is not None
        consumer, producer = self.consumer, self.producer
        while True:
            batch = await consumer.getmany(timeout_ms=200, max_records=self.MAX_BATCH)
            if not batch:
                continue
            started = time.perf_counter()
            received_at = datetime.now(timezone.utc)
            futures = []
            n = 0
            for tp, records in batch.items():
                for r in records:
                    n += 1
                    for out_topic, key, value, headers in ingest_record(
                            r.topic, r.partition, r.offset, r.key, r.value, received_at):
                        futures.append(await producer.send(out_topic, value=value, key=key, headers=headers))
            try:
                await asyncio.gather(*futures)
                offsets = {tp: records[-1].offset + 1 for tp, records in batch.items()}
                await consumer.commit(offsets)
                self.committed.update(offsets)
            except asyncio.CancelledError:
                raise
            except Exception as exc:
                # not acknowledged: rewind to the last commit and process the batch again
                log.warning("ingest write failed (%s); retrying from the last commit", type(exc).__name__)
                await asyncio.sleep(1.0)
                await self._rewind(batch)
                continue
            self.processed += n
            PROCESSING_SECONDS.labels(stage="ingest_batch").observe(time.perf_counter() - started)

    def lag(self) -> dict[tuple[str, int], int]:
        """Log end offset (from the last fetch) minus committed offset per assigned input partition."""
        if self.consumer is None:
            return {}
        out = {}
        for tp in self.consumer.assignment():
            end = self.consumer.highwater(tp)
            done = self.committed.get(tp)
            if end is not None and done is not None:
                out[(tp.topic, tp.partition)] = max(0, end - done)
            elif end is not None and end == 0:
                out[(tp.topic, tp.partition)] = 0
        for tp in list(self.committed):
            if tp not in self.consumer.assignment():
                del self.committed[tp]
        return out

    async def _rewind(self, batch) -> None:
        assert self.consumer is not None
        for tp, records in batch.items():
            try:
                committed = await self.consumer.committed(tp)
                self.consumer.seek(tp, committed if committed is not None else records[0].offset)
            except Exception as exc:  # revoked meanwhile: the new owner resumes from the commit
                log.warning("ingest rewind of partition %s failed: %s", tp.partition, type(exc).__name__)

    async def stop(self) -> None:
        for c in (self.consumer, self.producer):
            if c is not None:
                try:
                    await c.stop()
                except Exception:
                    pass


INGEST = IngestService()


async def _run_ingest() -> None:
    while True:
        try:
            await INGEST.start()
        except asyncio.CancelledError:
            raise
        except Exception:
            log.exception("ingest loop stopped; restarting in 2 s")
            INGEST.ready.clear()
            await INGEST.stop()
            await asyncio.sleep(2)


@app.task
async def start_ingest() -> None:
    # not a faust-managed task: faust cancels those when it restarts its services
    asyncio.ensure_future(_run_ingest())


@app.on_before_shutdown.connect
async def _stop_ingest(sender, **kwargs) -> None:  # pragma: no cover - wiring
    # leave the consumer group cleanly so a restarted worker gets its partitions at once
    await INGEST.stop()
