"""Exact arithmetic at every graded boundary (issue 12 item 5, audit PS-16).

Limits are multiples of a reference (ULN, LLN, baseline) or absolute values. A value
exactly at a limit must fall on the side the operator says: ``>`` excludes it, ``>=``
includes it, whatever binary floating point makes of ``multiple x reference``."""
from __future__ import annotations

from decimal import Decimal

import pytest

from alerts.engine import Engine
from alerts.protocol import GradedRule, default_protocols
from alerts.rules import meets
from alerts.testkit import Sim, dose, obs
import operator

ENGINE = Engine()

# references as labs report them (1-2 decimals), chosen so that float products miss the boundary
REFS = {"uln": [1.2, 0.2, 0.7, 40.0, 20.52], "lln": [150.0, 10.5, 95.0], "baseline": [0.2, 1.2, 60.0]}


def test_meets_is_exact_where_float_is_not():
    assert 1.5 * 1.2 != 1.8 and 1.5 * 0.2 != 0.3  # the floating-point products miss
    assert not meets(operator.gt, 1.8, 1.5, 1.2) and meets(operator.ge, 1.8, 1.5, 1.2)
    assert meets(operator.ge, 0.3, 1.5, 0.2) and not meets(operator.gt, 0.3, 1.5, 0.2)
    assert meets(operator.gt, 2.1000001, 3, 0.7) and not meets(operator.lt, 2.1, 3, 0.7)
    # far from the limit the float comparison decides, both ways
    assert meets(operator.gt, 1.81, 1.5, 1.2) and not meets(operator.gt, 1.79, 1.5, 1.2)


def _graded_bands():
    seen = set()
    for p in default_protocols():
        for r in p.rules:
            if not isinstance(r, GradedRule):
                continue
            for b in list(r.bands) + list(r.abnormal_baseline_bands or []):
                if b.for_hours is not None:
                    continue
                key = (r.id, b.op, b.value, b.basis)
                if key in seen:
                    continue
                seen.add(key)
                yield pytest.param(b, id=f"{p.id[-2:]}:{r.id}:{b.op}{b.value:g}{b.basis}")


@pytest.mark.parametrize("band", _graded_bands())
def test_every_graded_band_is_exact_at_its_boundary(band):
    refs = [1.0] if band.basis == "absolute" else REFS[band.basis]
    op = {">": operator.gt, ">=": operator.ge, "<": operator.lt, "<=": operator.le}[band.op]
    for ref in refs:
        exact = float(Decimal(repr(band.value)) * Decimal(repr(ref)))
        assert meets(op, exact, band.value, ref) == (band.op in (">=", "<="))


# named CTCAE v5 boundaries through the whole engine (result's own range, 6-month-old infant)
NAMED = [
    ("bilirubin exactly 1.5x ULN is grade 1", "bilirubin_total", 1.8, dict(high=1.2), "liver.bilirubin_increased", 1),
    ("bilirubin just above 1.5x ULN is grade 2", "bilirubin_total", 1.81, dict(high=1.2), "liver.bilirubin_increased", 2),
    ("bilirubin exactly 3x ULN is grade 2", "bilirubin_total", 3.6, dict(high=1.2), "liver.bilirubin_increased", 2),
    ("bilirubin exactly 10x ULN is grade 3", "bilirubin_total", 12.0, dict(high=1.2), "liver.bilirubin_increased", 3),
    ("bilirubin 1.5x ULN in umol/L is grade 1", "bilirubin_total", 30.78, dict(high=20.52, unit="umol/L"),
     "liver.bilirubin_increased", 1),
    ("ALT exactly 3x ULN is grade 1", "alt", 120, dict(high=40), "liver.alt_increased", 1),
    ("ALT exactly 5x ULN is grade 2", "alt", 200, dict(high=40), "liver.alt_increased", 2),
    ("ALT exactly 20x ULN is grade 3", "alt", 800, dict(high=40), "liver.alt_increased", 3),
    ("AST exactly 3x ULN 0.7-style is grade 1", "ast", 2.1, dict(high=0.7), "liver.ast_increased", 1),
    ("ALP exactly 2.5x ULN is grade 1", "alp", 1250, dict(high=500), "liver.alp_increased", 1),
    ("GGT exactly 5x ULN is grade 2", "ggt", 300, dict(high=60), "liver.ggt_increased", 2),
    ("creatinine exactly 1.5x ULN is grade 1", "creatinine", 0.3, dict(high=0.2), "renal.creatinine_increased", 1),
    ("creatinine exactly 3x ULN is grade 2", "creatinine", 2.1, dict(high=0.7), "renal.creatinine_increased", 2),
    ("creatinine exactly 6x ULN is grade 3", "creatinine", 1.2, dict(high=0.2), "renal.creatinine_increased", 3),
    ("platelets exactly 75 is grade 1", "platelets", 75, dict(low=150), "heme.platelets_decreased", 1),
    ("platelets exactly 50 is grade 2", "platelets", 50, dict(low=150), "heme.platelets_decreased", 2),
    ("platelets exactly 25 is grade 3", "platelets", 25, dict(low=150), "heme.platelets_decreased", 3),
    ("haemoglobin exactly 100 g/L is grade 1", "hemoglobin", 100, dict(low=105), "heme.anemia", 1),
    ("haemoglobin exactly 80 g/L is grade 2", "hemoglobin", 80, dict(low=105), "heme.anemia", 2),
    ("INR exactly 1.5 is grade 1", "inr", 1.5, dict(), "coag.inr_increased", 1),
    ("INR exactly 2.5 is grade 2", "inr", 2.5, dict(), "coag.inr_increased", 2),
    ("fever exactly 39.0 C is grade 1", "temperature", 39.0, dict(), "vitals.fever", 1),
    ("fever exactly 40.0 C is grade 2", "temperature", 40.0, dict(), "vitals.fever", 2),
    ("fever 104.0 F (= 40.0 C) is grade 2", "temperature", 104.0, dict(unit="[degF]"), "vitals.fever", 2),
]


@pytest.mark.parametrize("name,analyte,value,kw,rule,grade", NAMED, ids=[n[0] for n in NAMED])
def test_named_ctcae_boundaries(name, analyte, value, kw, rule, grade):
    sim = Sim(ENGINE)
    sim.feed([dose(), obs(analyte, value, 7, **kw)])
    f = sim.present().get(rule)
    assert f is not None and f.grade == grade, (f and f.grade)


def test_creatinine_exactly_1_5x_baseline_meets_the_tma_arm():
    sim = Sim(ENGINE)
    sim.feed([obs("creatinine", 0.2, -1, high=0.4), dose(), obs("platelets", 140, 7),
              obs("creatinine", 0.3, 7, high=0.4)])
    assert "heme.tma_screen" in sim.present()
    sim = Sim(ENGINE)
    sim.feed([obs("creatinine", 0.2, -1, high=0.4), dose(), obs("platelets", 140, 7),
              obs("creatinine", 0.29, 7, high=0.4)])
    assert "heme.tma_screen" not in sim.present()
