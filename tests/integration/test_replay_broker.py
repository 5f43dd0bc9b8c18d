"""``monitor protocol replay`` against a real broker: it reads the recorded patient courses from
the patient stream (canonical observations with a withdrawal, treatments routed there with a
``kind: treatment`` header; actions skipped; the raw ``treatments`` input topic is not read), finds
exactly the patients a lowered ALT grade-3 multiple changes, gives the same answer as the same
records replayed from a file, and never writes: the end offsets of every service topic are
unchanged and no consumer group is created (assign + seek, no commits).

The real ``monitor`` command line runs in a subprocess with the service's environment.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
import time
import uuid

import pytest
from kafka import KafkaAdminClient, KafkaConsumer, KafkaProducer, TopicPartition

from workers import ROOT, service_env, wait_ingested

from monitor.topics_admin import topic_partitions

sys.path.insert(0, str(ROOT / "tests" / "unit"))
from test_replay import constructed_cohort, expected_changes, lowered_alt  # noqa: E402

pytestmark = pytest.mark.integration

ALL = ("lab-results", "vital-signs", "liver-function", "treatments", "observations", "dead-letter",
       "findings", "alerts", "alert-actions", "patient-ticks", "alert-deliveries")


def monitor(env: dict[str, str], *args: str, timeout: float = 120) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "monitor.cli", *args], cwd=ROOT, env={**os.environ, **env},
                          capture_output=True, text=True, timeout=timeout)


def monitor_all(env: dict[str, str], *argvs: list[str], timeout: float = 120) -> list[subprocess.CompletedProcess]:
    """``monitor(env, *argv)`` for each argv, the processes running at the same time."""
    from concurrent.futures import ThreadPoolExecutor

    with ThreadPoolExecutor(len(argvs)) as pool:
        return list(pool.map(lambda argv: monitor(env, *argv, timeout=timeout), argvs))


def end_offsets(bootstrap: str, topics: list[str]) -> dict:
    c = KafkaConsumer(bootstrap_servers=bootstrap, group_id=None, enable_auto_commit=False)
    try:
        tps = [TopicPartition(t, p) for t in topics for p in sorted(topic_partitions(c, t))]
        return {f"{tp.topic}:{tp.partition}": off for tp, off in c.end_offsets(tps).items()}
    finally:
        c.close()


def groups(bootstrap: str) -> set[str]:
    admin = KafkaAdminClient(bootstrap_servers=bootstrap)
    try:
        listed = admin.list_groups()
        return {g["group_id"] if isinstance(g, dict) else g[0] for g in listed}
    finally:
        admin.close()


#: the constructed cohort's records carry their arrival times of 2025 as record timestamps, further
#: back than any retention (the broker's default of 7 days, the stream's 400): without this the
#: broker's retention check, every 5 minutes, deletes them whenever it falls between the writes
#: and the replay's read, and the replay finds an empty stream ("0 patients", as CI runs did)
NO_RETENTION = {"retention.ms": "-1"}


def write_constructed_cohort(bootstrap: str, topics: dict[str, str]) -> list[dict]:
    """The recorded inputs as the service holds them: the patient stream ``observations``
    (keyed by patient), with the canonical observations (written when ingest received them)
    and the treatments ingest routed there (original bytes, ``kind: treatment`` and ``src.*``
    headers), then a routed clinician action; returns the records as a replay file holds them."""
    from alerts.testkit import at
    from monitor.clinical.processor import KIND_ACTION, KIND_TREATMENT, routed_headers

    producer = KafkaProducer(bootstrap_servers=bootstrap, acks="all")
    export = []
    for n, pc in enumerate(constructed_cohort()):
        for ev in pc.sorted_events():
            obj = ev.event
            raw = obj.model_dump_json().encode()
            headers = None if type(obj).__name__ == "Observation" else \
                routed_headers(KIND_TREATMENT, topics["treatments"], 0, n)
            producer.send(topics["observations"], key=pc.patient_id.encode(), value=raw, headers=headers,
                          timestamp_ms=int(ev.arrival.timestamp() * 1000))
            rec = {"topic": topics["observations"], "key": pc.patient_id, "value": json.loads(raw),
                   "received_at": ev.arrival.isoformat()}
            if headers:
                rec["headers"] = {"kind": "treatment"}
            export.append(rec)
    # a clinician action routed to the stream is skipped (it names the deployed protocol's alerts)
    producer.send(topics["observations"], key=b"pt-4.6x", value=b'{"action":"acknowledge","alert_id":"x"}',
                  headers=routed_headers(KIND_ACTION, topics["alert-actions"], 0, 0),
                  timestamp_ms=int(at(20).timestamp() * 1000))
    producer.flush()
    producer.close()
    return export


def test_replay_reads_the_topics_and_never_writes(kafka_bootstrap, topic_factory, tmp_path):
    prefix = f"rpl{uuid.uuid4().hex[:8]}"
    topics = topic_factory(*ALL, prefix=prefix, configs=NO_RETENTION)
    env = {**service_env(topics, app_id=prefix), "KAFKA_BOOTSTRAP_SERVERS": kafka_bootstrap}
    secret = env["PSEUDONYM_SECRET"]

    from alerts.testkit import dose

    export = write_constructed_cohort(kafka_bootstrap, topics)
    # the raw `treatments` input topic is not read (ingest routes every valid treatment to the
    # stream): a dose there that was never routed does not make a patient
    producer = KafkaProducer(bootstrap_servers=kafka_bootstrap, acks="all")
    producer.send(topics["treatments"], key=b"pt-unrouted", value=dose(patient="pt-unrouted").model_dump_json().encode())
    producer.flush()
    producer.close()
    export_file = tmp_path / "export.jsonl"
    export_file.write_text("".join(json.dumps(r) + "\n" for r in export), encoding="utf-8")

    service_topics = sorted(topics.values())
    before = end_offsets(kafka_bootstrap, service_topics)
    groups_before = groups(kafka_bootstrap)
    cand = lowered_alt(tmp_path)
    until = "2025-05-02T08:00:00+00:00"  # day 60 of the constructed cohort

    # four replays (the topics; the same records from a file; pseudonymous; --since), run at
    # the same time, each checked below
    out, out_file, out_p = tmp_path / "topics.json", tmp_path / "file.json", tmp_path / "pseudo.json"
    since_at = "2025-03-17T00:00:00+00:00"
    r, r2, r3, r4 = monitor_all(
        env,
        ["protocol", "replay", "--candidate", str(cand), "--until", until, "--json", str(out), "--identify"],
        ["protocol", "replay", "--quiet", "--candidate", str(cand), "--until", until,
         "--from-file", str(export_file), "--json", str(out_file), "--identify"],
        ["protocol", "replay", "--quiet", "--candidate", str(cand), "--until", until, "--json", str(out_p)],
        ["protocol", "replay", "--quiet", "--candidate", str(cand), "--since", since_at,
         "--until", until, "--json", str(tmp_path / "since.json"), "--identify"])
    assert r.returncode == 0, r.stderr
    assert "replay: read" in r.stderr and "replay: candidate" in r.stderr  # progress on stderr
    assert "no longer on the brokers" not in r.stderr
    data = json.loads(out.read_text())
    assert data["window"]["expired_records"] == 0
    assert data["patients"] == len(constructed_cohort())
    assert data["window"]["skipped"] == {f"{topics['observations']} kind=action": 1}
    assert {p["patient_id"] for p in data["patients_changed"]} == set(expected_changes())
    for p in data["patients_changed"]:
        assert [(c["rule"], c["baseline"], c["candidate"]) for c in p["changed"]] == \
            [("liver.alt_increased",) + expected_changes()[p["patient_id"]]]

    # the same records from a file give the same comparison
    assert r2.returncode == 0, r2.stderr
    from_file = json.loads(out_file.read_text())
    for k in ("patients", "patient_days", "differences", "rules", "patients_changed"):
        assert from_file[k] == data[k], k

    # pseudonymous by default: the service's keyed references, no patient id in the output
    assert r3.returncode == 0, r3.stderr
    from alerts.replay import patient_ref

    pseudo = json.loads(out_p.read_text())
    assert {p["patient"] for p in pseudo["patients_changed"]} == {patient_ref(secret, p) for p in expected_changes()}
    assert "pt-" not in out_p.read_text() and "pt-" not in r3.stdout

    # --since (day 13.7): every course is still fed from its dose, but only the patients with a
    # record in the window are compared (pt-withdrawn's last records are on days 10-11)
    assert r4.returncode == 0, r4.stderr
    since = json.loads((tmp_path / "since.json").read_text())
    from datetime import datetime

    t_since = datetime.fromisoformat(since_at)
    in_window = {pc.patient_id for pc in constructed_cohort() if any(e.arrival >= t_since for e in pc.events)}
    assert "pt-withdrawn" not in in_window and since["patients"] == len(in_window)
    assert {p["patient_id"] for p in since["patients_changed"]} == set(expected_changes()) & in_window

    # read-only: nothing was written to any service topic, and no consumer group appeared
    assert end_offsets(kafka_bootstrap, service_topics) == before
    assert groups(kafka_bootstrap) == groups_before


def test_a_replay_says_how_many_records_the_stream_no_longer_holds(kafka_bootstrap, topic_factory, tmp_path):
    """Records below a partition's log start offset (deleted by the stream's retention or by an
    operator) cannot be replayed: the replay says how many, even with ``--quiet``, and the
    report's window holds the count, instead of replaying the rest as if it were the whole
    history."""
    prefix = f"rpx{uuid.uuid4().hex[:8]}"
    topics = topic_factory(*ALL, prefix=prefix, configs=NO_RETENTION)
    export = write_constructed_cohort(kafka_bootstrap, topics)
    stream = topics["observations"]
    ends = {int(k.rsplit(":", 1)[1]): v for k, v in end_offsets(kafka_bootstrap, [stream]).items()}
    part = max(ends, key=ends.get)
    gone = ends[part] // 2
    assert gone > 0, ends
    admin = KafkaAdminClient(bootstrap_servers=kafka_bootstrap)
    try:
        admin.delete_records({TopicPartition(stream, part): gone})  # what retention does to old segments
    finally:
        admin.close()
    env = {**service_env(topics, app_id=prefix), "KAFKA_BOOTSTRAP_SERVERS": kafka_bootstrap}
    out = tmp_path / "r.json"
    r = monitor(env, "protocol", "replay", "--quiet", "--identify", "--candidate", str(lowered_alt(tmp_path)),
                "--json", str(out))
    assert r.returncode == 0, r.stderr
    assert f"replay: {gone} earlier record(s) of the patient stream are no longer on the brokers" in r.stderr, \
        r.stderr
    data = json.loads(out.read_text())
    assert data["window"]["expired_records"] == gone
    assert data["window"]["records"] == len(export) + 1 - gone  # the cohort and the action, less those gone


def test_replay_of_a_patient_stream_the_brokers_do_not_have_fails_instead_of_finding_no_patients(
        kafka_bootstrap, tmp_path):
    """TOPIC_OBSERVATIONS names a topic the brokers do not have (a typo, another deployment's
    name): the replay asks for it again for its wait, then says so and exits 2, writing no
    report and creating nothing. It used to print "0 patients ... 0 difference(s)" with status
    0, which reads like a candidate that changes nothing."""
    prefix = f"rpa{uuid.uuid4().hex[:8]}"
    topics = {n: f"{prefix}.{n}" for n in ALL}  # none of them created
    env = {**service_env(topics, app_id=prefix), "KAFKA_BOOTSTRAP_SERVERS": kafka_bootstrap}
    report = tmp_path / "r.json"
    t0 = time.monotonic()
    r = monitor(env, "protocol", "replay", "--quiet", "--candidate",
                str(ROOT / "alerts/protocols/onasemnogene-abeparvovec-iv.yaml"), "--json", str(report))
    waited = time.monotonic() - t0
    assert r.returncode == 2, (r.returncode, r.stdout, r.stderr)
    assert topics["observations"] in r.stderr and "TOPIC_OBSERVATIONS" in r.stderr, r.stderr
    assert "patients" not in r.stdout and not report.exists()
    assert waited >= 10, waited  # asked again for the reader's wait, not once
    admin = KafkaAdminClient(bootstrap_servers=kafka_bootstrap)
    try:
        assert not [t for t in admin.list_topics() if t.startswith(prefix)]
    finally:
        admin.close()


def test_a_reader_waiting_for_a_topic_sees_it_once_it_is_created(kafka_bootstrap):
    """kafka-python asks the broker again each time it knows no partition of the topic, so the
    readers' wait (``topic_partitions``) sees a topic that appears while it waits."""
    import threading

    from kafka_broker import create_topics, drop_test_topics

    name = f"rpl{uuid.uuid4().hex[:8]}.observations"
    consumer = KafkaConsumer(bootstrap_servers=kafka_bootstrap, group_id=None, enable_auto_commit=False,
                             allow_auto_create_topics=False)
    timer = threading.Timer(1.5, create_topics, (kafka_bootstrap, [name]), {"partitions": 3})
    try:
        assert consumer.partitions_for_topic(name) == set()  # what a single look says
        timer.start()
        assert topic_partitions(consumer, name, wait=30.0) == {0, 1, 2}
    finally:
        timer.cancel()
        timer.join()
        consumer.close()
        drop_test_topics(kafka_bootstrap, [name], [])


def test_replay_of_the_stream_a_real_worker_recorded(kafka_bootstrap, topic_factory, worker_factory, tmp_path):
    """A simulated cohort published as raw inputs (JSON, FHIR and HL7 v2 lab results, treatments)
    goes through a real worker's ingest onto the patient stream; the replay reads that stream
    and replays the deployed protocol against itself: every patient is there, nothing is
    skipped, the cohort raises alerts, and there are 0 differences."""
    from monitor.simulate import generate_cohort, records

    prefix = f"rpw{uuid.uuid4().hex[:8]}"
    topics = topic_factory(*ALL, prefix=prefix)
    env = {**service_env(topics, app_id=prefix), "KAFKA_BOOTSTRAP_SERVERS": kafka_bootstrap}
    worker_factory(service_env(topics, app_id=prefix))
    cohort = generate_cohort(12, 21, days=60, formats=("json", "fhir", "hl7"))
    short = {"lab-results": topics["lab-results"], "vital-signs": topics["vital-signs"],
             "liver-function": topics["liver-function"], "treatments": topics["treatments"]}
    producer = KafkaProducer(bootstrap_servers=kafka_bootstrap, acks="all")
    for rec in records(cohort, "mixed", short):
        v = rec["value"]
        producer.send(rec["topic"], key=rec["key"].encode(),
                      value=v.encode() if isinstance(v, str) else json.dumps(v).encode())
    producer.flush()
    producer.close()
    # wait until ingest has written the stream: it committed every input, and commits only
    # once the observations of a batch are acknowledged
    wait_ingested(kafka_bootstrap, prefix, list(short.values()), timeout=120)
    last = sum(end_offsets(kafka_bootstrap, [topics["observations"]]).values())
    assert last and last >= len(cohort.events), (last, len(cohort.events))
    cand = ROOT / "alerts/protocols/onasemnogene-abeparvovec-iv.yaml"
    out = tmp_path / "self.json"
    r = monitor(env, "protocol", "replay", "--quiet", "--candidate", str(cand), "--json", str(out))
    assert r.returncode == 0, r.stderr
    data = json.loads(out.read_text())
    assert data["patients"] == len(cohort.patients)
    assert data["window"]["skipped"] == {}
    assert sum(v["opened"]["baseline"] for v in data["rules"].values()) >= len(cohort.patients)
    assert data["differences"] == 0 and data["patients_changed"] == []
