"""A result's reference limit of 0 where the protocol has no default limit to fall back on.

A site's protocol may leave an analyte's age default out (the shipped ones give one for every
analyte graded against a ULN). A lab system that sends ALT 100 U/L with the range "0-0" was
then graded as sent: every positive result "infinitely" above the ULN, CTCAE grade 4,
critical, with nothing telling the ward why. Now the result is not graded against a ULN at
all and the range check says so, until a result with a usable range arrives."""
from __future__ import annotations

from pathlib import Path

import yaml

from alerts.protocol import default_protocols
from alerts.scenarios import format_results, run_scenario

IV = Path(__file__).resolve().parents[2] / "alerts" / "protocols" / "onasemnogene-abeparvovec-iv.yaml"


def _site_protocol_without_default(tmp_path: Path, analyte: str = "alt") -> Path:
    doc = yaml.safe_load(IV.read_text())
    del doc["reference_ranges"][analyte]
    path = tmp_path / "site-iv.yaml"
    path.write_text(yaml.safe_dump(doc, sort_keys=False))
    return path


def test_an_upper_limit_of_0_without_a_default_is_not_graded_and_says_so(tmp_path: Path):
    scenario = {
        "name": "ULN 0 and no age default: not graded, flagged",
        "protocol": str(_site_protocol_without_default(tmp_path)),
        "patient": {"birth_date": "2024-09-01"},
        "dose": {"day": 0},
        "events": [
            {"day": -2, "lab": {"analyte": "alt", "value": 30, "low": 0, "high": 40}},
            {"day": 14, "lab": {"analyte": "alt", "value": 100, "low": 0, "high": 0}},
            {"day": 16, "lab": {"analyte": "alt", "value": 100, "low": 0, "high": 40}},
        ],
        "expect": [
            {"at": 14.1,
             "alerts": [{"rule": "data_quality.implausible_range", "dedupe": "alt", "severity": "warning",
                         "status": "open", "text_contains": "ULN 0 U/L, no default for this age"},
                        {"rule": "data_quality.implausible_range", "dedupe": "alt",
                         "text_contains": "not graded against a ULN"}],
             "absent": ["liver.alt_increased"]},
            # the next result carries a usable range: the question closes, and it is graded (2.5x ULN)
            {"at": 16.1,
             "alerts": [{"rule": "data_quality.implausible_range", "dedupe": "alt", "status": "resolved"},
                        {"rule": "liver.alt_increased", "grade": 1, "status": "open"}]},
        ],
    }
    result = run_scenario(scenario)
    assert result.ok, format_results([result])


def test_a_lower_limit_of_0_without_a_default_is_not_graded_against_an_lln_and_says_so(tmp_path: Path):
    """Platelets 120 with the range "0-450" where the site's protocol has no platelet default:
    "below the LLN" (grade 1) cannot be judged, and the finding says so; the absolute grades
    (below 75) still are."""
    scenario = {
        "name": "LLN 0 and no age default: not graded against an LLN, flagged",
        "protocol": str(_site_protocol_without_default(tmp_path, "platelets")),
        "patient": {"birth_date": "2024-09-01"},
        "dose": {"day": 0},
        "events": [
            {"day": 25, "lab": {"analyte": "platelets", "value": 120, "low": 0, "high": 450}},
            {"day": 26, "lab": {"analyte": "platelets", "value": 60, "low": 0, "high": 450}},
        ],
        "expect": [
            {"at": 25.1,
             "alerts": [{"rule": "data_quality.implausible_range", "dedupe": "platelets", "status": "open",
                         "text_contains": "LLN 0 10*9/L, no default for this age"},
                        {"rule": "data_quality.implausible_range", "dedupe": "platelets",
                         "text_contains": "not graded against an LLN"}],
             "absent": ["heme.platelets_decreased"]},
            {"at": 26.1, "alerts": [{"rule": "heme.platelets_decreased", "grade": 2, "status": "open"}]},
        ],
    }
    result = run_scenario(scenario)
    assert result.ok, format_results([result])


def test_the_shipped_protocols_give_a_default_limit_wherever_a_rule_grades_against_one():
    """The cases above need a site protocol: each shipped protocol has an age default for every
    analyte its rules read against a ULN (or an LLN), for every age, so a limit of 0 always has
    a fallback there, and the engine's list of LLN-graded analytes is the protocol's."""
    from alerts.rules import basis_analytes, compile_protocol

    for p in default_protocols():
        for basis, idx, must in (("uln", 2, {"alt", "ast", "bilirubin_total", "pt"}),
                                 ("lln", 3, {"platelets", "hemoglobin"})):
            graded = basis_analytes([r.model_dump(mode="json") for r in p.rules], basis)
            assert must <= graded, graded  # the walk finds them
            if basis == "lln":
                assert compile_protocol(p).lln_graded == graded
            missing = sorted(a for a in graded if a not in p.reference_ranges)
            assert not missing, f"{p.id}: no reference range default for {missing}"
            for a in graded:  # and the bands leave no age without the limit
                bands = sorted((b.min_months, b.max_months, b.high, b.low) for b in p.reference_ranges[a])
                assert bands[0][0] == 0 and bands[-1][1] >= 1e6 and all(b[idx] for b in bands), (p.id, a, bands)
                assert all(x[1] == y[0] for x, y in zip(bands, bands[1:])), (p.id, a, bands)
