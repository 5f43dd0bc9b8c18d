"""The open alerts Alertmanager has been given, per outbox partition, and their index on Kafka.

Alertmanager keeps no alerts across a restart and expires an alert at its ``endsAt``, so the
worker re-pushes every open alert of its outbox partitions each ``ALERTMANAGER_REFRESH_SECONDS``
with ``endsAt`` four intervals ahead. A worker that takes an outbox partition over must first
know that partition's open alerts, and the outbox consumer resumes from its commit, past alerts
opened long ago. It used to learn them by reading the partition from its beginning: the
``alerts`` topic keeps every version for ever, so that read grew with the service's history
(about 46 us of the worker's event loop per version: 200,000 versions took 9.2-9.6 s,
``bench/bench_outbox_rebuild.py``; a partition holding a few million would take minutes, as
long as the four intervals Alertmanager waits before it resolves the alerts nobody re-pushed).

The index is a compacted topic (``TOPIC_OPEN_ALERTS``, partition ``p`` for outbox partition
``p``): key the alert id, value the latest version of an open alert, a tombstone once it closes,
and one marker record per partition (key ``MARKER_KEY``) holding the outbox offset it is valid
from. The worker writes the alerts that changed since its last commit, then the marker with the
offset it is about to commit, and only then commits (``OpenAlerts.flush``). So the index is, at
every commit, at least as new as the commit; the next owner reads it (bounded by the open alerts,
not the history) and re-reads the outbox from the commit as it always does, newer versions
replacing older ones.

When the index cannot be trusted it is not used: the next owner reads the whole partition as
before, then rewrites the index. That is when the marker is missing (a first start, an upgrade
from a release without the index) or older than the group's commit (a worker committed without
writing the index: an older release in a rolling upgrade, a failed index write, a partition
committed before its open alerts were known).
"""
from __future__ import annotations

import asyncio
import json
import logging
import time
from typing import Awaitable, Callable

from aiokafka import AIOKafkaConsumer, AIOKafkaProducer, TopicPartition

from schemas.alert import Alert

from ..kafka_batch import READ_TO_END_FETCH_WAIT_MS
from ..metrics import OPEN_ALERTS_REBUILDS, OPEN_ALERTS_REBUILD_SECONDS, OPEN_ALERTS_INDEX_WRITE_FAILURES

log = logging.getLogger(__name__)

#: the key of a partition's marker record; alert ids are 32 hex characters, so it is never one
MARKER_KEY = b"#valid-from"
#: records decoded between two yields to the event loop while reading (the loop also runs the
#: clinical stage; a fetch response of 1 MiB holds about 700 alert versions, 30 ms of decoding)
YIELD_EVERY = 200


def marker_value(offset: int) -> bytes:
    return json.dumps({"outbox_offset": offset}).encode()


def marker_offset(value: bytes | None) -> int | None:
    """The outbox offset a marker record says the index is valid from (None: not readable)."""
    try:
        return int(json.loads(value)["outbox_offset"]) if value else None
    except (ValueError, KeyError, TypeError):
        return None


class OpenAlerts:
    """Per outbox partition, the latest version of each open alert that Alertmanager knows of,
    and which of them changed since the index was last written."""

    def __init__(self, topic: str | None = None) -> None:
        #: the index topic; None: no index (a worker without an Alertmanager sink)
        self.topic = topic
        self.open: dict[TopicPartition, dict[str, Alert]] = {}
        #: alert ids whose entry in the index is older than ``open`` (written at the next flush)
        self.dirty: dict[TopicPartition, set[str]] = {}
        #: partitions whose open alerts are all known (read from the index or the whole partition)
        self.built: set[TopicPartition] = set()
        #: per partition, the outbox offset the index is known valid from (its marker)
        self.marked: dict[TopicPartition, int] = {}
        #: while a partition is being built: the closed versions read, so an older open version
        #: read afterwards (from the index or the history, behind the outbox) does not reopen it
        self.closed: dict[TopicPartition, dict[str, int]] = {}

    def track(self, tp: TopicPartition, alert: Alert, delivered: bool, note: bool = True) -> None:
        """An alert version read from outbox partition ``tp``; ``delivered``: Alertmanager is given it.
        ``note``: its entry in the index is to be rewritten (not for versions the history read finds:
        the build rewrites what it must once it is done, not every alert that ever closed)."""
        if self._superseded(tp, alert):
            return
        opened = self.open.setdefault(tp, {})
        building = tp not in self.built
        if not alert.is_open:
            if building:  # the index or history read may hold an older open version
                self.closed.setdefault(tp, {})[alert.alert_id] = alert.version
            if opened.pop(alert.alert_id, None) is not None and note:
                self.dirty.setdefault(tp, set()).add(alert.alert_id)
        elif alert.alert_id in opened or delivered:
            opened[alert.alert_id] = alert
            if note:
                self.dirty.setdefault(tp, set()).add(alert.alert_id)

    def _superseded(self, tp: TopicPartition, alert: Alert) -> bool:
        """A version of ``alert`` at least as new is known open, or (while building) closed."""
        known = self.open.get(tp, {}).get(alert.alert_id)
        if known is not None and known.version >= alert.version:
            return True
        return self.closed.get(tp, {}).get(alert.alert_id, -1) >= alert.version

    def learn_index(self, tp: TopicPartition, indexed: list[Alert]) -> None:
        """The open alerts the index holds for ``tp``, as it holds them (nothing to write back),
        but for those the outbox has read newer versions of meanwhile: a close is tombstoned."""
        opened = self.open.setdefault(tp, {})
        for alert in indexed:
            if not self._superseded(tp, alert):
                opened[alert.alert_id] = alert
            elif alert.alert_id not in opened:
                self.dirty.setdefault(tp, set()).add(alert.alert_id)

    def drop(self, tp: TopicPartition) -> None:
        self.open.pop(tp, None)
        self.dirty.pop(tp, None)
        self.built.discard(tp)
        self.marked.pop(tp, None)
        self.closed.pop(tp, None)

    def needs_flush(self, tp: TopicPartition, commit_offset: int) -> bool:
        """Whether the index must be written before ``commit_offset`` of ``tp`` is committed (or,
        when that is the commit already, so the index becomes valid without a new record)."""
        return self.topic is not None and (bool(self.dirty.get(tp))
                                           or (tp in self.built and self.marked.get(tp) != commit_offset))

    def alerts(self, partitions) -> list[Alert]:
        """The open alerts of these partitions, those built only: while the index or the history
        is being read, an alert may be known open whose close comes later in the read."""
        return [a for tp in partitions if tp in self.built for a in self.open.get(tp, {}).values()]

    async def flush(self, producer: AIOKafkaProducer | None, tp: TopicPartition, commit_offset: int) -> bool:
        """Write the alerts of ``tp`` that changed, then (once the partition is built) the marker
        saying the index is valid from ``commit_offset``; call before committing that offset.
        Returns whether the marker was written. A failed write leaves the entries to be written
        at the next flush and the marker where it was, so the next owner reads the whole partition."""
        if self.topic is None or producer is None:
            return False
        ids = self.dirty.pop(tp, set())
        opened = self.open.get(tp, {})
        # decided once: a build that ends while the entries are written has not written the marker
        with_marker = tp in self.built
        try:
            sends = []
            for alert_id in sorted(ids):
                alert = opened.get(alert_id)
                value = alert.model_dump_json().encode() if alert is not None else None
                sends.append(await producer.send(self.topic, key=alert_id.encode(), value=value,
                                                 partition=tp.partition))
            if with_marker:
                sends.append(await producer.send(self.topic, key=MARKER_KEY, value=marker_value(commit_offset),
                                                 partition=tp.partition))
            await asyncio.gather(*sends)
            if with_marker:
                self.marked[tp] = commit_offset
        except asyncio.CancelledError:
            self.dirty.setdefault(tp, set()).update(ids)
            raise
        except Exception as exc:
            self.dirty.setdefault(tp, set()).update(ids)
            OPEN_ALERTS_INDEX_WRITE_FAILURES.inc()
            log.warning("open-alerts index not written for outbox partition %d (%s): the next owner reads "
                        "the partition's whole history", tp.partition, type(exc).__name__)
            return False
        return with_marker

    async def build(self, tp: TopicPartition, resumed_from: int | None,
                    consumer: Callable[[], Awaitable[AIOKafkaConsumer]],
                    delivered: Callable[[Alert], bool]) -> str:
        """Learn the open alerts of outbox partition ``tp``, which this worker's outbox reads
        from ``resumed_from`` (its group's commit; None: from the beginning). Returns how:
        ``index``, ``history`` (the whole partition) or ``outbox`` (nothing to read: the outbox
        itself reads the partition from its beginning)."""
        t0 = time.monotonic()
        if resumed_from is None:
            how = "outbox"
        else:
            entries, valid_from = await self._read_index(tp, consumer) if self.topic else ({}, None)
            indexed = await _decoded(entries) if valid_from is not None and valid_from >= resumed_from else None
            if indexed is not None:
                how = "index"
                self.learn_index(tp, indexed)
                self.marked[tp] = resumed_from
            else:
                how = "history"
                await self._read_history(tp, consumer, delivered)
                # the index is rewritten from what is known now: the open alerts, and tombstones
                # for what it holds that closed while it was not written
                self.dirty.setdefault(tp, set()).update(set(self.open.get(tp, {})) | set(entries))
        self.built.add(tp)
        self.closed.pop(tp, None)
        OPEN_ALERTS_REBUILDS.labels(source=how).inc()
        OPEN_ALERTS_REBUILD_SECONDS.labels(source=how).observe(time.monotonic() - t0)
        log.info("open alerts of outbox partition %d known from %s in %.2f s: %d open", tp.partition, how,
                 time.monotonic() - t0, len(self.open.get(tp, {})))
        return how

    async def _read_index(self, tp: TopicPartition, consumer) -> tuple[dict[str, bytes], int | None]:
        """The index partition's entries (alert id -> value) and its marker's offset."""
        itp = TopicPartition(self.topic, tp.partition)
        entries: dict[bytes, bytes] = {}
        valid_from = None
        async for r in _read_to_end(itp, consumer):
            if r.key == MARKER_KEY:
                valid_from = marker_offset(r.value)
            elif r.key is not None:
                if r.value is None:
                    entries.pop(r.key, None)
                else:
                    entries[r.key] = r.value
        return {k.decode(errors="replace"): v for k, v in entries.items()}, valid_from

    async def _read_history(self, tp: TopicPartition, consumer, delivered: Callable[[Alert], bool]) -> None:
        async for r in _read_to_end(tp, consumer):
            try:
                alert = Alert.model_validate_json(r.value)
            except Exception:
                continue
            self.track(tp, alert, delivered(alert), note=False)


async def _decoded(entries: dict[str, bytes]) -> list[Alert] | None:
    """The index's alerts, or None when one is not an alert this release reads (then the index
    is not used: the partition's history is)."""
    alerts = []
    try:
        for i, value in enumerate(entries.values(), 1):
            alerts.append(Alert.model_validate_json(value))
            if i % YIELD_EVERY == 0:
                await asyncio.sleep(0)
    except ValueError:
        log.warning("an open-alerts index entry is not an alert this release reads: the partition's history is read")
        return None
    return alerts


async def _read_to_end(tp: TopicPartition, consumer: Callable[[], Awaitable[AIOKafkaConsumer]]):
    """The records of ``tp`` from its beginning to its end as of now, yielding to the event loop
    every ``YIELD_EVERY`` records."""
    c = await consumer()
    try:
        end = (await c.end_offsets([tp]))[tp]  # before any fetch of it is in flight
        c.assign([tp])
        await c.seek_to_beginning(tp)
        while await c.position(tp) < end:
            batch = await c.getmany(tp, timeout_ms=500, max_records=YIELD_EVERY)
            for r in batch.get(tp, []):
                if r.offset >= end:
                    return
                yield r
            await asyncio.sleep(0)
    finally:
        await c.stop()


def fresh_consumer(cfg: dict) -> Callable[[], Awaitable[AIOKafkaConsumer]]:
    """A started group-less consumer for one read (the caller's ``_read_to_end`` stops it)."""
    async def make() -> AIOKafkaConsumer:
        c = AIOKafkaConsumer(enable_auto_commit=False, group_id=None, fetch_max_wait_ms=READ_TO_END_FETCH_WAIT_MS,
                             **cfg)
        await c.start()
        return c
    return make
