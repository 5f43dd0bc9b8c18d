"""Ingest through the real broker: valid events become observations, invalid ones dead letters.

An independent client (kafka-python) publishes and reads back; count in must equal
observations out plus dead letters.
"""
from __future__ import annotations

import json
import uuid

import pytest
from kafka import KafkaProducer

from workers import service_env, wait_processed

pytestmark = pytest.mark.integration

T0 = "2026-10-01T08:00:00+00:00"


def lab(pid, eid, loinc, value, unit, **kw):
    return {"event_id": eid, "patient_id": pid, "loinc": loinc, "value": value, "unit": unit,
            "reference_range": {"low": 0, "high": 40}, "effective_at": T0, "status": "final", "source": "lab-a", **kw}


def drain(bootstrap, topic):
    """Every record of ``topic``, read to its end offsets (after ``wait_processed``: complete)."""
    from kafka_broker import read_topic

    return read_topic(bootstrap, topic, fetch_max_bytes=64 * 1024 * 1024, max_partition_fetch_bytes=32 * 1024 * 1024)


def test_valid_and_hostile_events_are_accounted_for(kafka_bootstrap, topic_factory, worker_factory):
    prefix = f"ing{uuid.uuid4().hex[:8]}"
    topics = topic_factory("lab-results", "vital-signs", "liver-function", "treatments", "observations",
                           "dead-letter", "findings", "alerts", "alert-actions", "patient-ticks", prefix=prefix)
    worker_factory(service_env(topics, app_id=prefix))

    valid: list[tuple[str, dict, int]] = [
        ("lab-results", lab("p-1", "e1", "1742-6", 55, "U/L"), 1),
        ("lab-results", lab("p-1", "e2", "1975-2", 34.2, "umol/L", reference_range={"low": 0, "high": 20.5}), 1),
        ("lab-results", lab("p-2", "e3", "777-3", 140, "10*3/uL"), 1),
        ("lab-results", lab("p-2", "e4", "2951-2", 139, "mmol/L"), 1),  # known, unmonitored: passes
        ("vital-signs", {"event_id": "v1", "patient_id": "p-1", "loinc": "8310-5", "value": 101.3,
                         "unit": "[degF]", "effective_at": T0, "source": "ward"}, 1),
        ("liver-function", {"event_id": "lf1", "patient_id": "p-3", "effective_at": T0, "source": "lab-b", "status": "final",
                            "results": [{"loinc": "1742-6", "value": 88, "unit": "U/L"},
                                        {"loinc": "1920-8", "value": 70, "unit": "[IU]/L"},
                                        {"loinc": "1975-2", "value": 0.6, "unit": "mg/dL"},
                                        {"loinc": "6301-6", "value": 1.1, "unit": "{INR}"}]}, 4),
    ]
    nan_raw = b'{"event_id":"n1","patient_id":"p-1","loinc":"1742-6","value":NaN,"unit":"U/L","status":"final","effective_at":"' + T0.encode() + b'"}'
    inf_raw = b'{"event_id":"n2","patient_id":"p-1","loinc":"1742-6","value":1e999,"unit":"U/L","status":"final","effective_at":"' + T0.encode() + b'"}'
    hostile: list[tuple[str, bytes, str]] = [
        ("lab-results", b'{"event_id": "x1", "patient_id": ', "malformed_json"),
        ("lab-results", json.dumps(lab("p-1", "x2", "1742-6", "high", "U/L")).encode(), "schema_invalid"),
        ("lab-results", nan_raw, "non_finite_value"),
        ("lab-results", inf_raw, "non_finite_value"),
        ("lab-results", json.dumps(lab("p-1", "x3", "1742-6", 30, "U/L", effective_at="2026-10-01T08:00:00")).encode(), "naive_timestamp"),
        ("lab-results", json.dumps(lab("p-1", "x4", "99999-9", 30, "U/L")).encode(), "unknown_loinc"),
        ("lab-results", json.dumps(lab("p-1", "x5", "1742-6", 30, "mg/dL")).encode(), "unit_not_convertible"),
        ("lab-results", json.dumps(lab("", "x6", "1742-6", 30, "U/L")).encode(), "empty_id"),
        ("lab-results", json.dumps(lab("p-1", "x7", "1742-6", 30, "U/L", effective_at="2099-01-01T00:00:00+00:00")).encode(), "future_timestamp"),
        ("lab-results", b"{" + b" " * (10 * 1024 * 1024) + b"}", "payload_too_large"),
        ("lab-results", b'{"a":' * 5000 + b"1" + b"}" * 5000, "too_deep"),
        ("vital-signs", b"\xff\xfe not utf8", "not_utf8"),
        ("liver-function", json.dumps({"event_id": "lf2", "patient_id": "p-3", "effective_at": T0, "results": []}).encode(), "schema_invalid"),
        ("treatments", json.dumps({"type": "dose", "event_id": "d1", "patient_id": "p-1", "product": "unknown-product",
                                   "administered_at": T0, "birth_date": "2026-01-01", "weight_kg": 5}).encode(), "schema_invalid"),
        ("treatments", b"[1, 2, 3]", "schema_invalid"),
        # strict contract (issue 16): a misspelt field is not dropped, a missing status not guessed
        ("lab-results", json.dumps({**lab("p-1", "x8", "1742-6", 30, "U/L"), "refrence_range": {"high": 40}}).encode(),
         "unknown_field"),
        ("lab-results", json.dumps({k: v for k, v in lab("p-1", "x9", "1742-6", 30, "U/L").items() if k != "status"}).encode(),
         "schema_invalid"),
        # a test message (MSH-11 T) on the production input topic is dead-lettered, not processed
        ("lab-results", ("MSH|^~\\&|LIS|LAB|MON|GTX|20261030080000+0000||ORU^R01|T1|T|2.5.1\r"
                         "PID|1||p-1\rOBR|1|P1|F1\rOBX|1|NM|1742-6^ALT^LN||30|U/L|||||F|||20261030080000+0000\r").encode(),
         "hl7_processing_id"),
    ]
    producer = KafkaProducer(bootstrap_servers=kafka_bootstrap, acks="all", max_request_size=16 * 1024 * 1024)
    for short, value, _ in valid:
        producer.send(topics[short], key=value["patient_id"].encode(), value=json.dumps(value).encode())
    for short, raw, _ in hostile:
        producer.send(topics[short], key=b"p-1", value=raw)
    producer.flush()
    producer.close()

    expected_obs = sum(n for *_, n in valid)
    # the worker committed every input and the whole patient stream: every output of these
    # inputs is on the broker, so reading to the end catches a missing or an extra one
    wait_processed(kafka_bootstrap, prefix, topics)
    observations = drain(kafka_bootstrap, topics["observations"])
    dead = drain(kafka_bootstrap, topics["dead-letter"])

    assert len(observations) == expected_obs
    assert len(dead) == len(hostile)
    # count in = observations out (per input event) + dead letters
    events_out = {json.loads(m.value)["event_id"] for m in observations}
    assert len(events_out) + len(dead) == len(valid) + len(hostile)

    obs = [json.loads(m.value) for m in observations]
    by_id = {o["observation_id"]: o for o in obs}
    assert by_id["e2"]["value"] == pytest.approx(2.0) and by_id["e2"]["unit"] == "mg/dL"
    assert by_id["v1"]["value"] == pytest.approx(38.5) and by_id["v1"]["unit"] == "Cel"
    assert by_id["e3"]["unit"] == "10*9/L"
    assert {o["analyte"] for o in obs if o["event_id"] == "lf1"} == {"alt", "ast", "bilirubin_total", "inr"}
    for m in observations:  # keyed by patient
        assert m.key.decode() == json.loads(m.value)["patient_id"]

    # every hostile input is on dead-letter with its original bytes and the right reason
    got = {}
    for m in dead:
        headers = {k: v for k, v in m.headers}
        got[m.value] = headers
        assert headers["dlq.message"], "a human-readable message is required"
        assert headers["dlq.source.topic"].decode() in topics.values()
        assert headers["dlq.source.offset"].decode().isdigit()
    for short, raw, reason in hostile:
        assert raw in got, f"missing dead letter for {reason}"
        assert got[raw]["dlq.reason"].decode() == reason, (reason, got[raw])
