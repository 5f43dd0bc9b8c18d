"""The same lab value sent as JSON, FHIR R4 and HL7 v2 gives the same canonical observation.

Ids are per format by design (FHIR: the resource id; HL7: ``<filler order>:<LOINC>``),
so each comparison sends the JSON event with the id the other format derives; the
observations must then be equal in every field except ``format`` and ``received_at``.
"""
from __future__ import annotations

import json
from datetime import datetime, timedelta, timezone
from decimal import Decimal

from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st

from schemas.analytes import catalogue
from schemas.errors import Reason, Rejected
from schemas.ingest import decode

NOW = datetime(2030, 1, 1, tzinfo=timezone.utc)
IGNORED = {"format", "received_at"}
SOURCE = "central-lab"

HL7_STATUS = {"final": "F", "preliminary": "P", "corrected": "C", "amended": "A",
              "entered-in-error": "D", "cancelled": "X"}

ANALYTE_UNITS = sorted(
    (loinc, unit)
    for a in catalogue().by_key.values()
    for loinc in a.loinc
    for unit in a.units
    if unit  # an empty unit is "no unit" in HL7 but "" in JSON
)

fhir_id = st.from_regex(r"[A-Za-z0-9][A-Za-z0-9.\-]{0,30}", fullmatch=True)
numbers = st.decimals(min_value=0, max_value=100000, places=3, allow_nan=False, allow_infinity=False)


@st.composite
def lab_values(draw):
    loinc, unit = draw(st.sampled_from(ANALYTE_UNITS))
    value = draw(numbers)
    low = draw(st.none() | numbers)
    high = draw(st.none() | numbers)
    if low is not None and high is not None and low > high:
        low, high = high, low
    offset = draw(st.integers(min_value=-12 * 4, max_value=14 * 4)) * 15
    when = draw(st.datetimes(min_value=datetime(2020, 1, 1), max_value=datetime(2029, 12, 31)))
    when = when.replace(microsecond=0, tzinfo=timezone(timedelta(minutes=offset)))
    return {
        "loinc": loinc, "unit": unit, "value": value, "low": low, "high": high, "when": when,
        "status": draw(st.sampled_from(sorted(HL7_STATUS))),
        "flag": draw(st.sampled_from([None, "H", "L", "N", "HH", "LL", "A"])),
        "patient": draw(fhir_id), "order": draw(fhir_id), "fid": draw(fhir_id),
    }


def as_json(v, event_id: str) -> bytes:
    rr = None
    if v["low"] is not None or v["high"] is not None:
        rr = {"low": None if v["low"] is None else float(v["low"]),
              "high": None if v["high"] is None else float(v["high"])}
    return json.dumps({
        "event_id": event_id, "patient_id": v["patient"], "loinc": v["loinc"], "value": float(v["value"]),
        "unit": v["unit"], "reference_range": rr, "effective_at": v["when"].isoformat(),
        "status": v["status"], "source": SOURCE, "abnormal_flag": v["flag"],
    }).encode()


def as_fhir(v) -> bytes:
    def q(x: Decimal) -> dict:
        return {"value": float(x), "system": "http://unitsofmeasure.org", "code": v["unit"]}

    obs = {
        "resourceType": "Observation", "id": v["fid"], "meta": {"source": SOURCE}, "status": v["status"],
        "code": {"coding": [{"system": "http://snomed.info/sct", "code": "1"},
                            {"system": "http://loinc.org", "code": v["loinc"]}]},
        "subject": {"reference": f"Patient/{v['patient']}"},
        "effectiveDateTime": v["when"].isoformat(),
        "valueQuantity": q(v["value"]),
    }
    if v["low"] is not None or v["high"] is not None:
        rr = {}
        if v["low"] is not None:
            rr["low"] = q(v["low"])
        if v["high"] is not None:
            rr["high"] = q(v["high"])
        obs["referenceRange"] = [rr]
    if v["flag"]:
        obs["interpretation"] = [{"coding": [{
            "system": "http://terminology.hl7.org/CodeSystem/v3-ObservationInterpretation", "code": v["flag"]}]}]
    return json.dumps(obs).encode()


def hl7_ts(d: datetime) -> str:
    off = int(d.utcoffset().total_seconds() // 60)
    sign = "+" if off >= 0 else "-"
    return d.strftime("%Y%m%d%H%M%S") + f"{sign}{abs(off) // 60:02d}{abs(off) % 60:02d}"


def as_hl7(v) -> bytes:
    low, high = v["low"], v["high"]
    if low is not None and high is not None:
        rng = f"{low:f}-{high:f}"
    elif high is not None:
        rng = f"<{high:f}"
    elif low is not None:
        rng = f">{low:f}"
    else:
        rng = ""
    segs = [
        f"MSH|^~\\&|LIS|{SOURCE}|MON|GTX|{hl7_ts(v['when'])}||ORU^R01^ORU_R01|CTL1|P|2.5.1",
        f"PID|1||{v['patient']}^^^HOSP^MR",
        f"OBR|1|PLACER|{v['order']}|24325-3^Panel^LN|||{hl7_ts(v['when'])}",
        f"OBX|1|NM|LOCAL^Local name^L^{v['loinc']}^Name^LN||{v['value']:f}|{v['unit']}^unit^UCUM|{rng}|"
        f"{v['flag'] or ''}|||{HL7_STATUS[v['status']]}|||{hl7_ts(v['when'])}",
    ]
    return ("\r".join(segs) + "\r").encode()


def canonical(raw: bytes, topic: str = "lab-results"):
    (o,) = decode(topic, raw, received_at=NOW)
    return o


def reason_of(raw: bytes):
    """The reason ``raw`` is refused for, or None."""
    try:
        canonical(raw)
    except Rejected as rej:
        return rej.reason
    return None


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(lab_values())
@example({"loinc": "2708-6", "unit": "%", "value": Decimal("100.001"), "low": None, "high": None,
          "when": datetime(2020, 1, 1, tzinfo=timezone.utc), "status": "amended", "flag": None,
          "patient": "0", "order": "0", "fid": "0"})
def test_json_fhir_hl7_agree(v):
    refused = {reason_of(raw) for raw in (as_fhir(v), as_json(v, v["fid"]), as_hl7(v))}
    if refused != {None}:
        # a value its quantity cannot take (SpO2 over 100 %) is refused alike in every format
        assert refused == {Reason.IMPLAUSIBLE_VALUE}, (refused, v)
        return
    fhir_obs = canonical(as_fhir(v))
    json_for_fhir = canonical(as_json(v, v["fid"]))
    assert fhir_obs.format == "fhir" and json_for_fhir.format == "json"
    assert fhir_obs.model_dump(exclude=IGNORED) == json_for_fhir.model_dump(exclude=IGNORED)

    hl7_obs = canonical(as_hl7(v))
    hl7_id = f"{v['order']}:{v['loinc']}"
    assert hl7_obs.observation_id == hl7_obs.event_id == hl7_id
    json_for_hl7 = canonical(as_json(v, hl7_id))
    assert hl7_obs.format == "hl7"
    assert hl7_obs.model_dump(exclude=IGNORED) == json_for_hl7.model_dump(exclude=IGNORED)
