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
    c.rollback("write_refused")
    c.commit_failed()
    c.commit_failed()


def test_relayed_counts_reach_the_worker_metrics_once():
    before = {
        "events": sample("monitor_events_consumed_total", topic="lab-results", format="json"),
        "invalid": sample("monitor_events_consumed_total", topic="vital-signs", format="invalid"),
        "obs": sample("monitor_observations_total", analyte="alt", monitored="true"),
        "dead": sample("monitor_dead_letters_total", topic="relay-test.vital-signs", reason="not_utf8"),
        "batches": sample("monitor_processing_seconds_count", stage="ingest_batch"),
        "rollbacks": sample("monitor_rollbacks_total", stage="ingest", reason="write_refused"),
        "commits": sample("monitor_commit_failures_total", stage="ingest"),
    }
    child = _Counters()
    child.relayed = child.deferred = True
    _count(child)
    child.flush()  # a relayed process applies nothing itself
    assert sample("monitor_observations_total", analyte="alt", monitored="true") == before["obs"]
    assert sample("monitor_rollbacks_total", stage="ingest", reason="write_refused") == before["rollbacks"]

    line = json.dumps({"counts": child.take()})  # what crosses the pipe
    again = child.take()
    assert again["events"] == [] and "rollbacks" not in again and "commit_failures" not in again  # taken once
    worker = _Counters()
    worker.apply(json.loads(line)["counts"])

    assert sample("monitor_events_consumed_total", topic="lab-results", format="json") == before["events"] + 3
    assert sample("monitor_events_consumed_total", topic="vital-signs", format="invalid") == before["invalid"] + 1
    assert sample("monitor_observations_total", analyte="alt", monitored="true") == before["obs"] + 3
    assert sample("monitor_dead_letters_total", topic="relay-test.vital-signs", reason="not_utf8") == before["dead"] + 1
    assert sample("monitor_processing_seconds_count", stage="ingest_batch") == before["batches"] + 1
    assert sample("monitor_rollbacks_total", stage="ingest", reason="write_refused") == before["rollbacks"] + 1
    assert sample("monitor_commit_failures_total", stage="ingest") == before["commits"] + 2


def test_in_process_counts_are_applied_at_flush():
    before = sample("monitor_observations_total", analyte="alt", monitored="true")
    c = _Counters()
    c.deferred = True
    for _ in range(3):
        c.observation("alt")
    assert sample("monitor_observations_total", analyte="alt", monitored="true") == before
    c.flush()
    assert sample("monitor_observations_total", analyte="alt", monitored="true") == before + 3


def test_in_process_rollbacks_and_commit_failures_are_applied_at_once():
    """Rare, and counted when nothing else may flush for a while (a loop failing its writes)."""
    before = (sample("monitor_rollbacks_total", stage="ingest", reason="write_refused"),
              sample("monitor_commit_failures_total", stage="ingest"))
    c = _Counters()
    c.deferred = True
    c.rollback("write_refused")
    c.commit_failed()
    assert (sample("monitor_rollbacks_total", stage="ingest", reason="write_refused"),
            sample("monitor_commit_failures_total", stage="ingest")) == (before[0] + 1, before[1] + 1)


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
