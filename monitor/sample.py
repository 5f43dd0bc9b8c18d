"""A sample patient's first post-dose month as input events (for the quick-start demo).

An 8-month-old infant dosed IV, prednisolone 1 mg/kg/day from the day before, weekly
liver panels and platelets, troponin, daily vitals. Transaminases rise in weeks 2-3
(CTCAE grade 2 then grade 3 for ALT), platelets dip in week 1, one fever on day 1, and
one corrected lab result, plus a few malformed inputs that must end on the dead-letter
topic.
"""
from __future__ import annotations

import json
from datetime import datetime, timedelta, timezone
from pathlib import Path


def _iso(t: datetime) -> str:
    return t.isoformat()


def sample_patient_events(patient_id: str = "demo-patient-001", dose_at: datetime | None = None) -> list[dict]:
    dose_at = dose_at or (datetime.now(timezone.utc) - timedelta(days=30)).replace(hour=9, minute=0, second=0, microsecond=0)
    ev: list[dict] = []
    n = 0

    def eid(prefix: str) -> str:
        nonlocal n
        n += 1
        return f"{patient_id}-{prefix}-{n:04d}"

    def lab(loinc, value, unit, t, low=None, high=None, **kw):
        ev.append({"topic": "lab-results", "value": {
            "event_id": eid("lab"), "patient_id": patient_id, "loinc": loinc, "value": value, "unit": unit,
            "reference_range": {"low": low, "high": high}, "effective_at": _iso(t), "status": "final",
            "source": "central-lab", **kw}})
        return ev[-1]["value"]["event_id"]

    def panel(t, alt, ast, tbili, inr=1.0):
        ev.append({"topic": "liver-function", "value": {
            "event_id": eid("lft"), "patient_id": patient_id, "effective_at": _iso(t), "source": "central-lab",
            "results": [
                {"loinc": "1742-6", "value": alt, "unit": "U/L", "reference_range": {"low": 0, "high": 40}},
                {"loinc": "1920-8", "value": ast, "unit": "U/L", "reference_range": {"low": 0, "high": 50}},
                {"loinc": "1975-2", "value": tbili, "unit": "mg/dL", "reference_range": {"low": 0.1, "high": 1.2}},
                {"loinc": "6301-6", "value": inr, "unit": "{INR}", "reference_range": {"low": 0.8, "high": 1.2}},
                {"loinc": "5902-2", "value": 12.0 * inr, "unit": "s", "reference_range": {"low": 10, "high": 13.5}},
            ]}})

    def vital(loinc, value, unit, t):
        ev.append({"topic": "vital-signs", "value": {
            "event_id": eid("vit"), "patient_id": patient_id, "loinc": loinc, "value": value, "unit": unit,
            "effective_at": _iso(t), "source": "ward-monitor"}})

    birth = (dose_at - timedelta(days=245)).date().isoformat()
    # pre-dose baselines
    pre = dose_at - timedelta(days=2)
    panel(pre, 28, 42, 0.4)
    lab("777-3", 310, "10*3/uL", pre, 150, 450)
    lab("718-7", 11.8, "g/dL", pre, 10.5, 13.5)
    lab("2160-0", 0.25, "mg/dL", pre, 0.1, 0.4)
    lab("10839-9", 0.01, "ng/mL", pre, 0, 0.04)
    lab("2532-0", 240, "U/L", pre, 150, 360)
    ev.append({"topic": "treatments", "value": {
        "type": "steroid", "event_id": eid("ster"), "patient_id": patient_id, "drug": "prednisolone",
        "dose_mg_per_kg_day": 1.0, "phase": "full", "at": _iso(dose_at - timedelta(days=1))}})
    ev.append({"topic": "treatments", "value": {
        "type": "dose", "event_id": eid("dose"), "patient_id": patient_id, "product": "onasemnogene-abeparvovec-iv",
        "administered_at": _iso(dose_at), "birth_date": birth, "weight_kg": 7.9, "ward": "paediatric-neurology",
        "care_team": "sma-gene-therapy"}})
    alt_course = {7: (58, 70, 0.5), 14: (135, 120, 0.6), 21: (260, 190, 0.7), 28: (110, 90, 0.5)}
    plt_course = {3: 190, 7: 128, 14: 240, 21: 290, 28: 300}
    for day in range(0, 30):
        t = dose_at + timedelta(days=day, hours=8)
        temp = 38.6 if day == 1 else 36.9
        vital("8310-5", temp, "Cel", t)
        vital("8867-4", 128, "/min", t)
        vital("9279-1", 34, "/min", t)
        vital("8480-6", 92, "mm[Hg]", t)
        vital("59408-5", 98, "%", t)
        if day in alt_course:
            panel(t, *alt_course[day])
        if day in plt_course:
            lab("777-3", plt_course[day], "10*3/uL", t, 150, 450)
            lab("718-7", 11.5, "g/dL", t, 10.5, 13.5)
            lab("2160-0", 0.26, "mg/dL", t, 0.1, 0.4)
        if day in (7, 14, 21, 28):
            lab("10839-9", 0.02, "ng/mL", t, 0, 0.04)
    # a typo at the lab, corrected an hour later
    wrong = lab("777-3", 12, "10*3/uL", dose_at + timedelta(days=10, hours=8), 150, 450)
    lab("777-3", 212, "10*3/uL", dose_at + timedelta(days=10, hours=8), 150, 450, status="corrected", corrects=wrong)
    # what a careless integration sends: these must be dead-lettered, not lost
    ev.append({"topic": "lab-results", "value": "{\"event_id\": \"broken"})
    ev.append({"topic": "lab-results", "value": {
        "event_id": eid("lab"), "patient_id": patient_id, "loinc": "1742-6", "value": 40, "unit": "mg/dL",
        "effective_at": _iso(dose_at + timedelta(days=5)), "source": "outside-lab"}})
    ev.append({"topic": "vital-signs", "value": {
        "event_id": eid("vit"), "patient_id": patient_id, "loinc": "8310-5", "value": 37.0, "unit": "Cel",
        "effective_at": (dose_at + timedelta(days=5)).replace(tzinfo=None).isoformat(), "source": "home-device"}})
    return ev


def write_sample(path: str | Path, topics: dict[str, str] | None = None, **kw) -> int:
    events = sample_patient_events(**kw)
    with open(path, "w", encoding="utf-8") as fh:
        for e in events:
            rec = dict(e)
            if topics:
                rec["topic"] = topics.get(rec["topic"], rec["topic"])
            if isinstance(rec["value"], dict):
                rec["key"] = rec["value"].get("patient_id")
            else:
                rec["key"] = kw.get("patient_id", "demo-patient-001")
            fh.write(json.dumps(rec) + "\n")
    return len(events)
