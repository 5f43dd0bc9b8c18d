"""The batched aiokafka pattern shared by the ingest loop and the clinical runner:
consume a batch -> process -> produce -> await the broker's acknowledgements -> commit.

- ``new_producer`` / ``new_consumer``: the clients with the service's settings (idempotent
  producer, ``acks=all``; consumer without auto-commit, oversized records readable);
- ``produce_all``: send records and wait until the broker holds every one of them;
- ``next_offsets``: what to commit after a batch (last offset + 1 per partition);
- ``rewind``: seek partitions back to their committed offsets after a failed write, so
  the batch is processed again (partitions revoked meanwhile are skipped: the new owner
  resumes from the commit);
- ``Positions``: the committed offsets this process made, for the lag gauge.
"""
from __future__ import annotations

import asyncio
import logging
from typing import Any, Iterable, Mapping

from aiokafka import AIOKafkaConsumer, AIOKafkaProducer
from aiokafka.structs import TopicPartition

from .kafka_config import aiokafka_config
from .settings import Settings

log = logging.getLogger(__name__)


def new_producer(s: Settings, **extra: Any) -> AIOKafkaProducer:
    opts = dict(acks="all", enable_idempotence=True, linger_ms=5, max_batch_size=512 * 1024,
                max_request_size=s.max_message_bytes)
    opts.update(extra)
    return AIOKafkaProducer(**opts, **aiokafka_config(s))


def new_consumer(s: Settings, *topics: str, group_id: str | None, **extra: Any) -> AIOKafkaConsumer:
    opts = dict(group_id=group_id, enable_auto_commit=False, auto_offset_reset="earliest",
                max_partition_fetch_bytes=s.max_message_bytes,
                fetch_max_bytes=max(s.max_message_bytes, 50 * 1024 * 1024))
    if group_id is not None:
        opts.update(session_timeout_ms=int(s.kafka_session_timeout_seconds * 1000),
                    heartbeat_interval_ms=int(max(1.0, s.kafka_session_timeout_seconds / 3) * 1000),
                    max_poll_interval_ms=300_000)
    opts.update(extra)
    return AIOKafkaConsumer(*topics, **opts, **aiokafka_config(s))


async def produce_all(producer: AIOKafkaProducer, records: Iterable[tuple[str, bytes | None, bytes, Any, int | None]]
                      ) -> list:
    """Send ``(topic, key, value, headers, partition)`` records in order; return their
    metadata once the broker acknowledged every one (raises if any write failed)."""
    futures = [await producer.send(topic, value=value, key=key, headers=headers, partition=partition)
               for topic, key, value, headers, partition in records]
    return list(await asyncio.gather(*futures)) if futures else []


def next_offsets(batch: Mapping[TopicPartition, list]) -> dict[TopicPartition, int]:
    return {tp: records[-1].offset + 1 for tp, records in batch.items() if records}


async def rewind(consumer: AIOKafkaConsumer, tps: Iterable[TopicPartition], what: str) -> None:
    for tp in tps:
        try:
            committed = await consumer.committed(tp)
            if committed is None:
                await consumer.seek_to_beginning(tp)
            else:
                consumer.seek(tp, committed)
        except Exception as exc:  # revoked meanwhile: the new owner resumes from the commit
            log.warning("%s rewind of partition %s failed: %s", what, tp.partition, type(exc).__name__)


class Positions:
    """Offsets this process committed per partition, and the lag against the last fetch."""

    def __init__(self) -> None:
        self.committed: dict[TopicPartition, int] = {}

    def lag(self, consumer: AIOKafkaConsumer | None) -> dict[tuple[str, int], int]:
        """Log end (as the last fetch reported it) minus committed offset per assigned partition."""
        if consumer is None:
            return {}
        assigned = consumer.assignment()
        out = {}
        for tp in assigned:
            end = consumer.highwater(tp)
            done = self.committed.get(tp)
            if end is not None and done is not None:
                out[(tp.topic, tp.partition)] = max(0, end - done)
            elif end is not None and end == 0:
                out[(tp.topic, tp.partition)] = 0
        for tp in [tp for tp in self.committed if tp not in assigned]:
            del self.committed[tp]
        return out
