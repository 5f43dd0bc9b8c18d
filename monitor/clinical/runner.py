"""The clinical runner: the processor on a batched aiokafka consumer, with the patient
store restored from (and written to) a compacted changelog topic.

One loop, in this order for every batch (consumer group ``<app id>-clinical`` on the
patient stream ``observations``):

1. ``getmany`` a batch, and take the records this worker's own ingest wrote to its *direct*
   partitions (``_next_input``, ``monitor.clinical.own_writes``: acknowledged writes taken
   in offset order from the position instead of fetched back; a hole or a broker end past
   them makes the partition fetch again); keep only records of partitions still assigned
   and restored;
2. the processor turns it into findings, alert versions and dead letters, and marks the
   patients it changed in the store;
3. produce the outputs and wait until the broker acknowledged every one; the batch's
   offsets (``last offset + 1`` per partition) join the *pending* set; its changed
   patients stay marked in the store;
4. take the result of the last checkpoint's changelog write (step 5) once it is done; wait
   for it only when the records a crash would replay (its checkpoint's and those pending
   since) reach ``REPLAY_MAX_RECORDS``;
5. a *checkpoint*, when due and none is in flight: it takes the pending offsets, and the
   patients marked at that moment are encoded (``take_changed``) ``ENCODE_SLICE`` after
   each batch, each with the state of every batch so far (see below); once all are, in the
   background, while the next batches are read, processed and written, each value is
   produced once to the changelog (partition = the patient's partition), and after the
   acknowledgements the checkpoint's offsets are committed (commits stay in order,
   ``OrderedCommits``).

A batch's outputs do not wait for the changelog in flight. They derive from records whose
offsets are not committed, exactly as after a crash, which would replay those records to
the same outputs; a failed changelog is noticed at step 4 (or at the next idle, clock,
revocation or stop checkpoint) and rolls back every partition with pending work, the
batches since included. The changelog has a producer of its own (client id ``<app
id>-clinical-changelog``), so its bursts do not queue ahead of the alerts on one
connection. So alerts keep reaching the nurses while the changelog is slow (a broker
quota on that client id, a busy disk): only the commit waits, up to the replay cap. At 2,000
alert-changing events/s a checkpoint's changelog is about 1,000 patients, some 6 MB; the
batch after each checkpoint used to wait for all of it, about 45 ms (docs/measurements.md,
fourteenth pass).

A checkpoint is due when the oldest pending batch is older than
``clinical_checkpoint_interval_seconds`` (0: after every batch), or the pending batches
hold ``CHECKPOINT_MAX_RECORDS`` records. It is started at once when the consumer returns
no records and none is in flight (idle input: acknowledged work never stays uncommitted
when input stops; the next idle poll takes its result), and taken and waited for at a
revocation and at a stop. A patient changed by many batches in a row is encoded and written
once per checkpoint, not once per batch (until the twentieth pass it was encoded after each
batch that changed it: 5.3-6.6 % of the worker's samples at 800-1,600 alert-changing
events/s, against 2.4 % for the slices at 1,000/s; docs/measurements.md). Encoding a whole
interval's changed patients at once held the event loop, and with it every record in the
worker, for tens of milliseconds (2,000 alert-changing events/s: p99 183-200 ms against
134-142 ms with a checkpoint per batch), so while the stage keeps up with its input
(batches below ``MAX_BATCH`` records) a due checkpoint encodes ``ENCODE_SLICE`` patients
after each batch, in the order they were first marked; a patient marked again after its
slice waits for the next checkpoint. While batches come full (a backlog: the records wait
anyway), or when the replay cap is reached, the checkpoint encodes all of them at once, as
does one taken at a revocation or a stop. One started at an idle poll encodes a slice per
poll, the polls then not waiting for input (``checkpoint_idle``). The clock's chunks leave their
changed patients marked in the same way.

Guarantees, and why they hold:

- Outputs before state: the changelog never holds a state whose outputs were not
  acknowledged. Marks are taken (``take_changed`` encodes) only synchronously right after
  a batch's outputs were acknowledged, or under the batch lock when no batch is being
  processed (idle, revocation, stop), so every value kept for a checkpoint is the state
  after batches whose outputs are on the broker. A patient marked by acknowledged batches
  and not encoded yet (a backlog) is, after an internal error, rolled back to its bytes and
  its records since then are applied again (``ClinicalProcessor._recover``); its partition
  is restored from the changelog if that fails. A batch interrupted between processing
  and the acknowledgement of its outputs (``_unacknowledged``: cancelled at a stop) is
  never checkpointed: ``stop`` forgets every partition with pending or marked work
  instead, and they are restored from the changelog at the next start.
- Committed offsets never run ahead of the changelog: a checkpoint commits the offsets
  pending when it became due only after its changelog write was acknowledged
  (``_persist``), and it writes a value for every patient marked then, encoded after those
  offsets' batches, which covers every record below them. A value encoded a few batches
  later also holds those batches' records, whose offsets the next checkpoint commits: a
  crash in between replays them on a state that already holds them, which the engine drops
  by observation id, as after a crash between a checkpoint's changelog and its commit.
- Rollback: a failed output write, or a refused changelog, rolls back not only the
  partitions of the batches concerned but every partition with pending work: its kept
  values and offsets are dropped rather than written first (one path for every failure,
  taken only when the broker refuses a write), those partitions are restored from the
  changelog and read again from the commit (their outputs are produced again with the
  same ``alert_id:version``; the delivery ledger drops them). A failed checkpoint is
  handled the same way: nothing after it is committed.
- A revocation takes the batch lock (so it waits for the batch in flight), checkpoints all
  pending work and waits for the changelog and the commits before returning: the next owner
  resumes from a committed offset on a current changelog, and ``_held`` records the
  changelog end and commit this worker left (``_unchanged``). If that checkpoint fails, the
  partitions concerned are forgotten and restored at the next assignment.
- Crash: at least once. A crash replays the records since the last commit on the state of
  the changelog: up to one checkpoint interval (plus the batch in flight, plus the
  checkpoint in flight's records while its changelog is slow; never more than
  ``REPLAY_MAX_RECORDS`` and a batch in all) more records than with a checkpoint per
  batch. The engine and the lifecycle are replay-idempotent
  (observation ids, finding ids, action ids), and a re-emitted alert version carries the
  same ``alert_id:version``, which the delivery ledger drops (no Kafka transactions:
  aiokafka 0.14 sends no group generation with transactional offsets, see README
  "Reliability").

Writing the changelog in the background takes one broker round trip out of each batch's
path from input to alert; coalescing it takes most changelog encodes and writes out of
the worker's CPU and the broker's.

Rebalances (``ConsumerRebalanceListener``): an assignment restores the changelog of every
partition this worker did not hold with a known-current state before any record of it is
processed. A partition held before is kept without re-reading when nobody else wrote its
changelog or committed its offsets meanwhile (both checked with the broker), otherwise it
is read again.

The clock (``tick``) runs in-process under the same lock over the owned patients, in
chunks, as a batch without offsets: a chunk's outputs are produced and acknowledged, and
its changed patients stay marked for the next checkpoint (due after the next batches, or
started by the next idle poll). A chunk takes the result of a changelog write in flight only
once it is done, never waits for it: a tick used to checkpoint the pending work and write
its own changelog before each chunk, so with a slow changelog every tick held the batch
lock, and the alerts behind it, for as long as the write took. A crash before the chunk's
patients are durable is the case a crash between a chunk's outputs and its changelog write
already was: the next clock run finds the same due work and re-emits the same
``alert_id:version``.
"""
from __future__ import annotations

import asyncio
import logging
import time
from datetime import datetime, timezone
from typing import Callable, Iterable

from aiokafka import AIOKafkaConsumer, AIOKafkaProducer, ConsumerRebalanceListener
from aiokafka.structs import TopicPartition

from ..kafka_batch import (READ_TO_END_FETCH_WAIT_MS, OrderedCommits, Positions, new_consumer, new_producer,
                           next_offsets, produce_all, rewind, stop_clients)
from ..metrics import (CHANGELOG_REFUSED, CLINICAL_CHECKPOINTS, CLINICAL_CLOCK_LAST_RUN, CLINICAL_PARTITIONS_OWNED,
                       CLINICAL_PATIENTS_UNREADABLE, CLINICAL_PROCESSOR_CPU, CLINICAL_RECORDS, CLINICAL_RESTORE_SECONDS,
                       CLINICAL_UNCHECKPOINTED, COMMIT_FAILURES, PATIENTS_MONITORED, PATIENTS_OVERDUE,
                       PROCESSING_SECONDS, ROLLBACKS, STATE_LOST, WRITE_REFUSED)
from ..settings import Settings
from ..topics_admin import changelog_topic
from .own_writes import OwnWrites, StreamRecord
from .processor import ClinicalProcessor, Output, PatientStateLost
from .store import PatientStore

log = logging.getLogger(__name__)
_TAKEN = CLINICAL_RECORDS.labels(path="own_writes")
_FETCHED = CLINICAL_RECORDS.labels(path="fetched")


class PendingCheckpoint:
    """The offsets of batches whose outputs are acknowledged and whose changed patients are
    not on the changelog yet; a checkpoint writes those patients to the changelog, then
    commits these offsets."""

    def __init__(self, interval: float, max_records: int, clock: Callable[[], float] = time.monotonic) -> None:
        self.interval = interval
        self.max_records = max_records
        self.clock = clock
        self.offsets: dict[TopicPartition, int] = {}
        #: when the oldest pending batch was acknowledged
        self.since: float | None = None
        self.records = 0

    def add(self, offsets: dict[TopicPartition, int], records: int) -> None:
        """One more acknowledged batch (``offsets``: its next offset per partition)."""
        if self.since is None:
            self.since = self.clock()
        for tp, off in offsets.items():
            if off > self.offsets.get(tp, -1):
                self.offsets[tp] = off
        self.records += records

    def due(self) -> bool:
        if not self.offsets:
            return False
        return (self.interval <= 0 or self.records >= self.max_records
                or self.since is None or self.clock() - self.since >= self.interval)

    def take(self) -> dict[TopicPartition, int]:
        """The offsets to commit after the checkpoint; nothing is pending afterwards."""
        offsets = self.offsets
        self.offsets, self.since, self.records = {}, None, 0
        return offsets

    def partitions(self) -> set[int]:
        return {tp.partition for tp in self.offsets}

    def __bool__(self) -> bool:
        return bool(self.offsets)


class ClinicalRunner(ConsumerRebalanceListener):
    #: records per batch at most. The batch is processed without yielding the event loop, which
    #: delivery and the web endpoints share (and ingest, in this process): 4,000 gave an ingest
    #: process's backlog 4-7 % more throughput (docs/measurements.md, eighth pass) but held the
    #: loop four times as long, and the take-over's ledger read (LEDGER_CATCH_UP_SECONDS, wall
    #: time) with it; a rebalance test repeated 3 pages on a slow host in that state
    MAX_BATCH = 1000
    #: the clock judges its patients in chunks under the batch lock, so results that arrive
    #: during a pass wait for one chunk, not the pass. A chunk ends by time, not count: a
    #: patient that needs nothing takes the processor 30-65 us, one whose pass raises alerts
    #: 1-3 ms, and a pass mixes them in patient order (those with input in the last
    #: ``clock_settle_seconds`` are skipped), so 500 patients held the lock for 0.5-0.9 s and a
    #: chunk sized from the one before still 0.2 s (docs/measurements.md, thirty-sixth pass). A
    #: chunk judges ``TICK_STEP`` patients at a time until ``TICK_CHUNK_SECONDS`` have passed
    #: or it holds ``TICK_CHUNK``, then writes its outputs
    TICK_CHUNK = 500
    TICK_STEP = 5
    TICK_CHUNK_SECONDS = 0.02
    #: a checkpoint is due once the pending batches hold this many records
    CHECKPOINT_MAX_RECORDS = 20_000
    #: the next batch waits for the checkpoint in flight once its records and those pending
    #: since reach this many (bounds a crash's replay). Above ``CHECKPOINT_MAX_RECORDS``, so
    #: that in a backlog the changelog is written while the next batches are processed: with
    #: the two equal, the batch after every checkpoint waited for its whole changelog (about
    #: 1,000 patients, 13 MB in the benchmark), 50-90 ms each, 4-8 % of the clinical process's
    #: time (docs/measurements.md, thirty-first pass)
    REPLAY_MAX_RECORDS = 30_000
    #: patients a due checkpoint encodes after each batch while the stage keeps up with its
    #: input (30-60 us each: a slice holds the event loop for a few milliseconds)
    ENCODE_SLICE = 50
    #: how often the broker's end of each direct partition is checked (``_check_ends``): a
    #: record someone else wrote to it is fetched within about two of these
    END_CHECK_SECONDS = 0.05
    #: a partition that met a hole keeps fetching at least this long before it is direct again
    DIRECT_RETRY_SECONDS = 5.0

    def __init__(self, settings: Settings, processor: ClinicalProcessor, store: PatientStore) -> None:
        self.s = settings
        self.processor = processor
        self.store = store
        self.stream = settings.topic_observations
        self.changelog = changelog_topic(settings)
        self.group_id = f"{settings.app_id}-clinical"
        self.consumer: AIOKafkaConsumer | None = None
        self.producer: AIOKafkaProducer | None = None
        #: the changelog's own producer (client id ``<app id>-clinical-changelog``): a
        #: checkpoint's burst never queues ahead of the alerts on one connection, and a slow or
        #: throttled changelog slows only the checkpoints
        self.changelog_producer: AIOKafkaProducer | None = None
        self._restorer: AIOKafkaConsumer | None = None
        self._lock = asyncio.Lock()
        #: times a clock chunk (``tick``)
        self._timer: Callable[[], float] = time.perf_counter
        #: partitions assigned and restored: only these are processed and ticked
        self.owned: frozenset[int] = frozenset()
        #: per partition held: (changelog end after our writes, our last commit) to decide
        #: at the next assignment whether anyone else touched it meanwhile
        self._held: dict[int, tuple[int, int | None]] = {}
        #: per owned partition: the next offset to process (the committed offset this
        #: worker resumed from, then the end of each batch whose outputs are acknowledged)
        self._next: dict[int, int | None] = {}
        self.positions = Positions()
        #: the changelog write of the last checkpoint, in flight (see ``_settle``), then its commit
        self._persist_task: asyncio.Future | None = None
        #: the records whose offsets that checkpoint commits
        self._persist_records = 0
        self.commits = OrderedCommits(self.positions, "clinical",
                                      on_failure=COMMIT_FAILURES.labels(stage="clinical").inc)
        #: acknowledged batches not checkpointed yet (see the module docstring)
        self.pending = PendingCheckpoint(settings.clinical_checkpoint_interval_seconds, self.CHECKPOINT_MAX_RECORDS)
        #: a batch (or clock chunk) is processed and its outputs are not acknowledged yet:
        #: its changes are marked in the store and must never be checkpointed
        self._unacknowledged = False
        #: patient id -> (partition, value) encoded after acknowledged batches, for the next
        #: checkpoint (the last value per patient)
        self._encoded: dict[str, tuple[int, bytes]] = {}
        #: a due checkpoint whose patients are being encoded, a slice after each batch: the
        #: offsets it commits (the pending ones when it became due), their records, and how
        #: many of the patients marked then are still to encode (``_encode_slice``)
        self._collecting: dict[TopicPartition, int] | None = None
        self._collect_records = 0
        self._collect_left = 0
        self.ready = asyncio.Event()
        self.processed = 0
        self.last_restore: dict = {}
        #: set by ``stop``: no batch or clock chunk starts after the one in progress
        self._stopping = False
        #: this worker's ingest's acknowledged writes to the patient stream (set by the worker
        #: when ingest runs in its process): taken instead of fetched while they continue a
        #: partition's position (``monitor.clinical.own_writes``)
        self.own_writes: OwnWrites | None = None
        #: direct partitions (paused in the consumer) -> the next offset to take
        self._direct: dict[int, int] = {}
        #: partition -> when it may be direct again after a hole
        self._fetch_after: dict[int, float] = {}
        #: direct partition -> its end at the broker's last check
        self._broker_end: dict[int, int] = {}
        #: direct partitions whose end check found records nobody offered
        self._holes: set[int] = set()
        #: partition -> rollbacks so far: a batch made before a rollback of its partition
        #: (and processed after it, having waited for the lock) is not processed
        self._epoch: dict[int, int] = {}
        self._wake = asyncio.Event()
        self._end_checks: asyncio.Future | None = None
        #: which direct partition is served first in the next take (turns with each take)
        self._turn = 0

    # -- lifecycle -----------------------------------------------------------------------
    async def start(self) -> None:
        self._stopping = False
        CLINICAL_UNCHECKPOINTED.set_function(self.uncheckpointed_records)
        CLINICAL_PATIENTS_UNREADABLE.set_function(lambda: len(self.store.unreadable_ids(self.owned)))
        self.producer = new_producer(self.s, linger_ms=1)
        await self.producer.start()
        self.changelog_producer = new_producer(self.s, linger_ms=1, client_id=f"{self.group_id}-changelog")
        await self.changelog_producer.start()
        self._restorer = new_consumer(self.s, group_id=None, fetch_max_wait_ms=READ_TO_END_FETCH_WAIT_MS)
        await self._restorer.start()
        self.consumer = new_consumer(self.s, group_id=self.group_id)
        self.consumer.subscribe([self.stream], listener=self)
        await self.consumer.start()

    async def run(self) -> None:
        await self.start()
        consumer = self.consumer
        assert consumer is not None
        if self.own_writes is not None:
            self.own_writes.notify = self._wake.set
            self._end_checks = asyncio.ensure_future(self._check_ends())
        try:
            while not self._stopping:
                batch = await self._next_input(consumer)
                if batch:
                    await self.process_batch(batch, dict(self._epoch))
                elif self._undurable() or self._persist_task is not None:
                    await self.checkpoint_idle()
        finally:
            if self._end_checks is not None:
                self._end_checks.cancel()
                self._end_checks = None

    # -- input: fetched, or this worker's own writes ----------------------------------------
    async def _next_input(self, consumer: AIOKafkaConsumer) -> dict:
        """The next batch: records fetched, and records of the direct partitions taken from
        this worker's own acknowledged writes. Those are taken last, with nothing awaited
        after: a batch is processed as it stood when it was made (see ``process_batch``)."""
        # an idle checkpoint being encoded (``checkpoint_idle``): poll without waiting, so that its
        # next slice follows at once when no input is ready
        wait_ms = 0 if self._collecting is not None else 100
        if self.own_writes is None or not self._direct:  # every partition fetching
            return await consumer.getmany(timeout_ms=wait_ms, max_records=self.MAX_BATCH)
        self._wake.clear()
        assigned = consumer.assignment()
        # the fetching partitions' share of a batch, when a direct partition has records ready:
        # an even share per partition (the direct ones share the rest, ``_take_direct``), so
        # that neither way starves the other while the stage is behind
        fetching = sum(1 for tp in assigned if tp.partition not in self._direct)
        share = max(1, self.MAX_BATCH * fetching // max(1, len(assigned)))
        if self._direct_ready():
            # a poll of the consumer also when every partition is direct: it keeps the member's
            # poll interval, and brings what the fetching partitions have ready
            fetched = await consumer.getmany(timeout_ms=0, max_records=share)
        elif not fetching:
            try:  # every partition direct: wait for an offer (or a hole)
                if wait_ms:
                    await asyncio.wait_for(self._wake.wait(), wait_ms / 1000)
            except asyncio.TimeoutError:
                pass
            fetched = await consumer.getmany(timeout_ms=0, max_records=share)
        else:  # some direct, some fetching: whichever comes first
            getter = asyncio.ensure_future(consumer.getmany(timeout_ms=wait_ms, max_records=self.MAX_BATCH))
            waker = asyncio.ensure_future(self._wake.wait())
            try:
                await asyncio.wait({getter, waker}, return_when=asyncio.FIRST_COMPLETED)
            finally:
                waker.cancel()
                if not getter.done():
                    getter.cancel()  # nothing is taken from the fetcher before it returns
            fetched = getter.result() if getter.done() and not getter.cancelled() else {}
        return _merge(fetched, self._take_direct(self.MAX_BATCH - sum(len(rs) for rs in fetched.values())))

    def _direct_ready(self) -> bool:
        """A direct partition has its next record offered, or a hole."""
        own = self.own_writes
        assert own is not None
        return bool(self._holes) or any(own.pending(p, pos) for p, pos in self._direct.items())

    def _take_direct(self, room: int) -> dict:
        """Up to ``room`` records of the direct partitions from their positions on, without
        a hole; a partition whose next record nobody offered (someone else wrote it) fetches
        again.

        The room is shared among the partitions with records ready in proportion to the
        records each holds, the first of them turning with each take: while the stage is
        behind, every partition's backlog drains in the same time, a busier partition's (more
        patients) as soon as a quieter one's. (Taking each partition's records in a fixed order
        let the first ones fill every batch: at 2,000 events/s on a slow host, one partition of
        six waited 5.7-6.0 s at the median and the others 0.8-1.2 s. Equal shares left the
        partition with the most patients the slowest; docs/measurements.md, twenty-seventh
        pass.)"""
        own = self.own_writes
        assert own is not None
        out: dict = {}
        ready: list[int] = []
        for p, pos in list(self._direct.items()):
            if p in self._holes:
                self._to_fetch(p)
            elif own.continues(p, pos):
                ready.append(p)
            elif own.hole(p, pos):
                self._to_fetch(p)
        if not ready or room <= 0:
            return out
        first = self._turn % len(ready)
        self._turn += 1
        ready = ready[first:] + ready[:first]
        while ready and room > 0:
            total = max(1, sum(own.held(p) for p in ready))
            start = room
            more: list[int] = []
            for p in ready:
                if room <= 0:
                    break
                each = max(1, start * own.held(p) // total)
                records = own.take(p, self._direct[p], min(each, room))
                if not records:
                    continue
                out.setdefault(TopicPartition(self.stream, p), []).extend(records)
                self._direct[p] = records[-1].offset + 1
                room -= len(records)
                if len(records) == each and own.held(p) > 0:  # it may hold more: a share of what is left
                    more.append(p)
            ready = more
        return out

    def _to_fetch(self, p: int) -> None:
        """A direct partition fetches again, from the next offset to process."""
        self._direct.pop(p, None)
        self._broker_end.pop(p, None)
        self._holes.discard(p)
        self._fetch_after[p] = time.monotonic() + self.DIRECT_RETRY_SECONDS
        consumer = self.consumer
        if consumer is None:
            return
        tp = TopicPartition(self.stream, p)
        try:
            pos = self._next.get(p)
            if pos is not None:
                consumer.seek(tp, pos)
            consumer.resume(tp)
        except Exception as exc:  # revoked meanwhile: the assignment starts it afresh
            log.debug("partition %s not resumed: %s", p, type(exc).__name__)

    def _maybe_direct(self, offsets: dict[TopicPartition, int]) -> None:
        """(After a fetched batch's outputs were acknowledged.) A fetching partition whose
        next record this worker's ingest offered, or that reached the end of what it offered,
        is taken from the offers from now on (a record someone else writes next is a hole:
        it fetches again)."""
        own = self.own_writes
        consumer = self.consumer
        if own is None or consumer is None:
            return
        now = time.monotonic()
        for tp, off in offsets.items():
            p = tp.partition
            if (p not in self._direct and now >= self._fetch_after.get(p, 0.0)
                    and (own.continues(p, off) or own.reached(p, off))):
                consumer.pause(tp)  # what it fetched beyond ``off`` is dropped: the offers hold it
                self._direct[p] = off

    async def _check_ends(self) -> None:
        """Every ``END_CHECK_SECONDS``: the broker's end of each direct partition. An end
        that the previous check saw and that no offer reaches is a record someone else wrote:
        the partition fetches again (``_take_direct``). (The previous check's end, not this
        one's: this worker's own write may be on the broker before its acknowledgement is
        processed here.)"""
        while True:
            await asyncio.sleep(self.END_CHECK_SECONDS)
            direct = list(self._direct)
            restorer = self._restorer
            if not direct or restorer is None:
                continue
            try:
                ends = await restorer.end_offsets([TopicPartition(self.stream, p) for p in direct])
            except asyncio.CancelledError:
                raise
            except Exception as exc:  # the broker away: checked again next time
                log.debug("end offsets of the direct partitions not read: %s", type(exc).__name__)
                continue
            self._note_ends({tp.partition: end for tp, end in ends.items()}, direct)

    def _note_ends(self, ends: dict[int, int], direct: list[int]) -> None:
        """One end check's result (partition -> the broker's end) for the partitions that were
        direct when it was asked: a hole where the previous check's end passes the offers."""
        own = self.own_writes
        assert own is not None
        for p in direct:
            pos = self._direct.get(p)
            if pos is None:
                continue
            seen = self._broker_end.get(p)
            if seen is not None and seen > own.covered(p, pos):
                self._holes.add(p)
                self._wake.set()
            end = ends.get(p)
            if end is not None:
                self._broker_end[p] = end

    def _leave_direct(self) -> None:
        """No partition is direct (a revocation, a stop)."""
        self._direct.clear()
        self._broker_end.clear()
        self._holes.clear()

    def _forget(self, partitions: set[int]) -> None:
        """Partitions whose changelog was not acknowledged: restored at the next assignment."""
        self.store.drop(partitions)
        for p in partitions:
            self._held.pop(p, None)

    async def stop(self) -> None:
        self.ready.clear()
        # the batch in progress finishes (the lock); none starts after it, so the final
        # checkpoint's commit is the last one (a batch processed after it was committed, if
        # at all, after the consumer had left its group)
        self._stopping = True
        try:
            self._forget(await asyncio.wait_for(self._final_checkpoint(), 10.0))
        except (Exception, asyncio.CancelledError):  # not known to be durable: restore all when started again
            self._forget(self.store.partitions() | set(self._held))
            self._discard_pending()  # every partition is forgotten: nothing pending is kept
        if self._end_checks is not None:
            self._end_checks.cancel()
            self._end_checks = None
        self._leave_direct()
        own = self.own_writes
        if own is not None:
            log.info("records of this worker's ingest taken without a fetch: %d of %d offered (%d dropped)",
                     own.taken, own.offered, own.dropped)
        h = self.processor.handoff
        if h is not None:
            log.info("observations handed over by ingest: %d; decoded from the stream: %d; held: %d",
                        h.taken, h.decoded, len(h))
        await stop_clients(self.consumer, self._restorer, self.producer, self.changelog_producer)
        self.consumer = self._restorer = self.producer = self.changelog_producer = None

    # -- one batch -----------------------------------------------------------------------
    async def process_batch(self, batch: dict, epochs: dict[int, int] | None = None) -> None:
        """``epochs``: the partitions' rollback counts when the batch was made; the records
        of a partition rolled back since (a clock chunk's failed write, while this batch
        waited for the lock) are dropped: that partition is read again from its commit, and
        records past its new position must not be processed before the ones in between."""
        async with self._lock:
            if self._stopping:  # fetched while stopping: the next owner reads it
                return
            assert self.consumer is not None
            assigned = self.consumer.assignment()
            epoch = self._epoch
            batch = {tp: self._from_position(tp, rs) for tp, rs in batch.items()
                     if tp in assigned and tp.partition in self.owned
                     and (epochs is None or epoch.get(tp.partition, 0) == epochs.get(tp.partition, 0))}
            batch = {tp: rs for tp, rs in batch.items() if rs}
            if not batch:
                return
            started = time.perf_counter()
            records = [r for rs in batch.values() for r in rs]
            taken = sum(1 for r in records if type(r) is StreamRecord)
            if taken:
                _TAKEN.inc(taken)
            if taken < len(records):
                _FETCHED.inc(len(records) - taken)
            self._unacknowledged = True
            try:
                outputs = self._process(records)
            except PatientStateLost as exc:
                log.warning("clinical state of a patient not recoverable in place after an error; restoring "
                            "partition %s and processing it again", exc.partition)
                await self._roll_back({tp.partition for tp in batch} | {exc.partition}, STATE_LOST)
                return
            try:
                await self._write_outputs(outputs)
            except asyncio.CancelledError:
                raise
            except Exception as exc:
                log.warning("clinical batch not acknowledged (%s); restoring its partitions and processing "
                            "it again", type(exc).__name__)
                await self._roll_back({tp.partition for tp in batch}, WRITE_REFUSED)
                return
            # outputs are on the broker: the batch joins the pending checkpoint; when due,
            # the changed patients go to the changelog, then the pending offsets are
            # committed, while the next batches are read, processed and written
            self._unacknowledged = False
            offsets = next_offsets(batch)
            for tp, off in offsets.items():
                self._next[tp.partition] = off
            self._maybe_direct(offsets)
            self.pending.add(offsets, len(records))
            # the last checkpoint's changelog is written while the next batches are read,
            # processed and written: its result is taken once it is there, and waited for only
            # when the records not durable yet reach the cap of a crash's replay
            failed = await self._take_checkpoint(wait=self._replay_full())
            if failed:
                await self._roll_back(failed | {tp.partition for tp in batch}, CHANGELOG_REFUSED)
                return
            if self._persist_task is None:
                full = len(records) >= self.MAX_BATCH
                if self._collecting is None and self.pending.due() and not full:
                    self._begin_checkpoint()
                if self._collecting is not None and not full and not self._replay_full():
                    # keeping up with the input: a slice of the due checkpoint's patients
                    # now, so that encoding them all never holds the event loop
                    self._encode_slice()
                elif self._collecting is not None or self.pending.due():
                    # a backlog (the records wait anyway) or the replay cap: all at once
                    self._checkpoint()
            self.processed += len(records)
            PROCESSING_SECONDS.labels(stage="clinical_batch").observe(time.perf_counter() - started)

    def _process(self, records: list) -> list[Output]:
        """The processor over a batch, its CPU on this (the event loop's) thread counted however
        it ends (``monitor_clinical_processor_cpu_seconds_total``; the records are counted
        before it)."""
        cpu = time.thread_time()
        try:
            return self.processor.process(records)
        finally:
            CLINICAL_PROCESSOR_CPU.inc(time.thread_time() - cpu)

    async def _take_checkpoint(self, wait: bool = False) -> set[int]:
        """The result of the changelog write in flight once it is done (``wait``: wait for
        it); the partitions to restore, if any."""
        task = self._persist_task
        if task is None or not (wait or task.done()):
            return set()
        return await self._settle()

    def _replay_full(self) -> bool:
        """The records a crash would replay (the checkpoint in flight's and those pending
        since) reached ``REPLAY_MAX_RECORDS``: the next batch waits for the changelog."""
        held = self._persist_records + self._collect_records + self.pending.records
        return held >= self.REPLAY_MAX_RECORDS

    def _checkpoint(self) -> None:
        """Start a checkpoint: the value kept for every patient changed since the last one
        (all of batches whose outputs are acknowledged; the marked ones are encoded first) to
        the changelog, then the pending offsets committed, in the background."""
        assert self._persist_task is None and not self._unacknowledged
        self._absorb_collecting()
        self._keep_encoded()
        records = self.pending.records
        self._write_checkpoint(self.pending.take(), records)

    def _write_checkpoint(self, offsets: dict[TopicPartition, int], records: int) -> None:
        """Write the values kept for the checkpoint, then commit ``offsets``, in the background."""
        changed = [(pid, partition, value) for pid, (partition, value) in self._encoded.items()]
        self._encoded = {}
        if changed or offsets:
            self._persist_task = asyncio.ensure_future(self._persist(changed, offsets))
            self._persist_records = records

    def _begin_checkpoint(self) -> None:
        """A checkpoint is due while the stage keeps up with its input: it will commit the
        offsets pending now, once every patient marked now is encoded (``_encode_slice``)."""
        assert self._collecting is None
        self._collect_records = self.pending.records
        self._collecting = self.pending.take()
        self._collect_left = self.store.changed_count()

    def _encode_slice(self) -> None:
        """(Right after a batch's outputs were acknowledged, or at an idle poll under the lock.)
        Encode the next ``ENCODE_SLICE`` of the due checkpoint's patients, in the order they
        were marked, with the state of every batch so far; once all of them are, write the checkpoint.
        A patient marked again after its slice is written by the next checkpoint."""
        assert self._collecting is not None and self._persist_task is None and not self._unacknowledged
        n = min(self.ENCODE_SLICE, self._collect_left)
        self._keep_encoded(limit=n)
        self._collect_left -= n
        if self._collect_left <= 0 or not self.store.changed_count():
            self._write_checkpoint(*self._take_collecting())

    def _take_collecting(self) -> tuple[dict[TopicPartition, int], int]:
        """The offsets and records of the checkpoint being encoded; none is being encoded after."""
        assert self._collecting is not None
        taken = self._collecting, self._collect_records
        self._collecting, self._collect_records, self._collect_left = None, 0, 0
        return taken

    def _absorb_collecting(self) -> None:
        """The offsets of a checkpoint being encoded go back to the pending ones (it is then
        taken at once, or dropped)."""
        if self._collecting is not None:
            self.pending.add(*self._take_collecting())

    def _undurable(self) -> bool:
        """Acknowledged work that is not on the changelog and committed, nor being written."""
        return bool(self.pending or self._encoded or self._collecting is not None
                    or self.store.changed_count())

    async def _flush(self, wait: bool = True) -> set[int]:
        """Checkpoint now and wait for its changelog (under the lock; ``wait=False``: encode
        the next ``ENCODE_SLICE`` of its patients, starting it if none is being encoded, and
        return: the write starts once all are, its result is taken later); the partitions to
        restore, if any: on a failure, every partition with work that is not durable (its
        pending offsets are dropped). A batch interrupted before its outputs were acknowledged
        (cancelled) is never checkpointed: its partitions and the pending ones are given up
        instead."""
        failed = await self._settle()
        if self._unacknowledged:
            return failed | self._discard_pending()
        if not failed and self._undurable():
            if not wait:
                if self._collecting is None:
                    self._begin_checkpoint()
                self._encode_slice()
                return set()
            self._checkpoint()
            failed = await self._settle()
        if failed:
            failed |= self._discard_pending()
        return failed

    async def checkpoint_idle(self) -> None:
        """No input: checkpoint what is pending now rather than after the interval. Its
        patients are encoded ``ENCODE_SLICE`` per call, as after a batch (``_encode_slice``),
        the loop polling for input between slices without waiting (``_next_input``), and the
        changelog is written once all are. Encoding them all at once held the loop, and any
        result arriving, for as long as it took: 99-283 us a patient of the simulated cohort
        (10,000 in-process: 1.0-2.8 s). The idle polls between a clock pass's chunks keep each
        such checkpoint small, but marked patients build up behind a slow changelog write or a
        backlog; a slice bounds the hold whatever their number. Nothing here waits for the
        changelog (input arriving meanwhile is processed): a write in flight is taken by the
        next idle poll once it is done, or by the next batch."""
        async with self._lock:
            if self._persist_task is not None and not self._persist_task.done():
                return
            failed = await self._flush(wait=False)
            if failed:
                await self._roll_back(failed, CHANGELOG_REFUSED)

    def _keep_encoded(self, limit: int | None = None) -> None:
        """Encode every marked patient (all of them changed by batches whose outputs are
        acknowledged), or the first ``limit`` in the order they were marked, and keep the
        value for the next checkpoint."""
        for pid, partition, value in self.store.take_changed(limit=limit):
            self._encoded[pid] = (partition, value)

    def _discard_pending(self) -> set[int]:
        """Drop the pending offsets: the partitions with work that is not durable (pending
        offsets, values kept for the checkpoint or marked patients), to restore from the
        changelog."""
        self._absorb_collecting()
        parts = (self.pending.partitions() | self.store.changed_partitions()
                 | {partition for partition, _value in self._encoded.values()})
        self.pending.take()
        self._encoded.clear()
        self._unacknowledged = False  # every caller drops these partitions from the store
        return parts

    async def _final_checkpoint(self) -> set[int]:
        """At a stop: checkpoint and commit everything acknowledged; the partitions that are
        not durable (see ``_flush``)."""
        async with self._lock:
            return await self._checkpoint_all()

    async def _checkpoint_all(self) -> set[int]:
        """(The lock held.) Checkpoint every pending batch and wait for its changelog and
        commit; the partitions that are not durable (see ``_flush``)."""
        failed = await self._flush()
        await self.commits.drain()
        return failed

    async def _persist(self, changed: list[tuple[str, int, bytes]], offsets: dict) -> set[int]:
        """A checkpoint: the changed patients of batches whose outputs are acknowledged to
        the changelog, then (once acknowledged) the commit of their offsets. Returns the
        partitions to restore (their changelog was not acknowledged), else nothing."""
        try:
            await self._write_changelog(changed)
        except asyncio.CancelledError:
            raise
        except Exception as exc:
            CLINICAL_CHECKPOINTS.labels(outcome="refused").inc()
            log.warning("clinical changelog not acknowledged (%s); restoring its partitions and processing "
                        "them again", type(exc).__name__)
            return {p for _pid, p, _v in changed} | {tp.partition for tp in offsets}
        CLINICAL_CHECKPOINTS.labels(outcome="written").inc()
        # the commit is not waited for by the next batch: commits stay in order, a
        # revocation or rollback waits for all (_drain)
        if offsets:
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
        self._persist_records = 0
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

    async def _write_outputs(self, outputs: list[Output]) -> None:
        assert self.producer is not None
        await produce_all(self.producer, ((o.topic, o.key, o.value, o.headers, None) for o in outputs))

    async def _write_changelog(self, changed: list[tuple[str, int, bytes]]) -> None:
        """Each changed patient to its partition of the changelog, acknowledged; the
        changelog end per partition is remembered (see ``_unchanged``)."""
        assert self.changelog_producer is not None
        metas = await produce_all(self.changelog_producer, ((self.changelog, pid.encode(), value, None, partition)
                                                  for pid, partition, value in changed))
        for md in metas:
            end, committed = self._held.get(md.partition, (0, None))
            self._held[md.partition] = (max(end, md.offset + 1), committed)

    async def _roll_back(self, partitions: set[int], reason: str) -> None:
        """Back to the durable state of these partitions and of every partition with pending
        (acknowledged, not checkpointed) work: restore, then re-read from the commit.
        ``reason``: why (``monitor_rollbacks_total{stage="clinical",reason}``)."""
        ROLLBACKS.labels(stage="clinical", reason=reason).inc()
        partitions = set(partitions) | await self._drain()
        partitions |= self._discard_pending()
        await asyncio.sleep(1.0)
        self.store.drop(partitions)
        self.store.take_changed()  # nothing of a rolled-back batch may be written later
        self._unacknowledged = False
        await self._restore_retrying(partitions, "rollback")
        for p in partitions:
            self._next[p] = self._held.get(p, (0, None))[1]
            self._epoch[p] = self._epoch.get(p, 0) + 1
        if self.consumer is not None:
            for p in partitions & set(self._direct):
                self._to_fetch(p)
            await rewind(self.consumer, [TopicPartition(self.stream, p) for p in partitions], "clinical")

    # -- the clock -----------------------------------------------------------------------
    async def tick(self, now: datetime | None = None) -> int:
        """Run the clock over every owned patient, in chunks under the batch lock. A chunk's
        outputs are acknowledged before its changed patients are kept for the next checkpoint,
        exactly as a batch's: nothing here waits for the changelog in flight. A pass that
        judged every chunk sets ``monitor_clinical_clock_last_run_timestamp_seconds`` (one cut
        short by a stop or a chunk's rollback does not: those patients wait for the next)."""
        now = now or datetime.now(timezone.utc)
        pids = self.store.patient_ids(self.owned)
        PATIENTS_MONITORED.set(len(pids))
        complete = True
        i = 0
        while i < len(pids):
            async with self._lock:
                if self._stopping:  # the final checkpoint was taken: nothing is written after it
                    complete = False
                    break
                failed = await self._take_checkpoint()
                if failed:
                    await self._roll_back(failed, CHANGELOG_REFUSED)
                owned = self.owned
                first = i
                self._unacknowledged = True
                outputs: list[Output] = []
                until = self._timer() + self.TICK_CHUNK_SECONDS
                try:
                    while i < len(pids) and i - first < self.TICK_CHUNK:
                        part = pids[i:min(i + self.TICK_STEP, first + self.TICK_CHUNK)]
                        i += len(part)
                        outputs += self.processor.tick([p for p in part if self.store.partition_of(p) in owned], now)
                        if self._timer() >= until:
                            break
                except PatientStateLost as exc:
                    log.warning("clinical state of a patient not recoverable in place after a clock error; "
                                "restoring partition %s", exc.partition)
                    judged = {self.store.partition_of(p) for p in pids[first:i]} & owned
                    await self._roll_back(judged | {exc.partition}, STATE_LOST)
                    complete = False
                    continue
                try:
                    await self._write_outputs(outputs)
                except asyncio.CancelledError:
                    raise
                except Exception as exc:
                    log.warning("clock outputs not acknowledged (%s); restoring", type(exc).__name__)
                    await self._roll_back({self.store.partition_of(p) for p in pids[first:i]} & owned, WRITE_REFUSED)
                    complete = False
                    continue
                # the chunk's changed patients stay marked and join the next checkpoint, as a
                # batch's do: due after the next batches, or started by the next idle poll,
                # revocation or stop
                self._unacknowledged = False
            await asyncio.sleep(0)
        PATIENTS_OVERDUE.set(len(self.processor.overdue & set(self.store.patient_ids(self.owned))))
        if complete:
            CLINICAL_CLOCK_LAST_RUN.set(time.time())
        return len(pids)

    # -- rebalances ----------------------------------------------------------------------
    async def on_partitions_revoked(self, revoked) -> None:
        # waits for the batch in flight, then checkpoints every pending batch and waits for
        # its changelog and commit: the next owner resumes from a current changelog
        async with self._lock:
            self._forget(await self._checkpoint_all())
            self.owned = frozenset()
            CLINICAL_PARTITIONS_OWNED.set(0)
            self._leave_direct()
            self.ready.clear()

    async def on_partitions_assigned(self, assigned) -> None:
        async with self._lock:
            parts = {tp.partition for tp in assigned if tp.topic == self.stream}
            try:
                keep = await self._unchanged(parts)
            except Exception as exc:
                log.warning("could not check the held partitions (%s); restoring them", type(exc).__name__)
                keep = set()
            keep -= self._discard_pending()  # none after a revocation; never kept undurable
            self.store.drop(self.store.partitions() - keep)
            self._held = {p: v for p, v in self._held.items() if p in keep}
            await self._restore_retrying(parts - keep, "assigned")
            self._next = {p: self._held.get(p, (0, None))[1] for p in parts}
            self.owned = frozenset(parts)
            CLINICAL_PARTITIONS_OWNED.set(len(parts))
            self._leave_direct()
            if self.consumer is not None:  # every partition fetches from its position first
                self.consumer.resume(*[tp for tp in self.consumer.paused() if tp.topic == self.stream])
            if self.own_writes is not None:
                self.own_writes.retain(parts)
            if self.processor.handoff is not None:
                self.processor.handoff.retain(parts)
            self.ready.set()

    async def _restore_retrying(self, partitions: set[int], cause: str) -> None:
        """Restore, retrying while the broker is away: no record of a partition is
        processed before its state is back. ``cause``: ``assigned`` or ``rollback``
        (``monitor_clinical_restore_seconds``, from the first attempt to the state back)."""
        if not partitions:
            return
        delay = 0.5
        started = time.perf_counter()
        while True:
            try:
                await self._restore(partitions)
                CLINICAL_RESTORE_SECONDS.labels(cause=cause).observe(time.perf_counter() - started)
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
        parts = sorted(partitions)  # never empty (_restore_retrying)
        c = self._restorer
        assert c is not None
        started = time.perf_counter()
        tps = [TopicPartition(self.changelog, p) for p in parts]
        ends = await c.end_offsets(tps)  # before any fetch of these partitions is in flight
        c.assign(tps)
        await c.seek_to_beginning(*tps)
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
    def uncheckpointed_records(self) -> int:
        """Records processed here (their outputs acknowledged) whose patients are not on the
        changelog yet: pending, being encoded for a due checkpoint, or in a changelog write
        not acknowledged (or refused: they will be processed again). What a crash now would
        process again (``monitor_clinical_uncheckpointed_records``)."""
        n = self.pending.records + self._collect_records
        task = self._persist_task
        if task is not None and not (task.done() and not task.cancelled() and task.exception() is None
                                     and not task.result()):
            n += self._persist_records
        return n

    def lag(self) -> dict[tuple[str, int], int]:
        lag = self.positions.lag(self.consumer)
        for p, end in self._broker_end.items():  # a direct partition's fetch position stands still
            done = self.positions.committed.get(TopicPartition(self.stream, p))
            if done is not None:
                lag[(self.stream, p)] = max(0, end - done)
        return lag

    def find_alert(self, alert_id: str):
        return self.store.find_alert(alert_id)


def _merge(a: dict, b: dict) -> dict:
    """Two batches of disjoint partitions in one (a partition in both: its records in offset
    order, each once)."""
    for tp, rs in b.items():
        if tp in a:
            a[tp] = sorted({r.offset: r for r in (*a[tp], *rs)}.values(), key=lambda r: r.offset)
        else:
            a[tp] = rs
    return a
