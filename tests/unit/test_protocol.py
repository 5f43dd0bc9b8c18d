"""Protocol model, loader, shipped defaults and error paths."""
from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from alerts.protocol import (
    STABLE_RULE_IDS,
    ProtocolError,
    Route,
    RouteTier,
    Sourced,
    default_protocol,
    load_protocol,
    protocol_for_product,
    summarise,
)
from alerts.protocol_check import check_protocol_file

PROTOCOLS = Path(__file__).resolve().parents[2] / "alerts" / "protocols"
IV, IT = "onasemnogene-abeparvovec-iv", "onasemnogene-abeparvovec-it"


@pytest.mark.parametrize("product", [IV, IT])
def test_defaults_load_and_carry_stable_rule_ids(product):
    p = default_protocol(product)
    assert p.id == product and p.version
    assert set(STABLE_RULE_IDS) <= {r.id for r in p.rules}
    assert protocol_for_product(product) is p
    for r in p.rules:
        assert isinstance(p.route(r.route), Route)
    for route in p.routes:
        assert route.failsafe.recipients and all(isinstance(t, RouteTier) for t in route.tiers)


def test_severity_mapping_in_defaults():
    p = default_protocol(IV)
    for rid in ("liver.hys_law", "liver.acute_liver_failure_signature", "heme.tma_screen"):
        assert p.rule(rid).severity.value == "critical"
    alt = p.rule("liver.alt_increased")
    assert [(b.grade, b.value) for b in alt.bands] == [(1, 1.0), (2, 3.0), (3, 5.0), (4, 20.0)]


def test_route_escalation_lookup():
    r = default_protocol(IV).route("ward-nurse")
    assert r.tiers[0].escalate_after_minutes.for_severity("critical") == 5
    assert r.tiers[0].escalate_after_minutes.for_severity("info") is None


def test_every_number_is_sourced_or_marked():
    p = default_protocol(IV)
    source_ids = {s.id for s in p.sources}
    seen = 0

    def visit(o):
        nonlocal seen
        if isinstance(o, Sourced):
            seen += 1
            assert o.unconfirmed or set(o.source_ids()) <= source_ids
            assert not o.unconfirmed or o.note
        if hasattr(type(o), "model_fields"):
            for name in type(o).model_fields:
                visit(getattr(o, name))
        elif isinstance(o, (list, tuple)):
            for x in o:
                visit(x)
        elif isinstance(o, dict):
            for x in o.values():
                visit(x)

    visit(p)
    assert seen > 50


def _raw():
    return yaml.safe_load((PROTOCOLS / f"{IV}.yaml").read_text())


def _write(tmp_path, data):
    f = tmp_path / "p.yaml"
    f.write_text(yaml.safe_dump(data, sort_keys=False))
    return f


def _errors(tmp_path, data):
    with pytest.raises(ProtocolError) as exc:
        load_protocol(_write(tmp_path, data))
    return exc.value.messages


def test_error_names_path_of_unsourced_threshold(tmp_path):
    d = _raw()
    idx = next(i for i, r in enumerate(d["rules"]) if r["id"] == "heme.platelets_decreased")
    del d["rules"][idx]["bands"][2]["source"]
    msgs = _errors(tmp_path, d)
    assert any(m.startswith(f"rules[{idx}].bands[2]") and "source" in m for m in msgs), msgs


def test_error_names_path_of_bad_value(tmp_path):
    d = _raw()
    d["rules"][3]["bands"][0]["value"] = "lots"
    msgs = _errors(tmp_path, d)
    assert any(m.startswith("rules[3].bands[0].value") for m in msgs), msgs


def test_unknown_route_source_and_analyte_are_rejected(tmp_path):
    d = _raw()
    d["rules"][0]["route"] = "nowhere"
    d["rules"][1]["bands"][0]["source"] = "made-up"
    d["rules"][2]["analytes"] = ["unobtainium"]
    msgs = _errors(tmp_path, d)
    assert any(m.startswith("rules[0].route") for m in msgs)
    assert any(m.startswith("rules[1].bands[0].source") for m in msgs)
    assert any(m.startswith("rules[2].analytes") for m in msgs)


def test_route_needs_failsafe(tmp_path):
    d = _raw()
    del d["routes"][0]["failsafe"]
    msgs = _errors(tmp_path, d)
    assert any(m.startswith("routes[0].failsafe") for m in msgs), msgs


def test_duplicate_rule_id(tmp_path):
    d = _raw()
    d["rules"].append(dict(d["rules"][0]))
    assert any("duplicate rule id" in m for m in _errors(tmp_path, d))


def test_check_protocol_file(tmp_path):
    ok, text = check_protocol_file(PROTOCOLS / f"{IT}.yaml")
    assert ok and "onasemnogene-abeparvovec-it" in text and "unconfirmed numbers:" in text
    bad = _raw()
    bad["version"] = ""
    ok, text = check_protocol_file(_write(tmp_path, bad))
    assert not ok and "version" in text
    ok, text = check_protocol_file(tmp_path / "missing.yaml")
    assert not ok


def test_summary_lists_rules_and_schedules():
    s = summarise(default_protocol(IV))
    assert "liver.hys_law" in s and "schedules: 4" in s and "failsafe" in s


def test_sustained_band_needs_an_absolute_limit_and_one_analyte(tmp_path):
    d = _raw()
    idx = next(i for i, r in enumerate(d["rules"]) if r["id"] == "vitals.fever")
    band = next(j for j, b in enumerate(d["rules"][idx]["bands"]) if b.get("for_hours"))
    assert d["rules"][idx]["bands"][band]["grade"] == 4 and d["rules"][idx]["bands"][band]["source"] == "ctcae-fever"
    d["rules"][idx]["bands"][band]["basis"] = "uln"
    msgs = _errors(tmp_path, d)
    assert any(m.startswith(f"rules[{idx}].bands[{band}]") and "for_hours" in m for m in msgs), msgs
    d = _raw()
    alt = next(i for i, r in enumerate(d["rules"]) if r["id"] == "liver.taper_gate_breach")
    d["rules"][alt]["bands"][0].update(for_hours=24, basis="absolute", value=80)
    msgs = _errors(tmp_path, d)
    assert any(m.startswith(f"rules[{alt}].bands[0].for_hours") for m in msgs), msgs


@pytest.mark.parametrize("product", [IV, IT])
def test_completion_analytes_are_scheduled_after_month_three_until_complete(product):
    """Completion needs results from day 90 on, so every group it reads keeps a period after
    day 90 that completion ends (``ends_on_completion``); no period before day 90 does."""
    p = default_protocol(product)
    comp = p.rule("monitoring.complete")
    assert comp.min_days == 90
    for s in p.schedules:
        for per in s.periods:
            if per.ends_on_completion:
                assert per.from_day >= comp.min_days
    groups = {s.group for s in p.schedules if any(per.ends_on_completion for per in s.periods)}
    assert "liver" in groups and "platelets" in groups


def test_both_protocols_state_their_steroid_regimen_and_itvisma_says_what_is_unknown():
    # audit US-4: the Itvisma regimen was absent; its numbers are not sourced, so they stay
    # empty and the entry is unconfirmed with the reason, never copied from Zolgensma
    from alerts.protocol import default_protocol, summarise

    iv = default_protocol("onasemnogene-abeparvovec-iv").steroid_regimen
    it = default_protocol("onasemnogene-abeparvovec-it").steroid_regimen
    assert (iv.dose_mg_per_kg_day, iv.start_days_before_dose, iv.full_dose_days, iv.taper_days) == (1.0, 1, 30, 28)
    assert iv.source == "zol-pi-steroid" and not iv.unconfirmed
    assert it.unconfirmed and "2.2" in it.note and it.dose_mg_per_kg_day is None and it.taper_days is None
    assert "steroid regimen:" in summarise(default_protocol("onasemnogene-abeparvovec-it"))
