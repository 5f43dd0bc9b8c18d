"""An unexpected error part-way through a record (a bug, never bad input: that is a dead
letter before any state is touched) leaves the patient exactly as before that record and
writes nothing but the record's dead letter:

- the outputs the record had already produced (a finding whose alert then failed) are
  dropped: an alert version written for a state that is then rolled back would take the
  ``alert_id:version`` the real next version needs, and the delivery ledger would drop that
  one as a repeat;
- a patient changed earlier in the same batch (not written to the changelog yet) goes back
  to its last written bytes and those earlier records are applied again (their outputs are
  already in the batch; metrics are not counted twice), instead of keeping a half-updated
  state;
- if a record applied again fails too, ``PatientStateLost`` tells the runner to restore the
  partition from the changelog and read it again from its committed offset;
- a change by the clock cannot be applied again: the patient then keeps its state, as before.
"""
from __future__ import annotations

import json

import pytest

from alerts.testkit import at, dose, obs
from monitor.clinical import processor as processor_module
from monitor.clinical.processor import PatientStateLost
from monitor.clinical.store import InMemoryPatientStore, encode
from monitor.metrics import ALERTS_OPENED
from test_clinical_processor import Stream, by_topic, engine, lifecycle, processor  # noqa: F401 (fixtures)


def _opened(rule: str, severity: str) -> float:
    return ALERTS_OPENED.labels(rule, severity)._value.get()


def _reasons(out):
    return [dict(o.headers)["dlq.reason"].decode() for o in out if o.topic == "dead-letter"]


def test_a_record_that_fails_after_producing_a_finding_writes_only_its_dead_letter(engine, lifecycle, monkeypatch):
    store = InMemoryPatientStore()
    p = processor(engine, lifecycle, store)
    s = Stream()
    p.process([s.treatment(dose(patient="r1")), s.observation(obs("alt", 30, -1, high=40, patient="r1"))], at(8))
    store.take_changed()
    real = processor_module.apply_finding

    def fail_on_alt(book, finding, now, config):
        if finding.rule_id == "liver.alt_increased":
            book.alerts.clear()  # a half-done change of the book
            raise RuntimeError("bug")
        return real(book, finding, now, config)

    monkeypatch.setattr(processor_module, "apply_finding", fail_on_alt)
    out = p.process([s.observation(obs("alt", 1000, 7, high=40, patient="r1"))], at(8))
    assert [o.topic for o in out] == ["dead-letter"] and _reasons(out) == ["internal_error"]
    assert store.take_changed() == []  # nothing to write: back to the durable version
    monkeypatch.setattr(processor_module, "apply_finding", real)
    # the same result again (fixed code) raises the alert as version 1
    out = p.process([s.observation(obs("alt", 1000, 7, high=40, patient="r1"))], at(8))
    (alert,) = [a for a in by_topic(out, "alerts") if a["rule_id"] == "liver.alt_increased"]
    assert alert["version"] == 1 and alert["severity"] == "critical"


def test_a_patient_changed_earlier_in_the_batch_goes_back_to_the_state_before_the_failing_record(
        engine, lifecycle, monkeypatch):
    ref_store, store = InMemoryPatientStore(), InMemoryPatientStore()
    ref, p = processor(engine, lifecycle, ref_store), processor(engine, lifecycle, store)
    now = at(8)
    for proc, st in ((ref, ref_store), (p, store)):
        s = Stream()
        proc.process([s.treatment(dose(patient="r2"))], now)
        st.take_changed()  # the dose is durable
    s_ref, s = Stream(), Stream()
    s_ref.offset = s.offset = 1
    before = [obs("platelets", 320, -1, low=150, high=450, patient="r2"),
              obs("platelets", 40, 5, low=150, high=450, patient="r2")]
    ref_out = ref.process([s_ref.observation(o) for o in before], now)
    (expected,) = ref_store.take_changed()
    opened = _opened("heme.platelets_decreased", "high")
    real = engine.evaluate_observation

    def half_update(state, o, when):
        if o.analyte == "alt":
            state.ward = "half-updated"
            state.hist.pop("platelets", None)
            raise RuntimeError("bug")
        return real(state, o, when)

    monkeypatch.setattr(p.engine, "evaluate_observation", half_update)
    out = p.process([s.observation(o) for o in before] + [s.observation(obs("alt", 1000, 7, high=40, patient="r2"))],
                    now)
    # the two earlier records' outputs, then the dead letter: nothing of the failing record
    assert [o.value for o in out[:-1]] == [o.value for o in ref_out]
    assert _reasons(out) == ["internal_error"] and out[-1].topic == "dead-letter"
    # the state is that after the two earlier records, byte for byte
    (got,) = store.take_changed()
    assert got == expected
    # the records applied again were not counted again (the reference counted its alert once)
    assert _opened("heme.platelets_decreased", "high") - opened == 1


def test_a_record_that_fails_when_applied_again_asks_for_the_partition_to_be_restored(
        engine, lifecycle, monkeypatch):
    store = InMemoryPatientStore()
    p = processor(engine, lifecycle, store)
    s = Stream(partition=3)
    p.process([s.treatment(dose(patient="r3"))], at(8))
    store.take_changed()
    calls = {"n": 0}
    real = engine.evaluate_observation

    def second_call_fails(state, o, when):
        calls["n"] += 1
        if calls["n"] >= 2:
            raise RuntimeError("bug")
        return real(state, o, when)

    monkeypatch.setattr(p.engine, "evaluate_observation", second_call_fails)
    with pytest.raises(PatientStateLost) as err:
        p.process([s.observation(obs("alt", 30, 1, high=40, patient="r3")),
                   s.observation(obs("alt", 31, 2, high=40, patient="r3"))], at(8))
    assert err.value.partition == 3


def test_a_change_by_the_clock_is_not_replayed_the_patient_keeps_its_state(engine, lifecycle, monkeypatch):
    store = InMemoryPatientStore()
    p = processor(engine, lifecycle, store)
    s = Stream()
    p.process([s.treatment(dose(patient="r4"))], at(1))
    store.take_changed()
    out = p.tick(["r4"], at(30))  # samples overdue: the clock changes the patient
    assert any(a["rule_id"] == "schedule.overdue" for a in by_topic(out, "alerts"))
    assert store.is_changed("r4")

    def boom(state, o, when):
        raise RuntimeError("bug")

    monkeypatch.setattr(p.engine, "evaluate_observation", boom)
    (dead,) = p.process([s.observation(obs("alt", 30, 29, high=40, patient="r4"))], at(30))
    assert _reasons([dead]) == ["internal_error"]
    (pid, _part, value), = store.take_changed()  # the clock's change is kept, not lost
    assert pid == "r4" and b"schedule.overdue" in value


def test_the_store_keeps_what_to_replay_until_the_patient_is_written():
    store = InMemoryPatientStore()
    state, book = store.load("r5", 0)
    store.mark_changed("r5", replay="first")
    store.mark_changed("r5", book=False, replay="second")
    assert store.discard("r5") == ["first", "second"]  # never written: forgotten, then rebuilt
    assert not store.is_changed("r5") and len(store) == 0
    state, book = store.load("r5", 0)
    state.ward = "W9"
    store.mark_changed("r5", replay="third")
    (_pid, _p, value), = store.take_changed()
    assert json.loads(value)["state"] == json.loads(encode(state, book))["state"]
    assert store.discard("r5") == []  # written: nothing to replay; back to the written bytes
    state, _ = store.load("r5", 0)
    assert state.ward == "W9"
    state.ward = "W10"
    store.mark_changed("r5", replay="fourth")
    store.mark_changed("r5")  # a change that cannot be applied again
    assert store.discard("r5") is None and store.is_changed("r5")
    assert store.load("r5", 0)[0].ward == "W10"
    store.take_changed()
    assert store.discard("r5") == [] and store.load("r5", 0)[0].ward == "W10"
