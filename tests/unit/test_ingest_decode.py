"""Pure ingest: decoding, validation reasons, panel fan-out, corrections."""
from __future__ import annotations

import json
from datetime import datetime, timezone

import pytest

from schemas.errors import Reason, Rejected
from schemas.events import DoseEvent, ResultStatus, SteroidEvent
from schemas.ingest import decode

NOW = datetime(2026, 11, 1, 12, 0, tzinfo=timezone.utc)
T = "2026-10-30T08:00:00+01:00"


def lab(**kw):
    base = {"event_id": "e1", "patient_id": "p1", "loinc": "1742-6", "value": 50, "unit": "U/L",
            "reference_range": {"low": 0, "high": 40}, "effective_at": T, "status": "final", "source": "lab"}
    base.update(kw)
    return json.dumps(base).encode()


def reason_of(kind, raw):
    with pytest.raises(Rejected) as ei:
        decode(kind, raw, received_at=NOW)
    return ei.value.reason


def test_lab_result_becomes_one_canonical_observation():
    [obs] = decode("lab-results", lab(), received_at=NOW)
    assert obs.analyte == "alt" and obs.value == 50 and obs.unit == "U/L"
    assert obs.reference_range.high == 40
    assert obs.effective_at.utcoffset().total_seconds() == 3600
    assert obs.observation_id == "e1" and obs.replaces is None


@pytest.mark.parametrize(
    "raw,reason",
    [
        (b"", Reason.EMPTY_PAYLOAD),
        (b"{not json", Reason.MALFORMED_JSON),
        (b"\xc3\x28", Reason.NOT_UTF8),
        (b"[]", Reason.SCHEMA_INVALID),
        (lab(value="x"), Reason.SCHEMA_INVALID),
        (lab(effective_at="2026-10-30T08:00:00"), Reason.NAIVE_TIMESTAMP),
        (lab(effective_at="2030-01-01T00:00:00+00:00"), Reason.FUTURE_TIMESTAMP),
        (lab(loinc="12345-6"), Reason.UNKNOWN_LOINC),
        (lab(unit="mg/dL"), Reason.UNIT_NOT_CONVERTIBLE),
        (lab(unit=None), Reason.UNIT_NOT_CONVERTIBLE),
        (lab(patient_id=""), Reason.EMPTY_ID),
        (lab(event_id="   "), Reason.EMPTY_ID),
        (lab(value=None), Reason.MISSING_VALUE),
        (b'{"value": Infinity}', Reason.NON_FINITE_VALUE),
        (lab(value=1e999), Reason.NON_FINITE_VALUE),
        (b"[" * 10000 + b"]" * 10000, Reason.TOO_DEEP),
        (b'{"a":' * 40 + b"1" + b"}" * 40, Reason.TOO_DEEP),
        (b"{" + b" " * 2_000_000 + b"}", Reason.PAYLOAD_TOO_LARGE),
        (lab(reference_range={"low": 50, "high": 10}), Reason.SCHEMA_INVALID),
    ],
)
def test_bad_lab_results_are_rejected_with_reason(raw, reason):
    assert reason_of("lab-results", raw) == reason


def test_panel_fans_out_and_corrections_name_results():
    panel = {"event_id": "lf9", "patient_id": "p1", "effective_at": T, "source": "lab", "status": "corrected",
             "corrects": "lf8",
             "results": [{"loinc": "1742-6", "value": 0.5, "unit": "ukat/L"},
                         {"loinc": "14631-6", "value": 34.2, "unit": "umol/L", "reference_range": {"high": 20.52}}]}
    obs = decode("liver-function", json.dumps(panel).encode(), received_at=NOW)
    assert [o.analyte for o in obs] == ["alt", "bilirubin_total"]
    assert obs[0].value == pytest.approx(30.0)
    assert obs[1].value == pytest.approx(2.0) and obs[1].reference_range.high == pytest.approx(1.2)
    assert [o.replaces for o in obs] == ["lf8:alt", "lf8:bilirubin_total"]
    assert all(o.status == ResultStatus.CORRECTED for o in obs)


def test_panel_with_a_duplicate_analyte_is_rejected():
    panel = {"event_id": "lf9", "patient_id": "p1", "effective_at": T,
             "results": [{"loinc": "1742-6", "value": 1, "unit": "U/L"}, {"loinc": "76625-3", "value": 2, "unit": "U/L"}]}
    assert reason_of("liver-function", json.dumps(panel).encode()) == Reason.SCHEMA_INVALID


def test_entered_in_error_withdraws_same_id_without_value():
    [obs] = decode("lab-results", lab(status="entered-in-error", value=None), received_at=NOW)
    assert obs.value is None and obs.replaces == "e1"


def test_treatments_decode_to_dose_and_steroid_events():
    dose = {"type": "dose", "event_id": "d1", "patient_id": "p1", "product": "onasemnogene-abeparvovec-it",
            "administered_at": T, "birth_date": "2015-04-01", "weight_kg": 31.5, "ward": "neuro", "care_team": "sma-team"}
    steroid = {"type": "steroid", "event_id": "s1", "patient_id": "p1", "drug": "prednisolone",
               "dose_mg_per_kg_day": 1.0, "phase": "full", "at": T}
    assert isinstance(decode("treatments", json.dumps(dose).encode(), received_at=NOW), DoseEvent)
    assert isinstance(decode("treatments", json.dumps(steroid).encode(), received_at=NOW), SteroidEvent)
    bad = dict(dose, weight_kg=-1)
    assert reason_of("treatments", json.dumps(bad).encode()) == Reason.SCHEMA_INVALID
    naive = dict(steroid, at="2026-10-30T08:00:00")
    assert reason_of("treatments", json.dumps(naive).encode()) == Reason.NAIVE_TIMESTAMP


@pytest.mark.parametrize("comparator", ["<", "<=", ">=", ">"])
def test_a_json_comparator_is_kept_not_ignored(comparator):
    # it used to be silently ignored: "<500" became a measured 500
    [obs] = decode("lab-results", lab(comparator=comparator), received_at=NOW)
    [plain] = decode("lab-results", lab(), received_at=NOW)
    assert obs.comparator == comparator and obs.value == plain.value and plain.comparator is None


def test_an_unknown_json_comparator_is_rejected():
    assert reason_of("lab-results", lab(comparator="~")) is Reason.SCHEMA_INVALID


# ---------------------------------------------------------------- strict contract (issue 16)


def rejection(kind, raw) -> Rejected:
    with pytest.raises(Rejected) as ei:
        decode(kind, raw, received_at=NOW)
    return ei.value


def test_misspelt_field_is_unknown_field_naming_it():
    raw = json.loads(lab())
    raw["refrence_range"] = raw.pop("reference_range")  # used to be dropped silently
    rej = rejection("lab-results", json.dumps(raw).encode())
    assert rej.reason is Reason.UNKNOWN_FIELD and "'refrence_range'" in rej.message and "extensions" in rej.message


@pytest.mark.parametrize("kind,raw,name", [
    ("lab-results", lab(reference_range={"low": 0, "hihg": 40}), "'reference_range.hihg'"),
    ("vital-signs", json.dumps({"event_id": "v", "patient_id": "p1", "loinc": "8867-4", "value": 80, "unit": "/min",
                                "effective_at": T, "bed": "3"}).encode(), "'bed'"),
    ("treatments", json.dumps({"type": "steroid", "event_id": "s1", "patient_id": "p1", "dose_mg_per_kg_day": 1,
                               "phase": "full", "at": T, "dose_mg": 5}).encode(), "'dose_mg'"),
    ("liver-function", json.dumps({"event_id": "lf", "patient_id": "p1", "effective_at": T, "status": "final",
                                   "results": [{"loinc": "1742-6", "value": 5, "unit": "U/L", "flag": "H"}]}).encode(),
     "'results.0.flag'"),
])
def test_unknown_fields_everywhere_are_named(kind, raw, name):
    rej = rejection(kind, raw)
    assert rej.reason is Reason.UNKNOWN_FIELD and name in rej.message


def test_many_unknown_fields_are_named_in_bounded_text():
    raw = json.loads(lab())
    raw.update({f"x{i}" * 40: i for i in range(500)})
    rej = rejection("lab-results", json.dumps(raw).encode())
    assert rej.reason is Reason.UNKNOWN_FIELD and "(+490 more)" in rej.message and len(rej.message) < 1000


def test_extensions_carry_free_data():
    [obs] = decode("lab-results", lab(extensions={"lis": {"bed": "3", "analyser": "c702"}}), received_at=NOW)
    assert obs.analyte == "alt"


@pytest.mark.parametrize("kind,raw", [
    ("lab-results", json.dumps({k: v for k, v in json.loads(lab()).items() if k != "status"}).encode()),
    ("liver-function", json.dumps({"event_id": "lf", "patient_id": "p1", "effective_at": T,
                                   "results": [{"loinc": "1742-6", "value": 5, "unit": "U/L"}]}).encode()),
])
def test_status_is_required_on_lab_results(kind, raw):
    rej = rejection(kind, raw)
    assert rej.reason is Reason.SCHEMA_INVALID and "status" in rej.message


def test_json_schemas_forbid_unknown_fields():
    from schemas.jsonschema import _model
    from schemas.events import LabResult, LiverFunctionPanel

    for model in (LabResult, LiverFunctionPanel):
        schema = _model(model)()
        assert schema["additionalProperties"] is False and "status" in schema["required"]
        assert "extensions" in schema["properties"]


@pytest.mark.parametrize("kw,what", [
    # rounding to 10 significant digits overflows next to the largest double
    ({"value": 1.7976931348623157e308}, "value"),
    # the conversion overflows: 1e308 ukat/L is 6e309 U/L
    ({"value": 1e308, "unit": "ukat/L"}, "value"),
    ({"reference_range": {"low": 0, "high": 1.7976931348623157e308}}, "reference range high"),
    ({"unit": "ukat/L", "value": 1, "reference_range": {"low": -1e308, "high": 1}}, "reference range low"),
])
def test_a_finite_value_without_a_finite_canonical_value_is_rejected_as_non_finite(kw, what):
    # a finite number whose conversion to the canonical unit overflows is refused with its
    # reason (it used to end as internal_error: OverflowError, or schema_invalid)
    with pytest.raises(Rejected) as ei:
        decode("lab-results", lab(**kw), received_at=NOW)
    assert ei.value.reason == Reason.NON_FINITE_VALUE
    assert ei.value.message.startswith(what + " ") and "no finite value in U/L" in ei.value.message


def test_the_largest_values_that_convert_are_kept():
    [obs] = decode("lab-results", lab(value=1.7e308, reference_range={"low": 0, "high": 1e300}), received_at=NOW)
    assert obs.value == 1.7e308 and obs.reference_range.high == 1e300


@pytest.mark.parametrize("kind,raw,said", [
    ("lab-results", lab(value=-5), "alt -5 U/L is outside what the quantity can take (0.. U/L)"),
    ("lab-results", lab(loinc="777-3", value=-40, unit="10*9/L", reference_range=None), "platelets -40"),
    ("vital-signs", json.dumps({"event_id": "v1", "patient_id": "p1", "loinc": "59408-5", "value": 101,
                                "unit": "%", "effective_at": T, "source": "monitor"}).encode(), "spo2 101 %"),
    ("vital-signs", json.dumps({"event_id": "v1", "patient_id": "p1", "loinc": "67775-7", "value": 5,
                                "unit": "{ACVPU}", "effective_at": T, "source": "monitor"}).encode(), "(0..4 {ACVPU})"),
])
def test_a_value_its_quantity_cannot_take_is_implausible_not_judged(kind, raw, said):
    # platelets of -40 were judged as a grade 4 count, an ACVPU of 5 or SpO2 of 101 % scored
    with pytest.raises(Rejected) as ei:
        decode(kind, raw, received_at=NOW)
    assert ei.value.reason == Reason.IMPLAUSIBLE_VALUE and said in ei.value.message


@pytest.mark.parametrize("kw", [dict(value=0), dict(value=0.0, unit="ukat/L"),
                                dict(value=-5, status="entered-in-error")])
def test_the_bounds_themselves_and_a_withdrawals_value_pass(kw):
    [obs] = decode("lab-results", lab(**kw), received_at=NOW)
    assert obs.value == kw["value"]
