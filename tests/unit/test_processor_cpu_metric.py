"""``monitor_clinical_processor_cpu_seconds_total``: the CPU the clinical processor takes over
a batch, on the event-loop thread, counted apart from anything the stage waits for (a
processor that sleeps adds its wall time to nothing)."""
from __future__ import annotations

import asyncio
import time

from aiokafka.structs import TopicPartition

from monitor.clinical.own_writes import StreamRecord
from monitor.clinical.runner import ClinicalRunner
from monitor.clinical.store import InMemoryPatientStore
from monitor.metrics import REGISTRY
from monitor.settings import Settings


class Consumer:
    def assignment(self):
        return {TopicPartition("obs", 0)}


def _runner(work) -> ClinicalRunner:
    class Processor:
        handoff = None

        def process(self, records):
            work()
            return []

    r = ClinicalRunner(Settings(_env_file=None, topic_observations="obs"), processor=Processor(),
                       store=InMemoryPatientStore())
    r.consumer = Consumer()
    r.owned = frozenset({0})
    r._next = {0: 0}

    async def written(outputs):  # no broker: the outputs (none) are taken as acknowledged
        return None

    r._write_outputs = written
    return r


def _total() -> float:
    return REGISTRY.get_sample_value("monitor_clinical_processor_cpu_seconds_total") or 0.0


def _busy(seconds: float = 0.05) -> None:
    end = time.thread_time() + seconds
    while time.thread_time() < end:
        pass


def _counted(r: ClinicalRunner) -> float:
    """What one batch of one record adds to the counter."""
    before = _total()
    asyncio.run(r.process_batch({TopicPartition("obs", 0): [StreamRecord("obs", 0, 0, b"k", b"v", ())]}))
    return _total() - before


def test_the_processors_cpu_is_counted():
    r = _runner(_busy)
    assert 0.05 <= _counted(r) < 1.0
    assert r.processed == 1


def test_time_the_processor_does_not_compute_is_not_counted():
    r = _runner(lambda: time.sleep(0.2))
    assert _counted(r) < 0.05
    assert r.processed == 1


def test_a_batch_whose_patient_state_is_lost_counts_its_cpu_too():
    """Its records are counted by ``monitor_clinical_records_total`` before processing, so its
    CPU is counted as well, before the partition is restored and read again."""
    from monitor.clinical.processor import PatientStateLost

    def busy_then_lost():
        _busy()
        raise PatientStateLost(0)

    r = _runner(busy_then_lost)
    rolled_back = []

    async def roll_back(partitions, reason):
        rolled_back.append((partitions, reason))

    r._roll_back = roll_back
    assert 0.05 <= _counted(r) < 1.0
    assert rolled_back == [({0}, "state_lost")] and r.processed == 0
