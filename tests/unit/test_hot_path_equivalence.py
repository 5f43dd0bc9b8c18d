"""The clinical stage's faster paths give what the plain code they replace gives.

Each fast path (alert-churn CPU work) is compared with the straightforward computation it
stands for, over values chosen to hit its edges (ints and floats, None, NaN, huge
numbers, conditions it does not inline). ``bench/diff_clinical_outputs.py`` compares whole
runs byte for byte; these pin the pieces.
"""
from __future__ import annotations

import hashlib
import hmac
from datetime import datetime, timedelta, timezone
from operator import is_

import pytest
from pydantic import BaseModel

from alerts import lifecycle
from alerts.engine import finding_id
from alerts.protocol import default_protocols
from alerts.routing import RouteSpec, copy_route, route_from_alert
from alerts.rules import CompositeRuleC, _expr_conds, meets
from alerts.state import PatientState, _pack, _pack_all
from monitor.clinical.store import alert_fingerprint
from schemas.alert import Alert, AlertStatus, HistoryEntry, make_alert_id, make_pseudonym
from schemas.findings import ProtocolRef, Severity

VALUES = [None, 0, 1, 1.0, 1.5, -2.0, 40.0, 1e16, -1e16, 2 ** 60, float("nan"), float("inf"), 3, 0.1 + 0.2]


@pytest.mark.parametrize("shared", [None, [0, 40], [1, None], [None, None], [0.5, 40.5]])
def test_pack_all_is_pack_of_each_entry(shared):
    entries = [(100 + i, v, f"id-{i}", lo, hi) for i, (v, lo, hi) in
               enumerate((v, lo, hi) for v in VALUES for lo in VALUES[:7] for hi in VALUES[:7])]
    # repr: 1 and 1.0 differ, and so do the JSON numbers they become
    assert repr(_pack_all(entries, 7, shared)) == repr([_pack(e, 7, shared) for e in entries])


def test_to_dict_unchanged_by_packing():
    st = PatientState("P-1")
    st.set_dose(1_000_000)
    for i, v in enumerate([30.0, 45.5, 120, 160.0, 1e16]):
        st.insert("alt", (1_000_000 + 3600 * i, v, f"alt-{i}", 0.0 if i % 2 else None, 40.0), 20)
    d = st.to_dict()
    assert d["h"]["A"] == [_pack(e, d["t0"], d.get("r", {}).get("A")) for e in st.hist["alt"]]
    assert PatientState.from_dict(d).to_dict() == d


def _conditions():
    out = []
    for p in default_protocols():
        for r in p.rules:
            if r.kind == "composite":
                c = CompositeRuleC(r)
                out += _expr_conds(c.when, [])
    return out


def test_meeting_times_is_limit_then_meets_for_every_condition():
    p = default_protocols()[0]
    from alerts.rules import compile_protocol
    cp = compile_protocol(p)
    st = PatientState("P-2")
    st.birth = 0
    st.set_dose(10_000_000)
    conds = _conditions()
    sizes = []
    assert any(c.basis == "uln" and c.by_age is None for c in conds)  # the inlined case is exercised
    assert any(c.basis != "uln" or c.by_age is not None for c in conds)  # and the general one
    for c in conds:
        st.base[c.analyte] = (9_000_000, 50.0, f"{c.analyte}-base", None, 40.0)
        es = [(10_000_000 + 60 * i, v, f"{c.analyte}-{i}", None if i % 3 else 0.0, [None, 40.0, 1.2, 0.0][i % 4])
              for i, v in enumerate([0.0, 1.0, 3.0 * 40.0, 20.0 * 40.0, 20.0 * 40.0 + 1e-12, 3.6, 1.8, 150.0,
                                     80.0, 1e300, -5.0])]
        want = []
        for e in es:
            lr = c.limit(st, cp, e)
            if lr is not None and meets(c.op, e[1], lr[0], lr[1]):
                want.append(e[0])
        assert c.meeting_times(st, cp, es) == want, c.analyte
        sizes.append(len(want))
    assert any(0 < n < 11 for n in sizes)  # some results meet a condition and some do not


def test_finding_and_alert_ids_are_the_hmac_hexdigests():
    for key in (b"", b"secret", "s\u00e9cret".encode()):
        raw = "P\x1fliver.alt_increased\x1f\x1fpresent\x1f2\x1f3\x1fa b|a=1.0"
        assert finding_id("P", "liver.alt_increased", "", "present", 2, 3, "a b|a=1.0", key) == \
            hmac.new(key, raw.encode(), hashlib.sha256).hexdigest()[:32]
        aid = make_alert_id("P", "r", "k", 3, key=key)
        assert aid == hmac.new(key, "alert-id\x1fP\x1fr\x1fk\x1f3".encode(), hashlib.sha256).hexdigest()[:32]
        assert make_pseudonym(aid, key) == "a-" + hmac.new(key, aid.encode(), hashlib.sha256).hexdigest()[:12]


def test_enum_values_and_json_unchanged():
    class M(BaseModel):
        s: Severity
        a: AlertStatus | None = None

    assert [s.value for s in Severity] == ["info", "warning", "high", "critical"]
    assert AlertStatus.ACKNOWLEDGED.value == "acknowledged" and Severity.HIGH.rank == 2
    assert M(s="high", a=AlertStatus.FIRING).model_dump_json() == '{"s":"high","a":"firing"}'
    assert M.model_json_schema()["$defs"]["Severity"]["enum"] == ["info", "warning", "high", "critical"]


def _alert(route: dict) -> Alert:
    now = datetime(2026, 1, 1, tzinfo=timezone.utc)
    return Alert(alert_id="a1", patient_id="P", rule_id="r", episode=1, severity=Severity.HIGH,
                 protocol=ProtocolRef(id="p", version="1"), opened_at=now, updated_at=now, effective_at=now,
                 route=route, text={"what": "w", "why": "y", "action": "x"}, pseudonym="a-1",
                 history=[HistoryEntry(at=now, by="system", action="opened", severity=Severity.HIGH)],
                 finding_ids=["f1"])


def test_fingerprint_matches_a_copy_and_misses_every_change():
    route = copy_route(lifecycle.FALLBACK_ROUTE)
    a = _alert(route)
    snap = lifecycle._snapshot(a)
    fp, fs = alert_fingerprint(a), alert_fingerprint(snap)
    assert len(fp) == len(fs) and all(map(is_, fp, fs))  # fresh lists, same items: a hit

    def missed(change) -> bool:
        b = lifecycle._snapshot(a)
        change(b)
        fb = alert_fingerprint(b)
        return not (len(fb) == len(fp) and all(map(is_, fb, fp)))

    now = datetime(2026, 1, 2, tzinfo=timezone.utc)
    assert missed(lambda b: b.history.append(HistoryEntry(at=now, by="system", action="updated")))
    assert missed(lambda b: b.history.pop())
    assert missed(lambda b: b.finding_ids.append("f2"))
    assert missed(lambda b: b.changes.append("updated"))
    assert missed(lambda b: setattr(b, "version", 2))
    assert missed(lambda b: setattr(b, "updated_at", now))
    assert missed(lambda b: b.route.__setitem__("id", "other"))


def test_snapshot_is_model_copy_with_fresh_containers():
    a = _alert(copy_route(lifecycle.FALLBACK_ROUTE))
    want = a.model_copy(update={"evidence": list(a.evidence), "history": list(a.history),
                                "changes": list(a.changes), "finding_ids": list(a.finding_ids),
                                "route": dict(a.route)})
    got = lifecycle._snapshot(a)
    assert got == want and got.__dict__ == want.__dict__
    assert got.__pydantic_fields_set__ == want.__pydantic_fields_set__
    assert got.model_dump_json() == a.model_dump_json()
    for name in ("evidence", "history", "changes", "finding_ids", "route"):
        assert getattr(got, name) is not getattr(a, name)


def test_set_is_setattr():
    a, b = _alert(copy_route(lifecycle.FALLBACK_ROUTE)), _alert(copy_route(lifecycle.FALLBACK_ROUTE))
    now = datetime(2026, 1, 3, tzinfo=timezone.utc)
    lifecycle._set(a, status=AlertStatus.RESOLVED, closed_at=now, grade=3)
    b.status, b.closed_at, b.grade = AlertStatus.RESOLVED, now, 3
    assert a == b and a.__pydantic_fields_set__ == b.__pydantic_fields_set__


def test_route_cache_gives_the_validated_route_per_distinct_json():
    r1 = copy_route(lifecycle.FALLBACK_ROUTE)
    r2 = copy_route(lifecycle.FALLBACK_ROUTE)
    assert lifecycle._route(r1) is lifecycle._route(r2)  # equal routes: validated once
    assert lifecycle._route(r1) == route_from_alert(r1)
    slower = copy_route(lifecycle.FALLBACK_ROUTE)
    slower["tiers"][0]["escalate_after_minutes"]["high"] = 15.5
    assert lifecycle._route(slower).timeout_minutes(0, Severity.HIGH) == 15.5
    assert lifecycle._route(r1).timeout_minutes(0, Severity.HIGH) == 15
    for i in range(lifecycle._ROUTES_MAX + 5):  # bounded
        r = copy_route(lifecycle.FALLBACK_ROUTE)
        r["id"] = f"r{i}"
        assert lifecycle._route(r).id == f"r{i}"
    assert len(lifecycle._ROUTES) <= lifecycle._ROUTES_MAX
    with pytest.raises(Exception):
        lifecycle._route({"id": "", "tiers": []})  # invalid as before
    assert isinstance(lifecycle._route(r1), RouteSpec)
    assert timedelta(minutes=15) == lifecycle._timeout(_alert(r1))
