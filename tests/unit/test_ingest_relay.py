"""Ingest's counts relayed from an ingest process to its worker (monitor/ingest_process.py):
what the worker adds to its metrics equals what the process counted; a relayed process
applies nothing itself; an unreadable relay line costs nothing but its figures."""
from __future__ import annotations

import json
from datetime import datetime, timezone

from monitor.ingest import _Counters
from monitor.ingest_process import IngestProcess
from monitor.metrics import REGISTRY


def sample(name: str, **labels: str) -> float:
    return REGISTRY.get_sample_value(name, labels) or 0.0


def _count(c: _Counters) -> None:
    for _ in range(3):
        c.event("lab-results", "json")
        c.observation("alt")
    c.event("vital-signs", "invalid")
    c.dead("relay-test.vital-signs", "not_utf8")
    c.source_seen("lab-relay", datetime(2026, 11, 29, 12, 0, tzinfo=timezone.utc))
    c.batch(0.25)


def test_relayed_counts_reach_the_worker_metrics_once():
    before = {
        "events": sample("monitor_events_consumed_total", topic="lab-results", format="json"),
        "invalid": sample("monitor_events_consumed_total", topic="vital-signs", format="invalid"),
        "obs": sample("monitor_observations_total", analyte="alt", monitored="true"),
        "dead": sample("monitor_dead_letters_total", topic="relay-test.vital-signs", reason="not_utf8"),
        "batches": sample("monitor_processing_seconds_count", stage="ingest_batch"),
    }
    child = _Counters()
    child.relayed = child.deferred = True
    _count(child)
    child.flush()  # a relayed process applies nothing itself
    assert sample("monitor_observations_total", analyte="alt", monitored="true") == before["obs"]

    line = json.dumps({"counts": child.take()})  # what crosses the pipe
    assert child.take()["events"] == []  # taken once
    worker = _Counters()
    worker.apply(json.loads(line)["counts"])

    assert sample("monitor_events_consumed_total", topic="lab-results", format="json") == before["events"] + 3
    assert sample("monitor_events_consumed_total", topic="vital-signs", format="invalid") == before["invalid"] + 1
    assert sample("monitor_observations_total", analyte="alt", monitored="true") == before["obs"] + 3
    assert sample("monitor_dead_letters_total", topic="relay-test.vital-signs", reason="not_utf8") == before["dead"] + 1
    assert sample("monitor_processing_seconds_count", stage="ingest_batch") == before["batches"] + 1


def test_in_process_counts_are_applied_at_flush():
    before = sample("monitor_observations_total", analyte="alt", monitored="true")
    c = _Counters()
    c.deferred = True
    _count(c)
    assert sample("monitor_observations_total", analyte="alt", monitored="true") == before
    c.flush()
    assert sample("monitor_observations_total", analyte="alt", monitored="true") == before + 3


def test_relay_lines_set_readiness_and_lag_and_survive_garbage():
    applied = []
    p = IngestProcess(0, applied.append)
    p._receive(b'{"counts": {"events": [["lab-results", "json", 2]]}, "lag": [["in", 0, 5]], "ready": true}\n')
    assert p.ready.is_set() and p.lag() == {("in", 0): 5} and applied == [{"events": [["lab-results", "json", 2]]}]
    p._receive(b"not json\n")
    p._receive(b'{"lag": [["in", 0]]}\n')  # malformed lag: ignored, the last one kept
    assert p.ready.is_set() and p.lag() == {("in", 0): 5}
    p._receive(b'{"ready": false, "lag": []}\n')
    assert not p.ready.is_set() and p.lag() == {}
