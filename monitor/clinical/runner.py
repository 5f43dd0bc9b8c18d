"""The clinical runner: the processor on a batched aiokafka consumer, with the patient
store restored from (and written to) a compacted changelog topic.

One loop, in this order for every batch (consumer group ``<app id>-clinical`` on the
patient stream ``observations``):

1. ``getmany`` a batch; keep only records of partitions still assigned and restored;
2. the processor turns it into findings, alert versions and dead letters, and marks the
   patients it changed;
3. wait until the previous batch's changelog and commit (step 5) are done;
4. produce the outputs and wait until the broker acknowledged every one;
5. in the background, while the next batch is read and processed: produce each changed
   patient once to the changelog (partition = the patient's partition), wait for the
   acknowledgements, then commit ``last offset + 1`` per partition (step 3 waits for the
   changelog only; commits stay in order).

Outputs before state: the changelog never records an alert as emitted that the broker
does not hold. Writing it in the background takes one broker round trip out of each
batch's path from input to alert. A crash anywhere replays at most the uncommitted
batches on the state of the changelog; the engine and the lifecycle are replay-idempotent
(observation ids, finding ids, action ids), and a re-emitted alert version carries the
same ``alert_id:version``, which the delivery ledger drops. That is the guarantee: at
least once, with downstream deduplication (no Kafka transactions: aiokafka 0.14 sends no
group generation with transactional offsets, see README "Reliability").

A failed output or changelog write rolls back: the partitions of the batch (and of the
batch processed meanwhile, whose outputs are then not written) are restored again from
the changelog and the consumer seeks to the committed offsets, so they are processed
again from the durable state (never from a state whose outputs were not written).

Rebalances (``ConsumerRebalanceListener``): a revocation takes the batch lock, so it
waits for the batch in flight (and its commit) to finish; an assignment restores the
changelog of every partition this worker did not hold with a known-current state before
any record of it is processed. A partition held before is kept without re-reading when
nobody else wrote its changelog or committed its offsets meanwhile (both checked with the
broker), otherwise it is read again.

The clock (``tick``) runs in-process under the same lock over the owned patients, in
chunks, and writes outputs and changelog the same way (there are no offsets to commit).
"""
from __future__ import annotations

import asyncio
import logging
import time
from datetime import datetime, timezone
from typing import Iterable

from aiokafka import AIOKafkaConsumer, AIOKafkaProducer, ConsumerRebalanceListener
from aiokafka.structs import TopicPartition

from ..kafka_batch import (OrderedCommits, Positions, new_consumer, new_producer, next_offsets, produce_all, rewind,
                           stop_clients)
from ..metrics import PATIENTS_MONITORED, PATIENTS_OVERDUE, PROCESSING_SECONDS
from ..settings import Settings
from ..topics_admin import changelog_topic
from .processor import ClinicalProcessor, Output
from .store import PatientStore

log = logging.getLogger(__name__)


class ClinicalRunner(ConsumerRebalanceListener):
    MAX_BATCH = 1000
    TICK_CHUNK = 500

    def __init__(self, settings: Settings, processor: ClinicalProcessor, store: PatientStore) -> None:
        self.s = settings
        self.processor = processor
        self.store = store
        self.stream = settings.topic_observations
        self.changelog = changelog_topic(settings)
        self.group_id = f"{settings.app_id}-clinical"
        self.consumer: AIOKafkaConsumer | None = None
        self.producer: AIOKafkaProducer | None = None
        self._restorer: AIOKafkaConsumer | None = None
        self._lock = asyncio.Lock()
        #: partitions assigned and restored: only these are processed and ticked
        self.owned: frozenset[int] = frozenset()
        #: per partition held: (changelog end after our writes, our last commit) to decide
        #: at the next assignment whether anyone else touched it meanwhile
        self._held: dict[int, tuple[int, int | None]] = {}
        #: per owned partition: the next offset to process (the committed offset this
        #: worker resumed from, then the end of each batch it committed)
        self._next: dict[int, int | None] = {}
        self.positions = Positions()
        #: the changelog write of the last batch, in flight (see ``_settle``), then its commit
        self._persist_task: asyncio.Future | None = None
        self.commits = OrderedCommits(self.positions, "clinical")
        self.ready = asyncio.Event()
        self.processed = 0
        self.last_restore: dict = {}

    # -- lifecycle -----------------------------------------------------------------------
    async def start(self) -> None:
        self.producer = new_producer(self.s, linger_ms=1)
        await self.producer.start()
        self._restorer = new_consumer(self.s, group_id=None)
        await self._restorer.start()
        self.consumer = new_consumer(self.s, group_id=self.group_id)
        self.consumer.subscribe([self.stream], listener=self)
        await self.consumer.start()

    async def run(self) -> None:
        await self.start()
        consumer = self.consumer
        assert consumer is not None
        while True:
            batch = await consumer.getmany(timeout_ms=100, max_records=self.MAX_BATCH)
            if batch:
                await self.process_batch(batch)

    def _forget(self, partitions: set[int]) -> None:
        """Partitions whose changelog was not acknowledged: restored at the next assignment."""
        self.store.drop(partitions)
        for p in partitions:
            self._held.pop(p, None)

    async def stop(self) -> None:
        self.ready.clear()
        try:
            self._forget(await asyncio.wait_for(self._drain(), 10.0))
        except (Exception, asyncio.CancelledError):  # not known to be durable: restore all when started again
            self._forget(self.store.partitions() | set(self._held))
        h = self.processor.handoff
        if h is not None:
            log.info("observations handed over by ingest: %d; decoded from the stream: %d; held: %d",
                        h.taken, h.decoded, len(h))
        await stop_clients(self.consumer, self._restorer, self.producer)
        self.consumer = self._restorer = self.producer = None

    # -- one batch -----------------------------------------------------------------------
    async def process_batch(self, batch: dict) -> None:
        async with self._lock:
            assert self.consumer is not None
            assigned = self.consumer.assignment()
            batch = {tp: self._from_position(tp, rs) for tp, rs in batch.items()
                     if tp in assigned and tp.partition in self.owned}
            batch = {tp: rs for tp, rs in batch.items() if rs}
            if not batch:
                return
            started = time.perf_counter()
            records = [r for rs in batch.values() for r in rs]
            outputs = self.processor.process(records)
            # the previous batch's changelog was written while this one was read and
            # processed; this batch's outputs go out only once that state is on the broker
            failed = await self._settle()
            if failed:
                await self._roll_back(failed | {tp.partition for tp in batch})
                return
            try:
                await self._write_outputs(outputs)
            except asyncio.CancelledError:
                raise
            except Exception as exc:
                log.warning("clinical batch not acknowledged (%s); restoring its partitions and processing "
                            "it again", type(exc).__name__)
                await self._roll_back({tp.partition for tp in batch})
                return
            # outputs are on the broker: the changed patients to the changelog, then the
            # commit, while the next batch is read and processed (_settle waits for both)
            offsets = next_offsets(batch)
            for tp, off in offsets.items():
                self._next[tp.partition] = off
            self._persist_task = asyncio.ensure_future(self._persist(self.store.take_changed(), offsets))
            self.processed += len(records)
            PROCESSING_SECONDS.labels(stage="clinical_batch").observe(time.perf_counter() - started)

    async def _persist(self, changed: list[tuple[str, int, bytes]], offsets: dict) -> set[int]:
        """The changelog of a batch whose outputs are acknowledged, then its commit. Returns
        the partitions to restore (their changelog was not acknowledged), else nothing."""
        try:
            await self._write_changelog(changed)
        except asyncio.CancelledError:
            raise
        except Exception as exc:
            log.warning("clinical changelog not acknowledged (%s); restoring its partitions and processing "
                        "them again", type(exc).__name__)
            return {p for _pid, p, _v in changed} | {tp.partition for tp in offsets}
        # the commit is not waited for by the next batch: commits stay in order, a
        # revocation or rollback waits for all (_drain)
        assert self.consumer is not None
        self.commits.submit(self.consumer, offsets, done=lambda ok: self._committed(offsets, ok))
        return set()

    def _committed(self, offsets: dict, ok: bool) -> None:
        for tp, off in offsets.items():
            end, _ = self._held.get(tp.partition, (0, None))
            self._held[tp.partition] = (end, off if ok else None)  # None: restored at the next assignment

    async def _settle(self) -> set[int]:
        """Wait for the changelog in flight; the partitions to restore, if any."""
        task, self._persist_task = self._persist_task, None
        if task is None:
            return set()
        return await asyncio.shield(task)

    async def _drain(self) -> set[int]:
        """Wait for the changelog and every commit in flight; the partitions to restore."""
        failed = await self._settle()
        await self.commits.drain()
        return failed

    def _from_position(self, tp: TopicPartition, records: list) -> list:
        """Drop records before the position this worker resumed from (fetched before a
        rebalance or a rollback and handed out after it: they are read again in order)."""
        start = self._next.get(tp.partition)
        if start is None or not records or records[0].offset >= start:
            return records
        return [r for r in records if r.offset >= start]

    async def _write(self, outputs: list[Output]) -> None:
        """Outputs, acknowledged; then every changed patient, acknowledged (the clock)."""
        await self._write_outputs(outputs)
        await self._write_changelog(self.store.take_changed())

    async def _write_outputs(self, outputs: list[Output]) -> None:
        assert self.producer is not None
        await produce_all(self.producer, ((o.topic, o.key, o.value, o.headers, None) for o in outputs))

    async def _write_changelog(self, changed: list[tuple[str, int, bytes]]) -> None:
        """Each changed patient to its partition of the changelog, acknowledged; the
        changelog end per partition is remembered (see ``_unchanged``)."""
        assert self.producer is not None
        metas = await produce_all(self.producer, ((self.changelog, pid.encode(), value, None, partition)
                                                  for pid, partition, value in changed))
        for md in metas:
            end, committed = self._held.get(md.partition, (0, None))
            self._held[md.partition] = (max(end, md.offset + 1), committed)

    async def _roll_back(self, partitions: set[int]) -> None:
        """Back to the durable state of these partitions: restore, then re-read from the commit."""
        partitions = set(partitions) | await self._drain()
        await asyncio.sleep(1.0)
        self.store.drop(partitions)
        self.store.take_changed()  # nothing of a rolled-back batch may be written later
        await self._restore_retrying(partitions)
        for p in partitions:
            self._next[p] = self._held.get(p, (0, None))[1]
        if self.consumer is not None:
            await rewind(self.consumer, [TopicPartition(self.stream, p) for p in partitions], "clinical")

    # -- the clock -----------------------------------------------------------------------
    async def tick(self, now: datetime | None = None) -> int:
        """Run the clock over every owned patient, in chunks under the batch lock."""
        now = now or datetime.now(timezone.utc)
        pids = self.store.patient_ids(self.owned)
        PATIENTS_MONITORED.set(len(pids))
        for i in range(0, len(pids), self.TICK_CHUNK):
            async with self._lock:
                failed = await self._settle()
                if failed:
                    await self._roll_back(failed)
                owned = self.owned
                chunk = [p for p in pids[i:i + self.TICK_CHUNK] if self.store.partition_of(p) in owned]
                outputs = self.processor.tick(chunk, now)
                try:
                    await self._write(outputs)
                except asyncio.CancelledError:
                    raise
                except Exception as exc:
                    log.warning("clock outputs not acknowledged (%s); restoring", type(exc).__name__)
                    await self._roll_back({self.store.partition_of(p) for p in chunk} - {None})
            await asyncio.sleep(0)
        PATIENTS_OVERDUE.set(len(self.processor.overdue & set(self.store.patient_ids(self.owned))))
        return len(pids)

    # -- rebalances ----------------------------------------------------------------------
    async def on_partitions_revoked(self, revoked) -> None:
        # waits for the batch in flight (its outputs, changelog and commit) to finish
        async with self._lock:
            self._forget(await self._drain())
            self.owned = frozenset()
            self.ready.clear()

    async def on_partitions_assigned(self, assigned) -> None:
        async with self._lock:
            parts = {tp.partition for tp in assigned if tp.topic == self.stream}
            try:
                keep = await self._unchanged(parts)
            except Exception as exc:
                log.warning("could not check the held partitions (%s); restoring them", type(exc).__name__)
                keep = set()
            self.store.drop(self.store.partitions() - keep)
            self._held = {p: v for p, v in self._held.items() if p in keep}
            await self._restore_retrying(parts - keep)
            self._next = {p: self._held.get(p, (0, None))[1] for p in parts}
            self.owned = frozenset(parts)
            if self.processor.handoff is not None:
                self.processor.handoff.retain(parts)
            self.ready.set()

    async def _restore_retrying(self, partitions: set[int]) -> None:
        """Restore, retrying while the broker is away: no record of a partition is
        processed before its state is back."""
        delay = 0.5
        while True:
            try:
                await self._restore(partitions)
                return
            except asyncio.CancelledError:
                raise
            except Exception as exc:
                log.warning("changelog restore failed (%s); retrying in %.1fs", type(exc).__name__, delay)
                self.store.drop(partitions)
                await asyncio.sleep(delay)
                delay = min(delay * 2, 5.0)

    async def _unchanged(self, parts: set[int]) -> set[int]:
        """Partitions held before whose changelog end and committed offset are still ours."""
        candidates = [p for p in parts if p in self._held]
        if not candidates or self._restorer is None or self.consumer is None:
            return set()
        ends = await self._restorer.end_offsets([TopicPartition(self.changelog, p) for p in candidates])
        keep = set()
        for p in candidates:
            end, committed = self._held[p]
            try:
                now_committed = await self.consumer.committed(TopicPartition(self.stream, p))
            except Exception:
                continue
            if ends.get(TopicPartition(self.changelog, p)) == end and now_committed == committed:
                keep.add(p)
        return keep

    async def _restore(self, partitions: Iterable[int]) -> None:
        """Read the changelog of these partitions from the start to its current end."""
        parts = sorted(partitions)
        if not parts:
            return
        c = self._restorer
        assert c is not None
        started = time.perf_counter()
        tps = [TopicPartition(self.changelog, p) for p in parts]
        c.assign(tps)
        await c.seek_to_beginning(*tps)
        ends = await c.end_offsets(tps)
        n = 0
        remaining = {tp for tp in tps if ends[tp] > 0}
        for tp in tps:
            if tp not in remaining:
                self._held[tp.partition] = (0, None)
        while remaining:
            batch = await c.getmany(*remaining, timeout_ms=500, max_records=10_000)
            for tp, records in batch.items():
                for r in records:
                    if r.offset < ends[tp]:
                        self.store.restore_record(tp.partition, r.key, r.value)
                        n += 1
            for tp in list(remaining):
                if await c.position(tp) >= ends[tp]:
                    remaining.discard(tp)
                    self._held[tp.partition] = (ends[tp], None)
        c.unsubscribe()
        for p in parts:  # remember the committed offset as of the restore
            try:
                assert self.consumer is not None
                committed = await self.consumer.committed(TopicPartition(self.stream, p))
            except Exception:
                committed = None
            self._held[p] = (self._held.get(p, (0, None))[0], committed)
        took = time.perf_counter() - started
        self.last_restore = {"partitions": parts, "records": n, "patients": len(self.store), "seconds": round(took, 3)}
        log.info("restored %d changelog records of %d partitions in %.2fs (%d patients held)", n, len(parts), took,
                 len(self.store))

    # -- observability -------------------------------------------------------------------
    def lag(self) -> dict[tuple[str, int], int]:
        return self.positions.lag(self.consumer)

    def find_alert(self, alert_id: str):
        return self.store.find_alert(alert_id)
