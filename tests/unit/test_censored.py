"""Censored results: used at their bound only where that is safe (alerts.censored, Engine)."""
from __future__ import annotations

import pytest

from alerts.engine import Engine
from alerts.testkit import Sim, at, dose
from schemas.analytes import catalogue
from schemas.events import ReferenceRange, ResultStatus
from schemas.ingest import build_observation

ENGINE = Engine()


def cens(analyte, value, comparator, day, *, low=None, high=None, oid=None):
    a = catalogue().by_key[analyte]
    oid = oid or f"{analyte}-{day}-{comparator}{value}"
    return build_observation(
        observation_id=oid, event_id=oid, patient_id="p1", loinc=a.loinc[0], value=value, unit=a.canonical_unit,
        reference_range=ReferenceRange(low=low, high=high) if (low or high) else None, effective_at=at(day),
        status=ResultStatus.FINAL, corrects=None, source="t", fmt="json", received_at=at(day), comparator=comparator)


def run(*obs):
    s = Sim(ENGINE)
    s.feed([dose()])
    s.feed(list(obs))
    return s


@pytest.mark.parametrize("analyte, value, comparator, kw, rule, severity", [
    ("alt", 3000, ">", {"high": 40}, "liver.alt_increased", "critical"),          # 75x ULN: at least grade 4
    ("troponin_i", 50000, ">", {"high": 40}, "cardiac.troponin_i_increased", "high"),
    ("platelets", 10, "<", {"low": 150}, "heme.platelets_decreased", "critical"),  # < 25: grade 4
    ("platelets", 10, "<=", {"low": 150}, "heme.platelets_decreased", "critical"),
])
def test_a_bound_in_the_rules_direction_grades_at_least_as_the_bound(analyte, value, comparator, kw, rule, severity):
    s = run(cens(analyte, value, comparator, 5, **kw))
    present = s.present()
    assert present[rule].severity.value == severity
    assert f"reported as {comparator}{value}" in present[rule].text.what
    assert not any(k.startswith("data_quality") for k in present)


@pytest.mark.parametrize("analyte, value, comparator, kw", [
    ("troponin_i", 10, "<", {"high": 40}),    # below ULN whatever it is
    ("alt", 20, "<", {"high": 40}),
    ("platelets", 500, ">", {"low": 150}),    # above LLN whatever it is
])
def test_a_bound_that_decides_every_rule_raises_nothing(analyte, value, comparator, kw):
    assert run(cens(analyte, value, comparator, 5, **kw)).present() == {}


@pytest.mark.parametrize("analyte, value, comparator, kw, blocked", [
    ("alt", 500, "<", {"high": 40}, "liver.alt_increased"),        # could be 30 or 450
    ("platelets", 20, ">", {"low": 150}, "heme.platelets_decreased"),  # could be 21 or 300
    ("creatinine", 2.0, "<", {"high": 0.4}, "renal.creatinine_increased"),
])
def test_a_bound_that_cannot_be_graded_is_an_explicit_finding_and_not_used(analyte, value, comparator, kw, blocked):
    s = run(cens(analyte, value, comparator, 5, **kw))
    present = s.present()
    assert set(present) == {f"data_quality.censored_value|{analyte}"}
    f = present[f"data_quality.censored_value|{analyte}"]
    assert f.severity.value == "warning" and f.route == "ward-nurse"
    assert blocked in f.text.what and f"{comparator}{value:g}" in f.text.what
    assert analyte not in s.state.hist  # the bound never stands for the value


def test_the_finding_clears_on_a_newer_measured_value_and_is_retracted_on_withdrawal():
    s = run(cens("alt", 500, "<", 5, high=40, oid="a5"))
    out = s.feed([cens("alt", 50, None, 4, high=40)])  # older: does not settle it
    assert not any(f.rule_id.startswith("data_quality") for f in out)
    out = s.feed([cens("alt", 50, None, 6, high=40)])
    assert [(f.rule_id, f.state) for f in out if f.rule_id.startswith("data_quality")] == [
        ("data_quality.censored_value", "cleared")]
    s2 = run(cens("alt", 500, "<", 5, high=40, oid="a5"))
    a = catalogue().by_key["alt"]
    withdraw = build_observation(observation_id="a5", event_id="a5", patient_id="p1", loinc=a.loinc[0], value=None,
                                 unit=None, reference_range=None, effective_at=at(5), status=ResultStatus.ENTERED_IN_ERROR,
                                 corrects=None, source="t", fmt="json", received_at=at(6))
    out = s2.feed([withdraw])
    assert [(f.rule_id, f.state) for f in out] == [("data_quality.censored_value", "retracted")]


def test_before_the_dose_event_an_ungradable_bound_is_still_reported():
    s = Sim(ENGINE)
    out = s.feed([cens("alt", 500, "<", 1, high=40)])
    assert [(f.rule_id, f.state) for f in out] == [("data_quality.censored_value", "present")]
