"""The clinical stage builds no reference cycles.

Garbage in a reference cycle is freed only by Python's cyclic collector, whose collections
hold every stage of the worker (``monitor_gc_pause_seconds``); until a collection runs it
also keeps alive everything it refers to (a composite rule's closures held the patient's
state and protocol). The records below are the latency benchmark's workload (every result
flips an ALT alert, which makes the composite liver rules search episodes) and a simulated
cohort; with ``gc.DEBUG_SAVEALL`` every object a collection finds unreachable is kept in
``gc.garbage`` instead of freed, so the test names what was built.
"""
from __future__ import annotations

import gc
import json
from collections import Counter
from datetime import datetime, timedelta, timezone

import pytest

from alerts.testkit import dose, obs
from monitor import simulate as sim
from monitor.ingest import Ingest
from monitor.settings import Settings
from tests.unit.test_clinical_processor import Stream, engine, lifecycle, processor  # noqa: F401 (fixtures)


@pytest.fixture
def cyclic_garbage():
    """A function giving the kinds of the objects collections found unreachable since the
    test started (it collects first)."""
    gc.collect()
    gc.garbage.clear()
    gc.set_debug(gc.DEBUG_SAVEALL)

    def kinds() -> Counter:
        gc.collect()
        return Counter(type(o).__name__ for o in gc.garbage)

    try:
        yield kinds
    finally:
        gc.set_debug(0)
        gc.garbage.clear()


def test_alert_churn_builds_no_cycles(engine, lifecycle, cyclic_garbage):  # noqa: F811
    p = processor(engine, lifecycle)
    s = Stream()
    patients = [f"p{i}" for i in range(20)]
    p.process([s.treatment(dose(patient=pid)) for pid in patients])
    outputs = 0
    for k in range(6):  # within hours of each other, as the benchmark's are
        grade3 = k % 2 == 0
        outputs += len(p.process([s.observation(obs("alt", 320.0 if grade3 else 160.0, 1 + k / 24, high=40,
                                                    patient=pid))
                                  for pid in patients]))
    assert outputs >= 6 * len(patients)  # every result changed an alert
    assert cyclic_garbage() == Counter()


def test_simulated_cohort_through_ingest_and_the_clinical_stage_builds_no_cycles(
        engine, lifecycle, cyclic_garbage):  # noqa: F811
    s = Settings()
    step = Ingest(s)
    p = processor(engine, lifecycle)
    today = datetime.now(timezone.utc).replace(hour=0, minute=0, second=0, microsecond=0)
    cohort = sim.generate_cohort(20, 7, start=today - timedelta(days=12), days=12)
    now = datetime.now(timezone.utc)
    stream = Stream()
    batch = []
    for i, rec in enumerate(sim.records(cohort)):
        v = rec["value"]
        raw = v.encode() if isinstance(v, str) else json.dumps(v).encode()
        for topic, key, value, headers in step.record(rec["topic"], 0, i, rec["key"].encode(), raw, now):
            if topic == s.topic_observations:
                batch.append(stream._rec(key.decode(), value, headers))
    for bad in (b"{", b'{"patient_id": "x"}', b"\xff\xfe", b"MSH|^~\\&|bad"):
        step.record(s.topic_lab_results, 0, 10**6, b"x", bad, now)
    assert len(batch) > 1000
    outputs = sum(len(p.process(batch[i:i + 500], now)) for i in range(0, len(batch), 500))
    assert outputs > 0
    assert cyclic_garbage() == Counter()
