"""The clinical clock's last complete pass (``ClinicalRunner.tick``;
``monitor_clinical_clock_last_run_timestamp_seconds``, rule MonitorClinicalClockStalled): set
when the clock has judged every patient this worker owns, not when a pass was cut short, so a
clock that keeps failing shows as stalled instead of staying silent about overdue samples."""
from __future__ import annotations

import asyncio

from monitor.clinical.processor import PatientStateLost
from monitor.clinical.runner import ClinicalRunner
from monitor.clinical.store import InMemoryPatientStore
from monitor.metrics import CLINICAL_CLOCK_LAST_RUN, REGISTRY
from monitor.settings import Settings


def last_run() -> float:
    return REGISTRY.get_sample_value("monitor_clinical_clock_last_run_timestamp_seconds")


class Clock:
    """The processor's clock side: judges the patients it is given, or fails as told."""

    def __init__(self, fail: BaseException | None = None) -> None:
        self.fail = fail
        self.judged: list[str] = []
        self.overdue: set[str] = set()

    def tick(self, patient_ids, now):
        if self.fail is not None:
            raise self.fail
        self.judged.extend(patient_ids)
        return []


def runner(clock: Clock, patients: int = 5) -> ClinicalRunner:
    store = InMemoryPatientStore()
    for i in range(patients):
        store.load(f"p{i}", i % 2)
    r = ClinicalRunner(Settings(_env_file=None), processor=clock, store=store)
    r.owned = frozenset({0, 1})
    r.TICK_CHUNK = 2  # three chunks
    r.producer = object()  # never used: the clock here writes no output

    async def roll_back(partitions, reason):
        rolled.append(reason)

    rolled: list[str] = []
    r._roll_back = roll_back
    r.rolled = rolled
    return r


def test_a_pass_over_every_owned_patient_sets_the_last_run():
    CLINICAL_CLOCK_LAST_RUN.set(-1.0)
    clock = Clock()
    assert asyncio.run(runner(clock).tick()) == 5
    assert sorted(clock.judged) == [f"p{i}" for i in range(5)]
    assert last_run() > 0


def test_a_pass_cut_short_does_not():
    # a chunk whose patient's state is lost: rolled back, its patients wait for the next pass
    CLINICAL_CLOCK_LAST_RUN.set(-1.0)
    r = runner(Clock(fail=PatientStateLost(0)))
    asyncio.run(r.tick())
    assert r.rolled == ["state_lost"] * 3 and last_run() == -1.0
    # a chunk whose outputs are not written (here: no producer to write them): rolled back too
    r = runner(Clock())
    r.producer = None  # _write_outputs fails
    asyncio.run(r.tick())
    assert r.rolled == ["write_refused"] * 3 and last_run() == -1.0
    # the worker stopping: the pass ends before its first chunk
    r = runner(Clock())
    r._stopping = True
    asyncio.run(r.tick())
    assert last_run() == -1.0


class TimedClock(Clock):
    """A clock whose patients take the processor a known time each (on a fake timer): the
    patients whose position in the pass is in ``heavy`` raise alerts (1 ms each), the others
    need nothing (20 us each)."""

    def __init__(self, heavy) -> None:
        super().__init__()
        self.heavy = heavy
        self.now = 0.0

    def timer(self) -> float:
        return self.now

    def tick(self, patient_ids, now):
        self.now += sum(0.001 if len(self.judged) + k in self.heavy else 0.00002 for k in range(len(patient_ids)))
        return super().tick(patient_ids, now)


def holds(heavy, patients: int = 2000) -> tuple[ClinicalRunner, list[tuple[int, float]]]:
    """A pass over ``patients``; per chunk (one write of its outputs each): its patients and
    the time it held the batch lock."""
    clock = TimedClock(heavy)
    r = runner(clock, patients=patients)
    r.TICK_CHUNK = 500
    r._timer = clock.timer
    marks = [(0, 0.0)]

    async def write_outputs(outputs):
        marks.append((len(clock.judged), clock.now))

    r._write_outputs = write_outputs
    assert asyncio.run(r.tick()) == patients
    assert clock.judged == r.store.patient_ids(r.owned) and len(set(clock.judged)) == patients
    return r, [(n - n0, t - t0) for (n0, t0), (n, t) in zip(marks, marks[1:])]


def test_a_chunk_holds_the_batch_lock_for_a_bounded_time_whatever_its_patients_cost():
    # results arriving during a pass wait for one chunk: about TICK_CHUNK_SECONDS, at most one
    # step of patients more, however the patients that raise alerts (1 ms each here, 1-3 ms in
    # the benchmark's worker) are spread among those that need nothing. With 500 patients a
    # chunk, a chunk held the lock for up to 0.11 s here (0.5-0.9 s in the worker); sized from
    # the chunk before, a cheap run followed by dear patients still for 0.05 s
    step_max = 0.001 * ClinicalRunner.TICK_STEP
    for heavy in (set(range(100)), set(range(300, 2000, 7)), set(range(50)) | set(range(1400, 1600))):
        r, chunks = holds(heavy)
        assert max(t for _, t in chunks) <= r.TICK_CHUNK_SECONDS + step_max, heavy
    # patients that need nothing still go TICK_CHUNK at a time (500 x 20 us = 10 ms)
    r, chunks = holds(set())
    assert [n for n, _ in chunks] == [500] * 4
