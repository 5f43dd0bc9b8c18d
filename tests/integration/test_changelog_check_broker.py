"""``monitor changelog check`` on a real broker, through the real command line.

The changelog holds, per patient, values the worker reads (this format version; a faust
Table's, without one) and values it cannot (a newer release's version, bytes that are not a
state), one patient whose unreadable value was replaced by a readable one and one that was
deleted. The tool names exactly the two unreadable patients with their partition, offset
and why, and exits 1; on a changelog with none it exits 0; a changelog that does not exist
is one line and exit 2.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
import uuid

import pytest
from kafka import KafkaProducer

from alerts.lifecycle import AlertBook
from alerts.state import PatientState
from monitor.clinical.store import FORMAT_VERSION, encode
from workers import ROOT

pytestmark = pytest.mark.integration


def readable(pid: str) -> bytes:
    return encode(PatientState(pid), AlertBook(patient_id=pid))


def monitor(env: dict[str, str], *args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "monitor.cli", *args], cwd=ROOT, env={**os.environ, **env},
                          capture_output=True, text=True, timeout=120)


def test_changelog_check_names_the_unreadable_patients(kafka_bootstrap, topic_factory):
    prefix = f"clc{uuid.uuid4().hex[:8]}"
    topics = topic_factory("patients-changelog", "empty-changelog", prefix=prefix,
                           configs={"cleanup.policy": "compact"})
    newer = json.loads(readable("cc-newer"))
    newer["v"] = FORMAT_VERSION + 1
    faust_era = json.loads(readable("cc-faust"))
    del faust_era["v"]
    writes = [  # (partition, key, value)
        (0, b"cc-ok", readable("cc-ok")),
        (1, b'"cc-faust"', json.dumps(faust_era).encode()),  # the faust Table's JSON key, no version
        (1, b"cc-newer", json.dumps(newer).encode()),
        (2, b"cc-garbage", b"\x00 not a state"),
        (0, b"cc-fixed", b"\x00 not a state"),
        (0, b"cc-fixed", readable("cc-fixed")),  # replaced by a readable value
        (2, b"cc-gone", b"\x00 not a state"),
        (2, b"cc-gone", None),  # deleted
    ]
    producer = KafkaProducer(bootstrap_servers=kafka_bootstrap, acks="all")
    for partition, key, value in writes:
        producer.send(topics["patients-changelog"], key=key, value=value, partition=partition)
    producer.flush()
    producer.close()
    env = {"KAFKA_BOOTSTRAP_SERVERS": kafka_bootstrap, "MONITOR_APP_ID": prefix,
           "TOPIC_PATIENT_CHANGELOG": topics["patients-changelog"]}

    table = monitor(env, "changelog", "check")
    assert table.returncode == 1, table.stderr
    assert "8 records read, 5 patients, 2 whose stored state this release cannot read" in table.stdout
    assert "cc-newer" in table.stdout and "cc-garbage" in table.stdout
    for fine in ("cc-ok", "cc-faust", "cc-fixed", "cc-gone"):
        assert fine not in table.stdout
    out = monitor(env, "changelog", "check", "--json")
    assert out.returncode == 1
    report = json.loads(out.stdout)
    assert report["patients"] == 5 and report["records"] == 8
    assert [(u["patient_id"], u["partition"], u["offset"]) for u in report["unreadable"]] == [
        ("cc-newer", 1, 1), ("cc-garbage", 2, 0)]
    assert f"format version {FORMAT_VERSION + 1}" in report["unreadable"][0]["why"]
    assert report["unreadable"][1]["why"] == "not JSON"

    clean = monitor({**env, "TOPIC_PATIENT_CHANGELOG": topics["empty-changelog"]}, "changelog", "check")
    assert clean.returncode == 0, clean.stderr
    assert "0 whose stored state this release cannot read" in clean.stdout
    missing = monitor({**env, "TOPIC_PATIENT_CHANGELOG": f"{prefix}.no-such-changelog"}, "changelog", "check",
                      "--timeout", "3")
    assert missing.returncode == 2 and "does not exist" in missing.stderr and "Traceback" not in missing.stderr
