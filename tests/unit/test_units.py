"""Unit conversion: the same quantity in any accepted unit normalises to the same canonical value."""
from __future__ import annotations

import math

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from schemas.analytes import catalogue, round_sig
from schemas.errors import Reason, Rejected

CAT = catalogue()

# (analyte, unit, factor from canonical to that unit) -- written independently of the data file
EQUIVALENTS = [
    ("bilirubin_total", "umol/L", 17.1),
    ("bilirubin_direct", "umol/L", 17.1),
    ("creatinine", "umol/L", 88.4),
    ("platelets", "10*3/uL", 1.0),
    ("hemoglobin", "g/dL", 0.1),
    ("hemoglobin", "mmol/L", 0.062),
    ("albumin", "g/dL", 0.1),
    ("troponin_i", "ng/mL", 0.001),
    ("troponin_i", "ug/L", 0.001),
    ("troponin_i", "pg/mL", 1.0),
    ("alt", "[IU]/L", 1.0),
    ("alt", "ukat/L", 1 / 60),
    ("ast", "IU/L", 1.0),
    ("alp", "ukat/L", 1 / 60),
    ("weight", "g", 1000.0),
]


@pytest.mark.parametrize("analyte,unit,to_unit", EQUIVALENTS)
@given(canonical=st.floats(min_value=0.001, max_value=1e5, allow_nan=False, allow_infinity=False))
@settings(max_examples=60, deadline=None)
def test_same_quantity_any_unit_same_canonical_value(analyte, unit, to_unit, canonical):
    a = CAT.by_key[analyte]
    in_canonical = CAT.convert(a, canonical, a.canonical_unit)
    in_other = CAT.convert(a, canonical * to_unit, unit)
    assert math.isclose(in_canonical, in_other, rel_tol=1e-8)


@given(celsius=st.floats(min_value=30, max_value=45))
@settings(max_examples=100, deadline=None)
def test_fahrenheit_converts_to_celsius(celsius):
    a = CAT.by_key["temperature"]
    assert math.isclose(CAT.convert(a, celsius * 9 / 5 + 32, "[degF]"), celsius, rel_tol=1e-9, abs_tol=1e-9)


def test_known_clinical_equivalents():
    assert CAT.convert(CAT.by_key["bilirubin_total"], 17.1, "umol/L") == 1.0
    assert CAT.convert(CAT.by_key["creatinine"], 88.4, "umol/L") == 1.0
    assert CAT.convert(CAT.by_key["temperature"], 100.4, "[degF]") == 38.0
    assert CAT.convert(CAT.by_key["hemoglobin"], 6.2, "mmol/L") == 100.0


@pytest.mark.parametrize("analyte,unit", [("alt", "mg/dL"), ("bilirubin_total", "U/L"), ("platelets", "g/L"),
                                          ("creatinine", "mmol"), ("temperature", "K"), ("inr", "s")])
def test_unconvertible_units_are_rejected_never_guessed(analyte, unit):
    with pytest.raises(Rejected) as ei:
        CAT.convert(CAT.by_key[analyte], 1.0, unit)
    assert ei.value.reason == Reason.UNIT_NOT_CONVERTIBLE


def test_every_loinc_maps_to_one_analyte_and_canonical_unit_is_identity():
    seen = set()
    for a in CAT.by_key.values():
        assert CAT.convert(a, 12.5, a.canonical_unit) == 12.5
        for code in a.loinc:
            assert code not in seen
            seen.add(code)


def test_round_sig():
    assert round_sig(0.1 + 0.2) == 0.3
    assert round_sig(0.0) == 0.0
