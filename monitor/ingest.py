"""Ingest: raw input bytes -> the patient stream ``observations``, or dead-letter.

Lab results, vital signs and liver panels become canonical observations. Treatment
events (validated here) and alert actions are routed into the same stream, keyed by
their patient id (header ``kind``; original bytes and source coordinates kept), so the
clinical stage reads one keyed stream in which a patient's events are in one partition
in write order: a dose sent without a key, or by a client whose partitioner is not
murmur2, still lands on the patient's partition (aiokafka's default partitioner is
murmur2, as Kafka's Java client).

Ingest is stateless, so it runs as a batched consume -> decode -> produce -> commit loop
on aiokafka inside the worker process rather than as a per-message faust agent: the
profile of the faust agent showed the time going to per-message stream, conductor and
producer overhead, not to decoding (see README, "Performance"). Guarantees:

- at least once: a batch's offsets are committed only after the broker acknowledged
  every observation and dead letter produced from it and from every batch before it.
  The loop does not wait for those acknowledgements: it reads and processes the next
  batches meanwhile (up to ``MAX_UNACKNOWLEDGED`` batches unacknowledged; the producer
  keeps each partition's records in order), and the commits follow in order. On a failed
  write nothing after it is committed: the loop waits for the batches in flight, forgets
  what is buffered, rewinds every partition to its last commit and processes from there
  again (ids are stable, so downstream stages see the same observation ids; a batch
  written after the failed one is written again, and the engine drops the repeats);
- nothing lost: every input ends as observations or as a dead letter with its original
  bytes, source topic/partition/offset and a reason; nothing raised by decoding can stop
  the loop;
- keyed by patient: observations are produced with ``patient_id`` as key.
"""
from __future__ import annotations

import asyncio
import logging
import time
from collections import deque
from datetime import datetime, timedelta, timezone

from aiokafka import AIOKafkaConsumer, AIOKafkaProducer, ConsumerRebalanceListener
from aiokafka.coordinator.assignors.range import RangePartitionAssignor
from aiokafka.structs import TopicPartition
from pydantic import ValidationError

from schemas.analytes import catalogue
from schemas.errors import Reason, Rejected
from schemas.events import Observation
from schemas.ingest import Limits, decode

from schemas.alert import AlertAction

from .clinical.handoff import DecodedObservations
from .clinical.own_writes import OwnWrites
from .clinical.processor import KIND_ACTION, KIND_TREATMENT, routed_headers
from .dlq import dead_letter_headers
from .kafka_batch import (OrderedCommits, Positions, acknowledged, key_partition, new_consumer, new_producer, rewind,
                          send_all, stop_clients)
from .metrics import (COMMIT_FAILURES, DEAD_LETTERS, EVENTS_CONSUMED, OBSERVATIONS, PROCESSING_SECONDS, ROLLBACKS,
                      SOURCE_LAST_EVENT, WRITE_REFUSED, LabelCache, source_label)

from .settings import Settings, get_settings
from .write_order import WriteOrderMerge

log = logging.getLogger(__name__)


def limits_of(s: Settings) -> Limits:
    from schemas.codemaps import load_code_maps

    return Limits(max_bytes=s.max_payload_bytes, max_depth=s.max_json_depth,
                  max_future=timedelta(seconds=s.max_future_skew_seconds),
                  hl7_processing_id=s.hl7_processing_id, code_maps=load_code_maps(s.code_maps_dir))


#: the model's own JSON serializer: the bytes of ``model_dump_json().encode()`` without the str round trip
_OBS_JSON = Observation.__pydantic_serializer__.to_json

_MONITORED = {a.key: str(a.monitored).lower() for a in catalogue().by_key.values()}


class _Counters:
    """Metric children cached by label values: ``labels()`` costs more than the increment.

    With ``deferred`` set (the batched loop), counts are kept in plain dicts and applied
    to the metrics once per batch by :meth:`flush` (an increment of a prometheus-client
    child takes a lock: three per observation were ~9 % of ingest's CPU); otherwise each
    count is applied at once. With ``relayed`` set (ingest in a process of its own,
    ``monitor.ingest_process``), :meth:`flush` applies nothing: the counts are taken as a
    JSON-able snapshot (:meth:`take`) and applied by the worker's process (:meth:`apply`),
    whose ``/metrics`` ops teams scrape."""

    #: batch durations kept between two takes at most (a relay reads them twice a second)
    MAX_BATCHES = 10_000

    def __init__(self) -> None:
        self._m = LabelCache()
        self.deferred = False
        self.relayed = False
        self._n_events: dict[tuple[str, str], int] = {}
        self._n_obs: dict[str, int] = {}
        self._seen: dict[str, datetime] = {}
        self._n_dead: dict[tuple[str, str], int] = {}
        self._batches: list[float] = []
        self._n_rollbacks: dict[str, int] = {}
        self._n_commit_failures = 0

    def event(self, kind: str, fmt: str) -> None:
        k = (kind, fmt)
        self._n_events[k] = self._n_events.get(k, 0) + 1
        if not self.deferred:
            self.flush()

    def observation(self, analyte: str) -> None:
        self._n_obs[analyte] = self._n_obs.get(analyte, 0) + 1
        if not self.deferred:
            self.flush()

    def source_seen(self, source: str, received_at: datetime) -> None:
        self._seen[source] = received_at
        if not self.deferred:
            self.flush()

    def dead(self, topic: str, reason: str) -> None:
        k = (topic, reason)
        self._n_dead[k] = self._n_dead.get(k, 0) + 1
        if not self.deferred:
            self.flush()

    def batch(self, seconds: float) -> None:
        """One batch of the loop processed in ``seconds`` (``processing_seconds{stage="ingest_batch"}``)."""
        if len(self._batches) < self.MAX_BATCHES:
            self._batches.append(seconds)
        if not self.deferred:
            self.flush()

    def rollback(self, reason: str) -> None:
        """The loop went back to its last commit (``monitor_rollbacks_total{stage="ingest"}``);
        rare, so applied (or made ready for the relay) at once."""
        self._n_rollbacks[reason] = self._n_rollbacks.get(reason, 0) + 1
        self.flush()

    def commit_failed(self) -> None:
        """An offset commit failed (``monitor_commit_failures_total{stage="ingest"}``)."""
        self._n_commit_failures += 1
        self.flush()

    def flush(self) -> None:
        """Apply the counts kept since the last flush (unless they are relayed)."""
        if not self.relayed:
            self.apply(self.take())

    def take(self) -> dict:
        """The counts kept since the last take, as JSON-able lists; cleared."""
        snap = {
            "events": [[topic, fmt, n] for (topic, fmt), n in self._n_events.items()],
            "observations": [[analyte, n] for analyte, n in self._n_obs.items()],
            "sources": [[source, at.timestamp()] for source, at in self._seen.items()],
            "dead": [[topic, reason, n] for (topic, reason), n in self._n_dead.items()],
            "batches": self._batches,
        }
        if self._n_rollbacks:
            snap["rollbacks"] = [[reason, n] for reason, n in self._n_rollbacks.items()]
        if self._n_commit_failures:
            snap["commit_failures"] = self._n_commit_failures
        self._n_events, self._n_obs, self._seen, self._n_dead, self._batches = {}, {}, {}, {}, []
        self._n_rollbacks, self._n_commit_failures = {}, 0
        return snap

    def apply(self, snap: dict) -> None:
        """Add a snapshot of :meth:`take` (this process's or an ingest process's) to the metrics."""
        m = self._m
        for topic, fmt, n in snap.get("events", ()):
            m.get(EVENTS_CONSUMED, topic, fmt).inc(n)
        for analyte, n in snap.get("observations", ()):
            m.get(OBSERVATIONS, analyte, _MONITORED.get(analyte, "false")).inc(n)
        for source, at in snap.get("sources", ()):
            # the label of a source depends on the configured allow-list: judged when applied
            m.get(SOURCE_LAST_EVENT, source_label(source)).set(at)
        for topic, reason, n in snap.get("dead", ()):
            m.get(DEAD_LETTERS, topic, reason).inc(n)
        if snap.get("batches"):
            h = m.get(PROCESSING_SECONDS, "ingest_batch")
            for seconds in snap["batches"]:
                h.observe(seconds)
        for reason, n in snap.get("rollbacks", ()):
            m.get(ROLLBACKS, "ingest", reason).inc(n)
        if snap.get("commit_failures"):
            m.get(COMMIT_FAILURES, "ingest").inc(snap["commit_failures"])


COUNTERS = _Counters()


class Ingest:
    """The pure step of ingest for one worker's settings: one input message -> the records
    to produce ``(topic, key, value, headers)``."""

    def __init__(self, s: Settings) -> None:
        self.s = s
        self.limits = limits_of(s)
        self.kinds = {s.topic_lab_results: "lab-results", s.topic_vital_signs: "vital-signs",
                      s.topic_liver_function: "liver-function", s.topic_treatments: "treatments"}
        self.topics = [*self.kinds, s.topic_alert_actions]

    def record(self, topic: str, partition: int | None, offset: int | None, key: bytes | None, raw: bytes | None,
               received_at: datetime, decoded_out: list | None = None) -> list[tuple[str, bytes | None, bytes, list | None]]:
        """``decoded_out``: if given, gets ``(value, Observation)`` of every observation
        record returned (in order; nothing for other records)."""
        s = self.s
        kind = self.kinds.get(topic, topic)
        try:
            if topic == s.topic_alert_actions:
                return [self._action(topic, partition, offset, key, raw)]
            decoded = decode(kind, raw, received_at=received_at, limits=self.limits)
        except Rejected as rej:
            reason, message = rej.reason, rej.message
        except ValidationError as exc:
            reason, message = Reason.SCHEMA_INVALID, str(exc.errors(include_url=False, include_input=False)[:1])
        except Exception as exc:  # never crash on input
            log.warning("unexpected %s decoding input from %s[%s]@%s", type(exc).__name__, topic, partition, offset)
            reason, message = Reason.INTERNAL_ERROR, f"{type(exc).__name__} while decoding"
        else:
            if not isinstance(decoded, list):  # a treatment: to the patient's partition of the stream
                COUNTERS.event(kind, "json")
                return [(s.topic_observations, decoded.patient_id.encode(), raw,
                         routed_headers(KIND_TREATMENT, topic, partition, offset))]
            COUNTERS.event(kind, decoded[0].format if decoded else "json")
            out = []
            for obs in decoded:
                COUNTERS.observation(obs.analyte)
                value = _OBS_JSON(obs)
                out.append((s.topic_observations, obs.patient_id.encode(), value, None))
                if decoded_out is not None:
                    decoded_out.append((value, obs))
            if decoded:
                COUNTERS.source_seen(decoded[0].source, received_at)
            return out
        COUNTERS.event(kind, "invalid")
        COUNTERS.dead(topic, reason.value)
        log.info("dead-lettered input from %s[%s]@%s: %s", topic, partition, offset, reason.value)
        return [(s.topic_dead_letter, key, raw if raw is not None else b"",
                 dead_letter_headers(reason, message, topic, partition, offset, received_at))]

    def _action(self, topic, partition, offset, key, raw) -> tuple:
        """An action goes to its patient's partition of the stream; the lifecycle decides on
        it (unknown alert, role, state) and dead-letters it there if refused."""
        action = AlertAction.model_validate_json(raw or b"")
        patient_id = action.patient_id or (key.decode(errors="replace") if key else None)
        if not patient_id:
            raise Rejected(Reason.ACTION_INVALID, "action names no patient (set patient_id or the message key)")
        return (self.s.topic_observations, patient_id.encode(), raw,
                routed_headers(KIND_ACTION, topic, partition, offset))


def ingest_record(topic: str, partition: int | None, offset: int | None, key: bytes | None, raw: bytes | None,
                  received_at: datetime) -> list[tuple[str, bytes | None, bytes, list | None]]:
    """``Ingest.record`` with the environment's settings (tests and benchmarks)."""
    out = Ingest(get_settings()).record(topic, partition, offset, key, raw, received_at)
    COUNTERS.flush()
    return out


class IngestService(ConsumerRebalanceListener):
    """The batched ingest loop; one consumer group ``<app id>-ingest`` across workers.

    Records are produced in the order they were written across the input topics (record
    timestamps, see ``monitor.write_order``): a dose published before a lab result stands
    ahead of it in the patient stream, also when a backlog is read after a restart. The
    range assignor gives one worker the same partition number of every input topic, so a
    patient whose producers key by patient id has all inputs merged by one worker."""

    MAX_BATCH = 2000
    #: pause fetching a partition whose buffer holds this many records (resume at a quarter)
    MAX_BUFFERED = 20_000
    #: acknowledged batches' offsets join one commit per this many seconds (``OrderedCommits``):
    #: at a live rate each batch holds a few records, and a commit per batch was 157 commits
    #: a second at 500 events/s (3.2 records a batch) for the broker and the client; a crash
    #: replays up to this much more input, which the patient stream's readers drop by
    #: observation id (at least once)
    COMMIT_INTERVAL_SECONDS = 0.2

    def __init__(self, s: Settings, handoff: DecodedObservations | None = None,
                 own_writes: OwnWrites | None = None) -> None:
        self.s = s
        self.step = Ingest(s)
        #: where the observations written go to this worker's clinical stage, decoded
        self.handoff = handoff
        #: where the records written to the patient stream go, with their offsets once
        #: acknowledged, for this worker's clinical stage (``monitor.clinical.own_writes``)
        self.own_writes = own_writes
        self.consumer: AIOKafkaConsumer | None = None
        self.producer: AIOKafkaProducer | None = None
        self.ready = asyncio.Event()
        self.processed = 0
        self.positions = Positions()
        # within one timestamp, treatments first (see monitor.write_order)
        self.merge = WriteOrderMerge(priority=lambda tp: 0 if tp.topic == s.topic_treatments else 1)
        self._lock = asyncio.Lock()
        self.commits = OrderedCommits(self.positions, "ingest", min_interval=self.COMMIT_INTERVAL_SECONDS,
                                      on_failure=COUNTERS.commit_failed)
        #: per batch written and not yet committed: its acknowledgement, then its commit
        self._acks: deque[asyncio.Future] = deque()
        #: the first write that failed since the last rewind (the loop rewinds)
        self._failed: BaseException | None = None
        #: set by ``stop``: the loop processes no batch after the one in progress
        self._stopping = False

    async def start(self) -> None:
        self._stopping = False
        COUNTERS.deferred = True  # applied once per batch (after its write)
        self.producer = new_producer(self.s, linger_ms=1)
        await self.producer.start()
        self.consumer = new_consumer(self.s, group_id=f"{self.s.app_id}-ingest",
                                     partition_assignment_strategy=(RangePartitionAssignor,))
        self.consumer.subscribe(self.step.topics, listener=self)
        await self.consumer.start()
        self.ready.set()

    async def on_partitions_revoked(self, revoked) -> None:
        async with self._lock:  # the batches in flight are acknowledged (and committed) first
            await self._settle_all()  # the assignment reads every partition again from its commit

    async def _settle_all(self) -> None:
        """Every batch written acknowledged and committed (or its failure known), nothing
        buffered, no failure pending: the next read starts at the commits (after a
        revocation, a failed write, or at a stop)."""
        await self._settle_writes()
        self._failed = None
        self.merge.clear()
        await self.commits.drain()

    async def on_partitions_assigned(self, assigned) -> None:
        pass

    async def _caught_up(self, consumer: AIOKafkaConsumer, tps) -> set:
        out = set()
        for tp in tps:
            end = consumer.highwater(tp)
            if end is None:
                continue
            try:
                if await consumer.position(tp) >= end:
                    out.add(tp)
            except Exception:  # revoked meanwhile
                continue
        return out

    def _flow_control(self, consumer: AIOKafkaConsumer) -> None:
        paused = consumer.paused()
        for tp, n in self.merge.sizes().items():
            if n >= self.MAX_BUFFERED and tp not in paused:
                consumer.pause(tp)
            elif n <= self.MAX_BUFFERED // 4 and tp in paused:
                consumer.resume(tp)

    async def run(self) -> None:
        await self.start()
        consumer, producer = self.consumer, self.producer
        assert consumer is not None and producer is not None
        record = self.step.record
        handoff = self.handoff
        full = False  # the last batch was as large as a batch may be
        while True:
            if handoff is not None and handoff.full():
                await self._wait_for_clinical(handoff)
            wait_ms, full = self.fetch_wait_ms(len(self.merge), full), False
            batch = await consumer.getmany(timeout_ms=wait_ms, max_records=self.MAX_BATCH)
            async with self._lock:
                if self._stopping:  # a batch fetched while stopping: the next owner reads it
                    return
                await self._settle_writes(self.MAX_UNACKNOWLEDGED - 1)
                if self._failed is not None:
                    await self._write_failed(consumer, self._failed)
                    continue
                assigned = consumer.assignment()
                self.merge.add({tp: rs for tp, rs in batch.items() if tp in assigned})
                if not len(self.merge):
                    continue
                self._flow_control(consumer)
                ordered = self.merge.take(assigned, await self._caught_up(consumer, assigned), self.MAX_BATCH)
                full = len(ordered) >= self.MAX_BATCH
                if not ordered:
                    continue
                started = time.perf_counter()
                received_at = datetime.now(timezone.utc)
                out = []
                last: dict = {}
                decoded: list | None = [] if handoff is not None else None
                for r in ordered:
                    last[(r.topic, r.partition)] = r.offset
                    for topic, key, value, headers in record(r.topic, r.partition, r.offset, r.key, r.value,
                                                             received_at, decoded):
                        out.append((topic, key, value, headers, None))
                if decoded:  # before the write: the clinical stage may read them back at once
                    parts = sorted(await producer.partitions_for(self.s.topic_observations))
                    for value, obs in decoded:
                        handoff.put(key_partition(obs.patient_id.encode(), parts), value, obs)
                kept: list | None = [] if self.own_writes is not None else None
                try:
                    sent = await send_all(producer, out, kept, self.s.topic_observations)
                except asyncio.CancelledError:
                    raise
                except Exception as exc:
                    await self._write_failed(consumer, exc)
                    continue
                # the acknowledgements are awaited in the background while the next batch is
                # read and processed; once every output of this batch (and of every batch
                # before it) is on the broker, its offsets are committed (in order)
                self._acks.append(asyncio.ensure_future(self._acknowledge(
                    self._acks[-1] if self._acks else None, sent,
                    {TopicPartition(t, p): off + 1 for (t, p), off in last.items()}, kept)))
                COUNTERS.batch(time.perf_counter() - started)
                COUNTERS.flush()
                self.processed += len(ordered)

    #: batches whose outputs may be unacknowledged at once (then the loop waits for the oldest)
    MAX_UNACKNOWLEDGED = 4

    @staticmethod
    def fetch_wait_ms(buffered: int, last_batch_full: bool) -> int:
        """How long the next ``getmany`` may wait for records to arrive.

        - 0 after a full batch: the merge may hold more records it can release now (a fetch
          brings up to ``max_message_bytes`` a partition, 16 MiB by default, far more than a
          batch), so the loop takes what the consumer has and goes on. Until 2026-12-02 it waited up to 50 ms here for the
          next fetch while the records were already in hand: in a backlog ingest was idle
          more than half the time and ran at about half the raw loop's rate
          (docs/measurements.md, thirty-first pass).
        - 50 ms while the merge holds records it cannot release yet (it waits for a
          partition's next records, or for ``max_hold``).
        - 200 ms when it holds none (nothing to do until records arrive)."""
        if last_batch_full:
            return 0
        return 50 if buffered else 200

    async def _acknowledge(self, previous: asyncio.Future | None, sent: list, offsets: dict,
                           kept: list | None = None) -> bool:
        """Wait for a batch's outputs, then (once every earlier batch's were acknowledged
        and committed in order) submit its commit. False if this or an earlier batch's write
        failed: nothing after a failure is committed (the loop rewinds to the last commit).
        The records written to the patient stream are offered to this worker's clinical
        stage with their offsets once acknowledged (``kept``, see ``send_all``)."""
        try:
            metas = await acknowledged(sent)
        except asyncio.CancelledError:
            raise
        except Exception as exc:
            if self._failed is None:
                self._failed = exc
            return False
        if kept:
            own = self.own_writes
            assert own is not None
            for md, (_f, n), records in zip(metas, sent, kept):
                if records:  # a batch's metadata is its last record's (``acknowledged``)
                    own.offer(md.partition, md.offset - max(n, 1) + 1, records)
        if previous is not None and not await asyncio.shield(previous):
            return False
        assert self.consumer is not None
        self.commits.submit(self.consumer, offsets)
        return True

    async def _settle_writes(self, limit: int = 0) -> None:
        """Wait until at most ``limit`` batches' outputs are unacknowledged."""
        while self._acks and (self._acks[0].done() or len(self._acks) > limit):
            await asyncio.wait([self._acks.popleft()])

    async def _write_failed(self, consumer: AIOKafkaConsumer, exc: BaseException) -> None:
        """An output was not acknowledged: forget what is buffered and every batch after
        the failure, rewind every partition to its last commit and process from there again."""
        log.warning("ingest write failed (%s); retrying from the last commit", type(exc).__name__)
        COUNTERS.rollback(WRITE_REFUSED)
        await self._settle_all()
        await asyncio.sleep(1.0)
        await rewind(consumer, list(consumer.assignment()), "ingest")

    #: how long ingest waits for this worker's clinical stage to take the observations
    #: handed over before it reads more (then it goes on, and the clinical stage decodes)
    HANDOFF_WAIT_SECONDS = 2.0

    async def _wait_for_clinical(self, handoff: DecodedObservations) -> None:
        """The clinical stage is behind: give it the CPU instead of running further ahead."""
        deadline = time.monotonic() + self.HANDOFF_WAIT_SECONDS
        while handoff.full() and time.monotonic() < deadline:
            await asyncio.sleep(0.005)

    def lag(self) -> dict[tuple[str, int], int]:
        return self.positions.lag(self.consumer)

    async def _quiesce(self) -> None:
        async with self._lock:  # no batch in progress, and none starts after this (_stopping)
            await self._settle_all()

    async def stop(self) -> None:
        """The batch in progress finishes; every batch written is acknowledged and committed
        before the consumer leaves its group (a commit after that fails, and the next owner
        writes the batch again: a graceful stop repeated up to a few batches of observations
        before, 11 in one run of ``tests/reliability/test_scale_out.py``)."""
        self.ready.clear()
        self._stopping = True
        try:
            await asyncio.wait_for(self._quiesce(), 10.0)
        except Exception:  # noqa: BLE001 - stopping: the next owner resumes from the last commit
            pass
        await stop_clients(self.consumer, self.producer)
        self.consumer = self.producer = None


