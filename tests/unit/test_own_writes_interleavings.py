"""The clinical runner over this worker's own acknowledged writes, in every interleaving
hypothesis draws: this worker's ingest and another writer append to the patient stream,
the acknowledgements arrive in any order (or never: a write that failed on the client but
landed), the broker's ends are checked now and then, fetches return part of what is
there, batches and the bound on held records are small. Whatever the order, the runner
processes each partition's log exactly: every offset once, in offset order, with the bytes
the log holds there, and all of it in the end.

What is driven is the runner's own code (``_next_input``, ``process_batch``, ``_note_ends``,
``_maybe_direct``, ``_take_direct``, ``_to_fetch``) over ``OwnWrites``; the broker is a
list per partition and the consumer a stand-in with aiokafka's calls (position, pause,
resume, seek, a fetch of up to ``max_records``). The same check against a real broker, with
its timing instead of every ordering: tests/integration/test_own_writes_broker.py."""
from __future__ import annotations

import asyncio
import random

from aiokafka import TopicPartition
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from monitor.clinical.own_writes import OwnWrites, StreamRecord
from monitor.clinical.runner import ClinicalRunner
from monitor.clinical.store import InMemoryPatientStore
from monitor.settings import Settings

TOPIC = "obs"
PARTITIONS = (0, 1)
SETTINGS = settings(max_examples=int(__import__("os").environ.get("HYPOTHESIS_EXAMPLES", "60")) * 3, deadline=None,
                    suppress_health_check=[HealthCheck.too_slow])


class Fetched(StreamRecord):
    """A record as the consumer returns it (another type than a taken ``StreamRecord``)."""

    __slots__ = ()


class Consumer:
    """The broker's log through the calls the runner makes on its consumer."""

    def __init__(self, log: dict[int, list], rnd: random.Random) -> None:
        self.log = log
        self.rnd = rnd
        self.position = {p: 0 for p in PARTITIONS}
        self.paused: set[int] = set()

    def assignment(self) -> set[TopicPartition]:
        return {TopicPartition(TOPIC, p) for p in PARTITIONS}

    def pause(self, tp: TopicPartition) -> None:
        self.paused.add(tp.partition)

    def resume(self, tp: TopicPartition) -> None:
        self.paused.discard(tp.partition)

    def seek(self, tp: TopicPartition, offset: int) -> None:
        self.position[tp.partition] = offset

    async def getmany(self, timeout_ms: int = 0, max_records: int | None = None) -> dict:
        room = max_records if max_records is not None else 1 << 30
        out = {}
        for p in self.rnd.sample(PARTITIONS, len(PARTITIONS)):
            if p in self.paused or room <= 0:
                continue
            at = self.position[p]
            there = len(self.log[p]) - at
            n = min(room, self.rnd.randint(1, there)) if there > 0 else 0  # a fetch returns some
            if n:
                out[TopicPartition(TOPIC, p)] = [Fetched(TOPIC, p, o, *self.log[p][o]) for o in range(at, at + n)]
                self.position[p] = at + n
                room -= n
        return out


class Processor:
    handoff = None

    def __init__(self) -> None:
        self.seen: dict[int, list] = {p: [] for p in PARTITIONS}
        self.taken = 0

    def process(self, records):
        for r in records:
            self.seen[r.partition].append((r.offset, r.value))
            self.taken += type(r) is StreamRecord
        return []


steps = st.lists(st.one_of(
    st.tuples(st.just("ours"), st.sampled_from(PARTITIONS), st.integers(1, 4)),
    st.tuples(st.just("other"), st.sampled_from(PARTITIONS), st.integers(1, 2)),
    st.tuples(st.just("ack"), st.integers(0, 7)),
    st.tuples(st.just("lost"), st.integers(0, 7)),
    st.tuples(st.just("check")),
    st.tuples(st.just("consume")),
    st.tuples(st.just("consume")),
), max_size=60)


def _exact(proc: Processor, log: dict[int, list]) -> None:
    for p in PARTITIONS:
        want = [(o, rec[1]) for o, rec in enumerate(log[p][:len(proc.seen[p])])]
        assert proc.seen[p] == want, (p, proc.seen[p], want)


def _runner(log: dict[int, list], proc: Processor, max_batch: int, rnd: random.Random) -> ClinicalRunner:
    """The real runner over the stand-in consumer of ``log``."""
    r = ClinicalRunner(Settings(_env_file=None, topic_observations=TOPIC, clinical_checkpoint_interval_seconds=1e6),
                       processor=proc, store=InMemoryPatientStore())
    r.MAX_BATCH = max_batch
    r.consumer = Consumer(log, rnd)
    return r


async def _run(plan: list, capacity: int, max_batch: int, rnd: random.Random) -> tuple[Processor, dict, OwnWrites]:
    log: dict[int, list] = {p: [] for p in PARTITIONS}
    proc = Processor()
    r = _runner(log, proc, max_batch, rnd)
    consumer = r.consumer
    r.DIRECT_RETRY_SECONDS = 0.0
    r.producer = object()  # never used: the processor here writes no output

    async def no_rollback(partitions, reason):
        raise AssertionError(f"rolled back {partitions}: nothing here fails")

    r._roll_back = no_rollback
    r.owned = frozenset(PARTITIONS)
    r._next = {p: 0 for p in PARTITIONS}
    own = OwnWrites(TOPIC, capacity=capacity)
    own.notify = r._wake.set
    r.own_writes = own
    inflight: list = []  # our writes on the log, not acknowledged yet: (partition, base, records)
    writes = 0

    def append(p: int, n: int, who: str) -> None:
        nonlocal writes
        writes += 1
        records = [(f"pt-{p}".encode(), f"{who}-{writes}-{i}".encode(), None) for i in range(n)]
        if who == "ours":
            inflight.append((p, len(log[p]), records))
        log[p].extend(records)

    async def consume() -> None:
        if len(r._direct) >= len(PARTITIONS) and not r._direct_ready():
            return  # every partition direct, nothing offered: the runner waits for an offer or a check
        batch = await r._next_input(consumer)
        if batch:
            await r.process_batch(batch, dict(r._epoch))
        _exact(proc, log)

    def check() -> None:
        direct = list(r._direct)
        r._note_ends({p: len(log[p]) for p in direct}, direct)

    for step in plan:
        kind = step[0]
        if kind in ("ours", "other"):
            append(step[1], step[2], kind)
        elif kind in ("ack", "lost") and inflight:
            p, base, records = inflight.pop(step[1] % len(inflight))
            if kind == "ack":
                own.offer(p, base, records)
        elif kind == "check":
            check()
        elif kind == "consume":
            await consume()
        assert len(own) <= capacity
    rnd.shuffle(inflight)
    for p, base, records in inflight:
        own.offer(p, base, records)
    for _ in range(400):
        if all(len(proc.seen[p]) == len(log[p]) for p in PARTITIONS):
            break
        check()
        await consume()
    return proc, log, own


@SETTINGS
@given(plan=steps, capacity=st.integers(1, 12), max_batch=st.integers(1, 6), seed=st.randoms(use_true_random=False))
def test_every_offset_is_processed_once_in_order_with_the_logs_bytes_whatever_the_interleaving(
        plan, capacity, max_batch, seed):
    proc, log, own = asyncio.run(_run(plan, capacity, max_batch, seed))
    _exact(proc, log)
    assert {p: len(proc.seen[p]) for p in PARTITIONS} == {p: len(log[p]) for p in PARTITIONS}
    assert proc.taken == own.taken  # what was taken from the offers was processed, nothing twice


def test_a_plain_run_takes_its_own_writes_and_fetches_the_other_writers():
    """One fixed interleaving, so that the property above is known to exercise both paths."""
    plan = [("ours", 0, 3), ("consume",), ("ack", 0), ("consume",), ("ours", 0, 2), ("ack", 0), ("consume",),
            ("other", 0, 1), ("ours", 0, 2), ("ack", 0), ("consume",), ("consume",)]
    proc, log, own = asyncio.run(_run(plan, 100, 10, random.Random(1)))
    _exact(proc, log)
    assert len(proc.seen[0]) == 8
    assert own.taken > 0 and proc.taken == own.taken
    assert 0 < proc.taken < 8  # the other writer's record, at least, was fetched


def _behind(backlog: dict[int, int], max_batch: int) -> tuple[ClinicalRunner, OwnWrites, dict]:
    """A runner whose partitions are all direct, with ``backlog[p]`` records of its own
    writes offered and not processed yet (the stage is behind)."""
    log: dict[int, list] = {p: [] for p in PARTITIONS}
    r = _runner(log, Processor(), max_batch, random.Random(0))
    own = OwnWrites(TOPIC, capacity=10_000)
    r.own_writes = own
    for p, n in backlog.items():
        for base in range(0, n, 5):  # ingest's batches of five records
            records = [(b"k", f"{p}-{o}".encode(), None) for o in range(base, min(n, base + 5))]
            log[p].extend(records)
            own.offer(p, base, records)
    r._direct = {p: 0 for p in PARTITIONS}
    for p in PARTITIONS:
        r.consumer.pause(TopicPartition(TOPIC, p))
    return r, own, log


def _drain(r: ClinicalRunner, backlog: dict[int, int]) -> list[dict[int, int]]:
    """Batches taken until every backlog is processed: the records processed per partition
    after each batch (every batch from the partition's position on, in offset order)."""
    done = {p: 0 for p in PARTITIONS}
    after: list[dict[int, int]] = []
    while any(done[p] < backlog.get(p, 0) for p in PARTITIONS):
        batch = asyncio.run(r._next_input(r.consumer))
        assert batch
        for tp, rs in batch.items():
            assert [x.offset for x in rs] == list(range(done[tp.partition], done[tp.partition] + len(rs)))
            done[tp.partition] += len(rs)
            r._direct[tp.partition] = done[tp.partition]
        after.append(dict(done))
    return after


def test_a_stage_that_is_behind_shares_each_batch_among_its_direct_partitions():
    """Taking each partition's records in a fixed order let the first partition fill every
    batch while the stage was behind: one partition of six waited seconds longer than the
    rest (docs/measurements.md, twenty-seventh pass). The room is shared in proportion to
    what each partition holds, and what one partition does not need goes to the others."""
    r, own, _ = _behind({0: 100, 1: 100}, max_batch=10)
    batch = asyncio.run(r._next_input(r.consumer))
    assert {tp.partition: len(rs) for tp, rs in batch.items()} == {0: 5, 1: 5}
    assert all([x.offset for x in rs] == list(range(5)) for rs in batch.values())  # from the position, in order

    r, own, _ = _behind({0: 20, 1: 80}, max_batch=10)  # a busier partition: more patients
    batch = asyncio.run(r._next_input(r.consumer))
    assert {tp.partition: len(rs) for tp, rs in batch.items()} == {0: 2, 1: 8}

    r, own, _ = _behind({0: 1, 1: 100}, max_batch=10)  # a quiet partition still gets its record
    batch = asyncio.run(r._next_input(r.consumer))
    assert {tp.partition: len(rs) for tp, rs in batch.items()} == {0: 1, 1: 9}


def test_a_stage_that_is_behind_drains_its_direct_partitions_at_the_same_pace():
    r, own, log = _behind({0: 60, 1: 60}, max_batch=7)  # an odd batch: the first served turns
    spread = max(abs(done[0] - done[1]) for done in _drain(r, {0: 60, 1: 60}))
    assert spread <= 1, spread


def test_a_stage_that_is_behind_drains_a_busier_partition_in_the_same_time():
    """Equal shares drained the partition holding the most patients last: the slowest of six
    in the runs of the twenty-seventh pass. Shares in proportion to the backlogs finish them
    together."""
    backlog = {0: 40, 1: 120}
    r, own, log = _behind(backlog, max_batch=8)
    after = _drain(r, backlog)
    assert len(after) == 20  # every batch full
    finished = {p: next(i for i, done in enumerate(after) if done[p] >= n) for p, n in backlog.items()}
    assert abs(finished[0] - finished[1]) <= 1, finished
