"""Finding states over time: present / update / cleared / retracted, late results, replay."""
from __future__ import annotations

import json

from alerts.engine import Engine
from alerts.state import PatientState
from alerts.testkit import Sim, T0, dose, obs, steroid


def test_present_then_update_then_cleared():
    sim = Sim()
    sim.feed([dose()])
    f1 = sim.feed([obs("alt", 130, 7, high=40)])
    assert [(f.rule_id, f.state, f.grade) for f in f1] == [("liver.alt_increased", "present", 2)]
    f2 = sim.feed([obs("alt", 250, 10, high=40)])
    assert [(f.state, f.severity.value, f.grade) for f in f2 if f.rule_id == "liver.alt_increased"] == [
        ("present", "high", 3)]
    f3 = sim.feed([obs("alt", 30, 14, high=40)])
    (c,) = [f for f in f3 if f.rule_id == "liver.alt_increased"]
    assert c.state == "cleared" and c.severity.value == "high"  # severity of what cleared, never None
    assert c.finding_id != f2[0].finding_id


def test_same_grade_same_evidence_is_silent_and_new_evidence_is_emitted():
    sim = Sim()
    sim.feed([dose(), obs("alt", 130, 7, high=40, oid="a")])
    assert sim.feed([obs("alt", 130, 7, high=40, oid="a")]) == []  # replayed: no change
    again = sim.feed([obs("alt", 140, 8, high=40, oid="b")])
    assert [(f.state, f.grade, f.evidence[0].observation_id) for f in again] == [("present", 2, "b")]


def test_entered_in_error_retracts():
    sim = Sim()
    sim.feed([dose(), obs("alt", 30, 3, high=40, oid="a0"), obs("alt", 900, 7, high=40, oid="a1")])
    assert {"liver.alt_increased", "liver.acute_liver_failure_signature"} <= set(sim.present())
    out = sim.feed([obs("alt", None, 7, oid="a1", status="entered-in-error")])
    states = {f.rule_id: f.state for f in out}
    assert states == {"liver.alt_increased": "retracted", "liver.acute_liver_failure_signature": "retracted"}
    assert sim.present() == {}
    assert [e[2] for e in sim.state.hist["alt"]] == ["a0"]


def test_correction_to_normal_retracts_and_to_lower_grade_updates():
    sim = Sim()
    sim.feed([dose(), obs("alt", 250, 7, high=40, oid="a1")])
    out = sim.feed([obs("alt", 150, 7, high=40, oid="a1", status="corrected")])
    assert [(f.state, f.grade) for f in out if f.rule_id == "liver.alt_increased"] == [("present", 2)]
    out = sim.feed([obs("alt", 35, 7, high=40, oid="a2", status="amended", corrects="a1")])
    assert [f.state for f in out if f.rule_id == "liver.alt_increased"] == ["retracted"]
    assert [e[2] for e in sim.state.hist["alt"]] == ["a2"]


def test_correction_same_grade_updates_evidence_with_new_id():
    sim = Sim()
    sim.feed([dose()])
    (f1,) = sim.feed([obs("alt", 250, 7, high=40, oid="a1")])
    (f2,) = sim.feed([obs("alt", 260, 7, high=40, oid="a1", status="corrected")])
    assert (f2.state, f2.grade, f2.evidence[0].value) == ("present", 3, 260)
    assert f2.finding_id != f1.finding_id


def test_late_older_result_never_overrides_newer():
    sim = Sim()
    sim.feed([dose(), obs("alt", 250, 10, high=40)])
    # a normal result from day 8 arrives late: the day-10 grade 3 stays
    assert sim.feed([obs("alt", 30, 8, high=40)]) == []
    assert sim.present()["liver.alt_increased"].grade == 3


def test_late_older_critical_result_is_surfaced_not_hidden():
    # PS-14: a late ALT 900 from day 8 once a day-10 ALT of 30 exists used to raise nothing.
    # It is surfaced (grade 4, saying it arrived late), then the newer normal result
    # resolves the graded finding, as an in-order stream would have done
    sim2 = Sim()
    sim2.feed([dose(), obs("alt", 30, 10, high=40)])
    out = sim2.feed([obs("alt", 900, 8, high=40, oid="late900")])
    alt = [(f.state, f.grade) for f in out if f.rule_id == "liver.alt_increased"]
    assert alt == [("present", 4), ("cleared", 4)]
    first = next(f for f in out if f.rule_id == "liver.alt_increased")
    assert "arrived after newer results" in first.text.what
    assert [e.observation_id for e in first.evidence] == ["late900"]
    # the finding is not older than what the alert already reflects (the lifecycle keeps it)
    assert first.effective_at.timestamp() == sim2.state.hist["alt"][-1][0]
    # the acute-liver-failure signature pairs the window's peak: present, saying so
    alf = sim2.present()["liver.acute_liver_failure_signature"]
    assert "arrived late" in alf.text.what
    # the same results in the other order end with the same open findings
    ref = Sim()
    ref.feed([dose(), obs("alt", 900, 8, high=40, oid="late900"), obs("alt", 30, 10, high=40)])
    assert set(ref.present()) == set(sim2.present())


def test_dose_event_evaluates_what_was_held_and_sets_baselines():
    sim = Sim()
    sim.feed([obs("alt", 80, -2, high=40, oid="base"), obs("alt", 130, 1, high=40)])
    assert sim.findings == []  # no dose yet: stored only
    out = sim.feed([dose()])
    assert sim.state.base["alt"][2] == "base"
    # baseline abnormal: 130/80 = 1.6x baseline -> grade 1
    assert [(f.rule_id, f.grade) for f in out] == [("liver.alt_increased", 1)]
    assert out[0].evidence[0].basis == "baseline"


def test_steroid_phase_change_re_evaluates_phase_rules():
    sim = Sim()
    # phase is read at the result's event time: the taper event arrives after the day-31 ALT
    sim.feed([steroid("full", -1), dose(), obs("alt", 90, 31, high=40)])
    assert "liver.taper_gate_breach" not in sim.present()
    out = sim.feed([steroid("taper", 30)])
    assert [(f.rule_id, f.state) for f in out] == [("liver.taper_gate_breach", "present")]
    # full dose resumed from day 30.5: at the ALT's time the patient was no longer tapering
    out = sim.feed([steroid("full", 30.5)])
    assert [(f.rule_id, f.state) for f in out] == [("liver.taper_gate_breach", "cleared")]


EVENTS = [
    obs("alt", 30, -2, high=40, oid="b-alt"), obs("platelets", 300, -2, oid="b-plt"), dose(),
    obs("alt", 250, 7, high=40, oid="alt7"), obs("bilirubin_total", 3.0, 8, high=1.2, oid="bil8"),
    obs("platelets", 140, 7, oid="plt7"), obs("ldh", 800, 7, high=600, oid="ldh7"),
    obs("temperature", 39.5, 2, oid="t2"), obs("alt", 45, 20, high=40, oid="alt20"),
    obs("bilirubin_total", 0.5, 20, high=1.2, oid="bil20"),
]


def _run(events, engine=None):
    sim = Sim(engine or Engine())
    sim.feed(events, now=T0)
    return sim


def test_replay_gives_identical_findings_and_ids():
    a, b = _run(EVENTS), _run(EVENTS)
    dump = lambda s: [f.model_dump(mode="json") for f in s.findings]
    assert dump(a) == dump(b)
    assert len({f.finding_id for f in a.findings}) == len(a.findings)  # every transition has its own id
    # processing the whole input a second time on the same state changes nothing
    assert a.feed(EVENTS, now=T0) == []


def test_state_round_trips_through_json_mid_stream():
    engine = Engine()
    sim = Sim(engine)
    sim.feed(EVENTS[:6], now=T0)
    restored = PatientState.from_dict(json.loads(json.dumps(sim.state.to_dict())))
    assert restored == sim.state
    cont = Sim(engine)
    cont.state = restored
    cont.feed(EVENTS[6:], now=T0)
    ref = _run(EVENTS)
    assert [f.finding_id for f in sim.findings] + [f.finding_id for f in cont.findings] == [
        f.finding_id for f in ref.findings]


def test_finding_context_and_route():
    sim = _run(EVENTS)
    hys = next(f for f in sim.findings if f.rule_id == "liver.hys_law")
    assert hys.severity.value == "critical" and hys.route == "clinical-urgent"
    assert {e.observation_id for e in hys.evidence} == {"alt7", "bil8"}
    assert hys.protocol.version == "1.0.0" and hys.ward == "W1" and hys.care_team == "T1"
    assert hys.days_since_dose == 8.0
    tma = next(f for f in sim.findings if f.rule_id == "heme.tma_screen")
    assert {e.observation_id for e in tma.evidence} == {"plt7", "ldh7"}


def test_state_uses_short_analyte_keys_and_reads_older_birth_in_seconds():
    import json as _json

    from alerts.state import PatientState

    sim = _run(EVENTS)
    d = sim.state.to_dict()
    assert "alt" not in d["h"] and "A" in d["h"]  # short stable codes
    assert isinstance(d["b"], int) and d["b"] < 100000  # birth in days since the epoch
    back = PatientState.from_dict(_json.loads(_json.dumps(d)))
    assert back == sim.state and back.birth == sim.state.birth and set(back.hist) == set(sim.state.hist)
    # a state written before the change (birth in seconds, long analyte keys) still loads
    old = dict(d, b=sim.state.birth, h={"alt": d["h"]["A"]})
    old.pop("bl", None)
    old.pop("r", None)
    legacy = PatientState.from_dict(old)
    assert legacy.birth == sim.state.birth and legacy.hist["alt"][-1][2] == sim.state.hist["alt"][-1][2]


def test_sustained_fever_run_survives_a_changelog_round_trip():
    import json as _json

    from alerts.state import PatientState

    sim = Sim()
    sim.feed([dose(), obs("temperature", 40.3, 1, oid="t1"), obs("temperature", 40.5, 1.5, oid="t2")])
    assert sim.state.runs["temperature"][2] == "t1"
    restored = Sim()
    restored.state = PatientState.from_dict(_json.loads(_json.dumps(sim.state.to_dict())))
    restored.feed([obs("temperature", 40.2, 2.1, oid="t3")])
    assert restored.present()["vitals.fever"].grade == 4


def test_episode_results_and_first_result_time_round_trip_through_the_state_dict():
    import json as _json

    from alerts.state import PatientState

    # no dose yet: the first result's time (no-dose-record grace) survives a restart
    sim = Sim()
    sim.feed([obs("alt", 30, 1.5, high=40, oid="n1"), obs("alt", 35, 1.0, high=40, oid="n0")])
    d = sim.state.to_dict()
    back = PatientState.from_dict(_json.loads(_json.dumps(d)))
    assert back == sim.state and back.first == sim.state.first == sim.state.hist["alt"][0][0]
    # episode results (an ALT peak, a bilirubin rise) survive it too, and the restored
    # state goes on to the same findings
    sim = Sim()
    sim.feed([dose(), obs("alt", 400, 20, high=40, oid="a20"), obs("alt", 100, 24, high=40, oid="a24"),
              obs("alt", 90, 26, high=40, oid="a26"), obs("alt", 80, 27, high=40, oid="a27")])
    assert [e[2] for e in sim.state.ev["alt"]] == ["a20"]  # the 10x peak, no longer in the history
    assert "a20" not in [e[2] for e in sim.state.hist["alt"]]
    d = sim.state.to_dict()
    assert "ev" in d
    restored = Sim()
    restored.state = PatientState.from_dict(_json.loads(_json.dumps(d)))
    assert restored.state == sim.state
    later = [obs("bilirubin_total", 3.0, 28, high=1.2, oid="b28")]
    assert [f.finding_id for f in restored.feed(later)] == [f.finding_id for f in sim.feed(later)]
    assert "liver.hys_law" in restored.present()
    # a state written before episode results existed (no "ev", no "f") still loads
    old = {k: v for k, v in d.items() if k not in ("ev", "f")}
    legacy = PatientState.from_dict(old)
    assert legacy.ev == {} and legacy.first is None and legacy.hist == PatientState.from_dict(d).hist
