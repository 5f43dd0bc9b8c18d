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
