"""The observation ``build_observation`` makes without running the model's validator is the
one the validator makes (fields, fields set, JSON), and every value the shortcut does not
cover still goes through the validator with its error (schemas/canonical.py, ``_made``)."""
from __future__ import annotations

import json
from datetime import datetime, timedelta, timezone, tzinfo
from zoneinfo import ZoneInfo

import pytest

import schemas.canonical as si
from monitor.ingest import _OBS_JSON
from schemas.analytes import catalogue
from schemas.errors import Reason, Rejected
from schemas.events import Observation, ReferenceRange, ResultStatus
from schemas.ingest import build_observation, decode

NOW = datetime(2026, 11, 1, 12, 0, tzinfo=timezone.utc)
HL7 = ("MSH|^~\\&|LAB|HOSP|MON|HOSP|20261030080000+0100||ORU^R01|C1|P|2.5\rPID|1||MRN-1\r"
       "OBR|1|||24325-3^Hepatic panel^LN|||20261030080000+0100\r"
       "OBX|1|NM|1742-6^ALT^LN||50|U/L^^UCUM|0-40|H|||F|||20261030080000+0100\r")


def _kw(**over):
    kw = dict(observation_id="o1", event_id="o1", patient_id="p1", loinc="1742-6", value=50.0, unit="U/L",
              reference_range=ReferenceRange(low=0.0, high=40.0), effective_at=NOW - timedelta(hours=1),
              status=ResultStatus.FINAL, corrects=None, source="lab", fmt="json", received_at=NOW,
              abnormal_flag="H", comparator=None)
    kw.update(over)
    return kw


def _same_as_validated(obs: Observation) -> None:
    again = Observation(**obs.__dict__)
    assert again == obs
    assert list(again.__dict__.items()) == list(obs.__dict__.items())
    assert again.__pydantic_fields_set__ == obs.__pydantic_fields_set__
    assert type(obs.__pydantic_fields_set__) is set
    assert (again.__pydantic_extra__, again.__pydantic_private__) == (obs.__pydantic_extra__, obs.__pydantic_private__)
    assert _OBS_JSON(again) == _OBS_JSON(obs)
    assert Observation.model_validate_json(_OBS_JSON(obs)) == obs
    if obs.reference_range is not None:
        rr = obs.reference_range
        assert ReferenceRange(low=rr.low, high=rr.high).__pydantic_fields_set__ == rr.__pydantic_fields_set__


def test_the_validator_keeps_values_of_the_field_types_as_they_are():
    """The premise of the shortcut: pydantic returns such values unchanged (same objects)."""
    d = dict(_kw(fmt=None, value=None, reference_range=ReferenceRange(low=1.0, high=None)))
    values = {"observation_id": "o" * 3, "event_id": "e", "patient_id": "p\u00e9", "analyte": "alt",
              "loinc": "1742-6", "kind": "lab", "value": 1.5, "comparator": "<", "unit": "U/L",
              "reference_range": d["reference_range"], "original_value": 2.5, "original_unit": "\u00b5mol/L",
              "effective_at": datetime(2026, 1, 1, tzinfo=ZoneInfo("Europe/Paris")), "status": ResultStatus.AMENDED,
              "corrects": "x", "source": "s", "format": "hl7", "abnormal_flag": "H", "on_oxygen": True,
              "received_at": Observation.model_validate_json(_OBS_JSON(build_observation(**_kw()))).effective_at}
    obs = Observation(**values)
    for k, v in values.items():
        assert getattr(obs, k) == v
        if k not in ("kind", "format", "comparator"):  # literals: an equal str
            assert getattr(obs, k) is v, k
    assert obs.__pydantic_fields_set__ == set(values)
    assert tuple(Observation.model_fields) == si._OBS_ORDER
    assert si._FAST_MODELS


@pytest.mark.parametrize("over", [
    {}, {"reference_range": None}, {"reference_range": ReferenceRange(low=None, high=3.0)},
    {"unit": "  U/L "}, {"value": 0, "comparator": "<"}, {"value": -0.0}, {"fmt": "hl7", "abnormal_flag": None},
    {"effective_at": datetime(2026, 10, 1, 8, tzinfo=ZoneInfo("America/New_York"))},
    {"effective_at": datetime(2026, 10, 1, 8, tzinfo=timezone(timedelta(hours=5, minutes=30)))},
    {"value": None, "status": ResultStatus.ENTERED_IN_ERROR, "comparator": ">"},
    {"loinc": "8867-4", "unit": "/min", "value": 120, "reference_range": None, "fmt": "fhir"},
    {"patient_id": "P-\u00e9\u60a3", "corrects": "c1", "source": "x" * 128},
])
def test_made_observation_equals_the_validated_one(over):
    _same_as_validated(build_observation(**_kw(**over)))


def test_json_hl7_and_fhir_observations_equal_their_validated_copy():
    lab = json.dumps({"event_id": "e1", "patient_id": "p1", "loinc": "1742-6", "value": 50, "unit": "U/L",
                      "reference_range": {"low": 0, "high": 40}, "effective_at": "2026-10-30T08:00:00+01:00",
                      "status": "final", "source": "lab"}).encode()
    fhir = json.dumps({"resourceType": "Observation", "id": "f1", "status": "final",
                       "code": {"coding": [{"system": "http://loinc.org", "code": "1742-6"}]},
                       "subject": {"reference": "Patient/p1"}, "effectiveDateTime": "2026-10-30T08:00:00+01:00",
                       "valueQuantity": {"value": 50, "unit": "U/L", "system": "http://unitsofmeasure.org",
                                         "code": "U/L"}}).encode()
    got = [o for raw in (lab, HL7.encode(), fhir) for o in decode("lab-results", raw, received_at=NOW)]
    assert [o.format for o in got] == ["json", "hl7", "fhir"]
    for o in got:
        _same_as_validated(o)


class _Odd(tzinfo):
    def utcoffset(self, dt):
        return timedelta(hours=1)


@pytest.mark.parametrize("over", [
    {"status": "final"},                       # a str: the validator makes it a ResultStatus
    {"effective_at": datetime(2026, 10, 1, tzinfo=_Odd())},  # a tzinfo class not known to be aware
    {"source": type("S", (str,), {})("lab")},  # a str subclass: the validator makes it a str
    {"on_oxygen": 1},
])
def test_other_values_go_through_the_validator(over, monkeypatch):
    calls = []
    real = Observation.__init__
    monkeypatch.setattr(Observation, "__init__", lambda self, **kw: calls.append(1) or real(self, **kw))
    obs = build_observation(**_kw(**over))
    assert calls == [1]
    assert obs.status is ResultStatus.FINAL and type(obs.source) is str


def test_a_conversion_that_overflows_is_refused_as_non_finite():
    # a finite value whose conversion is infinite: refused with non_finite_value (the model's
    # validator refused it as schema_invalid before the fast path; now it never gets there)
    cat = catalogue()
    analyte, unit, conv = next((a, u, c) for a in cat.by_key.values() for u, c in a.units.items()
                               if c.factor > 1 and u.strip() == u and u)
    big = 1.7e308 / conv.factor * 2
    kw = _kw(loinc=analyte.loinc[0], unit=unit, value=big, reference_range=None)
    with pytest.raises(Rejected) as ei:
        build_observation(**kw)
    assert ei.value.reason == Reason.NON_FINITE_VALUE and ei.value.message.startswith("value ")
    kw["value"], kw["reference_range"] = 1.0, ReferenceRange(low=0.0, high=big)
    with pytest.raises(Rejected) as ei:
        build_observation(**kw)
    assert ei.value.reason == Reason.NON_FINITE_VALUE and ei.value.message.startswith("reference range high ")


def test_conversion_cache_is_bounded_and_refuses_as_before(monkeypatch):
    cat = catalogue()
    alt = cat.analyte_for_loinc("1742-6")
    monkeypatch.setattr(cat, "_conversions", {})
    monkeypatch.setattr(type(cat), "MAX_CACHED_CONVERSIONS", 3)
    for u in ("U/L", " U/L", "U/L ", "  U/L", None if "" in alt.units else "U/L"):
        assert cat.conversion(alt, u) is alt.units["U/L"]
    assert len(cat._conversions) == 3
    for _ in range(2):
        with pytest.raises(Rejected) as ei:
            cat.conversion(alt, "mg/dL")
        assert ei.value.reason is Reason.UNIT_NOT_CONVERTIBLE
        assert ei.value.message == "unit 'mg/dL' cannot be converted to 'U/L' for alt"
    with pytest.raises(AttributeError):  # not a str: as before (the worker dead-letters it)
        cat.conversion(alt, 7)


def test_round_sig_cached_gives_round_sig_results(monkeypatch):
    import math

    import schemas.analytes as an

    monkeypatch.setattr(an, "_ROUNDED", {})
    monkeypatch.setattr(an, "MAX_ROUNDED", 4)
    values = [0.1 + 0.2, 0.1 + 0.2, -0.0, 0.0, 5, 1234.56789012345, -7.25e-12, math.inf, -math.inf, 1e300, 3.3]
    for v in values * 2:
        got, want = an.round_sig_cached(v), an.round_sig(v)
        assert type(got) is type(want) and repr(got) == repr(want), v
    assert repr(an.round_sig_cached(-0.0)) == "-0.0"  # 0.0 is never a key
    assert math.isnan(an.round_sig_cached(math.nan))
    assert len(an._ROUNDED) <= 4 and all(k != 0 and math.isfinite(k) for k in an._ROUNDED)
    for _ in range(2):  # rounding past the largest double is infinite (ingest refuses it), never cached
        assert an.round_sig_cached(1.7976931348623157e308) == math.inf == an.round_sig(1.7976931348623157e308)
        assert an.round_sig_cached(-1.7976931348623157e308) == -math.inf
    assert 1.7976931348623157e308 not in an._ROUNDED
