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


def _counted(work) -> float:
    r = _runner(work)
    before = _total()
    asyncio.run(r.process_batch({TopicPartition("obs", 0): [StreamRecord("obs", 0, 0, b"k", b"v", ())]}))
    assert r.processed == 1
    return _total() - before


def test_the_processors_cpu_is_counted():
    def busy():
        end = time.thread_time() + 0.05
        while time.thread_time() < end:
            pass

    assert 0.05 <= _counted(busy) < 1.0


def test_time_the_processor_does_not_compute_is_not_counted():
    assert _counted(lambda: time.sleep(0.2)) < 0.05


def test_a_batch_whose_patient_state_is_lost_counts_its_cpu_too():
    """Its records are counted by ``monitor_clinical_records_total`` before processing, so its
    CPU is counted as well, before the partition is restored and read again."""
    from monitor.clinical.processor import PatientStateLost

    def busy_then_lost():
        end = time.thread_time() + 0.05
        while time.thread_time() < end:
            pass
        raise PatientStateLost(0)

    r = _runner(busy_then_lost)
    rolled_back = []

    async def roll_back(partitions):
        rolled_back.append(partitions)

    r._roll_back = roll_back
    before = _total()
    asyncio.run(r.process_batch({TopicPartition("obs", 0): [StreamRecord("obs", 0, 0, b"k", b"v", ())]}))
    assert rolled_back == [{0}] and r.processed == 0
    assert 0.05 <= _total() - before < 1.0
