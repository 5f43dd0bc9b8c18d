"""The clinical processor and the patient store without a broker: records in, records out.

- a patient's dose, results and an action on one stream give findings, alert versions and
  dead letters (with the source coordinates of a routed record);
- the store's changelog bytes rebuild the same state in a fresh store (restore), and a
  replay of the same records on the restored state emits nothing new (at-least-once);
- the clock runs over the owned patients only;
- an internal error rolls an untouched patient back to its durable version.
"""
from __future__ import annotations

import json
from collections import namedtuple

import pytest

from alerts.engine import Engine
from alerts.protocol import default_protocols
from alerts.testkit import at, dose, obs
from monitor.actions_auth import ActionAuthority
from monitor.clinical.processor import KIND_ACTION, KIND_TREATMENT, ClinicalProcessor, routed_headers
from monitor.clinical.store import InMemoryPatientStore, decode, encode
from monitor.inbox.auth import User, UserDirectory
from monitor.worker import lifecycle_config
from schemas.alert import Role
from monitor.settings import Settings

Rec = namedtuple("Rec", "topic partition offset key value headers")
STREAM = "observations"


class Stream:
    """Records of one patient-stream partition with consecutive offsets."""

    def __init__(self, partition: int = 0) -> None:
        self.partition = partition
        self.offset = 0

    def _rec(self, key: str, value: bytes, headers=None) -> Rec:
        r = Rec(STREAM, self.partition, self.offset, key.encode(), value, headers)
        self.offset += 1
        return r

    def observation(self, o) -> Rec:
        return self._rec(o.patient_id, o.model_dump_json().encode())

    def treatment(self, event, src_offset: int = 7) -> Rec:
        return self._rec(event.patient_id, event.model_dump_json().encode(),
                         routed_headers(KIND_TREATMENT, "treatments", 2, src_offset))

    def action(self, patient: str, body: dict, src_offset: int = 3) -> Rec:
        return self._rec(patient, json.dumps(body).encode(), routed_headers(KIND_ACTION, "alert-actions", 1, src_offset))


@pytest.fixture(scope="module")
def engine():
    return Engine(default_protocols())


@pytest.fixture(scope="module")
def lifecycle():
    return lifecycle_config(default_protocols(), Settings())


#: the user directory actions are authorised against (the role comes from here, never the message)
DIRECTORY = UserDirectory([User("n1", Role.NURSE, "x"), User("doc1", Role.PHYSICIAN, "x")])


def processor(engine, lifecycle, store=None, **kw):
    kw.setdefault("clock_settle_seconds", 0.0)
    kw.setdefault("authority", ActionAuthority(DIRECTORY))
    return ClinicalProcessor(engine, lifecycle, store if store is not None else InMemoryPatientStore(),
                             findings_topic="findings", alerts_topic="alerts", dead_letter_topic="dead-letter", **kw)


def by_topic(outputs, topic):
    return [json.loads(o.value) for o in outputs if o.topic == topic]


def test_dose_results_and_action_on_one_stream(engine, lifecycle):
    p = processor(engine, lifecycle)
    s = Stream()
    now = at(8)
    out = p.process([s.treatment(dose(patient="p1")), s.observation(obs("alt", 30, -1, high=40, patient="p1")),
                     s.observation(obs("alt", 250, 7, high=40, patient="p1"))], now)
    findings = by_topic(out, "findings")
    alerts = by_topic(out, "alerts")
    assert [(f["rule_id"], f["state"], f["grade"]) for f in findings if f["rule_id"] == "liver.alt_increased"] == [
        ("liver.alt_increased", "present", 3)]
    (alert,) = [a for a in alerts if a["rule_id"] == "liver.alt_increased"]
    assert alert["status"] == "firing" and alert["version"] == 1
    assert all(o.key == b"p1" for o in out)
    # the action arrives on the same stream and changes the alert
    out2 = p.process([s.action("p1", {"action": "acknowledge", "alert_id": alert["alert_id"], "by": "n1",
                                      "role": "nurse", "at": now.isoformat(), "action_id": "a-1"})], now)
    (acked,) = by_topic(out2, "alerts")
    assert acked["status"] == "acknowledged" and acked["version"] == 2
    # the same action again (a replay) is applied once
    assert p.process([Rec(STREAM, 0, 3, b"p1", json.dumps({"action": "acknowledge", "alert_id": alert["alert_id"],
                     "by": "n1", "role": "nurse", "at": now.isoformat(), "action_id": "a-1"}).encode(),
                     routed_headers(KIND_ACTION, "alert-actions", 1, 3))], now) == []


def test_refused_and_bad_records_are_dead_letters_pointing_at_their_source(engine, lifecycle):
    p = processor(engine, lifecycle)
    s = Stream(partition=1)
    now = at(8)
    out = p.process([
        s.action("p2", {"action": "acknowledge", "alert_id": "nope", "by": "n1", "role": "nurse",
                        "at": now.isoformat()}, src_offset=11),
        s._rec("p2", b"not json"),
        s._rec("p2", b"{}", [("kind", b"treatment"), ("src.topic", b"treatments"), ("src.partition", b"0"),
                             ("src.offset", b"5")]),
    ], now)
    dead = [o for o in out if o.topic == "dead-letter"]
    assert len(dead) == 3 and len(out) == 3
    h = [{k: v.decode() for k, v in d.headers} for d in dead]
    assert (h[0]["dlq.reason"], h[0]["dlq.source.topic"], h[0]["dlq.source.partition"], h[0]["dlq.source.offset"]) == (
        "action_unknown_alert", "alert-actions", "1", "11")
    assert (h[1]["dlq.reason"], h[1]["dlq.source.topic"], h[1]["dlq.source.offset"]) == ("schema_invalid", STREAM, "1")
    assert (h[2]["dlq.source.topic"], h[2]["dlq.source.offset"]) == ("treatments", "5")
    assert dead[1].value == b"not json"  # the original bytes


def test_changelog_bytes_restore_the_same_state_and_a_replay_emits_nothing(engine, lifecycle):
    store = InMemoryPatientStore()
    p = processor(engine, lifecycle, store)
    s = Stream(partition=2)
    recs = [s.treatment(dose(patient="p3")), s.observation(obs("platelets", 320, -1, low=150, high=450, patient="p3")),
            s.observation(obs("platelets", 40, 5, low=150, high=450, patient="p3"))]
    out = p.process(recs, at(6))
    assert any(a["rule_id"] == "heme.platelets_decreased" for a in by_topic(out, "alerts"))
    changed = store.take_changed()
    assert [(pid, part) for pid, part, _ in changed] == [("p3", 2)]
    assert store.take_changed() == []  # marks cleared

    fresh = InMemoryPatientStore()
    for pid, part, value in changed:
        fresh.restore_record(part, pid.encode(), value)
    assert len(fresh) == 1 and fresh.partitions() == {2}
    state, book = fresh.load("p3", 2)
    orig_state, orig_book = store.load("p3", 2)
    assert state.to_dict() == orig_state.to_dict() and book.to_dict() == orig_book.to_dict()
    # the uncommitted batch is read again after a crash: nothing new to emit
    assert processor(engine, lifecycle, fresh).process(recs, at(6)) == []
    # an alert is found in a restored (still undecoded) patient
    alert_id = next(a["alert_id"] for a in by_topic(out, "alerts"))
    other = InMemoryPatientStore()
    other.restore_record(2, b"p3", changed[0][2])
    assert other.find_alert(alert_id).alert_id == alert_id
    assert other.find_alert("missing") is None


def _replay_after_restore(engine, lifecycle, recs, now):
    """``recs`` processed, the patient restored from its changelog value in a fresh store, then
    every record read again from each possible committed offset: the alert versions each replay
    emits."""
    store = InMemoryPatientStore()
    first = by_topic(processor(engine, lifecycle, store).process(recs, now), "alerts")
    values = store.take_changed()
    replays = []
    for start in range(len(recs)):
        fresh = InMemoryPatientStore()
        for pid, part, value in values:
            fresh.restore_record(part, pid.encode(), value)
        replays.append(by_topic(processor(engine, lifecycle, fresh).process(recs[start:], now), "alerts"))
    return first, replays


@pytest.mark.parametrize("fix", ["withdrawn", "corrected"])
def test_a_replay_after_a_crash_never_undoes_a_withdrawal_or_a_correction(engine, lifecycle, fix):
    """After a crash between a checkpoint and its commit, the records since the commit are read
    again on a state that already holds them. The engine drops a replayed result by its id, but
    a result's first version read again after its withdrawal (or correction under the same id)
    is taken in again: the grade-3 alert that the withdrawal of a normal result had reopened was
    resolved and reopened once more (a new page), the corrected value lowered and raised. The
    state now keeps the offset of the last record applied, and a record at or below it is
    skipped (``monitor_clinical_replayed_records_total``)."""
    from monitor.metrics import REGISTRY

    s = Stream(partition=1)
    grade3 = obs("alt", 250, 3, high=40, patient="p4", oid="alt-d3")
    if fix == "withdrawn":
        later = [obs("alt", 30, 5, high=40, patient="p4", oid="alt-d5"),
                 obs("alt", None, 5, patient="p4", oid="alt-d5", status="entered-in-error")]
    else:
        later = [obs("alt", 100, 5, high=40, patient="p4", oid="alt-d5"),
                 obs("alt", 300, 5, high=40, patient="p4", oid="alt-d5", status="corrected")]
    recs = [s.treatment(dose(patient="p4")), s.observation(grade3), *[s.observation(o) for o in later]]
    before = REGISTRY.get_sample_value("monitor_clinical_replayed_records_total", {"kind": "observation"}) or 0
    first, replays = _replay_after_restore(engine, lifecycle, recs, at(6))
    assert first, "the course raises alerts"
    assert replays == [[]] * len(recs)
    after = REGISTRY.get_sample_value("monitor_clinical_replayed_records_total", {"kind": "observation"})
    assert after == before + sum(1 for i in range(len(recs)) for r in recs[i:] if r.headers is None)


def test_a_value_without_an_offset_is_read_and_records_are_processed(engine, lifecycle):
    """A changelog value written before the offset was kept (no ``offset``) restores; nothing
    is skipped for it (the engine's own replay check applies), and the next value keeps one."""
    store = InMemoryPatientStore()
    p = processor(engine, lifecycle, store)
    s = Stream(partition=0)
    p.process([s.treatment(dose(patient="p6")), s.observation(obs("alt", 30, -1, high=40, patient="p6"))], at(2))
    (pid, part, value), = store.take_changed()
    assert json.loads(value)["offset"] == 1
    old = json.loads(value)
    del old["offset"]
    fresh = InMemoryPatientStore()
    fresh.restore_record(part, pid.encode(), json.dumps(old).encode())
    q = processor(engine, lifecycle, fresh)
    assert fresh.load(pid, part) and fresh.offset(pid) is None
    out = q.process([s.observation(obs("alt", 250, 1, high=40, patient="p6"))], at(2))
    assert [a["grade"] for a in by_topic(out, "alerts") if a["rule_id"] == "liver.alt_increased"] == [3]
    (_, _, value), = fresh.take_changed()
    assert json.loads(value)["offset"] == 2


def test_every_changelog_value_is_the_full_encoding_of_the_patient(engine, lifecycle):
    """The alert book's JSON is reused when a batch changed only the state (no finding): the
    value written must still be exactly the encoding of the state and book held, batch
    after batch (quiet results, a finding, an action, the clock), and after a rollback."""
    store = InMemoryPatientStore()
    p = processor(engine, lifecycle, store)
    s = Stream(partition=1)
    now = at(9)
    batches = [[s.treatment(dose(patient="p9"))],
               [s.observation(obs("alt", 30, -1, high=40, patient="p9"))],      # baseline: no finding
               [s.observation(obs("alt", 32, 1, high=40, patient="p9"))],       # quiet: state only
               [s.observation(obs("alt", 250, 3, high=40, patient="p9"))],      # a finding: book changes
               [s.observation(obs("platelets", 300, 4, low=150, high=450, patient="p9"))]]  # state only
    alert_id = None
    for recs in batches:
        out = p.process(recs, now)
        alert_id = alert_id or next((a["alert_id"] for a in by_topic(out, "alerts")), None)
        (pid, _part, value), = store.take_changed()
        state, book = store.load(pid, 1)
        assert value == encode(state, book, offset=store.offset(pid))  # the book encoded afresh
        assert decode(value)[1].to_dict() == book.to_dict()
    assert alert_id is not None
    p.process([s.action("p9", {"action": "acknowledge", "alert_id": alert_id, "by": "n1", "role": "nurse",
                               "at": now.isoformat(), "action_id": "a-9"})], now)
    p.process([s.observation(obs("alt", 240, 5, high=40, patient="p9"))], now)
    (_, _, value), = store.take_changed()
    state, book = store.load("p9", 1)
    assert value == encode(state, book, offset=store.offset("p9"))
    assert decode(value)[1].alerts[alert_id].status.value == "acknowledged"
    # rolled back to the durable bytes, then a quiet result: still the full encoding
    store.discard("p9")
    p.process([s.observation(obs("platelets", 310, 6, low=150, high=450, patient="p9"))], now)
    (_, _, value), = store.take_changed()
    assert value == encode(*store.load("p9", 1), offset=store.offset("p9"))


def test_a_changelog_written_by_the_faust_table_restores(engine, lifecycle):
    store = InMemoryPatientStore()
    p = processor(engine, lifecycle, store)
    p.process([Stream().treatment(dose(patient="p6"))], at(1))
    (_, _, value), = store.take_changed()
    d = json.loads(value)
    faust_value = json.dumps({"state": d["state"], "alerts": d["alerts"]}).encode()  # no "v"
    fresh = InMemoryPatientStore()
    fresh.restore_record(0, b'"p6"', faust_value)  # faust's JSON key serializer
    assert fresh.patient_ids([0]) == ["p6"] and fresh.load("p6", 0)[0].dose_id == "dose-p6"


def test_a_deleted_key_and_dropped_partitions_forget_patients():
    store = InMemoryPatientStore()
    store.restore_record(0, b"a", b'{"v":1}')
    store.restore_record(1, b"b", b'{"v":1}')
    store.restore_record(0, b"a", None)
    assert store.patient_ids([0, 1]) == ["b"]
    store.drop([1])
    assert len(store) == 0 and store.partitions() == set()


def test_clock_raises_overdue_only_for_owned_patients(engine, lifecycle):
    store = InMemoryPatientStore()
    p = processor(engine, lifecycle, store)
    for part, pid in ((0, "own"), (1, "other")):
        s = Stream(partition=part)
        p.process([s.treatment(dose(patient=pid)),
                   *[s.observation(obs(a, v, 0.5, high=h, patient=pid)) for a, v, h in
                     (("alt", 30, 40), ("ast", 40, 60), ("bilirubin_total", 0.4, 1.2))]], at(1))
    store.take_changed()
    out = p.tick(store.patient_ids([0]), at(30))
    overdue = [a for a in by_topic(out, "alerts") if a["rule_id"] == "schedule.overdue"]
    assert overdue and {a["patient_id"] for a in overdue} == {"own"}
    assert "own" in p.overdue and "other" not in p.overdue
    assert [pid for pid, _, _ in store.take_changed()] == ["own"]
    assert p.tick(store.patient_ids([0]), at(30)) == []  # same clock, nothing new


def test_one_patients_failing_clock_is_counted_and_the_others_are_judged(engine, lifecycle, monkeypatch):
    """A patient whose clock raises is logged and counted
    (``monitor_clinical_clock_failures_total{scope="patient"}``, rule MonitorClinicalClockFailing):
    its overdue samples go unjudged, silently otherwise; the other patients' are raised."""
    from monitor.metrics import REGISTRY

    store = InMemoryPatientStore()
    p = processor(engine, lifecycle, store)
    s = Stream()
    for pid in ("fine", "broken"):
        p.process([s.treatment(dose(patient=pid))], at(1))
    real = engine.check_schedule

    def check_schedule(state, now):
        if state.patient_id == "broken":
            raise RuntimeError("injected")
        return real(state, now)

    monkeypatch.setattr(engine, "check_schedule", check_schedule)
    before = REGISTRY.get_sample_value("monitor_clinical_clock_failures_total", {"scope": "patient"})
    out = p.tick(store.patient_ids([0]), at(30))
    assert {a["patient_id"] for a in by_topic(out, "alerts") if a["rule_id"] == "schedule.overdue"} == {"fine"}
    assert REGISTRY.get_sample_value("monitor_clinical_clock_failures_total", {"scope": "patient"}) == before + 1


def test_the_clock_waits_until_a_patients_inputs_settle(engine, lifecycle):
    t = [100.0]
    store = InMemoryPatientStore()
    p = processor(engine, lifecycle, store, clock_settle_seconds=2.0, monotonic=lambda: t[0])
    s = Stream()
    p.process([s.treatment(dose(patient="p5"))], at(30))  # a dose 30 days ago, its samples still coming
    assert p.tick(["p5"], at(30)) == []
    t[0] += 2.5
    assert any(json.loads(o.value)["rule_id"] == "schedule.overdue" for o in p.tick(["p5"], at(30))
               if o.topic == "alerts")


def test_an_internal_error_rolls_an_untouched_patient_back(engine, lifecycle, monkeypatch):
    store = InMemoryPatientStore()
    p = processor(engine, lifecycle, store)
    s = Stream()
    p.process([s.treatment(dose(patient="p4"))], at(1))
    durable = store.take_changed()[0][2]

    def boom(state, o, now):
        state.ward = "half-updated"
        raise RuntimeError("bug")

    monkeypatch.setattr(p.engine, "evaluate_observation", boom)
    out = p.process([s.observation(obs("alt", 30, 0.5, high=40, patient="p4"))], at(1))
    (dead,) = out
    assert dict(dead.headers)["dlq.reason"] == b"internal_error"
    state, _ = store.load("p4", 0)
    assert state.ward == decode(durable)[0].ward != "half-updated"
    assert store.take_changed() == []


def _critical_alert(p, s, patient, now):
    out = p.process([s.treatment(dose(patient=patient)),
                     s.observation(obs("alt", 30, -1, high=40, patient=patient)),
                     s.observation(obs("alt", 1000, 7, high=40, patient=patient))], now)
    (alert,) = [a for a in by_topic(out, "alerts") if a["rule_id"] == "liver.alt_increased"]
    assert alert["severity"] == "critical" and alert["status"] == "firing"
    return alert


def _reasons(out):
    return [dict(o.headers)["dlq.reason"].decode() for o in out if o.topic == "dead-letter"]


def test_an_actions_role_comes_from_the_directory_never_the_message(engine, lifecycle):
    """Security review H4: a forged ``admin`` from an unknown user or from a nurse cannot
    resolve a critical alert; a nurse's acknowledgement without any role field works."""
    from monitor.metrics import ACTIONS_REFUSED

    def refused(reason):
        return ACTIONS_REFUSED.labels(reason)._value.get()

    p = processor(engine, lifecycle)
    s = Stream()
    now = at(8)
    alert = _critical_alert(p, s, "p9", now)
    resolve = {"action": "resolve", "alert_id": alert["alert_id"], "role": "admin", "reason": "forged",
               "at": now.isoformat()}
    before = (refused("action_unknown_user"), refused("action_forbidden"))
    out = p.process([s.action("p9", {**resolve, "by": "mallory"}), s.action("p9", {**resolve, "by": "n1"})], now)
    assert by_topic(out, "alerts") == [] and _reasons(out) == ["action_unknown_user", "action_forbidden"]
    assert (refused("action_unknown_user"), refused("action_forbidden")) == (before[0] + 1, before[1] + 1)
    # the nurse acknowledges without a role field: applied, recorded with the directory's role
    out = p.process([s.action("p9", {"action": "acknowledge", "alert_id": alert["alert_id"], "by": "n1",
                                     "at": now.isoformat()})], now)
    (acked,) = by_topic(out, "alerts")
    assert acked["status"] == "acknowledged"
    assert acked["history"][-1]["by"] == "n1" and acked["history"][-1]["role"] == "nurse"
    # a physician from the directory may resolve it, whatever role the message claims
    out = p.process([s.action("p9", {**resolve, "by": "doc1", "role": "nurse", "reason": "reviewed"})], now)
    (resolved,) = by_topic(out, "alerts")
    assert resolved["status"] == "resolved" and resolved["history"][-1]["role"] == "physician"


def test_without_a_user_directory_every_action_is_refused(engine, lifecycle):
    p = processor(engine, lifecycle, authority=None)
    s = Stream()
    now = at(8)
    alert = _critical_alert(p, s, "p8", now)
    out = p.process([s.action("p8", {"action": "acknowledge", "alert_id": alert["alert_id"], "by": "n1",
                                     "role": "admin", "at": now.isoformat()})], now)
    assert by_topic(out, "alerts") == [] and _reasons(out) == ["action_unknown_user"]


def _dead_letter(out):
    (d,) = out
    assert d.topic == "dead-letter"
    return {k: v.decode() for k, v in d.headers}


def test_a_records_source_headers_are_believed_only_for_the_topics_ingest_routes_from(engine, lifecycle):
    """A routed record's dead letter points at its source topic, which ``monitor dlq replay``
    publishes to. A header naming another topic (a writer that is not ingest) is not believed,
    and source coordinates that are not numbers, or headers without values, never raise."""
    p = processor(engine, lifecycle)
    s = Stream(partition=4)
    now = at(8)
    forged = [("kind", b"treatment"), ("src.topic", b"alerts"), ("src.partition", b"0"), ("src.offset", b"9")]
    h = _dead_letter(p.process([s._rec("p3", b"{}", forged)], now))
    assert (h["dlq.source.topic"], h["dlq.source.partition"], h["dlq.source.offset"]) == (STREAM, "4", "0")
    garbled = [("kind", b"treatment"), ("src.topic", b"treatments"), ("src.partition", b"abc"), ("src.offset", b"\xff")]
    h = _dead_letter(p.process([s._rec("p3", b"{}", garbled)], now))
    assert (h["dlq.source.topic"], h["dlq.source.partition"], h["dlq.source.offset"]) == ("treatments", "", "")
    for headers in ([("kind", b"treatment"), ("src.topic", None)], [("kind", None)]):
        h = _dead_letter(p.process([s._rec("p3", b"{}", headers)], now))
        assert h["dlq.reason"] == "schema_invalid" and h["dlq.source.topic"] == STREAM
    # the topics a deployment names are the ones believed
    q = processor(engine, lifecycle, routed_from=("site-treatments",))
    routed = [("kind", b"treatment"), ("src.topic", b"site-treatments"), ("src.partition", b"1"), ("src.offset", b"2")]
    h = _dead_letter(q.process([s._rec("p3", b"{}", routed)], now))
    assert (h["dlq.source.topic"], h["dlq.source.offset"]) == ("site-treatments", "2")


def test_a_record_on_the_stream_with_a_patient_id_ingest_refuses_is_a_dead_letter(engine, lifecycle):
    """The patient stream may hold records ingest did not write: an empty patient id used to
    be judged, and its state written to the changelog under an empty key, which a restore
    skips (the state was lost at the next start)."""
    store = InMemoryPatientStore()
    p = processor(engine, lifecycle, store)
    s = Stream()
    now = at(8)
    for pid, reason in (("", "empty_id"), ("  ", "empty_id"), ("P\x00", "schema_invalid"),
                        ("P" * 129, "schema_invalid")):
        value = obs("alt", 250, 7, high=40, patient="p1").model_copy(update={"patient_id": pid}).model_dump_json()
        assert _dead_letter(p.process([s._rec("k", value.encode())], now))["dlq.reason"] == reason
        action = {"action": "acknowledge", "alert_id": "a1", "patient_id": pid, "by": "n1", "at": now.isoformat()}
        if pid.strip():
            assert _dead_letter(p.process([s.action("k", action)], now))["dlq.reason"] == reason
    assert len(store) == 0 and store.changed_count() == 0


def test_a_value_on_the_stream_its_quantity_cannot_take_is_a_dead_letter(engine, lifecycle):
    """Ingest's value bounds hold for records on the stream that ingest did not write: a
    platelet count of -40 used to be judged (grade 4, critical)."""
    store = InMemoryPatientStore()
    p = processor(engine, lifecycle, store)
    s = Stream()
    now = at(8)
    for analyte, value in (("platelets", -40.0), ("alt", -5.0)):
        bad = obs(analyte, 100, 7, patient="p1").model_copy(update={"value": value}).model_dump_json()
        h = _dead_letter(p.process([s._rec("p1", bad.encode())], now))
        assert h["dlq.reason"] == "implausible_value" and f"{analyte} {value:g}" in h["dlq.message"]
    assert len(store) == 0 and store.changed_count() == 0
    good = obs("platelets", 40, 7, patient="p1").model_dump_json()
    assert not any(o.topic == "dead-letter" for o in p.process([s._rec("p1", good.encode())], now))
    assert len(store) == 1


def test_an_action_for_a_patient_not_held_adds_no_patient(engine, lifecycle):
    """An action naming a patient the store does not hold is refused without creating that
    patient: before, an empty patient stayed in memory, counted as monitored and ticked."""
    store = InMemoryPatientStore()
    p = processor(engine, lifecycle, store)
    now = at(8)
    action = {"action": "acknowledge", "alert_id": "a1", "by": "n1", "at": now.isoformat(), "action_id": "x"}
    h = _dead_letter(p.process([Stream().action("nobody", action)], now))
    assert h["dlq.reason"] == "action_unknown_alert" and "no alert a1" in h["dlq.message"]
    assert len(store) == 0 and store.patient_ids(range(8)) == []
