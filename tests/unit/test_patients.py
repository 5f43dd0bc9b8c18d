"""Patient identity records: JSON, FHIR R4 Patient and HL7 v2 ADT give the same canonical record;
invalid ones are rejected with a reason (the feed dead-letters them)."""
from __future__ import annotations

import json
from datetime import date

import pytest

from schemas.errors import Reason, Rejected
from schemas.patients import PatientRecord, is_adt, parse_patient

ADT = ("MSH|^~\\&|ADT|HOSP|MON|HOSP|20260101120000||ADT^{ev}|1|P|2.5\r"
       "PID|1||P-3^^^HOSP^PI~MRN-3^^^HOSP-MRN^MR||Doe^Jane^Q||20250506|F\r"
       "PV1|1|I|PICU^R1^B2\r")
FHIR = {"resourceType": "Patient", "id": "P-3",
        "identifier": [{"type": {"coding": [{"system": "http://terminology.hl7.org/CodeSystem/v2-0203", "code": "MR"}]},
                        "system": "urn:oid:1.2.3", "value": "MRN-3"}],
        "name": [{"use": "nickname", "given": ["JJ"]}, {"use": "official", "family": "Doe", "given": ["Jane"]}],
        "birthDate": "2025-05-06"}


@pytest.mark.parametrize("event", ["A01", "A04", "A08", "A31"])
def test_adt_events(event):
    rec = parse_patient(ADT.format(ev=event).encode())
    assert rec == PatientRecord(patient_id="P-3", display_name="Jane Doe", mrn="MRN-3", mrn_authority="HOSP-MRN",
                                birth_date=date(2025, 5, 6), ward="PICU", bed="B2", source="hl7")
    assert is_adt(ADT.format(ev=event))


def test_fhir_patient_official_name_and_mr_identifier():
    rec = parse_patient(json.dumps(FHIR).encode())
    assert (rec.patient_id, rec.display_name, rec.mrn, rec.mrn_authority, rec.birth_date) == \
        ("P-3", "Jane Doe", "MRN-3", "urn:oid:1.2.3", date(2025, 5, 6))


def test_json_record_round_trip():
    raw = {"patient_id": "P-1", "display_name": "Ann Lee", "mrn": "M1", "birth_date": "2025-01-02", "ward": "W1",
           "care_team": "T", "bed": "4"}
    rec = parse_patient(json.dumps(raw).encode())
    assert rec.ward == "W1" and PatientRecord.model_validate_json(rec.model_dump_json()) == rec


@pytest.mark.parametrize("raw, reason", [
    (ADT.format(ev="A03"), Reason.HL7_UNSUPPORTED_MESSAGE),
    (ADT.format(ev="A01").replace("~MRN-3^^^HOSP-MRN^MR", ""), Reason.HL7_BAD_VALUE),  # no MRN
    (ADT.format(ev="A01").replace("P-3^^^HOSP^PI", ""), Reason.HL7_NO_PATIENT),
    (ADT.format(ev="A01").replace("20250506", "2025-5-6"), Reason.HL7_BAD_VALUE),
    (ADT.format(ev="A01").replace("Doe^Jane^Q", ""), Reason.HL7_BAD_VALUE),
    (json.dumps({**FHIR, "identifier": []}), Reason.SCHEMA_INVALID),
    (json.dumps({**FHIR, "birthDate": "2025-05"}), Reason.SCHEMA_INVALID),
    (json.dumps({**FHIR, "name": "Jane"}), Reason.FHIR_INVALID),
    (json.dumps({"resourceType": "Observation"}), Reason.UNKNOWN_FORMAT),
    (json.dumps({"patient_id": "P", "display_name": "X", "mrn": "M", "birth_date": "2099-01-01"}), Reason.SCHEMA_INVALID),
    (json.dumps({"patient_id": "P\x00", "display_name": "X", "mrn": "M", "birth_date": "2020-01-01"}),
     Reason.SCHEMA_INVALID),
    (json.dumps({"patient_id": "P", "display_name": "X", "mrn": "M", "birth_date": "2020-01-01", "extra": 1}),
     Reason.SCHEMA_INVALID),
    ("not json", Reason.MALFORMED_JSON),
    ("", Reason.EMPTY_PAYLOAD),
])
def test_invalid_records_are_rejected_with_a_reason(raw, reason):
    with pytest.raises(Rejected) as exc:
        parse_patient(raw.encode())
    assert exc.value.reason == reason and exc.value.message


def test_feed_routes_valid_to_patients_and_invalid_to_dead_letter():
    from monitor.patients import route, split_messages
    from monitor.settings import Settings

    s = Settings()
    data = (ADT.format(ev="A01") + "\n" + ADT.format(ev="A03")).encode()
    msgs = list(split_messages(data))
    assert len(msgs) == 2
    (t1, k1, v1, h1, r1), (t2, k2, v2, h2, r2) = (route(m, s) for m in msgs)
    assert t1 == s.topic_patients and k1 == b"P-3" and h1 is None and PatientRecord.model_validate_json(v1) == r1
    assert t2 == s.topic_dead_letter and v2 == msgs[1] and dict(h2)["dlq.reason"] == b"hl7_unsupported_message"
    bundle = {"resourceType": "Bundle", "type": "collection", "entry": [{"resource": FHIR}, {"resource": FHIR}]}
    assert len(list(split_messages(json.dumps(bundle).encode()))) == 2
