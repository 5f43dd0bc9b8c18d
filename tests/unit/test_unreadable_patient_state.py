"""A patient's stored state this release cannot read is never guessed at.

A changelog value of another format version (a newer release's, read after a rollback) or
bytes that are not a patient's state: ``decode`` refuses it (``UnreadablePatientState``,
never reading a version-2 value as version 1), the store counts the patient, the processor
dead-letters that patient's records with their original bytes and the reason
``patient_state_unreadable`` while every other patient is evaluated, and the clock skips
it without counting a clock failure (``monitor_clinical_patients_unreadable`` and the
critical rule MonitorPatientStateUnreadable say it instead).
"""
from __future__ import annotations

import json

import pytest

from alerts.engine import Engine
from alerts.lifecycle import AlertBook
from alerts.protocol import default_protocols
from alerts.state import PatientState
from alerts.testkit import dose, obs
from monitor.clinical.processor import ClinicalProcessor
from monitor.clinical.store import FORMAT_VERSION, InMemoryPatientStore, UnreadablePatientState, decode, encode
from monitor.metrics import REGISTRY
from monitor.settings import Settings
from monitor.worker import lifecycle_config
from test_clinical_processor import Stream, by_topic

PID = "UR-7f31c2"


def readable(pid: str = PID, weight: float = 9.5) -> bytes:
    state = PatientState(pid)
    state.weight = weight
    return encode(state, AlertBook(patient_id=pid))


def of_version(version) -> bytes:
    d = json.loads(readable())
    d["v"] = version
    return json.dumps(d).encode()


def test_this_version_and_the_faust_tables_values_are_read():
    assert decode(readable())[0].weight == 9.5
    d = json.loads(readable())
    del d["v"]  # the faust Table's values carry no version
    assert decode(json.dumps(d).encode())[0].weight == 9.5


@pytest.mark.parametrize("value, why", [
    (of_version(FORMAT_VERSION + 1), f"format version {FORMAT_VERSION + 1}"),
    (of_version("2"), "format version str"),
    (b"\x00\x01 not json", "not JSON"),
    (b'["a", "list"]', "a JSON list"),
    (json.dumps({"v": FORMAT_VERSION, "state": {"hist": 5, "patient_id": PID}, "alerts": {}}).encode(),
     "reading the state or the alert book"),
    (json.dumps({"v": FORMAT_VERSION, "alerts": {}}).encode(), "KeyError"),
])
def test_any_other_value_is_refused_never_guessed(value, why):
    with pytest.raises(UnreadablePatientState, match=why) as err:
        decode(value)
    assert PID not in str(err.value)  # the reason names the format, never the content


def test_the_store_counts_an_unreadable_patient_until_a_new_value_replaces_it():
    store = InMemoryPatientStore()
    store.restore_record(1, PID.encode(), of_version(FORMAT_VERSION + 1))
    store.restore_record(1, b"UR-other", readable("UR-other"))
    store.restore_record(2, b"UR-third", of_version(FORMAT_VERSION + 1))
    assert store.unreadable_ids([1, 2]) == []  # nothing is decoded before it is touched
    for _ in range(2):  # refused every time, never replaced by an empty state
        with pytest.raises(UnreadablePatientState):
            store.load(PID, 1)
    assert store.load("UR-other", 1)[0].patient_id == "UR-other"
    with pytest.raises(UnreadablePatientState):
        store.load("UR-third", 2)
    assert store.unreadable_ids([1, 2]) == [PID, "UR-third"]
    assert store.unreadable_ids([1]) == [PID]
    assert not store.changed_count()  # nothing of it is written back
    store.restore_record(1, PID.encode(), readable(weight=12.0))  # the release that reads it wrote again
    assert store.unreadable_ids([1]) == []
    assert store.load(PID, 1)[0].weight == 12.0
    store.drop([2])
    assert store.unreadable_ids([1, 2]) == []


def processor(store):
    protocols = default_protocols()
    return ClinicalProcessor(Engine(protocols), lifecycle_config(protocols, Settings()), store,
                             findings_topic="findings", alerts_topic="alerts", dead_letter_topic="dead-letter",
                             clock_settle_seconds=0.0)


def test_its_records_are_dead_lettered_with_their_bytes_and_the_others_evaluated():
    store = InMemoryPatientStore()
    future = of_version(FORMAT_VERSION + 1)
    store.restore_record(0, PID.encode(), future)
    proc = processor(store)
    s = Stream(0)
    recs = [s.treatment(dose(patient=PID)), s.observation(obs("alt", 400, 5, high=40, patient=PID)),
            s.treatment(dose(patient="UR-ok")), s.observation(obs("alt", 400, 5, high=40, patient="UR-ok"))]
    out = proc.process(recs)
    dead = [o for o in out if o.topic == "dead-letter"]
    assert [d.value for d in dead] == [recs[0].value, recs[1].value]  # the original bytes, in order
    for d in dead:
        headers = dict(d.headers)
        assert headers["dlq.reason"] == b"patient_state_unreadable"
        assert b"format version 2" in headers["dlq.message"] and PID.encode() not in headers["dlq.message"]
    assert {a["patient_id"] for a in by_topic(out, "alerts")} == {"UR-ok"}  # the other patient is judged
    assert not [o for o in out if o.key == PID.encode() and o.topic in ("alerts", "findings")]
    assert [pid for pid, _, _ in store.take_changed()] == ["UR-ok"]  # its bytes are never overwritten
    assert store.unreadable_ids([0]) == [PID]


def test_the_clock_skips_it_without_counting_a_clock_failure():
    store = InMemoryPatientStore()
    store.restore_record(0, PID.encode(), of_version(FORMAT_VERSION + 1))
    proc = processor(store)
    s = Stream(0)
    proc.process([s.treatment(dose(patient="UR-ok"))])
    store.take_changed()

    def failures() -> float:
        return REGISTRY.get_sample_value("monitor_clinical_clock_failures_total", {"scope": "patient"}) or 0.0

    before = failures()
    proc.tick([PID, "UR-ok"])
    assert failures() == before
    assert store.unreadable_ids([0]) == [PID]


def test_the_actions_api_lookup_does_not_read_it():
    """``find_alert`` (the actions API) searches undecoded values for the alert id: a value of
    another version, or bytes that are not a state, is not read as one, nor raises."""
    store = InMemoryPatientStore()
    proc = processor(store)
    s = Stream(0)
    out = proc.process([s.treatment(dose(patient=PID)), s.observation(obs("alt", 400, 5, high=40, patient=PID))])
    alert_id = by_topic(out, "alerts")[0]["alert_id"]
    (_, _, value), = [c for c in store.take_changed() if c[0] == PID]
    fresh = InMemoryPatientStore()
    fresh.restore_record(0, PID.encode(), value)
    assert fresh.find_alert(alert_id).alert_id == alert_id  # the value as written: found
    d = json.loads(value)
    d["v"] = FORMAT_VERSION + 1
    fresh.restore_record(0, PID.encode(), json.dumps(d).encode())
    assert fresh.find_alert(alert_id) is None
    fresh.restore_record(0, PID.encode(), b"garbage " + alert_id.encode())
    assert fresh.find_alert(alert_id) is None


def test_a_key_that_is_not_a_patient_id_never_stops_a_restore():
    """A restore that raised on one changelog record would retry for ever and leave every
    partition of the worker unserved. A key that is not UTF-8, or broken JSON, stands for
    itself (escaped); a faust Table's JSON key is the patient id it quotes."""
    from monitor.clinical.store import key_patient_id

    assert key_patient_id(b"P-1") == "P-1"
    assert key_patient_id(b'"P-1"') == "P-1"  # the faust Table's keys
    assert key_patient_id(b"\xff\xfe") == "\\xff\\xfe"
    assert key_patient_id(b'"unterminated') == '"unterminated'
    assert key_patient_id(b'"\\u00e9t\\u00e9"') == "\u00e9t\u00e9"
    store = InMemoryPatientStore()
    store.restore_record(0, b"\xff\xfe", b"\x00 not a state")
    store.restore_record(0, b'"unterminated', readable('"unterminated'))
    store.restore_record(0, b'"P-2"', readable("P-2"))
    assert store.patient_ids([0]) == ['"unterminated', "P-2", "\\xff\\xfe"]
    assert store.load('"unterminated', 0)[0].patient_id == '"unterminated'
    with pytest.raises(UnreadablePatientState):
        store.load("\\xff\\xfe", 0)
    assert store.unreadable_ids([0]) == ["\\xff\\xfe"]
