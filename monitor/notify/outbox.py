"""Alert delivery on the worker: the ``alerts`` topic is the outbox.

Every alert version the clinical agent emits is on the ``alerts`` topic. A delivery
consumer in its own consumer group (``<app id>-delivery``) reads that topic and offers
every version to the sinks through the dispatcher (retries with backoff, never blocks the
stream). Its committed offset only moves past a record once every sink has delivered
(or by policy skipped) that version, so a crash or restart resumes with anything
undelivered - a webhook that was down gets every version once it recovers.

The ledger of delivered (sink, alert_id, version) lives on the compacted
``alert-deliveries`` topic. Each worker loads it before delivering and keeps tailing
it, so a version already delivered (by this worker before a crash, or by another worker
before a rebalance) is never paged twice.

Hand-over of outbox partitions between live workers (a rebalance, or a graceful stop):
the worker giving a partition up starts no more deliveries of it, lets the ones in flight
end (their ledger records acknowledged), at most ``hand_over_seconds``, and commits past
everything delivered; the worker taking a partition reads the ledger to its end first.
Without this, the worker giving up kept delivering its queue for up to a second while the
new owner delivered the same versions from the last commit (8-11 repeated pages in each of
two runs of ``test_outbox_partitions_handed_over_between_live_workers_page_nothing_twice``).

With an Alertmanager sink, the open alerts of the worker's outbox partitions are re-pushed every
``ALERTMANAGER_REFRESH_SECONDS``; a worker taking a partition over learns them from the
open-alerts index, which every commit of the partition is preceded by a write of
(``open_alerts``).
"""
from __future__ import annotations

import asyncio
import logging
from datetime import timedelta
from typing import Iterable

from aiokafka import AIOKafkaConsumer, AIOKafkaProducer, ConsumerRebalanceListener, TopicPartition
from aiokafka.structs import OffsetAndMetadata

from .open_alerts import OpenAlerts, fresh_consumer
from .sinks import AlertmanagerSink, Backoff, DeliveryHooks, DeliveryKey, Dispatcher, WebhookSink, should_deliver
from schemas.alert import Alert

from ..kafka_batch import READ_TO_END_FETCH_WAIT_MS, stop_clients
from ..kafka_config import aiokafka_config
from ..metrics import OPEN_ALERTS_INDEX_UNUSABLE, SINK_ATTEMPTS, SINK_FAILURES, SINK_PENDING
from ..settings import Settings

log = logging.getLogger(__name__)


class KafkaLedger:
    """In-memory set of delivered keys, persisted to and rebuilt from a Kafka topic."""

    def __init__(self) -> None:
        self._keys: set[str] = set()
        self._producer: AIOKafkaProducer | None = None
        self._topic: str | None = None

    def seen(self, key: DeliveryKey) -> bool:
        return key.as_str() in self._keys

    def mark(self, key: DeliveryKey):
        """Record a delivery; returns an awaitable that completes when the record is durable."""
        k = key.as_str()
        self._keys.add(k)
        if self._producer is not None and self._topic:
            return self._producer.send_and_wait(self._topic, key=k.encode(), value=b"1")
        return None

    def attach(self, producer: AIOKafkaProducer, topic: str) -> None:
        """From now on every delivery is also written to ``topic``."""
        self._producer, self._topic = producer, topic

    def add_raw(self, key: bytes) -> None:
        """A key read from the ledger topic (one that is not UTF-8 is kept as text it cannot
        be confused with: a delivery loop that raised here restarted on the same record)."""
        self._keys.add(key.decode(errors="replace"))

    def __len__(self) -> int:
        return len(self._keys)


#: how long a hand-over (and a stop) waits at least for deliveries in flight to end
HAND_OVER_SECONDS = 5.0
#: the time a delivery takes after its sink answered (its ledger record acknowledged)
LEDGER_WRITE_SECONDS = 1.0
#: how long a worker taking outbox partitions over reads the ledger towards its end first
LEDGER_CATCH_UP_SECONDS = 5.0


def hand_over_seconds(sinks: Iterable) -> float:
    """How long a worker giving up outbox partitions (or stopping) waits for the deliveries
    in flight: at least ``HAND_OVER_SECONDS``, and long enough for an attempt that ends by its
    sink's own timeout to be recorded in the ledger (a shorter wait let the next owner send
    a page again that a slow webhook was still taking)."""
    longest = max((getattr(s, "timeout_seconds", 0.0) for s in sinks), default=0.0)
    return max(HAND_OVER_SECONDS, longest + LEDGER_WRITE_SECONDS)


class _HandOver(ConsumerRebalanceListener):
    def __init__(self, service: "DeliveryService") -> None:
        self.service = service

    async def on_partitions_revoked(self, revoked) -> None:
        await self.service._give_up(set(revoked))

    async def on_partitions_assigned(self, assigned) -> None:
        await self.service._take_over(set(assigned))


class DeliveryService:
    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self.ledger = KafkaLedger()
        self.sinks = list(self._sinks(settings))
        self.hand_over_seconds = hand_over_seconds(self.sinks)
        hooks = DeliveryHooks(
            on_delivered=self._on_delivered,
            on_failure=self._on_failure,
            on_enqueued=lambda sink, alert: SINK_PENDING.labels(sink=sink).inc(),
        )
        self.dispatcher = Dispatcher(self.sinks, self.ledger, hooks=hooks,
                                     backoff=Backoff(max_delay=settings.delivery_retry_max_seconds))
        self.ready = asyncio.Event()
        self._tasks: list[asyncio.Task] = []
        self._ledger_consumer: AIOKafkaConsumer | None = None
        self._outbox: AIOKafkaConsumer | None = None
        self._producer: AIOKafkaProducer | None = None
        #: per outbox partition: offsets read and the delivery keys each record waits for
        self._pending: dict[TopicPartition, dict[int, list[DeliveryKey]]] = {}
        self._next: dict[TopicPartition, int] = {}
        #: the latest version of each open alert this worker's outbox partitions hold that
        #: Alertmanager knows of (re-pushed every ALERTMANAGER_REFRESH_SECONDS), and its index
        self._alertmanagers = [sk for sk in self.sinks if isinstance(sk, AlertmanagerSink)]
        self.open_alerts = OpenAlerts(settings.topic_open_alerts if self._alertmanagers else None)
        self._builds: dict[TopicPartition, asyncio.Task] = {}
        #: per outbox partition, its end when it was assigned: until the outbox has read that far,
        #: an alert known open may have closed in what is still to be read (not re-pushed then)
        self._assigned_end: dict[TopicPartition, int] = {}
        #: commits of the outbox stay in order (the loop, a hand-over and the stop)
        self._commit_lock = asyncio.Lock()
        self._committed: dict[TopicPartition, int] = {}

    @staticmethod
    def _sinks(s: Settings) -> Iterable:
        if s.alertmanager_url:
            yield AlertmanagerSink(s.alertmanager_url, include_patient_id=s.notify_include_patient_id,
                                   active_ttl=timedelta(seconds=4 * s.alertmanager_refresh_seconds),
                                   generator_url=s.inbox_public_url or None)
        if s.webhook_url:
            yield WebhookSink(s.webhook_url, s.webhook_secret,
                              include_patient_id=s.notify_include_patient_id)

    def _on_delivered(self, sink: str, alert: Alert, attempts: int, latency: float) -> None:
        SINK_ATTEMPTS.labels(sink=sink, outcome="delivered").inc()
        SINK_PENDING.labels(sink=sink).dec()

    def _on_failure(self, sink: str, alert: Alert, attempt: int, exc: BaseException, retry_in: float) -> None:
        SINK_ATTEMPTS.labels(sink=sink, outcome="failed").inc()
        SINK_FAILURES.labels(sink=sink).inc()
        log.warning("delivery to %s failed (attempt %d, %s); retry in %.1fs", sink, attempt, type(exc).__name__, retry_in)

    async def start(self) -> None:
        if not self.sinks:
            self.ready.set()
            return
        s = self.settings
        cfg = aiokafka_config(s)
        self._producer = AIOKafkaProducer(acks="all", enable_idempotence=True, **cfg)
        await self._producer.start()
        self._ledger_consumer = AIOKafkaConsumer(s.topic_deliveries, enable_auto_commit=False,
                                                 auto_offset_reset="earliest", group_id=None,
                                                 fetch_max_wait_ms=READ_TO_END_FETCH_WAIT_MS, **cfg)
        await self._ledger_consumer.start()
        if self.open_alerts.topic is not None:
            await self._check_open_alerts_index()
        await self._catch_up_ledger()
        self.ledger.attach(self._producer, s.topic_deliveries)
        log.info("delivery ledger loaded: %d delivered versions", len(self.ledger))
        await self.dispatcher.start()
        # the tail runs before the outbox joins its group: an assignment waits for it (_take_over)
        self._tasks = [asyncio.create_task(self._tail_ledger())]
        self._outbox = AIOKafkaConsumer(
            group_id=f"{s.app_id}-delivery", enable_auto_commit=False, auto_offset_reset="earliest", **cfg)
        self._outbox.subscribe([s.topic_alerts], listener=_HandOver(self))
        await self._outbox.start()
        self._tasks += [asyncio.create_task(self._read_outbox()), asyncio.create_task(self._commit_loop())]
        if self._alertmanagers:
            self._tasks.append(asyncio.create_task(self._refresh_loop()))
        self.ready.set()

    async def _check_open_alerts_index(self) -> None:
        """The open-alerts index needs a partition per outbox partition; without one it is not
        used, and a worker taking an outbox partition over reads its whole history."""
        p, s = self._producer, self.settings
        assert p is not None
        try:
            outbox = await asyncio.wait_for(p.partitions_for(s.topic_alerts), 10)
            index = await asyncio.wait_for(p.partitions_for(s.topic_open_alerts), 10)
        except asyncio.CancelledError:
            raise
        except Exception:  # unknown, or not authorised
            outbox, index = set(), set()
        usable = bool(index) and len(index) >= len(outbox)
        OPEN_ALERTS_INDEX_UNUSABLE.set(int(not usable))
        if not usable:
            log.error("the open-alerts index %s is %s: not used; a worker taking an outbox partition over reads "
                      "its whole history (create it with `monitor topics`, as many partitions as %s)",
                      s.topic_open_alerts, "missing" if not index else f"of {len(index)} partitions for {len(outbox)}",
                      s.topic_alerts)
            self.open_alerts.topic = None

    async def _catch_up_ledger(self) -> None:
        c = self._ledger_consumer
        assert c is not None
        loop = asyncio.get_running_loop()
        deadline = loop.time() + 30
        while not c.assignment():
            if loop.time() > deadline:
                raise RuntimeError(f"ledger topic {self.settings.topic_deliveries} has no partitions")
            await asyncio.sleep(0.05)
        parts = sorted(c.assignment())
        await c.seek_to_beginning(*parts)
        ends = await c.end_offsets(parts)
        while True:
            positions = [await c.position(tp) for tp in parts]
            if all(pos >= ends[tp] for pos, tp in zip(positions, parts)):
                return
            self._learn_deliveries(await c.getmany(timeout_ms=500, max_records=5000))

    def _learn_deliveries(self, batch: dict) -> None:
        """Ledger records (keyed by delivery) read at start-up or while tailing."""
        for records in batch.values():
            for r in records:
                if r.key:
                    self.ledger.add_raw(r.key)

    async def _tail_ledger(self) -> None:
        """Keep learning deliveries made by other workers (after a rebalance they may be ours)."""
        c = self._ledger_consumer
        assert c is not None
        while True:
            try:
                self._learn_deliveries(await c.getmany(timeout_ms=1000, max_records=5000))
            except asyncio.CancelledError:
                raise
            except Exception as exc:
                log.warning("ledger tail error: %s", type(exc).__name__)
                await asyncio.sleep(1)

    async def _read_outbox(self) -> None:
        c = self._outbox
        assert c is not None
        while True:
            try:
                batch = await c.getmany(timeout_ms=500, max_records=1000)
                for tp, records in batch.items():
                    pend = self._pending.setdefault(tp, {})
                    for r in records:
                        self._next[tp] = r.offset + 1
                        try:
                            alert = Alert.model_validate_json(r.value)
                        except Exception:
                            log.warning("unreadable record on the alerts topic at %s@%d", tp.partition, r.offset)
                            continue
                        keys = [DeliveryKey(sink.name, alert.alert_id, alert.version)
                                for sink in self.sinks if should_deliver(sink, alert)]
                        if self._alertmanagers:
                            self.open_alerts.track(tp, alert, self._to_alertmanager(alert))
                        if keys:
                            pend[r.offset] = keys
                            queued = self.dispatcher.enqueue(alert)
                            log.debug("outbox %d@%d: %s queued for %d of %d sinks", tp.partition, r.offset,
                                      alert.idempotency_key, queued, len(keys))
            except asyncio.CancelledError:
                raise
            except Exception as exc:
                log.warning("outbox read error: %s", type(exc).__name__)
                await asyncio.sleep(1)

    def _read_past_assignment(self, tp: TopicPartition) -> bool:
        """The outbox has read partition ``tp`` up to where it ended when it was assigned here."""
        end = self._assigned_end.get(tp)
        return end is not None and self._next.get(tp, 0) >= end

    def _to_alertmanager(self, alert: Alert) -> bool:
        return any(should_deliver(sk, alert) for sk in self._alertmanagers)

    def _build(self, tp: TopicPartition, resumed_from: int | None) -> None:
        """Learn the open alerts of a newly assigned outbox partition in the background (from the
        open-alerts index, or its whole history when the index cannot be trusted)."""
        if not self._alertmanagers or tp in self._builds:
            return

        async def build() -> None:
            try:
                await self.open_alerts.build(tp, resumed_from, fresh_consumer(aiokafka_config(self.settings)),
                                             self._to_alertmanager)
            except asyncio.CancelledError:
                raise
            except Exception as exc:  # the next refresh tries again
                log.warning("open alerts of outbox partition %d not learnt (%s); retried at the next refresh",
                            tp.partition, type(exc).__name__)
                self._builds.pop(tp, None)

        self._builds[tp] = asyncio.create_task(build(), name=f"open-alerts-{tp.partition}")

    async def refresh_once(self) -> int:
        """Re-push every open alert known of this worker's outbox partitions to the Alertmanager
        sinks (rolling endsAt). Returns how many pushes were made."""
        assigned = self._outbox.assignment() if self._outbox is not None else set()
        for tp in sorted(assigned - set(self._builds)):  # a build that failed, or never started
            if tp not in self._assigned_end:
                self._assigned_end.update(await self._outbox.end_offsets([tp]))
            self._build(tp, await self._outbox.committed(tp))
        alerts = self.open_alerts.alerts(tp for tp in assigned if self._read_past_assignment(tp))
        n = 0
        for sink in self._alertmanagers:
            for a in alerts:
                try:
                    await sink.deliver(a)
                    n += 1
                except Exception as exc:  # the next round retries; the normal path has its own retries
                    log.warning("alertmanager refresh failed: %s", type(exc).__name__)
                    break
        return n

    async def _refresh_loop(self) -> None:
        while True:
            await asyncio.sleep(self.settings.alertmanager_refresh_seconds)
            try:
                await self.refresh_once()
            except asyncio.CancelledError:
                raise
            except Exception as exc:  # pragma: no cover - never stop refreshing
                log.warning("alertmanager refresh error: %s", type(exc).__name__)

    def committable(self) -> dict[TopicPartition, int]:
        """Per partition, the offset below which every record has been delivered."""
        out: dict[TopicPartition, int] = {}
        for tp, pend in self._pending.items():
            for off in sorted(pend):
                if all(self.ledger.seen(k) for k in pend[off]):
                    del pend[off]
                else:
                    break
            out[tp] = min(pend) if pend else self._next.get(tp, 0)
        return out

    async def _commit(self, partitions) -> None:
        """Commit, for these outbox partitions, the offset below which everything is delivered."""
        c = self._outbox
        assert c is not None
        async with self._commit_lock:
            committable = {tp: off for tp, off in self.committable().items() if tp in partitions and off > 0}
            # the open-alerts index first: at every commit it is at least as new as the commit
            for tp, off in committable.items():
                if self.open_alerts.needs_flush(tp, off):
                    await self.open_alerts.flush(self._producer, tp, off)
            offsets = {tp: off for tp, off in committable.items() if self._committed.get(tp) != off}
            if offsets:
                await c.commit({tp: OffsetAndMetadata(off, "") for tp, off in offsets.items()})
                self._committed.update(offsets)

    def _waited_for(self, tp: TopicPartition) -> set[str]:
        """The alert ids whose delivery the records read from this outbox partition wait for."""
        return {k.alert_id for keys in self._pending.get(tp, {}).values() for k in keys}

    def _drop(self, tp: TopicPartition) -> None:
        """Forget an outbox partition this worker no longer holds, and its queued deliveries."""
        self.dispatcher.forget(self._waited_for(tp))
        self._pending.pop(tp, None)
        self._next.pop(tp, None)
        self.open_alerts.drop(tp)
        self._assigned_end.pop(tp, None)
        build = self._builds.pop(tp, None)
        if build is not None:
            build.cancel()
        self._committed.pop(tp, None)

    async def _give_up(self, revoked: set[TopicPartition]) -> None:
        """Revoked outbox partitions: no new deliveries of them, the ones in flight end, and
        the commit moves past everything delivered; the next owner resumes from there."""
        ids = set().union(*(self._waited_for(tp) for tp in revoked))
        try:
            if ids:
                left = await self.dispatcher.withdraw(ids, self.hand_over_seconds)
                if left:
                    log.warning("%d deliveries still in flight when their outbox partitions were handed over: "
                                "the next owner may send them again", left)
            await self._commit(revoked)
        except Exception as exc:  # the next owner resumes from an older commit: the ledger still drops repeats
            log.warning("outbox hand-over commit failed: %s", type(exc).__name__)
        for tp in revoked:
            self._drop(tp)

    async def _take_over(self, assigned: set[TopicPartition]) -> None:
        """Newly assigned outbox partitions: first the ledger to its current end, so what the
        previous owner delivered until it let go is known here; then their open alerts are
        learnt in the background (for the Alertmanager refresh)."""
        c = self._ledger_consumer
        assert c is not None
        loop = asyncio.get_running_loop()
        try:
            parts = sorted(c.assignment())
            ends = await c.end_offsets(parts)
            deadline = loop.time() + LEDGER_CATCH_UP_SECONDS
            for tp in parts:
                while await c.position(tp) < ends[tp]:
                    if loop.time() > deadline:
                        raise asyncio.TimeoutError
                    await asyncio.sleep(0.01)
        except asyncio.CancelledError:
            raise
        except Exception as exc:
            log.warning("delivery ledger not read to its end at an outbox assignment (%s): repeats possible",
                        type(exc).__name__)
        if self._alertmanagers and self._outbox is not None:
            try:
                self._assigned_end.update(await self._outbox.end_offsets(sorted(assigned)) if assigned else {})
                for tp in sorted(assigned):
                    resumed_from = await self._outbox.committed(tp)
                    if resumed_from is not None and tp not in self._next:
                        # where the outbox resumes: a partition that gets no new record still
                        # has a commit offset, for which the open-alerts index is written
                        self._pending.setdefault(tp, {})
                        self._next[tp] = self._committed[tp] = resumed_from
                    self._build(tp, resumed_from)
            except asyncio.CancelledError:
                raise
            except Exception as exc:  # the refresh loop starts what is missing
                log.warning("open alerts of the assigned outbox partitions not requested (%s)", type(exc).__name__)

    async def _commit_loop(self) -> None:
        c = self._outbox
        assert c is not None
        while True:
            await asyncio.sleep(1.0)
            try:
                assigned = c.assignment()
                for tp in list(self._pending):
                    if tp not in assigned:  # revoked without _give_up (e.g. a lost session)
                        self._drop(tp)
                await self._commit(assigned)
            except asyncio.CancelledError:
                raise
            except Exception as exc:
                log.warning("outbox commit error: %s", type(exc).__name__)

    async def stop(self) -> None:
        builds = list(self._builds.values())
        for t in [*self._tasks, *builds]:
            t.cancel()
        await asyncio.gather(*self._tasks, *builds, return_exceptions=True)
        # deliveries in flight end and their ledger records are written before the outbox
        # commits past them and leaves its group (the next owner would send them again)
        await self.dispatcher.stop(drain_timeout=2.0, finish_timeout=self.hand_over_seconds)
        if self._outbox is not None:
            try:
                await self._commit(self._outbox.assignment())
            except Exception as exc:
                log.warning("outbox commit at stop failed: %s", type(exc).__name__)
        await stop_clients(self._outbox, self._ledger_consumer, self._producer)
