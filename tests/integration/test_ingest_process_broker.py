"""Ingest in a process of its own (``INGEST_PROCESSES``, monitor/ingest_process.py), through
the real broker:

- the worker's ``/metrics`` counts what its ingest process consumed and dead-lettered (the
  relay), and the inputs become observations and alerts;
- an ingest process killed on its own is started again by its worker, and the inputs
  published meanwhile are ingested by the new one;
- a worker killed by SIGKILL alone (its process, not its group) takes its ingest process
  with it: nothing keeps consuming for a worker that is gone;
- ``INGEST_PROCESSES=0`` runs ingest in the worker's process: no child.
"""
from __future__ import annotations

import json
import os
import signal
import uuid
from datetime import datetime, timedelta, timezone

import pytest
from kafka import KafkaProducer

from workers import metric, raw_alt, raw_dose, service_env, wait_for, wait_ingested, wait_processed

pytestmark = pytest.mark.integration


def children(pid: int) -> list[int]:
    try:
        with open(f"/proc/{pid}/task/{pid}/children") as fh:
            return [int(p) for p in fh.read().split()]
    except OSError:
        return []


def cmdline(pid: int) -> str:
    try:
        with open(f"/proc/{pid}/cmdline", "rb") as fh:
            return fh.read().replace(b"\0", b" ").decode(errors="replace")
    except OSError:
        return ""


def ingest_children(pid: int) -> list[int]:
    return [c for c in children(pid) if "monitor.ingest_process" in cmdline(c)]


def alive(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as fh:
            return fh.read().rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:
        return False


def publish(bootstrap: str, records: list[tuple[str, bytes | None, bytes]]) -> None:
    p = KafkaProducer(bootstrap_servers=bootstrap, acks="all")
    try:
        for topic, key, value in records:
            p.send(topic, key=key, value=value)
        p.flush(30)
    finally:
        p.close()


def _topics(topic_factory, prefix: str) -> dict[str, str]:
    return topic_factory("lab-results", "vital-signs", "liver-function", "treatments", "observations",
                         "dead-letter", "findings", "alerts", "alert-actions", prefix=prefix)


def _alt_records(topics: dict[str, str], pids: list[str], tag: str, value: float) -> list:
    at = datetime.now(timezone.utc) - timedelta(hours=1)
    return [(topics["lab-results"], pid.encode(), json.dumps(raw_alt(pid, f"{tag}-{pid}", value, at, "lab-a")).encode())
            for pid in pids]


def test_ingest_process_is_counted_by_its_worker_and_restarted(kafka_bootstrap, topic_factory, worker_factory):
    prefix = f"ip{uuid.uuid4().hex[:8]}"
    topics = _topics(topic_factory, prefix)
    # session timeout 6 s (the broker's group.min.session.timeout.ms, not the 10 s default):
    # the new ingest process gets the SIGKILLed one's partitions 4 s sooner
    w = worker_factory(service_env(topics, app_id=prefix, INGEST_PROCESSES="1", KAFKA_SESSION_TIMEOUT_SECONDS="6"))
    first = wait_for(lambda: ingest_children(w.proc.pid), 10, "an ingest process")
    assert len(first) == 1

    pids = [f"{prefix}-p{i}" for i in range(6)]
    dose_at = datetime.now(timezone.utc) - timedelta(days=3)
    publish(kafka_bootstrap, [(topics["treatments"], p.encode(), json.dumps(raw_dose(p, dose_at)).encode()) for p in pids]
            + _alt_records(topics, pids, "a", 400.0)  # 10x ULN: an alert per patient
            + [(topics["lab-results"], b"x", b"{not json"), (topics["vital-signs"], b"x", b"\xff\xfe")])
    wait_processed(kafka_bootstrap, prefix, topics)

    def counted() -> str | None:
        _, body = w.get("/metrics")
        text = body.decode()
        ok = (metric(text, "monitor_events_consumed_total", topic="lab-results") >= 7
              and metric(text, "monitor_dead_letters_total", topic=topics["lab-results"], reason="malformed_json") == 1
              and metric(text, "monitor_dead_letters_total", topic=topics["vital-signs"], reason="not_utf8") == 1
              and metric(text, "monitor_observations_total", analyte="alt") == 6)
        return text if ok else None

    text = wait_for(counted, 10, "the ingest process's counts on the worker's /metrics")
    assert metric(text, "monitor_events_consumed_total", topic="treatments") == 6
    assert metric(text, "monitor_processing_seconds_count", stage="ingest_batch") >= 1
    assert metric(text, "monitor_alerts_opened_total") >= 6

    # the ingest process dies on its own: the worker starts another, which ingests what comes next
    os.kill(first[0], signal.SIGKILL)
    second = wait_for(lambda: [p for p in ingest_children(w.proc.pid) if p != first[0] and alive(p)], 30,
                        "a new ingest process")
    w.wait_ready(60)
    publish(kafka_bootstrap, _alt_records(topics, pids, "b", 500.0))
    wait_ingested(kafka_bootstrap, prefix, [topics["lab-results"]], timeout=60)
    wait_for(lambda: metric(w.get("/metrics")[1].decode(), "monitor_observations_total", analyte="alt") == 12, 10,
               "the new ingest process's counts on /metrics")
    assert alive(second[0])

    # the worker dies alone (SIGKILL to its process only): its ingest process stops too
    os.kill(w.proc.pid, signal.SIGKILL)
    w.proc.wait(10)
    wait_for(lambda: not alive(second[0]), 20, "the ingest process to stop after its worker was killed")


def test_no_ingest_process_when_set_to_zero(kafka_bootstrap, topic_factory, worker_factory):
    prefix = f"ip0{uuid.uuid4().hex[:8]}"
    topics = _topics(topic_factory, prefix)
    w = worker_factory(service_env(topics, app_id=prefix, INGEST_PROCESSES="0"))
    pids = [f"{prefix}-p{i}" for i in range(3)]
    publish(kafka_bootstrap, _alt_records(topics, pids, "a", 400.0))
    wait_ingested(kafka_bootstrap, prefix, [topics["lab-results"]], timeout=60)
    assert ingest_children(w.proc.pid) == []
    text = w.get("/metrics")[1].decode()
    assert metric(text, "monitor_observations_total", analyte="alt") == 3


def test_two_ingest_processes_share_the_inputs_and_count_each_once(kafka_bootstrap, topic_factory, worker_factory):
    prefix = f"ip2{uuid.uuid4().hex[:8]}"
    topics = _topics(topic_factory, prefix)
    w = worker_factory(service_env(topics, app_id=prefix, INGEST_PROCESSES="2"))
    assert len(wait_for(lambda: [p for p in ingest_children(w.proc.pid) if alive(p)], 10, "an ingest process")) == 2
    pids = [f"{prefix}-p{i}" for i in range(30)]  # spread over the 3 partitions of each input
    publish(kafka_bootstrap, _alt_records(topics, pids, "a", 400.0))
    wait_ingested(kafka_bootstrap, prefix, [topics["lab-results"]], timeout=60)
    wait_for(lambda: metric(w.get("/metrics")[1].decode(), "monitor_observations_total", analyte="alt") == 30, 10,
               "the two ingest processes' counts to add up on /metrics")
    from kafka_broker import read_topic

    observations = [json.loads(r.value) for r in read_topic(kafka_bootstrap, topics["observations"], expected=30)]
    assert sorted(o["patient_id"] for o in observations) == sorted(pids)
    text = w.get("/metrics")[1].decode()
    assert metric(text, "monitor_observations_total", analyte="alt") == 30
