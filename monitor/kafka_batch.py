"""The batched aiokafka pattern shared by the ingest loop and the clinical runner:
consume a batch -> process -> produce -> await the broker's acknowledgements -> commit.

- ``new_producer`` / ``new_consumer``: the clients with the service's settings (idempotent
  producer, ``acks=all``; consumer without auto-commit, oversized records readable);
- ``produce_all``: send records and wait until the broker holds every one of them;
- ``next_offsets``: what to commit after a batch (last offset + 1 per partition);
- ``rewind``: seek partitions back to their committed offsets after a failed write, so
  the batch is processed again (partitions revoked meanwhile are skipped: the new owner
  resumes from the commit);
- ``OrderedCommits``: commits in the background, in order, while the next batch is processed;
- ``Positions``: the committed offsets this process made, for the lag gauge.
"""
from __future__ import annotations

import asyncio
import logging
from typing import Any, Callable, Iterable, Mapping

from aiokafka import AIOKafkaConsumer, AIOKafkaProducer
from aiokafka.partitioner import murmur2
from aiokafka.structs import TopicPartition

from .kafka_config import aiokafka_config
from .settings import Settings

log = logging.getLogger(__name__)


def new_producer(s: Settings, **extra: Any) -> AIOKafkaProducer:
    opts = dict(acks="all", enable_idempotence=True, linger_ms=5, max_batch_size=512 * 1024,
                max_request_size=s.max_message_bytes)
    opts.update(extra)
    return AIOKafkaProducer(**opts, **aiokafka_config(s))


def group_timeouts(s: Settings) -> dict[str, int]:
    """A group consumer's session, heartbeat and poll interval (aiokafka keyword arguments).

    A heartbeat every second (a third of the session when that is shorter): a member learns
    that its group is rebalancing at its next heartbeat, so with the old ``max(1 s, session /
    3)`` a worker joining (scale-out, a restart) waited up to 3.3 s with the 10 s session
    before the members gave up their partitions (docs/measurements.md, ninth pass)."""
    session = s.kafka_session_timeout_seconds
    return {"session_timeout_ms": int(session * 1000),
            "heartbeat_interval_ms": int(min(1.0, session / 3) * 1000),
            "max_poll_interval_ms": 300_000}


#: ``fetch_max_wait_ms`` of the consumers that read a topic to a known end (the changelog
#: restorer, the delivery ledger). A broker answers one request per connection at a time, in
#: order, and aiokafka sends a consumer's fetches and its ``end_offsets`` (ListOffsets) on the
#: same connection: behind a fetch of an idle partition, which the broker holds for
#: ``fetch_max_wait_ms`` (500 by default), ``end_offsets`` took 0.5-0.8 s, at every restore
#: and every ledger catch-up (docs/measurements.md, fifteenth pass)
READ_TO_END_FETCH_WAIT_MS = 100


def new_consumer(s: Settings, *topics: str, group_id: str | None, **extra: Any) -> AIOKafkaConsumer:
    opts = dict(group_id=group_id, enable_auto_commit=False, auto_offset_reset="earliest",
                max_partition_fetch_bytes=s.max_message_bytes,
                fetch_max_bytes=max(s.max_message_bytes, 50 * 1024 * 1024))
    if group_id is not None:
        opts.update(group_timeouts(s))
    opts.update(extra)
    return AIOKafkaConsumer(*topics, **opts, **aiokafka_config(s))


#: a record above this many bytes goes through ``send()`` alone (its size is checked against
#: ``max_request_size`` there, with the error it always had)
_BATCH_VALUE_LIMIT = 256 * 1024
#: murmur2 of a key (masked to 31 bits), by key: patient ids repeat in every batch
_HASHES: dict[bytes, int] = {}
_HASHES_MAX = 200_000


async def stop_clients(*clients: AIOKafkaConsumer | AIOKafkaProducer | None) -> None:
    """Stop each started client in turn; one that fails to stop does not keep the others
    running (a shutdown path: its error is of no further use)."""
    for c in clients:
        if c is not None:
            try:
                await c.stop()
            except Exception:  # noqa: BLE001
                pass


def key_partition(key: bytes, partitions: list[int]) -> int:
    """The partition aiokafka's (and Kafka's Java client's) default partitioner gives
    ``key`` among ``partitions`` (sorted): ``murmur2(key) & 0x7fffffff`` modulo their number."""
    h = _HASHES.get(key)
    if h is None:
        if len(_HASHES) >= _HASHES_MAX:
            _HASHES.clear()
        h = _HASHES[key] = murmur2(key) & 0x7FFFFFFF
    return partitions[h % len(partitions)]


async def produce_all(producer: AIOKafkaProducer, records: Iterable[tuple[str, bytes | None, bytes, Any, int | None]]
                      ) -> list:
    """Send ``(topic, key, value, headers, partition)`` records in order; return their
    metadata once the broker acknowledged every one (raises if any write failed).
    ``send_all`` then ``acknowledged``."""
    return await acknowledged(await send_all(producer, records))


async def acknowledged(sent: list) -> list:
    """The metadata of what ``send_all`` queued, once the broker acknowledged every record
    (raises if any write failed). The metadata of a batch is that of its LAST record
    (offset = base offset + count - 1)."""
    if not sent:
        return []
    out = []
    for md, n in zip(await asyncio.gather(*(f for f, _ in sent)), (n for _, n in sent)):
        out.append(md._replace(offset=md.offset + n - 1) if n and md is not None else md)
    return out


async def send_all(producer: AIOKafkaProducer, records: Iterable[tuple[str, bytes | None, bytes, Any, int | None]],
                   kept: list | None = None, keep_topic: str | None = None) -> list:
    """Queue ``(topic, key, value, headers, partition)`` records in order on ``producer``
    without waiting for the broker; returns what ``acknowledged`` waits for. Records queued
    by a later call follow these on every partition (the producer keeps its queue per
    partition in order; idempotence keeps it so across retries).

    Records go out as one record batch per partition (``create_batch`` / ``send_batch``)
    rather than one ``send()`` each: one future per batch instead of one per record. The
    partition of a keyed record without an explicit one is the default partitioner's
    (:func:`key_partition`), so every record lands where ``send()`` put it; a record
    without a key, or a large one, goes through ``send()``, after the records queued
    before it (for its partition; every partition for an unkeyed one). Order per partition
    is the order of ``records``.

    ``kept`` (with ``keep_topic``): for each entry returned, in the same order, the
    ``(key, value, headers)`` of its records of ``keep_topic`` in offset order (an empty list
    for another topic), so that the offsets the broker gives them are known once acknowledged
    (``monitor.clinical.own_writes``)."""
    parts: dict[str, list[int]] = {}
    open_: dict[tuple[str, int], list] = {}  # (topic, partition) -> [builder, count, kept records]
    futures: list = []  # (future, records in the batch or 0 for a single send)

    async def flush(tp: tuple[str, int]) -> None:
        b = open_.pop(tp, None)
        if b is not None and b[1]:
            b[0].close()  # nothing a later send() queues can join it
            futures.append((await producer.send_batch(b[0], tp[0], partition=tp[1]), b[1]))
            if kept is not None:
                kept.append(b[2] if tp[0] == keep_topic else [])

    for topic, key, value, headers, partition in records:
        if partition is None and key is not None:
            ps = parts.get(topic)
            if ps is None:
                ps = parts[topic] = sorted(await producer.partitions_for(topic))
            partition = key_partition(key, ps)
        if partition is None or (value is not None and len(value) > _BATCH_VALUE_LIMIT):
            # after everything queued for its partition (unkeyed: the partitioner's pick is
            # not known before, so after everything queued)
            for tp in ([(topic, partition)] if partition is not None else list(open_)):
                await flush(tp)
            futures.append((await producer.send(topic, value=value, key=key, headers=headers, partition=partition),
                            0))
            if kept is not None:
                kept.append([(key, value, headers)] if topic == keep_topic else [])
            continue
        tp = (topic, partition)
        b = open_.get(tp)
        if b is None:
            b = open_[tp] = [producer.create_batch(), 0, []]
        if b[0].append(key=key, value=value, timestamp=None, headers=headers or []) is None:
            await flush(tp)  # full: send it, start the next one
            b = open_[tp] = [producer.create_batch(), 0, []]
            if b[0].append(key=key, value=value, timestamp=None, headers=headers or []) is None:
                raise ValueError(f"record of {len(value or b'')} bytes does not fit an empty batch")
        b[1] += 1
        if kept is not None and topic == keep_topic:
            b[2].append((key, value, headers))
    for tp in list(open_):
        await flush(tp)
    return futures


class OrderedCommits:
    """Offset commits that run in the background, one after another in the order submitted
    (each waits for the one before), so a loop reads and processes its next batch meanwhile;
    ``drain`` waits for every commit submitted. A failed commit is logged and reported to
    ``done`` and ``on_failure``: its batch is already on the broker, so a later commit covers
    it or, after a rebalance, the new owner reads it again (at least once).

    ``min_interval`` (seconds, 0: every submission is a commit of its own): offsets submitted
    within that long of the last commit sent join one commit, sent when the interval is over
    (a timer, so the last batch before a pause is committed too) or at ``drain``, with the
    newest offset of each partition (submissions come in order). Every commit is a write to
    the broker's ``__consumer_offsets`` and a request the client encodes and waits for; a loop
    that commits every batch of a few records commits a hundred times a second and more
    (docs/measurements.md, nineteenth pass). What a crash replays grows by that interval, at
    least once as before."""

    def __init__(self, positions: "Positions", what: str, min_interval: float = 0.0,
                 on_failure: Callable[[], None] | None = None) -> None:
        self.positions = positions
        self.what = what
        self.min_interval = min_interval
        #: called once per failed commit (``monitor_commit_failures_total``)
        self.on_failure = on_failure
        self._last: asyncio.Future | None = None
        #: offsets waiting for the interval to end, their consumer and ``done`` callbacks
        self._pending: dict = {}
        self._pending_consumer: AIOKafkaConsumer | None = None
        self._pending_done: list[Callable[[bool], None]] = []
        self._timer: asyncio.TimerHandle | None = None
        self._last_sent = float("-inf")

    def submit(self, consumer: AIOKafkaConsumer, offsets: dict, done: Callable[[bool], None] | None = None) -> None:
        if self.min_interval <= 0:
            self._send(consumer, offsets, done)
            return
        if self._pending_consumer is not None and self._pending_consumer is not consumer:
            self._flush()  # (a new consumer after a restart: each commits its own offsets)
        self._pending.update(offsets)
        self._pending_consumer = consumer
        if done is not None:
            self._pending_done.append(done)
        loop = asyncio.get_running_loop()
        wait = self._last_sent + self.min_interval - loop.time()
        if wait <= 0:
            self._flush()
        elif self._timer is None:
            self._timer = loop.call_later(wait, self._flush)

    def _flush(self) -> None:
        """Send the offsets waiting for the interval, if any, as one commit."""
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        if not self._pending or self._pending_consumer is None:
            return
        offsets, consumer, dones = self._pending, self._pending_consumer, self._pending_done
        self._pending, self._pending_consumer, self._pending_done = {}, None, []
        self._last_sent = asyncio.get_running_loop().time()

        def done(ok: bool) -> None:
            for d in dones:
                d(ok)

        self._send(consumer, offsets, done if dones else None)

    def _send(self, consumer: AIOKafkaConsumer, offsets: dict, done: Callable[[bool], None] | None) -> None:
        self._last = asyncio.ensure_future(self._commit(self._last, consumer, offsets, done))

    async def _commit(self, previous: asyncio.Future | None, consumer: AIOKafkaConsumer, offsets: dict,
                      done: Callable[[bool], None] | None) -> None:
        if previous is not None:
            await asyncio.wait([previous])
        try:
            await consumer.commit(offsets)
            self.positions.committed.update(offsets)
            ok = True
        except asyncio.CancelledError:
            raise
        except Exception as exc:
            log.warning("%s commit failed (%s)", self.what, type(exc).__name__)
            ok = False
            if self.on_failure is not None:
                self.on_failure()
        if done is not None:
            done(ok)

    async def drain(self) -> None:
        """Send what waits for the interval, then wait for every commit submitted."""
        self._flush()
        task, self._last = self._last, None
        if task is not None:
            await asyncio.shield(task)


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
