"""``monitor dlq``: a dead-lettered message, a configuration fix, one replay; a second replay republishes nothing.

Real broker, real worker (first with a payload limit the lab result exceeds, then
with the limit raised), and the real ``monitor`` command line in a subprocess.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
import time
import uuid
from pathlib import Path

import pytest
from kafka import KafkaConsumer, KafkaProducer

from workers import ROOT, service_env, wait_ingested

pytestmark = pytest.mark.integration

T0 = "2026-10-01T08:00:00+00:00"
ALL = ("lab-results", "vital-signs", "liver-function", "treatments", "observations", "dead-letter",
       "findings", "alerts", "alert-actions", "patient-ticks", "alert-deliveries")


def read_all(bootstrap: str, topic: str, timeout: float = 60.0, expected: int = 0) -> list:
    """Every record of ``topic`` once ``expected`` are there, read to the end offsets: complete
    when no writer is left, or after ``wait_ingested`` (the worker's outputs of the inputs it
    committed are on the broker)."""
    from kafka_broker import read_topic

    return read_topic(bootstrap, topic, expected, timeout)


def monitor(env: dict[str, str], *args: str, timeout: float = 120) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "monitor.cli", *args], cwd=ROOT, env={**os.environ, **env},
                          capture_output=True, text=True, timeout=timeout)


def test_dead_letter_is_replayed_once_after_the_fix(kafka_bootstrap, topic_factory, worker_factory):
    prefix = f"dlq{uuid.uuid4().hex[:8]}"
    topics = topic_factory(*ALL, prefix=prefix)
    base = service_env(topics, app_id=prefix)
    env = {**base, "KAFKA_BOOTSTRAP_SERVERS": kafka_bootstrap}

    lab = {"event_id": "big-1", "patient_id": "p-dlq", "loinc": "1742-6", "value": 55, "unit": "U/L",
           "reference_range": {"low": 0, "high": 40}, "effective_at": T0, "status": "final", "source": "lab-a",
           "extensions": {"comment": "x" * 600}}  # free data goes under extensions (strict contract)
    raw = json.dumps(lab).encode()
    assert len(raw) > 400

    # 1. a too-small payload limit: the result is dead-lettered
    w1 = worker_factory({**base, "MAX_PAYLOAD_BYTES": "400"}, name="w1")
    producer = KafkaProducer(bootstrap_servers=kafka_bootstrap, acks="all")
    producer.send(topics["lab-results"], key=b"p-dlq", value=raw).get(30)
    producer.close()
    wait_ingested(kafka_bootstrap, prefix, [topics["lab-results"]])
    dead = read_all(kafka_bootstrap, topics["dead-letter"])
    assert len(dead) == 1
    assert dict(dead[0].headers)["dlq.reason"] == b"payload_too_large"
    w1.stop()
    # 2. (below) the configuration is fixed (default limit) and the worker restarted; it
    # starts while the dead letter is listed and shown
    w2 = worker_factory(base, name="w2", wait=False)

    listed = monitor(env, "dlq", "list", "--json")
    assert listed.returncode == 0, listed.stderr
    rows = [json.loads(line) for line in listed.stdout.splitlines()]
    assert [(r["reason"], r["source_topic"], r["replayed"]) for r in rows] == \
        [("payload_too_large", topics["lab-results"], None)]
    record_id = rows[0]["id"]
    assert monitor(env, "dlq", "list", "--json", "--reason", "unknown_loinc").stdout == ""

    shown = monitor(env, "dlq", "show", record_id, "--json")
    assert shown.returncode == 0, shown.stderr
    detail = json.loads(shown.stdout)
    assert detail["value_text"].encode() == raw and detail["key"] == "p-dlq"
    assert detail["headers"]["dlq.reason"] == "payload_too_large"

    # a bare replay does nothing by accident
    bare = monitor(env, "dlq", "replay")
    assert bare.returncode == 2 and "--all" in bare.stderr and "Traceback" not in bare.stderr

    # 2. the fixed worker (launched above) is ready before anything is replayed
    w2.wait_ready(90)

    first = monitor(env, "dlq", "replay", "--reason", "payload_too_large")
    assert first.returncode == 0, first.stderr
    counts = json.loads(first.stdout)
    assert counts["matched"] == 1 and counts["replayed"] == 1 and counts["already_replayed"] == 0
    assert counts["to"] == {topics["lab-results"]: 1}

    wait_ingested(kafka_bootstrap, prefix, [topics["lab-results"]])
    observations = read_all(kafka_bootstrap, topics["observations"])
    assert [json.loads(m.value)["event_id"] for m in observations] == ["big-1"]

    # 3. a second replay republishes nothing
    second = monitor(env, "dlq", "replay", "--all")
    assert second.returncode == 0, second.stderr
    counts2 = json.loads(second.stdout)
    assert counts2["matched"] == 1 and counts2["replayed"] == 0 and counts2["already_replayed"] == 1

    inputs = read_all(kafka_bootstrap, topics["lab-results"], expected=2)  # the replay command has exited
    assert len(inputs) == 2  # the original and exactly one replay
    replayed = [m for m in inputs if "dlq.replay.of" in dict(m.headers)]
    assert len(replayed) == 1 and replayed[0].value == raw and replayed[0].key == b"p-dlq"
    assert dict(replayed[0].headers)["dlq.replay.of"].decode() == \
        f"{topics['dead-letter']}/{dead[0].partition}/{dead[0].offset}"
    wait_ingested(kafka_bootstrap, prefix, [topics["lab-results"]])
    assert len(read_all(kafka_bootstrap, topics["observations"])) == 1
    assert len(read_all(kafka_bootstrap, topics["dead-letter"])) == 1  # the replay was not rejected again

    after = [json.loads(line) for line in monitor(env, "dlq", "list", "--json").stdout.splitlines()]
    assert after[0]["replayed"]["replayed_to"] == topics["lab-results"]


def test_unreachable_broker_is_one_line(tmp_path: Path):
    from kafka_broker import free_port

    env = {"KAFKA_BOOTSTRAP_SERVERS": f"127.0.0.1:{free_port()}"}
    r = monitor(env, "dlq", "list", "--timeout", "1", timeout=60)
    assert r.returncode != 0
    assert "Traceback" not in r.stderr
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("monitor: cannot use Kafka at"), r.stderr
