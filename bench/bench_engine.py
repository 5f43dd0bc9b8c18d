"""Benchmark the pure rule engine: evaluation cost per observation and state size.

Run: .venv/bin/python bench/bench_engine.py [--patients N] [--days D]

Builds realistic post-dose trajectories (baseline labs, weekly liver/heme/renal/cardiac
labs for three months, vital signs every 4 hours for the first two weeks), builds the
canonical observations up front, then times only ``Engine.evaluate_observation`` on the
default IV protocol. Prints microseconds per observation and the JSON size of
``PatientState.to_dict()`` per patient.
"""
from __future__ import annotations

import argparse
import json
import random
import statistics
import sys
import time
from datetime import date, datetime, timedelta, timezone
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from alerts.engine import Engine  # noqa: E402
from alerts.state import PatientState  # noqa: E402
from schemas.analytes import catalogue  # noqa: E402
from schemas.events import DoseEvent, Observation, ReferenceRange, SteroidEvent, SteroidPhase  # noqa: E402

T0 = datetime(2025, 3, 3, 8, tzinfo=timezone.utc)

LABS = {  # analyte: (typical value, reference range)
    "alt": (30, (None, 40)), "ast": (45, (None, 60)), "bilirubin_total": (0.5, (None, 1.2)),
    "alp": (250, (None, 500)), "ggt": (20, (None, 60)), "ldh": (300, (None, 600)),
    "platelets": (300, (150, 450)), "hemoglobin": (115, (95, 140)), "creatinine": (0.25, (0.1, 0.4)),
    "troponin_i": (10, (None, 40)), "inr": (1.0, (0.8, 1.2)), "pt": (12, (10, 13.5)),
}
VITALS = {"heart_rate": 130, "respiratory_rate": 38, "systolic_bp": 90, "spo2": 98, "temperature": 36.9}
NOISE = {"temperature": 0.01}


_DECIMALS = {"bilirubin_total": 2, "creatinine": 2, "inr": 2, "pt": 1, "temperature": 1}


def _realistic(analyte: str, value: float) -> float:
    """Round as a lab or monitor reports it (enzymes, counts, vitals as integers)."""
    if analyte == "spo2":
        value = min(value, 100.0)
    return float(round(value, _DECIMALS.get(analyte, 0)))


def make_patient(pid: str, rng: random.Random, days: int) -> tuple[list, list[Observation]]:
    cat = catalogue().by_key
    treatments = [
        SteroidEvent(type="steroid", event_id=f"{pid}-s1", patient_id=pid, dose_mg_per_kg_day=1.0,
                     phase=SteroidPhase.FULL, at=T0 - timedelta(days=1)),
        DoseEvent(type="dose", event_id=f"{pid}-d", patient_id=pid, product="onasemnogene-abeparvovec-iv",
                  administered_at=T0, birth_date=date(2024, 9, 1), weight_kg=7.5, ward="W1", care_team="T1"),
        SteroidEvent(type="steroid", event_id=f"{pid}-s2", patient_id=pid, dose_mg_per_kg_day=0.5,
                     phase=SteroidPhase.TAPER, at=T0 + timedelta(days=30)),
    ]
    obs: list[Observation] = []
    n = 0

    def add(analyte, value, when, rr=None):
        nonlocal n
        n += 1
        a = cat[analyte]
        oid = f"{pid}-{n:05d}"  # ids like lab accession numbers (13 chars)
        obs.append(Observation(
            observation_id=oid, event_id=oid, patient_id=pid, analyte=analyte, loinc=a.loinc[0], kind=a.kind,
            value=_realistic(analyte, value), unit=a.canonical_unit,
            reference_range=None if rr is None else ReferenceRange(low=rr[0], high=rr[1]),
            effective_at=when, source="bench", received_at=when,
        ))

    lab_days = [-2] + list(range(7, 31, 7)) + list(range(44, min(days, 91), 14))
    for d in lab_days:
        when = T0 + timedelta(days=d, hours=rng.randint(0, 6))
        for analyte, (v, rr) in LABS.items():
            f = 1.0
            if analyte in ("alt", "ast") and 7 <= d <= 60:
                f = rng.uniform(1.0, 3.0)  # typical transient rise
            if analyte == "platelets" and d == 7:
                f = rng.uniform(0.5, 0.9)
            add(analyte, v * f * rng.uniform(0.9, 1.1), when, rr)
    for h in range(0, 14 * 24, 4):
        when = T0 + timedelta(hours=h)
        for analyte, v in VITALS.items():
            nz = NOISE.get(analyte, 0.05)
            add(analyte, v * rng.uniform(1 - nz, 1 + nz), when)
    obs.sort(key=lambda o: o.effective_at)
    return treatments, obs


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--patients", type=int, default=200)
    ap.add_argument("--days", type=int, default=90)
    ap.add_argument("--repeat", type=int, default=3)
    args = ap.parse_args()
    rng = random.Random(42)
    engine = Engine()
    patients = [make_patient(f"P{i:06d}", rng, args.days) for i in range(args.patients)]
    n_obs = sum(len(o) for _, o in patients)
    now = T0 + timedelta(days=100)
    runs = []
    findings = 0
    states: list[PatientState] = []
    for _ in range(args.repeat):
        states = []
        elapsed = 0.0
        findings = 0
        for treatments, obs in patients:
            st = PatientState(obs[0].patient_id)
            for t in treatments:
                findings += len(engine.apply_treatment(st, t, now))
            ev = engine.evaluate_observation
            t0 = time.perf_counter()
            for o in obs:
                findings += len(ev(st, o, now))
            elapsed += time.perf_counter() - t0
            states.append(st)
        runs.append(elapsed / n_obs * 1e6)
    sizes = [len(json.dumps(s.to_dict(), separators=(",", ":"))) for s in states]
    # clock-driven schedule check
    t0 = time.perf_counter()
    for st in states:
        engine.check_schedule(st, now)
    sched_us = (time.perf_counter() - t0) / len(states) * 1e6
    print(f"patients: {args.patients}, observations: {n_obs}, findings emitted per run: {findings}")
    print(f"evaluate_observation: {min(runs):.2f} us/observation (best of {args.repeat}; runs: "
          + ", ".join(f"{r:.2f}" for r in runs) + ")")
    print(f"check_schedule: {sched_us:.2f} us/patient")
    print(f"state JSON bytes per patient: median {statistics.median(sizes):.0f}, max {max(sizes)}")


if __name__ == "__main__":
    main()
