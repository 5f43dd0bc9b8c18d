"""Builders for clinical scenarios (tests, benchmarks, demos). Pure, no Kafka.

Observations are made with ``schemas.canonical.build_observation`` so units and reference
ranges go through the real conversion, exactly as from a lab feed.
"""
from __future__ import annotations

from datetime import date, datetime, timedelta, timezone
from typing import Iterable

from schemas.analytes import catalogue
from schemas.events import DoseEvent, Observation, ReferenceRange, ResultStatus, SteroidEvent, SteroidPhase
from schemas.findings import Finding
from schemas.ingest import build_observation

from .engine import Engine
from .state import PatientState

T0 = datetime(2025, 3, 3, 8, 0, tzinfo=timezone.utc)  # dose time in scenarios
INFANT_BIRTH = date(2024, 9, 1)  # 6 months old at T0
ADULT_BIRTH = date(2000, 1, 1)

_counter = {"n": 0}


def at(day: float) -> datetime:
    return T0 + timedelta(days=day)


def obs(analyte: str, value: float | None, day: float, *, unit: str | None = None, low: float | None = None,
        high: float | None = None, oid: str | None = None, status: str = "final", corrects: str | None = None,
        patient: str = "p1", on_oxygen: bool | None = None) -> Observation:
    a = catalogue().by_key[analyte]
    if oid is None:
        _counter["n"] += 1
        oid = f"o{_counter['n']}"
    rr = ReferenceRange(low=low, high=high) if (low is not None or high is not None) else None
    eff = at(day)
    return build_observation(
        observation_id=oid, event_id=oid, patient_id=patient, loinc=a.loinc[0], value=value,
        unit=unit if unit is not None else a.canonical_unit, reference_range=rr, effective_at=eff,
        status=ResultStatus(status), corrects=corrects, source="test", fmt="json",
        received_at=eff + timedelta(hours=1), on_oxygen=on_oxygen,
    )


def dose(*, patient: str = "p1", product: str = "onasemnogene-abeparvovec-iv", birth: date = INFANT_BIRTH,
         day: float = 0.0, ward: str | None = "W1", care_team: str | None = "T1") -> DoseEvent:
    return DoseEvent(type="dose", event_id=f"dose-{patient}", patient_id=patient, product=product,
                     administered_at=at(day), birth_date=birth, weight_kg=7.5, ward=ward, care_team=care_team)


def steroid(phase: str, day: float, *, patient: str = "p1") -> SteroidEvent:
    return SteroidEvent(type="steroid", event_id=f"st-{patient}-{phase}-{day}", patient_id=patient,
                        dose_mg_per_kg_day=1.0, phase=SteroidPhase(phase), at=at(day))


class Sim:
    """Feed events to an engine for one patient and keep every finding emitted."""

    def __init__(self, engine: Engine | None = None, patient: str = "p1") -> None:
        self.engine = engine or Engine()
        self.state = PatientState(patient)
        self.findings: list[Finding] = []

    def feed(self, events: Iterable, now: datetime | None = None) -> list[Finding]:
        out: list[Finding] = []
        for ev in events:
            when = now or T0 + timedelta(days=400)
            if isinstance(ev, Observation):
                out += self.engine.evaluate_observation(self.state, ev, when)
            else:
                out += self.engine.apply_treatment(self.state, ev, when)
        self.findings += out
        return out

    def clock(self, day: float) -> list[Finding]:
        out = self.engine.check_schedule(self.state, at(day))
        self.findings += out
        return out

    def last(self, rule_id: str, dedupe_key: str = "") -> Finding | None:
        for f in reversed(self.findings):
            if f.rule_id == rule_id and f.dedupe_key == dedupe_key:
                return f
        return None

    def present(self) -> dict[str, Finding]:
        """Rule (|dedupe) -> the last finding, for rules whose last finding is ``present``."""
        last: dict[str, Finding] = {}
        for f in self.findings:
            last[f.rule_id + ("|" + f.dedupe_key if f.dedupe_key else "")] = f
        return {k: f for k, f in last.items() if f.state == "present"}
