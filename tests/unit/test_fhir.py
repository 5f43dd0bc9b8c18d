"""FHIR R4 Observations / Bundles -> canonical observations (schemas.fhir)."""
from __future__ import annotations

import copy
import json
from datetime import datetime, timezone
from pathlib import Path

import pytest

from schemas.errors import Reason, Rejected
from schemas.events import ResultStatus
from schemas.fhir import observations_from_fhir, parse_fhir
from schemas.ingest import decode

DATA = Path(__file__).resolve().parents[1] / "data" / "fhir"
NOW = datetime(2024, 6, 1, 12, 0, tzinfo=timezone.utc)


def load(name: str) -> dict:
    return json.loads((DATA / name).read_text(encoding="utf-8"))


def parse(obj):
    return observations_from_fhir(obj, received_at=NOW)


def rejected(obj) -> Rejected:
    with pytest.raises(Rejected) as ei:
        parse(obj)
    return ei.value


# ---------------------------------------------------------------- official examples


def test_hemoglobin_f005_as_published():
    (o,) = parse(load("observation-example-f005-hemoglobin.json"))
    assert o.observation_id == o.event_id == "f005"
    assert o.patient_id == "f001"
    assert (o.analyte, o.loinc, o.kind) == ("hemoglobin", "718-7", "lab")
    assert (o.value, o.unit, o.original_value, o.original_unit) == (72.0, "g/L", 7.2, "g/dL")
    assert (o.reference_range.low, o.reference_range.high) == (75.0, 100.0)
    assert o.effective_at == datetime.fromisoformat("2013-04-02T10:30:10+01:00")  # effectivePeriod.start
    assert o.status is ResultStatus.FINAL and o.corrects is None
    assert o.abnormal_flag == "L" and o.format == "fhir" and o.received_at == NOW


def test_bloodpressure_as_published_is_naive():
    # the R4 example has effectiveDateTime "2012-09-17": a date without time or offset
    assert rejected(load("observation-example-bloodpressure.json")).reason is Reason.NAIVE_TIMESTAMP


def test_bloodpressure_components_with_time_adapted():
    obj = load("observation-example-bloodpressure.json")
    obj["effectiveDateTime"] = "2012-09-17T09:30:00+02:00"  # adapted: the only change
    obs = parse(obj)
    by = {o.analyte: o for o in obs}
    assert set(by) == {"systolic_bp", "diastolic_bp"}
    assert by["systolic_bp"].observation_id == "blood-pressure:systolic_bp"
    assert by["diastolic_bp"].observation_id == "blood-pressure:diastolic_bp"
    assert {o.event_id for o in obs} == {"blood-pressure"}
    assert (by["systolic_bp"].value, by["systolic_bp"].unit, by["systolic_bp"].kind) == (107.0, "mm[Hg]", "vital")
    assert by["diastolic_bp"].value == 60.0
    assert by["systolic_bp"].abnormal_flag == "N" and by["diastolic_bp"].abnormal_flag == "L"
    assert all(o.patient_id == "example" for o in obs)


def test_glucose_f001_unknown_loinc_then_adapted_passes_through():
    obj = load("observation-example-f001-glucose.json")
    assert rejected(obj).reason is Reason.UNKNOWN_LOINC  # 15074-8 is in no value set
    obj["code"]["coding"][0]["code"] = "2345-7"  # adapted to the serum/plasma glucose code we list
    (o,) = parse(obj)
    assert o.analyte == "glucose"  # known but not monitored: passes through
    assert o.value == pytest.approx(6.3 * 18.0156)
    assert o.abnormal_flag == "H"


def test_weight_example_picks_the_known_loinc_among_several_codings():
    obj = load("observation-example.json")
    obj["effectiveDateTime"] = "2016-03-28T08:00:00-05:00"  # adapted: add time and offset
    (o,) = parse(obj)
    assert (o.loinc, o.analyte) == ("29463-7", "weight")
    assert o.value == pytest.approx(185 * 0.45359237)
    assert o.original_unit == "[lb_av]"  # code preferred over unit "lbs"


# ---------------------------------------------------------------- bundles


def _entry(res, full_url=None, method=None):
    e = {"resource": res}
    if full_url:
        e["fullUrl"] = full_url
    if method:
        e["request"] = {"method": method, "url": "Observation"}
    return e


def hb():
    return load("observation-example-f005-hemoglobin.json")


@pytest.mark.parametrize("btype", ["collection", "transaction", "batch", "message"])
def test_bundle_types(btype):
    bp = load("observation-example-bloodpressure.json")
    bp["effectiveDateTime"] = "2012-09-17T09:30:00+02:00"
    entries = [_entry(hb(), method="POST" if btype in ("transaction", "batch") else None),
               _entry({"resourceType": "Patient", "id": "f001"}),
               _entry(bp)]
    if btype == "message":
        entries.insert(0, _entry({"resourceType": "MessageHeader", "eventCoding": {"code": "x"},
                                  "source": {"endpoint": "http://lab.example"}}))
    obs = parse({"resourceType": "Bundle", "id": "b1", "type": btype, "entry": entries})
    assert sorted(o.observation_id for o in obs) == [
        "blood-pressure:diastolic_bp", "blood-pressure:systolic_bp", "f005"]


def test_bundle_ids_from_full_url_then_bundle_index():
    a, b = hb(), hb()
    del a["id"], b["id"]
    obs = parse({"resourceType": "Bundle", "id": "bx", "type": "collection",
                 "entry": [_entry(a, full_url="urn:uuid:0c3151bd-1cbf-4d64-b04d-cd9187a4c6e0"), _entry(b)]})
    assert [o.observation_id for o in obs] == ["urn:uuid:0c3151bd-1cbf-4d64-b04d-cd9187a4c6e0", "bx/1"]
    del_both = {"resourceType": "Bundle", "type": "collection", "entry": [_entry(copy.deepcopy(b))]}
    assert rejected(del_both).reason is Reason.FHIR_INVALID


def test_bundle_subject_resolved_to_patient_entry():
    o = hb()
    o["subject"] = {"reference": "urn:uuid:8a5b7b0e-3b8c-4b43-9d3a-1b2c3d4e5f60"}
    pat = {"resourceType": "Patient", "identifier": [{"system": "urn:mrn", "value": "MRN-42"}]}
    (obs,) = parse({"resourceType": "Bundle", "type": "collection",
                    "entry": [_entry(pat, full_url="urn:uuid:8a5b7b0e-3b8c-4b43-9d3a-1b2c3d4e5f60"), _entry(o)]})
    assert obs.patient_id == "MRN-42"


def test_bundle_skips_unknown_loinc_but_rejects_when_nothing_left():
    other = hb()
    other["id"] = "rbc"
    other["code"] = {"coding": [{"system": "http://loinc.org", "code": "26453-1"}]}
    res = parse_fhir({"resourceType": "Bundle", "type": "collection", "entry": [_entry(hb()), _entry(other)]},
                     received_at=NOW)
    assert [o.observation_id for o in res.observations] == ["f005"]
    assert [s.reason for s in res.skipped] == [Reason.UNKNOWN_LOINC]
    only = {"resourceType": "Bundle", "type": "collection", "entry": [_entry(other)]}
    assert rejected(only).reason is Reason.UNKNOWN_LOINC


def test_bundle_one_bad_observation_rejects_all():
    bad = hb()
    bad["id"] = "bad"
    bad["status"] = "registered"
    b = {"resourceType": "Bundle", "type": "collection", "entry": [_entry(hb()), _entry(bad)]}
    assert rejected(b).reason is Reason.FHIR_BAD_STATUS


@pytest.mark.parametrize("bundle, reason", [
    ({"resourceType": "Bundle", "type": "searchset", "entry": []}, Reason.FHIR_INVALID),
    ({"resourceType": "Bundle", "type": "collection", "entry": []}, Reason.FHIR_INVALID),
    ({"resourceType": "Bundle", "type": "collection",
      "entry": [{"resource": {"resourceType": "Patient", "id": "p"}}]}, Reason.FHIR_INVALID),
])
def test_bad_bundles(bundle, reason):
    assert rejected(bundle).reason is reason


def test_bundle_delete_entry_rejected():
    b = {"resourceType": "Bundle", "type": "transaction",
         "entry": [_entry(hb(), method="POST"), {"request": {"method": "DELETE", "url": "Observation/f005"}}]}
    assert rejected(b).reason is Reason.FHIR_INVALID


# ---------------------------------------------------------------- statuses and corrections


@pytest.mark.parametrize("fhir_status, canonical", [
    ("final", ResultStatus.FINAL), ("preliminary", ResultStatus.PRELIMINARY),
    ("amended", ResultStatus.AMENDED), ("corrected", ResultStatus.CORRECTED),
    ("cancelled", ResultStatus.CANCELLED), ("entered-in-error", ResultStatus.ENTERED_IN_ERROR),
])
def test_status_mapping(fhir_status, canonical):
    o = hb()
    o["status"] = fhir_status
    (obs,) = parse(o)
    assert obs.status is canonical
    assert obs.corrects is None
    if canonical in (ResultStatus.CORRECTED, ResultStatus.AMENDED, ResultStatus.ENTERED_IN_ERROR,
                     ResultStatus.CANCELLED):
        assert obs.replaces == "f005"  # same resource id: replaces the original


@pytest.mark.parametrize("status", ["registered", "unknown", "done", "FINAL"])
def test_bad_status(status):
    o = hb()
    o["status"] = status
    assert rejected(o).reason is Reason.FHIR_BAD_STATUS


def test_entered_in_error_may_omit_value_but_final_may_not():
    o = hb()
    del o["valueQuantity"]
    assert rejected(o).reason is Reason.MISSING_VALUE
    o["status"] = "entered-in-error"
    (obs,) = parse(o)
    assert obs.value is None and obs.status is ResultStatus.ENTERED_IN_ERROR


# ---------------------------------------------------------------- broken variants


def _mut(fn):
    o = hb()
    fn(o)
    return o


@pytest.mark.parametrize("mutate, reason", [
    # a numeric result under another code system is a local code in no code map (issue 16)
    (lambda o: o["code"]["coding"][0].update(system="http://snomed.info/sct"), Reason.UNKNOWN_LOCAL_CODE),
    (lambda o: o["code"].update(coding=[{"display": "ALT"}]), Reason.FHIR_NOT_LOINC),
    (lambda o: o["valueQuantity"].update(system="http://snomed.info/sct"), Reason.FHIR_NOT_UCUM),
    (lambda o: o["valueQuantity"].pop("system"), Reason.FHIR_NOT_UCUM),
    (lambda o: o["valueQuantity"].update(code="furlong"), Reason.UNIT_NOT_CONVERTIBLE),
    (lambda o: o.pop("subject"), Reason.FHIR_NO_SUBJECT),
    (lambda o: o.update(subject={"reference": "Group/g1"}), Reason.FHIR_NO_SUBJECT),
    (lambda o: o.update(effectivePeriod={"start": "2013-04-02T10:30:10"}), Reason.NAIVE_TIMESTAMP),
    (lambda o: o.update(effectivePeriod={"start": "2013-04"}), Reason.NAIVE_TIMESTAMP),
    (lambda o: o.pop("effectivePeriod"), Reason.FHIR_INVALID),
    (lambda o: o.update(effectivePeriod={"start": "2099-01-01T00:00:00Z"}), Reason.FUTURE_TIMESTAMP),
    (lambda o: o.update(valueString="7.2"), Reason.FHIR_INVALID),
    (lambda o: o.update(bogusField=1), Reason.FHIR_INVALID),
    (lambda o: o.pop("id"), Reason.FHIR_INVALID),
    (lambda o: o.update(resourceType="Patient"), Reason.FHIR_INVALID),
    (lambda o: o["code"]["coding"].append({"system": "http://loinc.org", "code": "1742-6"}), Reason.FHIR_INVALID),
])
def test_broken_variants(mutate, reason):
    assert rejected(_mut(mutate)).reason is reason


@pytest.mark.parametrize("comparator", ["<", "<=", ">=", ">"])
def test_a_comparator_is_kept_beside_the_bound(comparator):
    (obs,) = parse(_mut(lambda o: o["valueQuantity"].update(comparator=comparator)))
    plain = parse(hb())[0]
    assert obs.comparator == comparator and obs.value == plain.value
    assert plain.comparator is None


def test_subject_forms():
    def pid(subject):
        return parse(_mut(lambda o: o.update(subject=subject)))[0].patient_id

    assert pid({"reference": "https://fhir.example.org/r4/Patient/p-9/_history/2"}) == "p-9"
    assert pid({"identifier": {"system": "urn:mrn", "value": "MRN-1"}}) == "MRN-1"
    o = hb()
    o["contained"] = [{"resourceType": "Patient", "id": "pt", "identifier": [{"value": "MRN-2"}]}]
    o["subject"] = {"reference": "#pt"}
    # a contained Patient with an id: its id is the local anchor, the identifier is the patient
    assert parse(o)[0].patient_id in ("pt", "MRN-2")


def test_effective_fallbacks():
    o = _mut(lambda o: o.update(effectivePeriod={"end": "2013-04-05T10:30:10+01:00"}))
    assert parse(o)[0].effective_at == datetime.fromisoformat("2013-04-05T10:30:10+01:00")
    o = _mut(lambda o: (o.pop("effectivePeriod"), o.update(effectiveDateTime="2013-04-02T09:00:00Z")))
    assert parse(o)[0].effective_at == datetime(2013, 4, 2, 9, tzinfo=timezone.utc)


def test_reference_range_in_another_unit_is_dropped():
    o = _mut(lambda o: o["referenceRange"][0]["low"].update(code="mmol/L"))
    assert parse(o)[0].reference_range is None


def test_never_raises_anything_but_rejected():
    for junk in (None, [], "x", {"resourceType": "Observation"}, {"resourceType": "Bundle", "type": "collection",
                 "entry": "nope"}, {"resourceType": "Observation", "status": "final", "code": 5}):
        with pytest.raises(Rejected):
            parse(junk)


def test_decode_routes_fhir_json():
    raw = json.dumps(hb()).encode()
    for topic in ("lab-results", "vital-signs", "liver-function"):
        (o,) = decode(topic, raw, received_at=NOW)
        assert o.format == "fhir"
    with pytest.raises(Rejected) as ei:
        decode("treatments", raw, received_at=NOW)
    assert ei.value.reason is Reason.UNKNOWN_FORMAT


def test_local_code_observation_maps_through_the_source_map(tmp_path):
    """Issue 16: selected by Observation.meta.source; local code -> LOINC, local unit -> UCUM."""
    from dataclasses import replace

    from schemas.codemaps import load_code_maps
    from schemas.ingest import DEFAULT_LIMITS

    (tmp_path / "lis.yaml").write_text(
        "source: https://lis.example.org/fhir\ncodes:\n  ALAT: 1742-6\nunits:\n  U/l: U/L\n", encoding="utf-8")
    limits = replace(DEFAULT_LIMITS, code_maps=load_code_maps(str(tmp_path)))
    obs = {
        "resourceType": "Observation", "id": "alat-1", "status": "final",
        "meta": {"source": "https://lis.example.org/fhir"},
        "code": {"coding": [{"system": "https://lis.example.org/codes", "code": "ALAT", "display": "ALAT"}]},
        "subject": {"reference": "Patient/p-1"}, "effectiveDateTime": "2024-05-02T08:00:00+02:00",
        "valueQuantity": {"value": 95, "unit": "U/l"},
    }
    (o,) = observations_from_fhir(obs, received_at=NOW, limits=limits)
    assert o.loinc == "1742-6" and o.analyte == "alt" and o.value == 95.0 and o.unit == "U/L"
    other = {**obs, "meta": {"source": "https://other.example.org"}}
    with pytest.raises(Rejected) as ei:
        observations_from_fhir(other, received_at=NOW, limits=limits)
    assert ei.value.reason is Reason.UNKNOWN_LOCAL_CODE and "'ALAT'" in ei.value.message


def test_a_haemoglobin_below_zero_is_implausible():
    obs = hb()
    obs["valueQuantity"]["value"] = -7.2
    err = rejected(obs)
    assert err.reason == Reason.IMPLAUSIBLE_VALUE and "hemoglobin -7.2" in err.message
