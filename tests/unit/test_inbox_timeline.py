"""The inbox's patient timeline from the observations it keeps (``monitor.inbox.store``): days
since the dose, ALT/AST as multiples of the upper reference limit (the result's own, else an
assumed one, said so), corrections and withdrawals applied, the newest kept under the cap, and
only the points the timeline draws held per observation."""
from __future__ import annotations

import json
from datetime import datetime, timedelta, timezone

from monitor.inbox.store import DEFAULT_ULN, InboxStore, TimelinePoint
from schemas.analytes import catalogue
from schemas.events import DoseEvent, ReferenceRange
from schemas.ingest import build_observation

DOSE = datetime(2026, 11, 1, 8, 0, tzinfo=timezone.utc)
PID = "P-timeline"


def obs(n: int, analyte: str, value: float, day: float, *, high: float | None = None, status: str = "final",
        corrects: str | None = None):
    a = catalogue().by_key[analyte]
    t = DOSE + timedelta(days=day)
    return build_observation(
        observation_id=f"o{n}", event_id=f"e{n}", patient_id=PID, loinc=a.loinc[0], value=value,
        unit=a.canonical_unit, reference_range=ReferenceRange(low=None, high=high) if high else None,
        effective_at=t, status=status, corrects=corrects, source="test", fmt="json", received_at=t, on_oxygen=None)


def store_with(*observations, cap: int = 20_000) -> InboxStore:
    store = InboxStore(b"k" * 32, max_observations_per_patient=cap)
    store.apply_treatment(DoseEvent(type="dose", event_id="dose-1", patient_id=PID,
                                    product="onasemnogene-abeparvovec-iv", administered_at=DOSE,
                                    birth_date=(DOSE - timedelta(days=240)).date(), weight_kg=7.9))
    for o in observations:
        store.apply_observation_bytes(o.model_dump_json().encode())  # as the consumer applies them
    return store


def test_alt_is_drawn_against_its_own_upper_limit_and_ast_against_an_assumed_one_said_so():
    store = store_with(obs(1, "alt", 120.0, 7, high=40.0), obs(2, "alt", 200.0, 14, high=50.0),
                       obs(3, "ast", 150.0, 7))
    series = store.timeline(PID, now=DOSE + timedelta(days=20))["series"]
    assert series["alt"]["x"] == [7.0, 14.0] and series["alt"]["y"] == [120.0, 200.0]
    assert series["alt"]["xuln"] == [3.0, 4.0] and series["alt"]["uln_assumed"] is False
    assert series["ast"]["xuln"] == [round(150.0 / DEFAULT_ULN["ast"], 3)] and series["ast"]["uln_assumed"] is True


def test_a_correction_replaces_the_value_and_a_withdrawal_removes_it():
    store = store_with(obs(1, "platelets", 90.0, 3), obs(2, "platelets", 250.0, 3, status="corrected", corrects="o1"),
                       obs(3, "platelets", 40.0, 5), obs(4, "platelets", 40.0, 5, status="entered-in-error",
                                                         corrects="o3"))
    series = store.timeline(PID, now=DOSE + timedelta(days=6))["series"]
    assert series["platelets"]["y"] == [250.0]


def test_the_newest_observations_are_kept_under_the_cap_as_timeline_points():
    store = store_with(*(obs(n, "temperature", 36.5 + n / 10, n) for n in range(1, 6)), cap=3)
    assert store.timeline(PID, now=DOSE + timedelta(days=6))["series"]["temperature"]["x"] == [3.0, 4.0, 5.0]
    kept = list(store.patient(PID).observations.values())
    assert all(type(p) is TimelinePoint for p in kept)  # not the whole record (about 3 KB each)
    assert kept[0].analyte is kept[1].analyte  # one string shared by every point of an analyte


def test_a_record_whose_patient_id_breaks_ingests_rule_is_counted_invalid_and_shows_no_patient():
    # a record written to a topic past ingest: the inbox applies ingest's rule, as the clinical stage does
    store = store_with()
    held = set(store.patients)
    for bad in ("", "   ", "P\x00nul", "P" * 129):
        raw = obs(9, "alt", 120.0, 7).model_copy(update={"patient_id": bad}).model_dump_json().encode()
        assert store.apply_observation_bytes(raw) is None
        treatment = {"type": "steroid", "event_id": "s1", "patient_id": bad, "drug": "prednisolone",
                     "dose_mg_per_kg_day": 1.0, "phase": "full", "at": DOSE.isoformat()}
        assert store.apply_treatment_bytes(json.dumps(treatment).encode()) is None
    assert store.counts["invalid"] == 8 and store.counts["observations"] == 0
    assert set(store.patients) == held == {PID}
    good = {"type": "steroid", "event_id": "s1", "patient_id": PID, "drug": "prednisolone",
            "dose_mg_per_kg_day": 1.0, "phase": "full", "at": DOSE.isoformat()}
    assert store.apply_treatment_bytes(json.dumps(good).encode()) is not None  # the same record with a good id
