"""No patient identifier in metrics or logs (design promise 6).

A real worker runs a scenario with known, unique patient ids (valid events on every input
topic, a dose event, and invalid events that still carry the ids); then ``/metrics``,
faust's sensor page and the worker's log (run at INFO) are scanned for those ids. The
unit-level tests below prove the scanner would catch an id in a label, an exemplar or a
log line.
"""
from __future__ import annotations

import json
import time
import urllib.request
import uuid

import pytest
from kafka import KafkaConsumer, KafkaProducer
from prometheus_client import CollectorRegistry, Counter, Gauge, generate_latest
from prometheus_client.openmetrics.exposition import generate_latest as generate_openmetrics
from prometheus_client.parser import text_string_to_metric_families

from workers import service_env, wait_processed

T0 = "2026-10-01T08:00:00+00:00"


# ---- the scanner ----------------------------------------------------------------

def find_identifiers(text: str, identifiers: list[str]) -> list[tuple[str, str]]:
    """Every (identifier, line) where an identifier occurs in ``text`` (case-insensitive)."""
    hits = []
    lowered = [(i, i.lower()) for i in identifiers]
    for line in text.splitlines():
        low = line.lower()
        for ident, ident_low in lowered:
            if ident_low in low:
                hits.append((ident, line))
    return hits


def label_values(exposition: str) -> set[str]:
    """All label values in a Prometheus text exposition (parsed, not grepped)."""
    values = set()
    for family in text_string_to_metric_families(exposition):
        for sample in family.samples:
            values.update(sample.labels.values())
    return values


def assert_no_identifiers(text: str, identifiers: list[str], where: str) -> None:
    hits = find_identifiers(text, identifiers)
    assert not hits, f"patient identifiers in {where}: " + "; ".join(f"{i!r} in {line[:200]!r}" for i, line in hits[:10])


# ---- unit: the scanner catches what it must ------------------------------------------

def test_scanner_flags_a_patient_id_in_a_metric_label():
    pid = f"PAT-{uuid.uuid4().hex[:10]}"
    registry = CollectorRegistry()
    bad = Gauge("throwaway_last_seen", "a metric that wrongly carries a patient", ["patient_id"], registry=registry)
    bad.labels(patient_id=pid).set(1)
    text = generate_latest(registry).decode()
    with pytest.raises(AssertionError, match=pid):
        assert_no_identifiers(text, [pid], "metrics")
    assert pid in label_values(text)


def test_scanner_flags_a_patient_id_in_an_exemplar():
    pid = f"PAT-{uuid.uuid4().hex[:10]}"
    registry = CollectorRegistry()
    c = Counter("throwaway_events", "events", ["topic"], registry=registry)
    c.labels(topic="lab-results").inc(exemplar={"patient_id": pid})
    with pytest.raises(AssertionError):
        assert_no_identifiers(generate_openmetrics(registry).decode(), [pid], "metrics")


def test_scanner_flags_a_patient_id_in_a_log_line_and_passes_clean_text():
    pid = "PAT-0042"
    log = "[2026-10-01 08:00:00,000] [1] [INFO] dead-lettered input from lab-results[0]@12: schema_invalid\n" \
          f"[2026-10-01 08:00:01,000] [1] [INFO] opened alert for pat-0042\n"
    hits = find_identifiers(log, [pid])
    assert len(hits) == 1 and "opened alert" in hits[0][1]
    assert find_identifiers(log.splitlines()[0], [pid]) == []


def test_service_metric_labels_are_bounded_names():
    """Static check of the service's own registry: no label name suggests an identifier."""
    from monitor.metrics import REGISTRY

    forbidden = {"patient", "patient_id", "mrn", "encounter", "name", "event_id", "observation_id", "alert_id", "message"}
    for collector in list(REGISTRY._collector_to_names):  # registered collectors
        labelnames = set(getattr(collector, "_labelnames", ()))
        assert not labelnames & forbidden, (collector, labelnames)


# ---- integration: a real worker, a scenario with known ids ---------------------------

def _drain_count(bootstrap: str, topic: str, expected: int, timeout: float = 60.0) -> int:
    consumer = KafkaConsumer(topic, bootstrap_servers=bootstrap, auto_offset_reset="earliest",
                             enable_auto_commit=False, consumer_timeout_ms=1000, group_id=None)
    n = 0
    deadline = time.monotonic() + timeout
    try:
        while n < expected and time.monotonic() < deadline:
            for _ in consumer:
                n += 1
    finally:
        consumer.close()
    return n


@pytest.mark.integration
def test_no_patient_identifier_in_metrics_or_logs(kafka_bootstrap, topic_factory, worker_factory):
    prefix = f"npd{uuid.uuid4().hex[:8]}"
    topics = topic_factory("lab-results", "vital-signs", "liver-function", "treatments", "observations",
                           "dead-letter", "findings", "alerts", "alert-actions", "patient-ticks", prefix=prefix)
    worker = worker_factory(service_env(topics, app_id=prefix, LOG_LEVEL="INFO", MONITOR_LAG_INTERVAL_SECONDS="2"))

    patients = [f"MRN{uuid.uuid4().hex[:12].upper()}" for _ in range(4)]
    valid: list[tuple[str, str, dict]] = []
    for i, pid in enumerate(patients):
        valid += [
            ("treatments", pid, {"type": "dose", "event_id": f"d{i}", "patient_id": pid,
                                 "product": "onasemnogene-abeparvovec-iv", "administered_at": T0,
                                 "birth_date": "2026-03-01", "weight_kg": 6.5, "ward": "W1", "care_team": "neuro",
                                 "source": "pharmacy"}),
            ("lab-results", pid, {"event_id": f"alt{i}", "patient_id": pid, "loinc": "1742-6", "value": 400,
                                  "unit": "U/L", "reference_range": {"low": 0, "high": 40}, "effective_at": T0,
                                  "status": "final", "source": "lab-a"}),
            ("vital-signs", pid, {"event_id": f"v{i}", "patient_id": pid, "loinc": "8310-5", "value": 39.4,
                                  "unit": "Cel", "effective_at": T0, "source": "ward"}),
            ("liver-function", pid, {"event_id": f"lf{i}", "patient_id": pid, "effective_at": T0, "source": "lab-b", "status": "final",
                                     "results": [{"loinc": "1920-8", "value": 300, "unit": "U/L"},
                                                 {"loinc": "1975-2", "value": 3.1, "unit": "mg/dL"}]}),
        ]
    invalid: list[tuple[str, str, bytes]] = []
    for i, pid in enumerate(patients):
        invalid += [
            ("lab-results", pid, json.dumps({"event_id": f"x{i}", "patient_id": pid, "loinc": "99999-9", "value": 1,
                                             "unit": "U/L", "effective_at": T0, "status": "final"}).encode()),
            ("lab-results", pid, json.dumps({"event_id": f"y{i}", "patient_id": pid, "loinc": "1742-6",
                                             "value": "very high", "unit": "U/L", "effective_at": T0, "status": "final"}).encode()),
            ("vital-signs", pid, f'{{"patient_id": "{pid}", '.encode()),
            ("treatments", pid, json.dumps({"type": "dose", "event_id": f"bd{i}", "patient_id": pid,
                                            "product": "unknown", "administered_at": T0}).encode()),
        ]
    producer = KafkaProducer(bootstrap_servers=kafka_bootstrap, acks="all")
    try:
        for short, pid, value in valid:
            producer.send(topics[short], key=pid.encode(), value=json.dumps(value).encode())
        for short, pid, raw in invalid:
            producer.send(topics[short], key=pid.encode(), value=raw)
        producer.flush()
    finally:
        producer.close()

    n_obs = sum(1 for s, *_ in valid if s in ("lab-results", "vital-signs")) + 2 * len(patients)
    assert _drain_count(kafka_bootstrap, topics["observations"], n_obs) >= n_obs
    assert _drain_count(kafka_bootstrap, topics["dead-letter"], len(invalid)) >= len(invalid)

    # wait until the worker's metrics account for every event (so the scan sees a full run)
    def consumed() -> float:
        return worker.metric("monitor_events_consumed_total")

    deadline = time.monotonic() + 60
    while consumed() < len(valid) + len(invalid) and time.monotonic() < deadline:
        time.sleep(0.5)
    # ... and has committed them, and its lag timer (every 2 s) has measured every input
    # partition at lag 0 since
    def lag_zero() -> bool:
        _, body = worker.get("/metrics")
        lag = [(s.labels.get("topic"), s.value) for f in text_string_to_metric_families(body.decode())
               if f.name == "monitor_consumer_lag_messages" for s in f.samples]
        inputs = {topics[t] for t in ("lab-results", "vital-signs", "liver-function", "treatments")}
        return {t for t, _ in lag} >= inputs and all(v == 0 for t, v in lag if t in inputs)

    wait_processed(kafka_bootstrap, prefix, topics)
    while not lag_zero() and time.monotonic() < deadline:
        time.sleep(0.5)
    assert lag_zero(), "the lag gauge never showed the inputs consumed"

    status, body = worker.get("/metrics")
    assert status == 200
    metrics_text = body.decode()
    assert "monitor_events_consumed_total" in metrics_text and "monitor_dead_letters_total" in metrics_text
    assert_no_identifiers(metrics_text, patients, "/metrics")
    assert not set(patients) & label_values(metrics_text)
    status, body = worker.get("/faust/metrics")
    assert status == 200
    assert_no_identifiers(body.decode(), patients, "/faust/metrics")
    # OpenMetrics (exemplars only appear there): ask for it explicitly
    req = urllib.request.Request(worker.url + "/metrics", headers={"Accept": "application/openmetrics-text"})
    with urllib.request.urlopen(req, timeout=5) as r:
        assert_no_identifiers(r.read().decode(), patients, "/metrics (openmetrics)")

    log_text = worker.log_path.read_text(errors="replace")
    assert "dead-lettered" in log_text or "[INFO]" in log_text, "the worker log is empty: the scan proves nothing"
    assert_no_identifiers(log_text, patients, f"worker log {worker.log_path}")


def test_no_demographics_in_feed_logs_or_listener_metrics(kafka_bootstrap, topic_factory, tmp_path):
    """Issue 14: names, MRNs and dates of birth from the patients feed (``monitor patients load`` and
    ADT over the MLLP listener, both at INFO) appear in no log line and no metric."""
    import os
    import socket
    import subprocess
    import sys
    from pathlib import Path

    from hl7.client import MLLPClient

    root = Path(__file__).resolve().parents[2]
    topics = topic_factory("patients", "dead-letter", "observations", prefix=f"npd{uuid.uuid4().hex[:8]}")
    tag = uuid.uuid4().hex[:8].upper()
    people = [(f"PID{tag}{i}", f"Zebedee{tag}{i}", f"Quux{tag}{i}", f"MRN{tag}{i}") for i in range(3)]
    secrets_ = [s for p in people for s in p] + ["20240917"]
    records = [{"patient_id": p, "display_name": f"{g} {f}", "mrn": m, "birth_date": "2024-09-17", "ward": "W1"}
               for p, g, f, m in people]
    records.append({"patient_id": people[0][0], "display_name": "X", "mrn": people[0][3], "birth_date": "2999-01-01"})
    src = tmp_path / "patients.jsonl"
    src.write_text("\n".join(json.dumps(r) for r in records))
    env = dict(os.environ, KAFKA_BOOTSTRAP_SERVERS=kafka_bootstrap, TOPIC_PATIENTS=topics["patients"],
               TOPIC_DEAD_LETTER=topics["dead-letter"], LOG_LEVEL="INFO", PYTHONPATH=str(root))
    out = subprocess.run([sys.executable, "-m", "monitor.cli", "patients", "load", str(src)], env=env, cwd=root,
                         capture_output=True, text=True, timeout=120)
    assert "3 records published, 1 dead-lettered" in out.stdout, out.stdout + out.stderr
    assert_no_identifiers(out.stdout + out.stderr, secrets_, "monitor patients load output")

    def free() -> int:
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            return s.getsockname()[1]

    port, mport = free(), free()
    log_path = tmp_path / "mllp.log"
    with open(log_path, "wb") as log:
        proc = subprocess.Popen([sys.executable, "-m", "monitor.cli", "mllp", "--port", str(port), "--metrics-port",
                                 str(mport), "--observations-topic", topics["observations"], "--dead-letter-topic",
                                 topics["dead-letter"], "--log-level", "INFO"],
                                env=env, cwd=root, stdout=log, stderr=subprocess.STDOUT)
        try:
            deadline = time.monotonic() + 30
            while True:
                try:
                    socket.create_connection(("127.0.0.1", port), timeout=1).close()
                    break
                except OSError:
                    assert proc.poll() is None and time.monotonic() < deadline, log_path.read_text()
                    time.sleep(0.2)
            acks = []
            with MLLPClient("127.0.0.1", port) as client:
                for i, (p, g, f, m) in enumerate(people):
                    mr = f"~{m}^^^HOSP^MR" if i else ""  # the first has no MRN: dead-lettered (AE)
                    acks.append(client.send_message(
                        f"MSH|^~\\&|PAS|H|MON|H|20260101120000||ADT^A08|C{i}|P|2.5\r"
                        f"PID|1||{p}^^^H^PI{mr}||{f}^{g}||20240917\rPV1|1|I|W1^1^2\r"))
            assert [b"MSA|AE" in a for a in acks] == [True, False, False], acks
            with urllib.request.urlopen(f"http://127.0.0.1:{mport}/metrics", timeout=5) as r:
                metrics_text = r.read().decode()
            assert "mllp" in metrics_text
            assert_no_identifiers(metrics_text, secrets_, "MLLP /metrics")
        finally:
            proc.terminate()
            proc.wait(10)
    log_text = log_path.read_text(errors="replace")
    assert "dead-lettered" in log_text, "the listener log is empty: the scan proves nothing"
    assert_no_identifiers(log_text, secrets_, "MLLP listener log")
    assert _drain_count(kafka_bootstrap, topics["patients"], 5) >= 5  # 3 loaded + 2 over MLLP
