"""Seeded synthetic post-dose cohorts, their ground truth, and a rate-limited publisher.

``generate_cohort`` builds patients (2 months to adult; IV under 2 years, IT from 2 years),
each with pre-dose baselines, the dose, the prednisolone course (full 1 mg/kg/day from day -1,
taper over 28 days once the transaminases are unremarkable, re-escalated if they rise during
the taper, then stopped), a lab schedule that follows the label, vitals, and one archetype
per clinical feature.

Draws (``SCHEDULES`` is the unit's reading of the label): IV liver panel (with PT/INR) and
CBC on days 7, 14, 21, 28, then every 14 days; troponin I weekly in month 1, on days 56 and
84, with the first visit after month 3 (day 98) and every 28 days after. IT liver panel and CBC
weekly while on steroids, then every 14 days; troponin weekly in month 1. From day 90 the
"until complete" sampling stops once a draw's results meet the end-of-monitoring criteria
(``_criteria_met``); only the IT steroid-driven liver sampling (on steroids and 30 days after)
goes on past that.


=================  ==========================================================================
liver (IV / IT)    none 15/40 %, CTCAE grade 1 48/45 %, grade 2 25/12 %, grade 3 7/2 %,
                   grade 4 + ALF signature 3/0.5 %, Hy's law 2/0.5 % (peaks weeks 1-8; the
                   serious ones half of the time during the taper). ~62 % of IV and ~30 % of IT
                   patients have an ALT above ULN before dosing (clinical-reference 3a: > 60 %).
platelets          nadir on day 3 or 7: none 40 %, grade 1 49 %, grade 2 8 %, grade 3 3 %
TMA                0.6 % (platelets < 50, Hgb -20 %, LDH 2-4x ULN, creatinine x2-2.8 on days 5-10)
troponin           normal 65 %, transient rise above ULN 30 %, above 176 ng/L 5 %
fever (days 0-2)   IV: grade 1 35 %, grade 2 8 %; IT: grade 1 42 %, grade 2 10 %
missed labs        6 %: every visit of the last 20 days skipped -> overdue at ``cohort.now``
                   (unless nothing was due then, e.g. monitoring had already completed)
corrections        3 %: a platelet count mistyped then corrected; 3 %: a temperature
                   entered in error (each later withdrawn, so no alert should rest on it)
=================  ==========================================================================

Rare archetypes are assigned by quota (round(rate x n), at least one of each critical kind
when n >= 50), so a 100-patient cohort always holds a TMA, a Hy's law and an ALF case.

Ground truth (``Cohort.expected``) is derived from the design, not from the engine: every
generated sample carries the CTCAE grade it was drawn for (values are drawn inside that
grade's band, with margins), and a rule is expected at the highest severity among the
samples actually emitted (visits after ``now`` or skipped by a missed-lab patient do not
count). The clock-driven rules are judged at ``now`` on the samples emitted:
``schedule.overdue`` when a ``SCHEDULES`` group is overdue (``_overdue_groups``: the interval
in force plus 1 day of grace since the newest sample, or the dose); ``monitoring.complete``
when, at least 90 days after the dose, the newest result of every required analyte was taken
on or after day 90 and meets the criteria, and no group is overdue (completion ends the
"until complete" periods, so a patient who completed is not overdue for them).

Time: the cohort covers ``[start, start + days]``; ``start`` defaults to today 00:00 UTC minus
``days``, so every effective time is in the past. Doses are spread over the first 60 % of the
window. ``simulate`` sends the events in effective-time order; ``compress`` (days of
effective time per real second) paces them, ``rate`` caps events per second; the effective
times themselves are never moved.

Formats: each lab/vital event is encoded as JSON (the wire contract of ``schemas.events``),
FHIR R4 Observation (a liver panel is one Observation with components) or HL7 v2 ORU^R01
(one OBR per event, filler order number = event id). Dose and steroid events are always JSON
on ``treatments``. Ids: JSON corrections carry a new ``event_id`` and ``corrects``; FHIR and
HL7 corrections reuse the original resource id / order number, as those standards do.
"""
from __future__ import annotations

import argparse
import json
import random
import sys
import time
from dataclasses import dataclass, field
from datetime import date, datetime, timedelta, timezone
from pathlib import Path
from typing import Iterable, Sequence

from schemas.findings import SEVERITY_ORDER, SEVERITY_RANK

DAY = 86400.0
SEVERITIES = tuple(s.value for s in SEVERITY_ORDER)
SEV_RANK = SEVERITY_RANK
GRADE_SEV = {1: "info", 2: "warning", 3: "high", 4: "critical"}
FORMATS = ("json", "fhir", "hl7")
IV = "onasemnogene-abeparvovec-iv"
IT = "onasemnogene-abeparvovec-it"

LAB, VITAL, PANEL, TREAT = "lab-results", "vital-signs", "liver-function", "treatments"

L_ALT, L_AST, L_TBIL, L_INR, L_PT = "1742-6", "1920-8", "1975-2", "6301-6", "5902-2"
L_PLT, L_HGB, L_CREA, L_LDH, L_TNI = "777-3", "718-7", "2160-0", "2532-0", "10839-9"
L_TEMP, L_HR, L_RR, L_SBP, L_SPO2 = "8310-5", "8867-4", "9279-1", "8480-6", "59408-5"

#: archetype rates per product (fractions of that product's patients)
LIVER_RATES = {
    IV: {"g1": 0.48, "g2": 0.25, "g3": 0.07, "g4": 0.03, "hys": 0.02},
    IT: {"g1": 0.45, "g2": 0.12, "g3": 0.02, "g4": 0.005, "hys": 0.005},
}
PLATELET_RATES = {"p1": 0.49, "p2": 0.08, "p3": 0.03}
TMA_RATE = 0.006
TROPONIN_RATES = {"t1": 0.30, "t2": 0.05}
FEVER_RATES = {IV: {"f1": 0.35, "f2": 0.08}, IT: {"f1": 0.42, "f2": 0.10}}
MISSED_RATE = 0.06
TYPO_RATE = 0.03
EIE_RATE = 0.03
ABNORMAL_ALT_BASELINE = {IV: 0.62, IT: 0.30}
CRITICAL_KINDS = ("tma", "hys", "g4")

#: The label's sampling schedule as the simulated unit reads it (the same clinical content as
#: the protocols' ``schedules``, written out here so the ground truth does not depend on the
#: engine or its protocol loader): product -> group -> (analytes, any one of them suffices,
#: periods). A period is (from_day, to_day, every_days, steroid phases or None,
#: (from, to) days since the phase began or None, ends when monitoring is complete); at a
#: given time the FIRST period that applies is in force. A sample is overdue when more than
#: ``every_days`` + ``SCHEDULE_GRACE_DAYS`` have passed since the last one (or the dose).
_IV_BIWEEKLY = [(0, 30, 7, None, None, False), (30, 90, 14, None, None, False),
                (90, 365, 14, None, None, True)]
SCHEDULES = {
    IV: {
        "liver": (("alt", "ast", "bilirubin_total"), False, _IV_BIWEEKLY),
        "coagulation": (("pt", "inr"), True, _IV_BIWEEKLY),
        "platelets": (("platelets",), False, _IV_BIWEEKLY),
        "troponin": (("troponin_i",), True, [(0, 30, 7, None, None, False), (30, 90, 30, None, None, False),
                                             (90, 365, 30, None, None, True)]),
    },
    IT: {
        "liver": (("alt", "ast", "bilirubin_total"), False, [
            (0, 30, 7, None, None, False),
            (30, 365, 7, ("full", "taper"), None, False),
            (30, 365, 7, ("stopped",), (0, 30), False),
            (30, 90, 14, ("stopped",), None, False),
            (30, 90, 7, ("none",), None, False),
            (90, 365, 14, None, None, True)]),
        "platelets": (("platelets",), False, [(0, 30, 7, None, None, False), (90, 365, 14, None, None, True)]),
        "troponin": (("troponin_i",), True, [(0, 30, 7, None, None, False)]),
    },
}
SCHEDULE_GRACE_DAYS = 1.0
#: end of monitoring: no earlier than this many days after the dose, and every criterion must
#: rest on a result taken on or after that day
COMPLETION_MIN_DAYS = 90.0


# ------------------------------------------------------------------ data model
@dataclass
class SimEvent:
    """One input event: ``payload`` is the JSON wire form (``schemas.events``)."""

    topic: str
    event_id: str
    patient_id: str
    at: datetime
    payload: dict
    fmt: str = "json"
    #: for corrections / withdrawals: the wire observation ids they replace (per format)
    note: str = ""


@dataclass
class Patient:
    patient_id: str
    product: str
    birth_date: date
    weight_kg: float
    age_months: float
    dose_at: datetime
    now_day: float
    archetypes: dict = field(default_factory=dict)
    steroid: list = field(default_factory=list)  # [(day, phase)]


@dataclass
class Cohort:
    seed: int
    start: datetime
    now: datetime
    days: int
    patients: list[Patient]
    events: list[SimEvent]
    #: patient id -> {(rule_id, severity)}: the rule must be raised at (at least) that severity
    expected: dict[str, set]
    #: patient id -> {rule_id} of the critical rules among ``expected``
    critical_expected: dict[str, set]
    #: (observation id as the engine sees it, canonical value) of results later withdrawn or corrected
    withdrawn: set = field(default_factory=set)

    def expected_json(self) -> dict:
        return {
            "seed": self.seed, "start": self.start.isoformat(), "now": self.now.isoformat(), "days": self.days,
            "patients": {
                p.patient_id: {
                    "product": p.product, "age_months": round(p.age_months, 1), "weight_kg": p.weight_kg,
                    "dose_at": p.dose_at.isoformat(), "days_since_dose_at_now": round(p.now_day, 2),
                    "archetypes": p.archetypes,
                    "expected": sorted([r, s] for r, s in self.expected.get(p.patient_id, ())),
                    "critical": sorted(self.critical_expected.get(p.patient_id, ())),
                }
                for p in self.patients
            },
        }


# ------------------------------------------------------------------ helpers
def _age_months(birth: date, t: datetime) -> float:
    """Age as the engine reckons it (UTC midnight of the birth date, 30.4375-day months)."""
    b = datetime(birth.year, birth.month, birth.day, tzinfo=timezone.utc)
    return (t - b).total_seconds() / 2629800.0


def _r(x: float, nd: int = 1) -> float:
    return round(float(x), nd)


def _weight_for_age(rng: random.Random, months: float) -> float:
    if months < 12:
        w = 3.4 + 0.55 * months
    elif months < 24:
        w = 9.5 + 0.2 * (months - 12)
    elif months < 144:
        w = 12 + 2.6 * (months / 12 - 2)
    elif months < 216:
        w = 38 + 3.5 * (months / 12 - 12)
    else:
        w = 55
    return _r(w * rng.uniform(0.78, 1.05), 1)  # SMA: often lighter than the median


def _quota(rng: random.Random, ids: list, rates: dict, min_one: Iterable = ()) -> dict:
    """Assign archetype labels by quota (deterministic frequencies); the rest get 'none'."""
    order = list(ids)
    rng.shuffle(order)
    out, i = {}, 0
    for k, rate in rates.items():
        n = int(round(rate * len(ids)))
        if k in min_one and len(ids) >= 50:
            n = max(n, 1)
        for pid in order[i:i + n]:
            out[pid] = k
        i += n
    for pid in order[i:]:
        out[pid] = "none"
    return out


# CTCAE-style bands used to DRAW values (multiples of the reference: ULN, or the baseline when
# the baseline is above ULN), with margins away from every cut of the protocol.
def _liver_multiple(rng, grade: int, r: float) -> float:
    """Multiple of the reference for a designated transaminase grade; ``r`` = reference / ULN."""
    if grade == 1:
        return rng.uniform(1.7, 2.6)
    if grade == 2:
        return rng.uniform(3.4, 4.6)
    if grade == 3:
        return rng.uniform(6.5, max(6.6, min(15.0, 18.0 / r)))  # stays < 20x ULN (no ALF signature)
    if grade == 4:
        return rng.uniform(max(24.0, 22.0 / r), 40.0)
    return 0.0


# normal vitals by age band (inside every PEWS 0-score band, below the PALS systolic ULN, NEWS2 0)
def _vital_norms(months: float) -> dict:
    if months < 3:
        return {"hr": (130, 8), "sbp": (70, 4), "rr": (42, 5)}
    if months < 12:
        return {"hr": (128, 8), "sbp": (90, 4), "rr": (36, 4)}
    if months < 48:
        return {"hr": (105, 6), "sbp": (97, 3), "rr": (28, 4)}
    if months < 144:
        return {"hr": (90, 8), "sbp": (102, 4), "rr": (24, 3)}
    return {"hr": (76, 8), "sbp": (118, 4), "rr": (14, 1)}


def _lab_ranges(months: float) -> dict:
    if months < 12:
        hgb = (9.5, 14.0) if months < 6 else (10.5, 13.5)
        return {"hgb": hgb, "crea": (0.1, 0.4), "ldh": (140, 430), "ast_uln": 60}
    if months < 144:
        hgb = (10.5, 13.5) if months < 24 else (11.5, 15.5)
        return {"hgb": hgb, "crea": (0.2, 0.7), "ldh": (120, 300), "ast_uln": 40}
    return {"hgb": (12.0, 16.0), "crea": (0.5, 1.2), "ldh": (120, 250), "ast_uln": 40}


# ------------------------------------------------------------------ generation
def generate_cohort(n_patients: int, seed: int, start: datetime | None = None, days: int = 90,
                    formats: Sequence[str] = ("json",), it_fraction: float = 0.3,
                    id_prefix: str | None = None) -> Cohort:
    """Build a deterministic cohort (same arguments -> identical events and truth).

    ``formats``: per event, one of these is chosen at random ("mixed" = json, fhir and hl7).
    """
    fmts = tuple(FORMATS if f == "mixed" else (f,) for f in formats)
    fmts = tuple(dict.fromkeys(x for t in fmts for x in t))
    for f in fmts:
        if f not in FORMATS:
            raise ValueError(f"unknown format {f!r}")
    if start is None:
        today = datetime.now(timezone.utc).replace(hour=0, minute=0, second=0, microsecond=0)
        start = today - timedelta(days=days)
    if start.tzinfo is None:
        raise ValueError("start must be timezone-aware")
    now = start + timedelta(days=days)
    rng = random.Random(seed)
    prefix = id_prefix or f"SIM{seed}"
    ids = [f"{prefix}-{i + 1:04d}" for i in range(n_patients)]

    n_it = int(round(it_fraction * n_patients))
    order = list(ids)
    rng.shuffle(order)
    product = {pid: (IT if i < n_it else IV) for i, pid in enumerate(order)}
    iv_ids = [p for p in ids if product[p] == IV]
    it_ids = [p for p in ids if product[p] == IT]
    liver = {**_quota(rng, iv_ids, LIVER_RATES[IV], min_one=("hys", "g4")),
             **_quota(rng, it_ids, LIVER_RATES[IT])}
    tma = _quota(rng, ids, {"tma": TMA_RATE}, min_one=("tma",))
    plt_arch = _quota(rng, [p for p in ids if tma[p] != "tma"], PLATELET_RATES)
    trop = _quota(rng, ids, TROPONIN_RATES)
    fever = {**_quota(rng, iv_ids, FEVER_RATES[IV]), **_quota(rng, it_ids, FEVER_RATES[IT])}
    typo = _quota(rng, ids, {"typo": TYPO_RATE})
    eie = _quota(rng, ids, {"eie": EIE_RATE})

    patients: list[Patient] = []
    for pid in ids:
        prod = product[pid]
        if prod == IV:
            months = rng.uniform(2.0, 23.5)
        else:
            years = rng.choice([rng.uniform(2.0, 12.0), rng.uniform(2.0, 12.0), rng.uniform(12.0, 18.0),
                                rng.uniform(18.0, 45.0)])
            if 15.5 < years < 16.5:  # keep clear of the PEWS/NEWS2 switch at 16
                years = 17.0
            months = years * 12
        dose_off = rng.uniform(2.5, max(3.0, 0.6 * days))
        dose_at = (start + timedelta(days=dose_off)).replace(minute=0, second=0, microsecond=0)
        dose_at = dose_at.replace(hour=9 + rng.randrange(0, 4))
        birth = (dose_at - timedelta(days=months * 30.4375)).date()
        p = Patient(pid, prod, birth, _weight_for_age(rng, months), _age_months(birth, dose_at), dose_at,
                    (now - dose_at).total_seconds() / DAY)
        p.archetypes = {"liver": liver[pid], "platelets": "tma" if tma[pid] == "tma" else plt_arch.get(pid, "none"),
                        "troponin": trop[pid], "fever": fever[pid], "missed_labs": False,
                        "typo": typo[pid] == "typo", "entered_in_error": eie[pid] == "eie"}
        patients.append(p)
    # missed labs: among patients whose liver schedule is running at `now` (decided after the steroid plan)
    missed_pool = [p.patient_id for p in patients if p.now_day >= 12]
    missed = set(_quota(rng, missed_pool, {"m": MISSED_RATE}).items())
    missed = {pid for pid, k in missed if k == "m"}

    events: list[SimEvent] = []
    expected: dict[str, set] = {}
    withdrawn: set = set()
    for p in patients:
        prng = random.Random(f"{seed}:{p.patient_id}")
        ev, truth = _patient(p, prng, now, fmts, p.patient_id in missed, withdrawn)
        events += ev
        expected[p.patient_id] = truth
    events.sort(key=lambda e: (e.at, e.patient_id, e.event_id))
    critical = {pid: {r for r, s in t if s == "critical"} for pid, t in expected.items()}
    return Cohort(seed, start, now, days, patients, events, expected, critical, withdrawn)


def _patient(p: Patient, rng: random.Random, now: datetime, fmts, missed: bool, withdrawn: set):
    pid, prod, A = p.patient_id, p.product, p.archetypes
    ev: list[SimEvent] = []
    n = [0]
    truth: dict[str, int] = {}  # rule -> severity rank

    def want(rule: str, sev: str) -> None:
        if SEV_RANK[sev] > truth.get(rule, -1):
            truth[rule] = SEV_RANK[sev]

    def t_of(day: float) -> datetime:
        return p.dose_at + timedelta(days=day)

    def eid(kind: str) -> str:
        n[0] += 1
        return f"{pid}-{kind}-{n[0]:04d}"

    def emitted(day: float) -> bool:
        return t_of(day) <= now - timedelta(minutes=5)

    def fmt() -> str:
        return fmts[0] if len(fmts) == 1 else rng.choice(fmts)

    def lab(loinc, value, unit, day, low=None, high=None, **kw) -> SimEvent:
        e = SimEvent(LAB, kw.pop("event_id", None) or eid("lab"), pid, t_of(day), {
            "event_id": None, "patient_id": pid, "loinc": loinc, "value": value, "unit": unit,
            "reference_range": {"low": low, "high": high}, "effective_at": t_of(day).isoformat(),
            "status": kw.pop("status", "final"), "source": "central-lab", **kw}, fmt())
        e.payload["event_id"] = e.event_id
        ev.append(e)
        return e

    def vital(loinc, value, unit, day, **kw) -> SimEvent:
        e = SimEvent(VITAL, kw.pop("event_id", None) or eid("vit"), pid, t_of(day), {
            "event_id": None, "patient_id": pid, "loinc": loinc, "value": value, "unit": unit,
            "effective_at": t_of(day).isoformat(), "status": kw.pop("status", "final"), "source": "ward-monitor",
            **kw}, fmt())
        e.payload["event_id"] = e.event_id
        ev.append(e)
        return e

    ages = p.age_months
    rngs = _lab_ranges(ages)
    ALT_ULN, AST_ULN, TB_ULN = 40.0, float(rngs["ast_uln"]), 1.2

    # ---------------- baselines
    alt_abn = rng.random() < ABNORMAL_ALT_BASELINE[prod]
    ast_abn = rng.random() < (0.7 if alt_abn else 0.15)
    alt_b = ALT_ULN * (rng.uniform(1.1, 1.6) if alt_abn else rng.uniform(0.4, 0.85))
    ast_b = AST_ULN * (rng.uniform(1.1, 1.6) if ast_abn else rng.uniform(0.4, 0.85))
    alt_ref = alt_b if alt_abn else ALT_ULN
    ast_ref = ast_b if ast_abn else AST_ULN
    tb_b = TB_ULN * rng.uniform(0.25, 0.6)
    plt_b = rng.uniform(220, 420)
    hgb_lo, hgb_hi = rngs["hgb"]
    hgb_b = rng.uniform(hgb_lo + 1.0, hgb_hi - 0.5)
    cr_lo, cr_hi = rngs["crea"]
    cr_b = cr_hi * rng.uniform(0.45, 0.68)
    ldh_lo, ldh_hi = rngs["ldh"]
    ldh_b = ldh_hi * rng.uniform(0.5, 0.72)
    tni_b = rng.uniform(0.004, 0.02)
    A["baseline_alt_above_uln"] = alt_abn

    def panel(day, alt, ast, tbil, inr, **kw) -> SimEvent:
        e = SimEvent(PANEL, kw.pop("event_id", None) or eid("lft"), pid, t_of(day), {
            "event_id": None, "patient_id": pid, "effective_at": t_of(day).isoformat(), "source": "central-lab",
            "status": kw.pop("status", "final"), **kw,
            "results": [
                {"loinc": L_ALT, "value": _r(alt, 0), "unit": "U/L", "reference_range": {"low": 0, "high": ALT_ULN}},
                {"loinc": L_AST, "value": _r(ast, 0), "unit": "U/L", "reference_range": {"low": 0, "high": AST_ULN}},
                {"loinc": L_TBIL, "value": _r(tbil, 2), "unit": "mg/dL", "reference_range": {"low": 0.1, "high": TB_ULN}},
                {"loinc": L_INR, "value": _r(inr, 2), "unit": "{INR}", "reference_range": {"low": 0.8, "high": 1.2}},
                {"loinc": L_PT, "value": _r(12.0 * inr, 1), "unit": "s", "reference_range": {"low": 10, "high": 13.5}},
            ]}, fmt())
        e.payload["event_id"] = e.event_id
        ev.append(e)
        return e

    def cbc(day, plt, hgb, cr, ldh):
        lab(L_PLT, _r(plt, 0), "10*3/uL", day, 150, 450)
        lab(L_HGB, _r(hgb, 1), "g/dL", day, hgb_lo, hgb_hi)
        lab(L_CREA, _r(cr, 2), "mg/dL", day, cr_lo, cr_hi)
        lab(L_LDH, _r(ldh, 0), "U/L", day, ldh_lo, ldh_hi)

    def vitals(day, temp=None):
        m = _age_months(p.birth_date, t_of(day))
        nm = _vital_norms(m)
        t = temp if temp is not None else rng.uniform(36.4, 37.4)
        vital(L_TEMP, _r(t, 1), "Cel", day)
        vital(L_HR, _r(rng.uniform(nm["hr"][0] - nm["hr"][1], nm["hr"][0] + nm["hr"][1]), 0), "/min", day)
        vital(L_RR, _r(rng.uniform(nm["rr"][0] - nm["rr"][1], nm["rr"][0] + nm["rr"][1]), 0), "/min", day)
        vital(L_SBP, _r(rng.uniform(nm["sbp"][0] - nm["sbp"][1], nm["sbp"][0] + nm["sbp"][1]), 0), "mm[Hg]", day)
        vital(L_SPO2, _r(rng.uniform(97, 99.4), 0), "%", day)
        return t

    pre = -2 + rng.uniform(-0.2, 0.2)
    panel(pre, alt_b, ast_b, tb_b, rng.uniform(0.9, 1.1))
    cbc(pre, plt_b, hgb_b, cr_b, ldh_b)
    lab(L_TNI, _r(tni_b, 3), "ng/mL", pre, 0, 0.04)
    vitals(pre)

    # ---------------- visit days (post dose): liver panel + CBC/creatinine/LDH
    horizon = p.now_day + 1
    if prod == IV:
        visits = [7, 14, 21, 28] + list(range(42, 400, 14))
    else:
        visits = list(range(7, 400, 7))
    h_off = {d: rng.uniform(0.0, 0.15) for d in visits}  # morning draw, jitter of a few hours
    if missed:
        skipped = {d for d in visits if p.now_day - 20 < d + h_off[d] <= p.now_day}
        A["missed_labs"] = True
    else:
        skipped = set()

    # ---------------- liver course: designated grade per visit (ALT; AST the same or one lower)
    la = A["liver"]
    peak_grade = {"none": 0, "g1": 1, "g2": 2, "g3": 3, "g4": 4, "hys": 3}[la]
    grades = {d: 0 for d in visits}
    late = False
    if peak_grade:
        if la == "g1":
            cands, late = [7, 14, 21, 28], False
        elif la == "g2":
            late = rng.random() < 0.2
        else:
            late = rng.random() < (0.5 if la == "g3" else 0.6)
        if la != "g1":
            cands = [42, 56] if late else ([21, 28] if peak_grade >= 3 else [7, 14, 21, 28])
        peak = rng.choice(cands)
        A["liver_peak_day"] = peak
        i = visits.index(peak)
        grades[peak] = peak_grade
        if i > 0 and peak - visits[i - 1] <= 7 and visits[i - 1] >= 7 and (not late or peak_grade - 1 >= 2):
            grades[visits[i - 1]] = peak_grade - 1
        g = peak_grade
        for d in visits[i + 1:]:
            g -= 1
            if g <= 0:
                break
            grades[d] = g
    ast_grades = {d: (g if g <= 1 or rng.random() < 0.7 else g - 1) for d, g in grades.items()}
    if la == "g4":  # ALF: AST at least grade 3 at the peak
        ast_grades[A["liver_peak_day"]] = max(3, ast_grades[A["liver_peak_day"]])

    # ---------------- steroid plan from the visits that happen (decisions use only past results)
    steroid = [(-1.0, "full")]
    phase, taper_start_day, stopped_at = "full", None, None
    seen = [d for d in visits if d not in skipped and d + h_off[d] <= horizon]
    for d in seen:
        td = d + h_off[d]
        if phase == "taper" and td >= taper_start_day + 28:
            stopped_at = taper_start_day + 28
            steroid.append((stopped_at, "stopped"))
            phase = "stopped"
            break
        if phase == "full" and d >= 28 and grades[d] == 0:
            taper_start_day = max(30.0, td + 0.5)
            steroid.append((taper_start_day, "taper"))
            phase = "taper"
        elif phase == "taper" and td >= taper_start_day and grades[d] >= 2:
            steroid.append((td + 0.5, "full"))  # taper gate breached: back to the full dose
            phase, taper_start_day = "full", None
    if phase == "taper":
        stopped_at = taper_start_day + 28
        steroid.append((stopped_at, "stopped"))
    p.steroid = steroid

    def phase_at(day: float) -> str:
        ph = "none"
        for d0, x in steroid:
            if d0 <= day:
                ph = x
        return ph

    # IT: weekly while on steroids and for 30 days after stopping them, then every 14 days
    if prod == IT and stopped_at is not None:
        kept, last = [], None
        for d in visits:
            if d + h_off[d] < stopped_at + 30 or last is None or d - last >= 14:
                kept.append(d)
                last = d
        visits = kept

    # ---------------- steroid events
    for day, ph in steroid:
        if not emitted(day):
            continue
        dose = {"full": 1.0, "taper": 0.5, "stopped": 0.0}[ph]
        e = SimEvent(TREAT, eid("ster"), pid, t_of(day), {
            "type": "steroid", "event_id": None, "patient_id": pid, "drug": "prednisolone",
            "dose_mg_per_kg_day": dose, "phase": ph, "at": t_of(day).isoformat(), "source": "pharmacy"}, "json")
        e.payload["event_id"] = e.event_id
        ev.append(e)
    e = SimEvent(TREAT, eid("dose"), pid, p.dose_at, {
        "type": "dose", "event_id": None, "patient_id": pid, "product": prod,
        "administered_at": p.dose_at.isoformat(), "birth_date": p.birth_date.isoformat(), "weight_kg": p.weight_kg,
        "ward": "paediatric-neurology" if p.age_months < 192 else "adult-neurology", "care_team": "sma-gene-therapy",
        "source": "pharmacy"}, "json")
    e.payload["event_id"] = e.event_id
    ev.append(e)

    # ---------------- platelets / TMA course
    pa = A["platelets"]
    tma_day = rng.choice([5, 6, 8, 9, 10]) if pa == "tma" else None
    nadir_day = rng.choice([3, 7, 7])
    nadir = {"none": plt_b * rng.uniform(0.8, 0.95), "p1": rng.uniform(85, 140), "p2": rng.uniform(55, 70),
             "p3": rng.uniform(30, 45), "tma": plt_b * rng.uniform(0.82, 0.95)}[pa]
    nadir = max(nadir, 160) if pa in ("none", "tma") else nadir

    def plt_at(day: float) -> tuple[float, float, float, float]:
        """(platelets, Hgb, creatinine, LDH) on ``day``."""
        hgb = hgb_b * rng.uniform(0.97, 1.03)
        cr = cr_b * rng.uniform(0.93, 1.08)
        ldh = ldh_b * rng.uniform(0.92, 1.08)
        if tma_day is not None and tma_day <= day < tma_day + 7:
            return (rng.uniform(28, 45), hgb_b * rng.uniform(0.72, 0.82), cr_b * rng.uniform(2.0, 2.8),
                    ldh_hi * rng.uniform(2.0, 4.0))
        if tma_day is not None and day >= tma_day + 7:
            return (plt_b * rng.uniform(0.85, 1.0), hgb_b * rng.uniform(0.84, 0.88), cr_b * rng.uniform(1.1, 1.3),
                    ldh_hi * rng.uniform(0.6, 0.8))
        if day <= 2.5 or day >= 20:
            plt = plt_b * rng.uniform(0.95, 1.05)
        elif abs(day - nadir_day) < 1:
            plt = nadir
        elif day < nadir_day:
            plt = (plt_b + nadir) / 2
        elif day < 14.5:
            plt = max(nadir, plt_b * rng.uniform(0.85, 1.0)) if day >= 13 else (nadir + plt_b) / 2
        else:
            plt = plt_b * rng.uniform(0.95, 1.05)
        return plt, hgb, cr, ldh

    # ---------------- troponin
    ta = A["troponin"]
    # IV: weekly in month 1, monthly to month 3 (days 56, 84), then with the first visit after
    # month 3 (day 98, the end-of-monitoring panel) and every 28 days until complete
    tni_days = [7, 14, 21, 28] + ([56, 84] + list(range(98, 400, 28)) if prod == IV else [])
    tni_rise = {rng.choice([7, 14, 21, 28])} if ta != "none" else set()
    if ta == "t1" and rng.random() < 0.4:
        tni_rise.add(rng.choice([7, 14, 21, 28]))

    # ---------------- emit the post-dose course
    lab_days = sorted(set([3] + visits + ([tma_day, tma_day + 2] if tma_day else [])))
    plt_series = [(pre, plt_b)]
    hgb_series = [(pre, hgb_b)]
    # the values as emitted (rounded), per analyte: baselines and the post-dose series, which
    # the end-of-monitoring criteria and the schedule are judged on
    baseline = {"platelets": _r(plt_b, 0), "troponin_i": _r(tni_b, 3)}
    last: dict[str, tuple[float, float]] = {}  # analyte -> (day, value) of the newest post-dose result
    complete_day = None  # day of the draw whose results met the end-of-monitoring criteria
    not_drawn = set()  # visits after completion that the unit no longer draws
    for d in lab_days:
        day = d + h_off.get(d, rng.uniform(0.0, 0.15))
        if d in skipped or not emitted(day):
            continue
        draw_cbc = draw_panel = True
        if complete_day is not None:
            # monitoring is complete: the "until complete" sampling stops. Only a schedule
            # that does not end on completion (IT: liver tests while on steroids and for 30 days
            # after stopping them) still asks for a liver panel.
            draw_cbc = False
            draw_panel = prod == IT and d in visits and _steroid_liver_due(steroid, day)
            if not draw_panel:
                not_drawn.add(d)
                continue
        if draw_cbc:
            plt, hgb, cr, ldh = plt_at(d)
            cbc(day, plt, hgb, cr, ldh)
            plt_series.append((day, _r(plt, 0)))
            hgb_series.append((day, _r(hgb, 1)))
            last["platelets"] = (day, _r(plt, 0))
            if tma_day is not None and tma_day <= d < tma_day + 7:
                want("heme.tma_screen", "critical")
                want("heme.platelets_decreased", "high")
                want("renal.creatinine_increased", "warning")
        if d in visits and draw_panel:
            g, ga = grades.get(d, 0), ast_grades.get(d, 0)
            alt = alt_ref * _liver_multiple(rng, g, alt_ref / ALT_ULN) if g else alt_b * rng.uniform(0.85, 1.15)
            ast = ast_ref * _liver_multiple(rng, ga, ast_ref / AST_ULN) if ga else ast_b * rng.uniform(0.85, 1.15)
            if not alt_abn and not g:
                alt = min(alt, 0.95 * ALT_ULN)
            if not ast_abn and not ga:
                ast = min(ast, 0.95 * AST_ULN)
            tb, inr, tbg, inrg = tb_b * rng.uniform(0.85, 1.15), rng.uniform(0.9, 1.1), 0, 0
            pk = A.get("liver_peak_day")
            if la == "hys" and pk is not None and d in (pk, _next(visits, pk)):
                tb, tbg = TB_ULN * rng.uniform(2.3, 2.8), 2
            if la == "g4" and pk is not None and d in (pk, _next(visits, pk)):
                tb, tbg = TB_ULN * rng.uniform(3.5, 6.0), 3
                inr, inrg = (rng.uniform(1.6, 2.2), 2) if d == pk else (rng.uniform(1.3, 1.45), 1)
            panel(day, alt, ast, tb, inr)
            for k, v in (("alt", _r(alt, 0)), ("ast", _r(ast, 0)), ("bilirubin_total", _r(tb, 2)),
                         ("inr", _r(inr, 2)), ("pt", _r(12.0 * inr, 1))):
                last[k] = (day, v)
            if g:
                want("liver.alt_increased", GRADE_SEV[g])
            if ga:
                want("liver.ast_increased", GRADE_SEV[ga])
            if tbg:
                want("liver.bilirubin_increased", GRADE_SEV[tbg])
            if inrg:
                want("coag.inr_increased", GRADE_SEV[inrg])
            pt = _r(12.0 * inr, 1)  # PT reported beside INR (ULN 13.5 s): > ULN warning, > 1.5x ULN high
            if pt > 1.5 * 13.5:
                want("coag.pt_increased", "high")
            elif pt > 13.5:
                want("coag.pt_increased", "warning")
            if tbg >= 2 and g >= 2:
                want("liver.hys_law", "critical")  # ALT/AST >= 3x ULN (grade >= 2) with bilirubin > 2x ULN
            if g == 4 or ga == 4 or (inrg == 2 and g >= 2):
                want("liver.acute_liver_failure_signature", "critical")
            if phase_at(day) == "taper" and max(g, ga) >= 2:
                want("liver.taper_gate_breach", "warning")  # grade >= 2 means >= 3.4x the reference >= 2x ULN
        if d in tni_days and d in visits and draw_cbc:
            if ta == "t2" and d in tni_rise:
                v = rng.uniform(0.20, 0.35)
                want("cardiac.troponin_i_increased", "high")
            elif ta == "t1" and d in tni_rise:
                v = rng.uniform(0.05, 0.12)
                want("cardiac.troponin_i_increased", "warning")
            else:
                v = rng.uniform(0.004, 0.03)
            lab(L_TNI, _r(v, 3), "ng/mL", day, 0, 0.04)
            last["troponin_i"] = (day, _r(v, 3))
        if complete_day is None and _criteria_met(prod, last, baseline, day, ALT_ULN, AST_ULN, TB_ULN):
            complete_day = day  # the unit closes the "until complete" sampling on these results
    A["monitoring_complete_day"] = None if complete_day is None else _r(complete_day, 2)

    # platelets: CTCAE grade of the nadir (design), of every other emitted count (a count on
    # the way down to a grade-2 nadir can itself be below the LLN, and is the lowest one seen
    # when the nadir visit is missed), and the rapid-fall rule (from the emitted series)
    plt_grade = {"none": 0, "tma": 0, "p1": 1, "p2": 2, "p3": 3}[pa]
    if plt_grade and any(abs(dd - nadir_day) < 1 for dd, _ in plt_series[1:]):
        want("heme.platelets_decreased", GRADE_SEV[plt_grade])
    for dd, v in plt_series[1:]:  # CTCAE v5: G1 < LLN (150), G2 < 75, G3 < 50, G4 < 25 (10^3/uL)
        g = 4 if v < 25 else 3 if v < 50 else 2 if v < 75 else 1 if v < 150 else 0
        if g:
            want("heme.platelets_decreased", GRADE_SEV[g])
    for (d0, v0), (d1, v1) in zip(plt_series, plt_series[1:]):
        if 0 <= d1 < 21 and d1 - d0 <= 7 and v1 <= 0.75 * v0:
            want("heme.platelets_falling", "warning")
    for dd, v in hgb_series[1:]:  # CTCAE v5 anaemia: G1 < LLN, G2 < 10 g/dL, G3 < 8 g/dL (absolute)
        if v < 8.0:
            want("heme.anemia", "high")
        elif v < 10.0:
            want("heme.anemia", "warning")
        elif v < hgb_lo:
            want("heme.anemia", "info")

    # ---------------- vitals: inpatient every 8 h (IV 48 h, IT 24 h), then at each visit
    inpatient = [i / 3 for i in range(7 if prod == IV else 4)]
    fa = A["fever"]
    fever_at = rng.choice(inpatient[1:]) if fa != "none" else None
    adult = p.age_months >= 16 * 12
    for d in inpatient + [x + h_off.get(x, 0.1) for x in lab_days if x not in skipped and x not in not_drawn]:
        if not emitted(d):
            continue
        temp = None
        if fever_at is not None and abs(d - fever_at) < 1e-9:
            temp = rng.uniform(38.2, 38.9) if fa == "f1" else rng.uniform(39.2, 39.8)
            want("vitals.fever", "info" if fa == "f1" else "warning")
            if adult:
                want("vitals.early_warning", "info")  # NEWS2 temperature item scores 1-2
        vitals(d, temp)

    # ---------------- corrections and withdrawals
    post = [e for e in ev if e.topic == LAB and e.payload["loinc"] == L_PLT and e.at > p.dose_at]
    if A["typo"] and post:
        orig = rng.choice(post)
        good = orig.payload["value"]
        orig.payload["value"] = _r(good / 10 if good >= 100 else good * 10, 0)  # a slipped digit
        corr = lab(L_PLT, good, "10*3/uL", (orig.at - p.dose_at).total_seconds() / DAY, 150, 450,
                   status="corrected", corrects=orig.event_id)
        corr.at = orig.at + timedelta(hours=1)  # sent an hour later, same effective time
        corr.fmt = orig.fmt
        corr.note = "correction"
        orig.note = "corrected-later"
        withdrawn.add((orig.event_id, float(orig.payload["value"])))
        withdrawn.add((f"{orig.event_id}:{L_PLT}", float(orig.payload["value"])))
    vit = [e for e in ev if e.topic == VITAL and e.payload["loinc"] == L_TEMP and e.at > p.dose_at]
    if A["entered_in_error"] and vit:
        base = rng.choice(vit)
        day = (base.at - p.dose_at).total_seconds() / DAY + 0.05
        if emitted(day + 0.1):
            wrong = vital(L_TEMP, 40.6, "Cel", day)
            wrong.note = "entered-in-error-later"
            w = vital(L_TEMP, 40.6, "Cel", day, status="entered-in-error", corrects=wrong.event_id)
            w.at = wrong.at + timedelta(hours=2)
            w.fmt = wrong.fmt
            w.note = "withdrawal"
            withdrawn.add((wrong.event_id, 40.6))
            withdrawn.add((f"{wrong.event_id}:{L_TEMP}", 40.6))

    # ---------------- schedule and completion at `now`, from the samples actually emitted
    # End of monitoring (label): >= 3 months since dosing, and for every required analyte the
    # newest result was taken on or after day 90 and meets the criteria. Any sample overdue at
    # `now` (a missed-lab patient, or anyone whose schedule the emitted samples do not keep)
    # withholds completion; completion itself ends the "until complete" periods (day 90 on),
    # not the steroid-driven IT liver sampling.
    nd = p.now_day
    steroid_now = [(d0, ph) for d0, ph in steroid if emitted(d0)]
    complete = _criteria_met(prod, last, baseline, nd, ALT_ULN, AST_ULN, TB_ULN)
    overdue = _overdue_groups(prod, last, steroid_now, nd, complete)
    A["overdue_groups"] = overdue
    if complete and not overdue:
        want("monitoring.complete", "info")
    if overdue:
        want("schedule.overdue", "warning")
    elif missed:
        A["missed_labs_unscheduled"] = True  # nothing was due in the skipped weeks, or monitoring had ended
    return ev, {(r, SEVERITIES[s]) for r, s in truth.items()}


def _steroid_liver_due(steroid: list, day: float) -> bool:
    """IT: is the steroid-driven liver sampling (weekly on steroids and for 30 days after
    stopping them) in force on ``day``? It does not end with completion."""
    ph, since = "none", None
    for d0, x in steroid:
        if d0 <= day:
            ph, since = x, d0
    return ph in ("full", "taper") or (ph == "stopped" and since is not None and day - since < 30)


def _criteria_met(prod: str, last: dict, base: dict, day: float, alt_uln: float, ast_uln: float,
                  tb_uln: float) -> bool:
    """The label's end-of-monitoring criteria on the newest emitted values as of ``day``: at
    least ``COMPLETION_MIN_DAYS`` after the dose, every required analyte measured on or after
    that day, ALT and AST < 2x ULN and bilirubin <= ULN; IV also PT <= ULN (13.5 s) or INR <= 1.2
    and troponin I back to baseline or <= ULN (0.04 ng/mL); platelets back to baseline or >= LLN
    (150). ``last``: analyte -> (day, value) of the newest post-dose result emitted so far."""
    if day < COMPLETION_MIN_DAYS:
        return False
    need = ["alt", "ast", "bilirubin_total", "platelets"]
    if prod == IV:
        need += ["pt", "inr", "troponin_i"]
    for a in need:
        if a not in last or last[a][0] < COMPLETION_MIN_DAYS:
            return False
    v = {a: last[a][1] for a in need}
    ok = v["alt"] < 2 * alt_uln and v["ast"] < 2 * ast_uln and v["bilirubin_total"] <= tb_uln
    ok = ok and (v["platelets"] >= base["platelets"] or v["platelets"] >= 150)
    if prod == IV:
        ok = ok and (v["pt"] <= 13.5 or v["inr"] <= 1.2)
        ok = ok and (v["troponin_i"] <= base["troponin_i"] or v["troponin_i"] <= 0.04)
    return ok


def _overdue_groups(prod: str, last: dict, steroid: list, day: float, complete: bool) -> list[str]:
    """Schedule groups (``SCHEDULES``) with a sample overdue on ``day``, from the newest emitted
    post-dose sample of each analyte (``last``) and the steroid events emitted (``steroid``)."""
    ph, since = "none", None
    for d0, x in steroid:
        if d0 <= day:
            ph, since = x, d0
    out = []
    for group, (analytes, any_of, periods) in SCHEDULES[prod].items():
        every = None
        for lo, hi, ev_days, phases, phase_days, ends in periods:
            if not (lo <= day < hi) or (complete and ends):
                continue
            if phases is not None and ph not in phases:
                continue
            if phase_days is not None and (since is None or not (phase_days[0] <= day - since < phase_days[1])):
                continue
            every = ev_days
            break
        if every is None:
            continue
        anchors = [max(last[a][0], 0.0) if a in last else 0.0 for a in analytes]
        due = [anc + every + SCHEDULE_GRACE_DAYS for anc in anchors]
        # any one analyte suffices: overdue only when every one is late; else: when any is
        late = [day > d for d in due]
        if all(late) if any_of else any(late):
            out.append(group)
    return out


def _next(visits: list, d: int):
    i = visits.index(d) if d in visits else -1
    return visits[i + 1] if 0 <= i < len(visits) - 1 else None


# ------------------------------------------------------------------ encoders
def _hl7_ts(d: datetime) -> str:
    d = d.astimezone(timezone.utc)
    return d.strftime("%Y%m%d%H%M%S") + "+0000"


def _num(v: float) -> str:
    s = f"{float(v):.4f}".rstrip("0").rstrip(".")
    return s or "0"


_HL7_STATUS = {"final": "F", "preliminary": "P", "corrected": "C", "amended": "A",
               "entered-in-error": "D", "cancelled": "X"}


def _results_of(e: SimEvent) -> list[dict]:
    if e.topic == PANEL:
        return e.payload["results"]
    return [{"loinc": e.payload["loinc"], "value": e.payload.get("value"), "unit": e.payload.get("unit"),
             "reference_range": e.payload.get("reference_range")}]


def to_fhir(e: SimEvent) -> str:
    """FHIR R4 Observation (a panel: one Observation with components). Id = the original event id."""
    pl = e.payload
    rid = pl.get("corrects") or pl["event_id"]

    def q(v, unit):
        return {"value": v, "system": "http://unitsofmeasure.org", "code": unit}

    def rr(r, unit):
        if not r:
            return None
        out = {}
        if r.get("low") is not None:
            out["low"] = q(r["low"], unit)
        if r.get("high") is not None:
            out["high"] = q(r["high"], unit)
        return [out] if out else None

    obs = {"resourceType": "Observation", "id": rid, "meta": {"source": pl.get("source", "central-lab")},
           "status": pl.get("status", "final"), "subject": {"reference": f"Patient/{pl['patient_id']}"},
           "effectiveDateTime": pl["effective_at"]}
    if e.topic == PANEL:
        obs["code"] = {"coding": [{"system": "http://loinc.org", "code": "24325-3"}]}
        comps = []
        for r in pl["results"]:
            c = {"code": {"coding": [{"system": "http://loinc.org", "code": r["loinc"]}]},
                 "valueQuantity": q(r["value"], r["unit"])}
            if rr(r.get("reference_range"), r["unit"]):
                c["referenceRange"] = rr(r.get("reference_range"), r["unit"])
            comps.append(c)
        obs["component"] = comps
    else:
        obs["code"] = {"coding": [{"system": "http://loinc.org", "code": pl["loinc"]}]}
        if pl.get("value") is not None:
            obs["valueQuantity"] = q(pl["value"], pl["unit"])
        ranges = rr(pl.get("reference_range"), pl.get("unit"))
        if ranges:
            obs["referenceRange"] = ranges
        if e.topic == VITAL:
            obs["category"] = [{"coding": [{
                "system": "http://terminology.hl7.org/CodeSystem/observation-category", "code": "vital-signs"}]}]
    return json.dumps(obs, separators=(",", ":"))


def to_hl7(e: SimEvent) -> str:
    """HL7 v2.5.1 ORU^R01; OBR-3 (filler order) = the original event id, one OBX per result."""
    pl = e.payload
    order = pl.get("corrects") or pl["event_id"]
    ts = _hl7_ts(datetime.fromisoformat(pl["effective_at"]))
    st = _HL7_STATUS[pl.get("status", "final")]
    segs = [f"MSH|^~\\&|LIS|{pl.get('source', 'central-lab')}|MON|GTX|{ts}||ORU^R01^ORU_R01|{pl['event_id']}|P|2.5.1",
            f"PID|1||{pl['patient_id']}^^^HOSP^MR",
            f"OBR|1|{order}|{order}|{'24325-3^Hepatic function panel^LN' if e.topic == PANEL else pl['loinc'] + '^^LN'}"
            f"|||{ts}"]
    for i, r in enumerate(_results_of(e), 1):
        rng_ = r.get("reference_range") or {}
        lo, hi = rng_.get("low"), rng_.get("high")
        if lo is not None and hi is not None:
            rtxt = f"{_num(lo)}-{_num(hi)}"
        elif hi is not None:
            rtxt = f"<{_num(hi)}"
        elif lo is not None:
            rtxt = f">{_num(lo)}"
        else:
            rtxt = ""
        val = "" if r.get("value") is None else _num(r["value"])
        segs.append(f"OBX|{i}|NM|{r['loinc']}^^LN||{val}|{r.get('unit') or ''}^^UCUM|{rtxt}||||{st}|||{ts}")
    return "\r".join(segs) + "\r"


def encode(e: SimEvent, fmt: str | None = None) -> dict | str:
    """The wire value of one event: a dict (JSON) or a string (FHIR JSON text, HL7 v2 text)."""
    f = fmt or e.fmt
    if e.topic == TREAT or f == "json":
        return e.payload
    if f == "fhir":
        return to_fhir(e)
    if f == "hl7":
        return to_hl7(e)
    raise ValueError(f"unknown format {f!r}")


def records(cohort: Cohort, fmt: str | None = None, topics: dict | None = None) -> Iterable[dict]:
    """``{"topic", "key", "value"}`` per event in effective-time order. ``fmt`` overrides the
    per-event format ("mixed" or None keeps the cohort's choice)."""
    f = None if fmt in (None, "mixed") else fmt
    for e in cohort.events:
        topic = topics.get(e.topic, e.topic) if topics else e.topic
        if f is not None and e.topic != TREAT:
            e_fmt = f
        else:
            e_fmt = e.fmt
        # received_at: when the record is sent (``monitor protocol replay --from-file`` uses it as
        # the arrival clock; ``monitor publish`` ignores it)
        yield {"topic": topic, "key": e.patient_id, "value": encode(e, e_fmt), "received_at": e.at.isoformat()}


def write_cohort(cohort: Cohort, path: str | Path, format: str | None = None, topics: dict | None = None) -> dict:
    """Write ``events.jsonl`` and ``ground_truth.json`` into directory ``path`` (or, when
    ``path`` ends in .jsonl, that file and ``ground_truth.json`` beside it)."""
    path = Path(path)
    if path.suffix == ".jsonl":
        events_path, truth_path = path, path.with_name("ground_truth.json")
    else:
        path.mkdir(parents=True, exist_ok=True)
        events_path, truth_path = path / "events.jsonl", path / "ground_truth.json"
    n = 0
    with open(events_path, "w", encoding="utf-8") as fh:
        for rec in records(cohort, format, topics):
            fh.write(json.dumps(rec, separators=(",", ":")) + "\n")
            n += 1
    with open(truth_path, "w", encoding="utf-8") as fh:
        json.dump(cohort.expected_json(), fh, indent=1, sort_keys=True)
    return {"events": n, "events_path": str(events_path), "ground_truth_path": str(truth_path)}


# ------------------------------------------------------------------ engine comparison
def engine_outcome(cohort: Cohort, fmt: str | None = None, now: datetime | None = None) -> dict[str, dict[str, str]]:
    """Run the pure engine over the cohort (each event through ``schemas.ingest.decode`` in
    effective-time order, then ``check_schedule`` at ``now``): patient -> {rule: highest
    severity present}. Findings whose evidence rests on a result later corrected or withdrawn
    (the deliberate typos) are left out."""
    from alerts.engine import Engine
    from alerts.state import PatientState
    from schemas.ingest import decode

    now = now or cohort.now
    eng = Engine()
    states: dict[str, PatientState] = {}
    out: dict[str, dict[str, str]] = {}

    def take(pid, findings):
        d = out.setdefault(pid, {})
        for f in findings:
            if f.state != "present":
                continue
            if any((ev.observation_id, ev.value) in cohort.withdrawn for ev in f.evidence if ev.value is not None):
                continue
            sev = str(f.severity.value if hasattr(f.severity, "value") else f.severity)
            if SEV_RANK[sev] > SEV_RANK.get(d.get(f.rule_id, ""), -1):
                d[f.rule_id] = sev

    for rec_e, rec in zip(cohort.events, records(cohort, fmt)):
        v = rec["value"]
        raw = v.encode() if isinstance(v, str) else json.dumps(v).encode()
        decoded = decode(rec_e.topic, raw, received_at=rec_e.at + timedelta(hours=1))
        pid = rec_e.patient_id
        st = states.setdefault(pid, PatientState(pid))
        if isinstance(decoded, list):
            for o in decoded:
                take(pid, eng.evaluate_observation(st, o, rec_e.at))
        else:
            take(pid, eng.apply_treatment(st, decoded, rec_e.at))
    for pid, st in states.items():
        take(pid, eng.check_schedule(st, now))
    return out


def compare(cohort: Cohort, actual: dict[str, dict[str, str]]) -> dict:
    """Ground truth vs engine: missed (absent or lower severity), extra, over-graded."""
    missed, under, extra, over, match = [], [], [], [], 0
    for p in cohort.patients:
        pid = p.patient_id
        exp = {r: s for r, s in cohort.expected.get(pid, ())}
        got = actual.get(pid, {})
        for r, s in exp.items():
            if r not in got:
                missed.append((pid, r, s, None))
            elif SEV_RANK[got[r]] < SEV_RANK[s]:
                under.append((pid, r, s, got[r]))
            elif SEV_RANK[got[r]] > SEV_RANK[s]:
                over.append((pid, r, s, got[r]))
            else:
                match += 1
        for r, s in got.items():
            if r not in exp:
                extra.append((pid, r, None, s))
    missed_critical = [m for m in missed + under if m[2] == "critical"]
    return {"match": match, "missed": missed, "under": under, "over": over, "extra": extra,
            "missed_critical": missed_critical,
            "expected_total": sum(len(v) for v in cohort.expected.values()),
            "actual_total": sum(len(v) for v in actual.values())}


def summary(cohort: Cohort) -> dict:
    """Counts of archetypes and expected (rule, severity) pairs."""
    arch: dict[str, dict[str, int]] = {}
    for p in cohort.patients:
        for k in ("liver", "platelets", "troponin", "fever", "missed_labs", "typo", "entered_in_error"):
            v = str(p.archetypes.get(k))
            arch.setdefault(k, {}).setdefault(v, 0)
            arch[k][v] += 1
    rules: dict[str, int] = {}
    for t in cohort.expected.values():
        for r, s in t:
            rules[f"{r}:{s}"] = rules.get(f"{r}:{s}", 0) + 1
    return {"patients": len(cohort.patients), "events": len(cohort.events), "archetypes": arch,
            "expected": dict(sorted(rules.items()))}


# ------------------------------------------------------------------ publishing
class _Progress:
    def __init__(self, total: int, stream=None, enabled: bool = True) -> None:
        self.total, self.stream, self.enabled = total, stream or sys.stderr, enabled
        self.t0 = time.monotonic()
        self.last = 0.0

    def update(self, done: int, force: bool = False) -> None:
        if not self.enabled:
            return
        now = time.monotonic()
        if not force and now - self.last < 0.2:
            return
        self.last = now
        frac = done / self.total if self.total else 1.0
        bar = "#" * int(30 * frac) + "." * (30 - int(30 * frac))
        rate = done / max(now - self.t0, 1e-9)
        self.stream.write(f"\r[{bar}] {done}/{self.total} events {rate:,.0f} ev/s")
        self.stream.flush()

    def close(self, done: int) -> None:
        if self.enabled:
            self.update(done, force=True)
            self.stream.write("\n")
            self.stream.flush()


def pacing_delays(cohort: Cohort, rate: float | None, compress: float | None) -> list[float]:
    """Seconds after the start at which each event may be sent: ``compress`` days of effective
    time per real second, and at most ``rate`` events per second."""
    out, t_rate = [], 0.0
    for i, e in enumerate(cohort.events):
        t = 0.0
        if compress:
            t = (e.at - cohort.start).total_seconds() / DAY / compress
        if rate:
            t_rate = i / rate
            t = max(t, t_rate)
        out.append(t)
    return out


def simulate(cohort: Cohort, bootstrap: str | None = None, rate: float | None = None,
             compress: float | None = None, progress: bool = True, fmt: str | None = None,
             settings=None, producer=None) -> dict[str, int]:
    """Publish the cohort (kafka-python, acks=all) in effective-time order. Returns counts per topic."""
    from .settings import Settings

    s = settings or Settings(**({"kafka_bootstrap_servers": bootstrap} if bootstrap else {}))
    topics = {LAB: s.topic_lab_results, VITAL: s.topic_vital_signs, PANEL: s.topic_liver_function,
              TREAT: s.topic_treatments}
    own = producer is None
    if own:
        from kafka import KafkaProducer

        from .kafka_config import kafka_python_config

        producer = KafkaProducer(acks="all", linger_ms=5, batch_size=256 * 1024, **kafka_python_config(s))
    delays = pacing_delays(cohort, rate, compress)
    bar = _Progress(len(cohort.events), enabled=progress)
    counts: dict[str, int] = {}
    t0 = time.monotonic()
    i = 0
    try:
        for i, rec in enumerate(records(cohort, fmt, topics), 1):
            wait = delays[i - 1] - (time.monotonic() - t0)
            if wait > 0:
                time.sleep(wait)
            v = rec["value"]
            raw = v.encode() if isinstance(v, str) else json.dumps(v, separators=(",", ":")).encode()
            producer.send(rec["topic"], key=rec["key"].encode(), value=raw)
            counts[rec["topic"]] = counts.get(rec["topic"], 0) + 1
            bar.update(i)
        producer.flush()
    finally:
        bar.close(i)
        if own:
            producer.close()
    return counts


# ------------------------------------------------------------------ CLI
def build_parser(prog: str = "monitor simulate") -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog=prog, description="Generate (and optionally publish) a synthetic post-dose cohort.")
    ap.add_argument("--patients", type=int, default=50, help="number of patients (default: 50)")
    ap.add_argument("--seed", type=int, default=1, help="random seed; the same seed gives the same cohort (default: 1)")
    ap.add_argument("--days", type=int, default=90, help="days of follow-up per patient (default: 90)")
    ap.add_argument("--format", choices=("json", "fhir", "hl7", "mixed"), default="json",
                    help="wire format of lab results: json, fhir, hl7 or mixed (default: json)")
    ap.add_argument("--it-fraction", type=float, default=0.3,
                    help="share of patients dosed intrathecally rather than intravenously (default: 0.3)")
    ap.add_argument("--start", help="cohort start (ISO 8601 with offset) (default: today 00:00 UTC minus --days)")
    ap.add_argument("--out", default="sim-out",
                    help="directory for events.jsonl and ground_truth.json (default: sim-out)")
    ap.add_argument("--publish", action="store_true",
                    help="also publish the events to their topics (TOPIC_* variables) (default: off)")
    ap.add_argument("--bootstrap", default=None,
                    help="Kafka bootstrap servers for --publish (default: env KAFKA_BOOTSTRAP_SERVERS, 127.0.0.1:9092)")
    ap.add_argument("--rate", type=float, default=None, help="events per second cap (default: no cap)")
    ap.add_argument("--compress", type=float, default=None,
                    help="days of effective time per real second (default: publish as fast as --rate allows)")
    ap.add_argument("--quiet", action="store_true", help="no progress output while publishing (default: off)")
    return ap


def main(argv: Sequence[str] | None = None) -> int:
    a = build_parser().parse_args(argv)
    start = datetime.fromisoformat(a.start) if a.start else None
    cohort = generate_cohort(a.patients, a.seed, start=start, days=a.days, formats=(a.format,),
                             it_fraction=a.it_fraction)
    info = write_cohort(cohort, a.out)
    s = summary(cohort)
    crit = sum(1 for v in cohort.critical_expected.values() if v)
    print(f"wrote {info['events']} events for {s['patients']} patients to {info['events_path']}; "
          f"ground truth in {info['ground_truth_path']} ({crit} patients with a critical alert expected)")
    if a.publish:
        counts = simulate(cohort, a.bootstrap, rate=a.rate, compress=a.compress, progress=not a.quiet)
        print("published: " + ", ".join(f"{k}={v}" for k, v in sorted(counts.items())))
    return 0


if __name__ == "__main__":  # pragma: no cover
    raise SystemExit(main())
