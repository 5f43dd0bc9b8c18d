"""Table-driven clinical scenarios: one (or more) per rule id, on the pure engine.

Each scenario: events (IV product, infant 6 months old, dose at day 0 unless stated),
then the expected final state of one rule: severity and grade if present, or absent.
"""
from __future__ import annotations

import pytest

from alerts.testkit import ADULT_BIRTH, Sim, dose, obs, steroid

IT = "onasemnogene-abeparvovec-it"


def D(**kw):
    return dose(**kw)


# (name, events, rule_id, expected (severity, grade) or None for absent)
SCENARIOS = [
    # --- liver: CTCAE grading against the result's own ULN
    ("alt grade 2", [D(), obs("alt", 130, 7, high=40)], "liver.alt_increased", ("warning", 2)),
    ("alt grade 4", [D(), obs("alt", 900, 7, high=40)], "liver.alt_increased", ("critical", 4)),
    ("alt normal", [D(), obs("alt", 35, 7, high=40)], "liver.alt_increased", None),
    # no range on the result: the protocol's default ULN (40, unconfirmed placeholder)
    ("alt default ULN", [D(), obs("alt", 130, 7)], "liver.alt_increased", ("warning", 2)),
    # baseline abnormal (80 > ULN 40): graded on x baseline -> 130/80 = 1.6 -> grade 1, not 2
    ("alt abnormal baseline", [obs("alt", 80, -2, high=40), D(), obs("alt", 130, 7, high=40)],
     "liver.alt_increased", ("info", 1)),
    ("alt abnormal baseline below 1.5x", [obs("alt", 80, -2, high=40), D(), obs("alt", 110, 7, high=40)],
     "liver.alt_increased", None),
    ("ast grade 3", [D(), obs("ast", 900, 10, high=60)], "liver.ast_increased", ("high", 3)),
    ("bilirubin grade 2", [D(), obs("bilirubin_total", 2.0, 10, high=1.2)], "liver.bilirubin_increased", ("warning", 2)),
    ("bilirubin in umol/L grade 3", [D(), obs("bilirubin_total", 70, 10, unit="umol/L", high=20.5)],
     "liver.bilirubin_increased", ("high", 3)),
    ("alp grade 2", [D(), obs("alp", 1300, 10, high=500)], "liver.alp_increased", ("warning", 2)),
    ("ggt abnormal baseline grade 1", [obs("ggt", 80, -1, high=60), D(), obs("ggt", 170, 10, high=60)],
     "liver.ggt_increased", ("info", 1)),
    # --- Hy's law: ALT >= 3x ULN and bilirubin > 2x ULN within 14 days, ALP < 2x ULN
    ("hys law", [D(), obs("alt", 200, 20, high=40), obs("bilirubin_total", 3.0, 22, high=1.2),
                 obs("alp", 300, 22, high=500)], "liver.hys_law", ("critical", None)),
    ("hys law via AST", [D(), obs("ast", 190, 20, high=60), obs("bilirubin_total", 2.6, 20, high=1.2)],
     "liver.hys_law", ("critical", None)),
    ("hys law excluded by ALP >= 2x", [D(), obs("alt", 200, 20, high=40), obs("bilirubin_total", 3.0, 22, high=1.2),
                                       obs("alp", 1100, 22, high=500)], "liver.hys_law", None),
    ("hys law bilirubin only 2x", [D(), obs("alt", 200, 20, high=40), obs("bilirubin_total", 2.4, 22, high=1.2)],
     "liver.hys_law", None),
    ("hys law outside 14 days", [D(), obs("alt", 200, 10, high=40), obs("bilirubin_total", 3.0, 30, high=1.2)],
     "liver.hys_law", None),
    # --- acute liver failure signature
    ("alf alt > 20x", [D(), obs("alt", 900, 40, high=40)], "liver.acute_liver_failure_signature", ("critical", None)),
    ("alf inr with transaminase rise", [D(), obs("ast", 200, 40, high=60), obs("inr", 1.6, 41)],
     "liver.acute_liver_failure_signature", ("critical", None)),
    ("alf inr without transaminase rise", [D(), obs("ast", 70, 40, high=60), obs("inr", 1.6, 41)],
     "liver.acute_liver_failure_signature", None),
    # --- steroid taper gate (rule active only in a steroid phase)
    ("taper gate during taper", [steroid("full", -1), D(), steroid("taper", 30), obs("alt", 85, 35, high=40)],
     "liver.taper_gate_breach", ("warning", None)),
    ("taper gate not during full dose", [steroid("full", -1), D(), obs("alt", 85, 20, high=40)],
     "liver.taper_gate_breach", None),
    # --- haematology
    ("platelets grade 2", [D(), obs("platelets", 60, 7, low=150, high=450)], "heme.platelets_decreased", ("warning", 2)),
    ("platelets grade 4", [D(), obs("platelets", 20, 7)], "heme.platelets_decreased", ("critical", 4)),
    ("platelets grade 1 by LLN", [D(), obs("platelets", 140, 7, low=150)], "heme.platelets_decreased", ("info", 1)),
    ("platelets falling fast in week 1", [D(), obs("platelets", 320, 3), obs("platelets", 220, 7)],
     "heme.platelets_falling", ("warning", None)),
    ("platelets falling outside window", [D(), obs("platelets", 320, 40), obs("platelets", 220, 44)],
     "heme.platelets_falling", None),
    ("anaemia grade 2", [D(), obs("hemoglobin", 9.0, 7, unit="g/dL", low=10.5)], "heme.anemia", ("warning", 2)),
    ("tma platelets < 150 and LDH > ULN", [D(), obs("platelets", 140, 7), obs("ldh", 900, 7, high=600)],
     "heme.tma_screen", ("critical", None)),
    ("tma fall >= 25% and creatinine 1.5x baseline",
     [obs("platelets", 400, -1), obs("creatinine", 0.2, -1, high=0.4), D(),
      obs("platelets", 290, 6), obs("creatinine", 0.32, 7, high=0.4)], "heme.tma_screen", ("critical", None)),
    ("tma hypertension for age", [D(), obs("platelets", 120, 7), obs("systolic_bp", 118, 7)],
     "heme.tma_screen", ("critical", None)),
    ("tma platelets alone", [D(), obs("platelets", 120, 7), obs("ldh", 400, 7, high=600)], "heme.tma_screen", None),
    ("tma signs 20 days apart", [D(), obs("ldh", 900, 1, high=600), obs("platelets", 120, 21)], "heme.tma_screen", None),
    # --- renal: worse of x ULN and x baseline
    ("creatinine 1.75x baseline within ULN", [obs("creatinine", 0.2, -1, high=0.4), D(),
                                              obs("creatinine", 0.35, 7, high=0.4)],
     "renal.creatinine_increased", ("warning", 2)),
    ("creatinine umol/L grade 3", [D(), obs("creatinine", 120, 7, unit="umol/L", high=35)],
     "renal.creatinine_increased", ("high", 3)),
    ("inr grade 2", [D(), obs("inr", 1.8, 14)], "coag.inr_increased", ("warning", 2)),
    # --- cardiac
    ("troponin above ULN", [D(), obs("troponin_i", 60, 7, high=40)], "cardiac.troponin_i_increased", ("warning", None)),
    ("troponin above trial max (ng/mL)", [D(), obs("troponin_i", 0.2, 7, unit="ng/mL", high=0.04)],
     "cardiac.troponin_i_increased", ("high", None)),
    ("troponin normal", [D(), obs("troponin_i", 12, 7, high=40)], "cardiac.troponin_i_increased", None),
    # --- vitals
    ("fever grade 1", [D(), obs("temperature", 38.4, 2)], "vitals.fever", ("info", 1)),
    ("fever grade 2 in F", [D(), obs("temperature", 103.0, 2, unit="[degF]")], "vitals.fever", ("warning", 2)),
    ("fever grade 3", [D(), obs("temperature", 40.3, 2)], "vitals.fever", ("high", 3)),
    ("no fever", [D(), obs("temperature", 37.8, 2)], "vitals.fever", None),
    # PEWS, infant 6 months: HR 185 -> 4, RR 75 -> 2, O2 2 L/min -> 2 => 8 (cut-off 8 -> high)
    ("pews 8", [D(), obs("heart_rate", 185, 2), obs("respiratory_rate", 75, 2), obs("systolic_bp", 90, 2),
                obs("o2_flow", 2, 2)], "vitals.early_warning", ("high", None)),
    ("pews normal infant", [D(), obs("heart_rate", 130, 2), obs("respiratory_rate", 35, 2), obs("systolic_bp", 90, 2)],
     "vitals.early_warning", None),
    ("pews stale vitals do not add up", [D(), obs("heart_rate", 185, 1), obs("respiratory_rate", 75, 2),
                                         obs("o2_flow", 2, 2)], "vitals.early_warning", ("info", None)),
    # NEWS2, adult (IT product): RR 26 -> 3, SpO2 90 -> 3, HR 120 -> 2 => 8 -> critical
    ("news2 adult 8", [D(product=IT, birth=ADULT_BIRTH), obs("respiratory_rate", 26, 2), obs("spo2", 90, 2),
                       obs("heart_rate", 120, 2)], "vitals.early_warning", ("critical", None)),
    ("news2 single parameter 3", [D(product=IT, birth=ADULT_BIRTH), obs("respiratory_rate", 26, 2)],
     "vitals.early_warning", ("warning", None)),
    ("news2 on oxygen", [D(product=IT, birth=ADULT_BIRTH), obs("spo2", 95, 2, on_oxygen=True),
                         obs("heart_rate", 95, 2)], "vitals.early_warning", ("info", None)),
    # the same adult vitals under PEWS rules would differ: age picks the system
    ("news2 normal adult", [D(product=IT, birth=ADULT_BIRTH), obs("respiratory_rate", 16, 2), obs("spo2", 98, 2),
                            obs("heart_rate", 72, 2), obs("systolic_bp", 120, 2), obs("temperature", 36.8, 2)],
     "vitals.early_warning", None),
    # --- no dose yet: stored, not evaluated
    ("no dose, no findings", [obs("alt", 900, -3, high=40)], "liver.alt_increased", None),
]


@pytest.mark.parametrize("name,events,rule_id,expected", SCENARIOS, ids=[s[0] for s in SCENARIOS])
def test_scenario(name, events, rule_id, expected):
    sim = Sim()
    sim.feed(events)
    got = sim.present().get(rule_id)
    if expected is None:
        assert got is None, f"{rule_id} unexpectedly present: {got and got.text.what}"
        return
    assert got is not None, f"{rule_id} not present; findings: {[(f.rule_id, f.state) for f in sim.findings]}"
    sev, grade = expected
    assert got.severity.value == sev
    assert got.grade == grade
    assert got.evidence and all(e.observation_id or e.analyte == "oxygen" for e in got.evidence)
    assert got.protocol.id.startswith("onasemnogene-abeparvovec-")
    assert got.route and got.text and got.text.action
    assert got.days_since_dose is not None and got.ward == "W1"


def test_every_stable_rule_id_has_a_scenario():
    from alerts.protocol import STABLE_RULE_IDS

    covered = {s[2] for s in SCENARIOS if s[3] is not None} | {"schedule.overdue", "monitoring.complete"}
    assert set(STABLE_RULE_IDS) <= covered  # overdue/complete: test_engine_schedule.py


def test_evidence_carries_limits_and_multiples():
    sim = Sim()
    sim.feed([D(), obs("alt", 250, 7, high=40, oid="lab-1")])
    f = sim.present()["liver.alt_increased"]
    (ev,) = f.evidence
    assert (ev.observation_id, ev.value, ev.unit, ev.basis, ev.multiple) == ("lab-1", 250, "U/L", "uln", 6.25)
    assert ev.limit == 200 and ev.comparison == ">"
    assert f.days_since_dose == 7 and f.effective_at.day == 10


NORMAL_IV = [
    obs("alt", 30, -2, high=40), obs("ast", 45, -2, high=60), obs("platelets", 320, -2, low=150, high=450),
    obs("hemoglobin", 115, -2, low=95), obs("creatinine", 0.22, -2, low=0.1, high=0.4),
    obs("troponin_i", 10, -2, high=40), obs("bilirubin_total", 0.4, -2, high=1.2),
    steroid("full", -1), D(),
    # typical course: transient transaminase rise < 3x ULN, platelet dip staying >= 150, low-grade temp
    obs("temperature", 37.9, 1), obs("heart_rate", 140, 1), obs("respiratory_rate", 40, 1), obs("systolic_bp", 92, 1),
    obs("alt", 70, 7, high=40), obs("ast", 90, 7, high=60), obs("platelets", 170, 7, low=150, high=450),
    obs("hemoglobin", 112, 7, low=95), obs("creatinine", 0.24, 7, low=0.1, high=0.4),
    obs("troponin_i", 14, 7, high=40), obs("bilirubin_total", 0.5, 7, high=1.2), obs("ldh", 450, 7, high=600),
    obs("alt", 95, 14, high=40), obs("ast", 110, 14, high=60), obs("platelets", 260, 14, low=150, high=450),
    steroid("taper", 45),
    obs("alt", 60, 42, high=40), obs("ast", 70, 42, high=60), obs("platelets", 300, 42, low=150, high=450),
    steroid("stopped", 73),
    obs("alt", 32, 84, high=40), obs("ast", 50, 84, high=60), obs("platelets", 310, 84, low=150, high=450),
]


def test_normal_post_dose_trajectory_raises_nothing_above_info():
    sim = Sim()
    sim.feed(NORMAL_IV)
    above = [(f.rule_id, f.severity.value) for f in sim.findings if f.state == "present" and f.severity.rank > 0]
    assert above == []
    assert sim.present() == {}  # every info finding has cleared by day 84


def test_normal_trajectory_it_adult_raises_nothing_above_info():
    sim = Sim()
    sim.feed([
        obs("alt", 25, -2, high=40), obs("platelets", 250, -2, low=150, high=400),
        D(product=IT, birth=ADULT_BIRTH),
        obs("heart_rate", 80, 1), obs("respiratory_rate", 16, 1), obs("spo2", 97, 1), obs("systolic_bp", 118, 1),
        obs("temperature", 37.4, 1), obs("alt", 55, 7, high=40), obs("platelets", 210, 7, low=150, high=400),
    ])
    assert [f for f in sim.findings if f.severity.rank > 0] == []
