"""``LoopHistogram`` (the lock-free per-record timing histogram) exposes exactly what a
``prometheus_client.Histogram`` with the same observations exposes."""
from __future__ import annotations

import random

from prometheus_client import CollectorRegistry, Histogram, generate_latest

from monitor.metrics import PROCESSING_SECONDS, REGISTRY, LoopHistogram

BUCKETS = (0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.05, 0.1, 1)


def _lines(registry: CollectorRegistry) -> list[str]:
    """The exposition without the ``_created`` values (creation times differ by microseconds)."""
    out = []
    for line in generate_latest(registry).decode().splitlines():
        if "_created{" in line:
            line = line.rsplit(" ", 1)[0]
        out.append(line)
    return out


def test_same_exposition_as_the_library_histogram():
    rng = random.Random(7)
    amounts = [rng.choice(BUCKETS) for _ in range(50)]  # on the bounds: le is inclusive
    amounts += [rng.lognormvariate(-8, 2) for _ in range(2000)] + [0.0, 5.0, 1e-9]
    ours, theirs = CollectorRegistry(), CollectorRegistry()
    h1 = LoopHistogram("x_seconds", "Time to process one event, by stage", ["stage"], BUCKETS, ours)
    h2 = Histogram("x_seconds", "Time to process one event, by stage", ["stage"], buckets=BUCKETS, registry=theirs)
    for i, a in enumerate(amounts):
        stage = ("evaluate", "treatment", "action")[i % 3]
        h1.labels(stage).observe(a)
        h2.labels(stage).observe(a)
    h1.labels(stage="clinical_batch").observe(0.02)
    h2.labels(stage="clinical_batch").observe(0.02)
    assert _lines(ours) == _lines(theirs)
    assert ours.get_sample_value("x_seconds_count", {"stage": "evaluate"}) == len(range(0, len(amounts), 3))


def test_the_processing_histogram_counts_by_stage():
    before = REGISTRY.get_sample_value("monitor_processing_seconds_count", {"stage": "test_stage"}) or 0.0
    le = REGISTRY.get_sample_value("monitor_processing_seconds_bucket", {"stage": "test_stage", "le": "0.0005"}) or 0.0
    PROCESSING_SECONDS.labels("test_stage").observe(0.0005)
    PROCESSING_SECONDS.labels(stage="test_stage").observe(0.0006)
    assert REGISTRY.get_sample_value("monitor_processing_seconds_count", {"stage": "test_stage"}) == before + 2
    assert REGISTRY.get_sample_value("monitor_processing_seconds_bucket",
                                     {"stage": "test_stage", "le": "0.0005"}) == le + 1


def test_garbage_collections_are_timed_by_generation():
    import gc

    from monitor.metrics import time_garbage_collections

    def count(gen: int) -> float:
        return REGISTRY.get_sample_value("monitor_gc_pause_seconds_count", {"generation": str(gen)}) or 0.0

    time_garbage_collections()
    time_garbage_collections()  # once per process, however often called
    before = count(2)
    gc.collect(2)
    gc.collect(2)
    assert count(2) == before + 2
    assert REGISTRY.get_sample_value("monitor_gc_pause_seconds_sum", {"generation": "2"}) > 0


def test_objects_freed_by_the_cycle_collector_are_counted():
    import gc

    from monitor.metrics import time_garbage_collections

    def freed() -> float:
        return REGISTRY.get_sample_value("monitor_gc_collected_objects_total", {"generation": "2"}) or 0.0

    time_garbage_collections()
    gc.collect(2)
    before = freed()
    for _ in range(100):  # 100 lists each holding itself: garbage only the collector frees
        cycle: list = []
        cycle.append(cycle)
    del cycle
    gc.collect(2)
    after = freed()
    assert after >= before + 100
    gc.collect(2)  # nothing left to free: the counter stays
    assert freed() == after
