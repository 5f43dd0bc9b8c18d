"""Alert lifecycle: every transition, with a controllable clock."""
from __future__ import annotations

import json
from datetime import datetime, timedelta, timezone

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from pydantic import ValidationError

from alerts.lifecycle import (
    DEFAULT_INHIBITIONS,
    AlertBook,
    AlertEngine,
    Forbidden,
    InvalidAction,
    LifecycleConfig,
    UnknownAlert,
    apply_action,
    apply_finding,
    next_deadline,
    tick,
)
from alerts.routing import FALLBACK_ROUTE, RouteSpec, TierSpec, copy_route
from schemas.alert import Alert, AlertAction, AlertStatus, make_alert_id
from schemas.findings import Evidence, Finding, FindingText, ProtocolRef, Severity

UTC = timezone.utc
T0 = datetime(2025, 3, 1, 8, 0, tzinfo=UTC)
PID = "patient-0042"

ROUTE = RouteSpec(
    id="liver",
    tiers=[
        TierSpec(name="ward-nurse", recipients=["ward-nurse"],
                 escalate_after_minutes={"critical": 5, "high": 10, "warning": 30}),
        TierSpec(name="physician", recipients=["on-call-physician"],
                 escalate_after_minutes={"critical": 5, "high": 10, "warning": None}),
    ],
    failsafe={"name": "coordinator", "recipients": ["clinical-coordinator"]},
)
CONFIG = LifecycleConfig(routes={"liver": ROUTE}, pseudonym_secret=b"test-secret")


class Clock:
    def __init__(self, start: datetime = T0):
        self.now = start

    def advance(self, **kw) -> datetime:
        self.now += timedelta(**kw)
        return self.now


_seq = iter(range(1, 10**9))


def finding(rule: str = "liver.alt_increased", state: str = "present", severity: str | None = "high",
            at: datetime = T0, fid: str | None = None, key: str = "", grade: int | None = 3,
            route: str | None = "liver", value: float = 150.0, **kw) -> Finding:
    return Finding(
        finding_id=fid or f"f{next(_seq)}", patient_id=PID, rule_id=rule, dedupe_key=key, state=state,
        severity=severity, grade=grade,
        evidence=[Evidence(observation_id=f"obs-{value}", analyte="ALT", value=value, unit="U/L",
                           effective_at=at, limit=120.0, comparison=">", basis="uln", multiple=value / 40)],
        protocol=ProtocolRef(id="sma-oa", version="1.2.0"), effective_at=at, evaluated_at=at,
        route=route, text=FindingText(what="ALT above 3x ULN", why="Possible liver injury after AAV",
                                      action="Repeat LFTs within 24 h; call physician"),
        ward="PICU", care_team="neuro-picu", **kw,
    )


def action(kind: str, alert_id: str, role: str = "nurse", by: str = "nurse:amy", at: datetime = T0,
           **kw) -> AlertAction:
    return AlertAction(action=kind, alert_id=alert_id, role=role, by=by, at=at, **kw)


def book() -> AlertBook:
    return AlertBook(patient_id=PID)


def only(alerts: list[Alert]) -> Alert:
    assert len(alerts) == 1, alerts
    return alerts[0]


def open_alert(b: AlertBook, now=T0, **kw) -> Alert:
    return only(apply_finding(b, finding(at=now, **kw), now, CONFIG))


# ------------------------------------------------------------------ opening / dedupe


def test_open_creates_firing_alert_with_route_copy_and_deadline():
    b = book()
    a = open_alert(b)
    assert a.status == AlertStatus.FIRING and a.previous_status is None
    assert a.version == 1 and a.notify is True and a.changes == ["opened"]
    assert a.episode == 1 and a.alert_id == make_alert_id(PID, "liver.alt_increased", "", 1, key=b"test-secret")
    assert a.severity == Severity.HIGH and a.grade == 3
    assert a.route == copy_route(ROUTE) and a.escalation_tier == 0
    assert a.next_escalation_at == T0 + timedelta(minutes=10)
    assert a.protocol.version == "1.2.0" and a.evidence[0].value == 150.0
    assert a.text.what == "ALT above 3x ULN" and a.ward == "PICU" and a.care_team == "neuro-picu"
    assert a.history[0].action == "opened" and a.history[0].by == "system" and a.history[0].at == T0
    assert a.history[0].from_status is None and a.history[0].to_status == AlertStatus.FIRING
    assert PID not in a.pseudonym and a.alert_id not in a.pseudonym and len(a.pseudonym) <= 16
    assert a.current_recipients() == ["ward-nurse"]
    assert b.get(a.alert_id) is not None and b.get(a.alert_id) is not a  # emitted copy


def test_alert_id_is_deterministic_and_distinct_per_key_and_episode():
    a1 = open_alert(book())
    a2 = open_alert(book())
    assert a1.alert_id == a2.alert_id and a1.pseudonym == a2.pseudonym
    assert make_alert_id(PID, "r", "ALT", 1, key=b"k") != make_alert_id(PID, "r", "AST", 1, key=b"k")
    assert make_alert_id(PID, "r", "", 1, key=b"k") != make_alert_id(PID, "r", "", 2, key=b"k")
    assert make_alert_id(PID, "r", "", 1, key=b"k") != make_alert_id("other", "r", "", 1, key=b"k")


def test_dedupe_key_separates_alerts_of_one_rule():
    b = book()
    a = open_alert(b, rule="labs.overdue", key="ALT")
    c = open_alert(b, rule="labs.overdue", key="AST")
    assert a.alert_id != c.alert_id and len(b.open_alerts()) == 2


def test_repeat_finding_updates_open_alert_without_paging():
    b, clock = book(), Clock()
    a = open_alert(b)
    u = only(apply_finding(b, finding(at=clock.advance(minutes=2), value=160.0), clock.now, CONFIG))
    assert u.alert_id == a.alert_id and u.version == 2 and u.notify is False
    assert u.changes == ["updated"] and u.previous_status == AlertStatus.FIRING and not u.status_changed
    assert u.evidence[0].value == 160.0 and u.effective_at == clock.now and u.updated_at == clock.now
    assert u.next_escalation_at == a.next_escalation_at  # timer keeps running
    assert len(b.alerts) == 1


def test_replayed_finding_is_a_no_op():
    b = book()
    f = finding(fid="same")
    open_alert_v = only(apply_finding(b, f, T0, CONFIG))
    assert apply_finding(b, f, T0 + timedelta(minutes=1), CONFIG) == []
    assert b.get(open_alert_v.alert_id).version == 1


def test_a_superseded_finding_emitted_again_is_the_verdict_again():
    """The engine emits a finding only when its verdict changes. One it emits again after
    another (a late worse result was shown, then the newest result's verdict follows; or the
    result that replaced it was withdrawn) is its verdict now: applied, not taken for a
    replay. It used to be dropped, leaving the alert on the superseded result."""
    b = book()
    current = finding(severity="warning", grade=2, value=130.0, at=T0 + timedelta(days=2))
    a = only(apply_finding(b, current, T0 + timedelta(days=2), CONFIG))
    late_worse = finding(severity="high", grade=3, value=250.0, at=T0 + timedelta(days=2))
    assert only(apply_finding(b, late_worse, T0 + timedelta(days=3), CONFIG)).severity == Severity.HIGH
    again = only(apply_finding(b, current, T0 + timedelta(days=3), CONFIG))
    assert again.alert_id == a.alert_id and again.severity == Severity.WARNING and again.grade == 2
    assert again.evidence[0].value == 130.0 and again.changes == ["severity_lowered"]


def test_an_older_finding_after_a_withdrawal_reopens_the_alert():
    """A normal result resolved the alert; it is then withdrawn, and the engine's verdict rests
    on the older abnormal result again (an older effective_at than the withdrawn result's). The
    alert opens again (a new episode): it used to stay resolved, as if the older finding were a
    late one - silence while the valid newest result is grade 3."""
    b = book()
    grade3 = finding(value=250.0, at=T0)
    a = only(apply_finding(b, grade3, T0, CONFIG))
    later = T0 + timedelta(days=3)
    assert only(apply_finding(b, finding(state="cleared", at=later), later, CONFIG)).status == AlertStatus.RESOLVED
    reopened = only(apply_finding(b, grade3, later + timedelta(hours=1), CONFIG))
    assert reopened.status == AlertStatus.FIRING and reopened.episode == 2 and reopened.alert_id != a.alert_id
    assert reopened.severity == Severity.HIGH and reopened.evidence[0].value == 250.0 and reopened.notify is True


def test_finding_for_other_patient_rejected():
    b = AlertBook(patient_id="someone-else")
    with pytest.raises(ValueError):
        apply_finding(b, finding(), T0, CONFIG)


# ------------------------------------------------------------------ severity


def test_severity_rise_renotifies_and_tightens_timer():
    b, clock = book(), Clock()
    open_alert(b, severity="warning")  # 30-minute timer
    u = only(apply_finding(b, finding(severity="critical", at=clock.advance(minutes=1)), clock.now, CONFIG))
    assert u.notify is True and "severity_raised" in u.changes and u.severity == Severity.CRITICAL
    assert u.next_escalation_at == clock.now + timedelta(minutes=5)


def test_severity_fall_updates_without_paging_and_does_not_slow_timer():
    b, clock = book(), Clock()
    a = open_alert(b, severity="critical")
    u = only(apply_finding(b, finding(severity="warning", at=clock.advance(minutes=1)), clock.now, CONFIG))
    assert u.notify is False and u.changes == ["severity_lowered"] and u.severity == Severity.WARNING
    assert u.next_escalation_at == a.next_escalation_at


def test_missing_severity_is_critical():
    b = book()
    a = open_alert(b, severity=None)
    assert a.severity == Severity.CRITICAL and a.notify
    assert a.next_escalation_at == T0 + timedelta(minutes=5)
    assert "treated as critical" in a.history[0].note


def test_info_finding_is_visible_but_never_pages_or_escalates():
    b, clock = book(), Clock()
    a = open_alert(b, severity="info")
    assert a.status == AlertStatus.FIRING and a.notify is False and a.next_escalation_at is None
    assert tick(b, clock.advance(days=1), CONFIG) == []
    # rising to warning pages and starts the timer
    u = only(apply_finding(b, finding(severity="warning", at=clock.now), clock.now, CONFIG))
    assert u.notify is True and u.next_escalation_at == clock.now + timedelta(minutes=30)


# ------------------------------------------------------------------ ack-until-clear, episodes


def test_acknowledge_stops_escalation_and_stays_open_until_cleared():
    b, clock = book(), Clock()
    a = open_alert(b, severity="critical")
    ack = only(apply_action(b, action("acknowledge", a.alert_id, at=clock.advance(minutes=1)), clock.now, CONFIG))
    assert ack.status == AlertStatus.ACKNOWLEDGED and ack.previous_status == AlertStatus.FIRING
    assert ack.status_changed and ack.notify is False and ack.next_escalation_at is None
    assert ack.history[-1].by == "nurse:amy" and ack.history[-1].role == "nurse"
    assert tick(b, clock.advance(hours=5), CONFIG) == []
    # still present: stays acknowledged
    u = only(apply_finding(b, finding(severity="critical", at=clock.now), clock.now, CONFIG))
    assert u.status == AlertStatus.ACKNOWLEDGED and u.notify is False
    # condition clears: resolved
    r = only(apply_finding(b, finding(state="cleared", severity=None, at=clock.advance(hours=1)), clock.now, CONFIG))
    assert r.status == AlertStatus.RESOLVED and r.previous_status == AlertStatus.ACKNOWLEDGED
    assert r.closed_at == clock.now and r.notify is False and r.status_changed
    assert [h.action for h in r.history] == ["opened", "acknowledged", "updated", "resolved"]
    assert b.open_alerts() == []


def test_severity_rise_on_acknowledged_alert_returns_it_to_firing():
    b, clock = book(), Clock()
    a = open_alert(b, severity="warning")
    apply_action(b, action("acknowledge", a.alert_id), clock.now, CONFIG)
    u = only(apply_finding(b, finding(severity="critical", at=clock.advance(minutes=3)), clock.now, CONFIG))
    assert u.status == AlertStatus.FIRING and u.notify and u.previous_status == AlertStatus.ACKNOWLEDGED
    assert u.next_escalation_at == clock.now + timedelta(minutes=5)


def test_cleared_without_open_alert_is_a_no_op():
    assert apply_finding(book(), finding(state="cleared"), T0, CONFIG) == []


def test_recurrence_after_resolution_is_a_new_episode():
    b, clock = book(), Clock()
    a1 = open_alert(b)
    apply_finding(b, finding(state="cleared", at=clock.advance(hours=1)), clock.now, CONFIG)
    a2 = only(apply_finding(b, finding(at=clock.advance(hours=1)), clock.now, CONFIG))
    assert a2.alert_id != a1.alert_id and a2.episode == 2 and a2.version == 1 and a2.notify
    assert a2.alert_id == make_alert_id(PID, "liver.alt_increased", "", 2, key=b"test-secret")
    assert b.get(a1.alert_id).status == AlertStatus.RESOLVED


# ------------------------------------------------------------------ retraction


@pytest.mark.parametrize("acked", [False, True])
def test_retracted_finding_retracts_open_alert(acked):
    b, clock = book(), Clock()
    a = open_alert(b, now=T0 + timedelta(hours=2))
    if acked:
        apply_action(b, action("acknowledge", a.alert_id), clock.now, CONFIG)
    # the retraction may carry an older effective time (newest remaining evidence): still applies
    r = only(apply_finding(b, finding(state="retracted", at=T0), clock.advance(hours=3), CONFIG))
    assert r.status == AlertStatus.RETRACTED and r.notify is False and r.status_changed
    assert r.next_escalation_at is None and r.closed_at == clock.now
    assert tick(b, clock.advance(hours=1), CONFIG) == []
    # the watermark was reset: an older but still-valid result may open a new episode
    n = only(apply_finding(b, finding(at=T0 + timedelta(hours=1)), clock.now, CONFIG))
    assert n.episode == 2


def test_retraction_without_open_alert_is_a_no_op():
    assert apply_finding(book(), finding(state="retracted"), T0, CONFIG) == []


# ------------------------------------------------------------------ escalation


def test_escalation_through_tiers_to_failsafe():
    b, clock = book(), Clock()
    a = open_alert(b, severity="high")  # 10 min per tier
    assert tick(b, clock.advance(minutes=9, seconds=59), CONFIG) == []
    e1 = only(tick(b, clock.advance(seconds=1), CONFIG))
    assert e1.escalation_tier == 1 and e1.notify and e1.changes == ["escalated"] and e1.version == 2
    assert e1.current_recipients() == ["on-call-physician"]
    assert e1.next_escalation_at == T0 + timedelta(minutes=20)
    assert e1.status == AlertStatus.FIRING and e1.previous_status == AlertStatus.FIRING
    e2 = only(tick(b, clock.advance(minutes=10), CONFIG))
    assert e2.escalation_tier == 2 and e2.current_recipients() == ["clinical-coordinator"]
    assert e2.next_escalation_at is None and "failsafe" in e2.history[-1].note
    assert tick(b, clock.advance(days=1), CONFIG) == []
    assert next_deadline(b) is None
    assert a.alert_id == e2.alert_id


def test_missed_deadlines_caught_up_in_one_version():
    b = book()
    open_alert(b, severity="critical")
    e = only(tick(b, T0 + timedelta(hours=1), CONFIG))
    assert e.escalation_tier == 2 and e.version == 2 and e.notify
    steps = [h for h in e.history if h.action == "escalated"]
    assert [h.tier for h in steps] == [1, 2]
    assert e.tier_entered_at == T0 + timedelta(minutes=10)  # timed as if on schedule


def test_explicit_none_timeout_stops_automatic_escalation():
    b, clock = book(), Clock()
    open_alert(b, severity="warning")
    e = only(tick(b, clock.advance(minutes=30), CONFIG))
    assert e.escalation_tier == 1 and e.next_escalation_at is None
    assert tick(b, clock.advance(days=1), CONFIG) == []


def test_missing_severity_timeout_falls_back_to_more_urgent():
    tier = TierSpec(name="t", recipients=["x"], escalate_after_minutes={"critical": 5, "high": 10})
    assert tier.timeout_minutes(Severity.WARNING) == 10
    assert tier.timeout_minutes(Severity.INFO) == 10
    assert TierSpec(name="t", recipients=["x"]).timeout_minutes(Severity.CRITICAL) is None


def test_route_requires_failsafe_and_a_tier():
    with pytest.raises(ValidationError):
        RouteSpec.model_validate({"id": "r", "tiers": [{"name": "t", "recipients": ["a"]}]})
    with pytest.raises(ValidationError):
        RouteSpec.model_validate({"id": "r", "tiers": [], "failsafe": {"name": "f", "recipients": ["c"]}})
    with pytest.raises(ValidationError):
        RouteSpec.model_validate({"id": "r", "tiers": [{"name": "t", "recipients": ["a"]}],
                                  "failsafe": {"name": "f", "recipients": []}})


def test_route_adapts_from_a_dump_with_extra_fields():
    dump = copy_route(ROUTE) | {"description": "liver route", "extra": 1}
    assert RouteSpec.model_validate(dump) == ROUTE


def test_route_is_copied_at_open_and_not_rerouted_by_config_change():
    b, clock = book(), Clock()
    a = open_alert(b, severity="high")
    changed = RouteSpec(id="liver", tiers=[TierSpec(name="other", recipients=["someone-else"],
                                                    escalate_after_minutes={"high": 1})],
                        failsafe={"name": "f2", "recipients": ["f2"]})
    cfg2 = LifecycleConfig(routes={"liver": changed}, pseudonym_secret=b"test-secret")
    u = only(apply_finding(b, finding(at=clock.advance(minutes=1)), clock.now, cfg2))
    assert u.route == a.route == copy_route(ROUTE)
    assert tick(b, clock.advance(minutes=2), cfg2) == []  # old 10-minute timer, not 1
    assert only(tick(b, T0 + timedelta(minutes=10), cfg2)).current_recipients() == ["on-call-physician"]


def test_unknown_route_falls_back_and_is_noted():
    a = open_alert(book(), route="nope")
    assert a.route == copy_route(FALLBACK_ROUTE) and "unknown" in a.history[0].note


def test_manual_escalation_pages_next_level_even_if_acknowledged():
    b = book()
    a = open_alert(b)
    apply_action(b, action("acknowledge", a.alert_id), T0, CONFIG)
    e = only(apply_action(b, action("escalate", a.alert_id, reason="need help"), T0, CONFIG))
    assert e.escalation_tier == 1 and e.notify and e.status == AlertStatus.ACKNOWLEDGED
    assert e.next_escalation_at is None  # acknowledged: no automatic escalation
    apply_action(b, action("escalate", a.alert_id), T0, CONFIG)
    with pytest.raises(InvalidAction):
        apply_action(b, action("escalate", a.alert_id), T0, CONFIG)


# ------------------------------------------------------------------ inhibition


def test_inhibited_alert_is_visible_but_silent_and_does_not_escalate():
    b, clock = book(), Clock()
    hy = open_alert(b, rule="liver.hys_law", severity="critical")
    alt = only(apply_finding(b, finding(rule="liver.alt_increased", at=clock.advance(minutes=1)), clock.now, CONFIG))
    assert alt.status == AlertStatus.FIRING and alt.inhibited_by == hy.alert_id
    assert alt.notify is False and alt.next_escalation_at is None
    assert "inhibited" in alt.changes
    escalated = tick(b, clock.advance(hours=1), CONFIG)
    assert [x.alert_id for x in escalated] == [hy.alert_id]


def test_inhibitor_arriving_later_holds_back_open_target_and_release_renotifies():
    b, clock = book(), Clock()
    alt = open_alert(b, rule="liver.alt_increased")
    ast = open_alert(b, rule="liver.ast_increased")
    out = apply_finding(b, finding(rule="liver.hys_law", severity="critical", at=clock.advance(minutes=2)),
                        clock.now, CONFIG)
    by_rule = {x.rule_id: x for x in out}
    hy = by_rule["liver.hys_law"]
    assert hy.notify and by_rule["liver.alt_increased"].inhibited_by == hy.alert_id
    assert by_rule["liver.ast_increased"].inhibited_by == hy.alert_id
    assert by_rule["liver.alt_increased"].notify is False
    assert by_rule["liver.alt_increased"].next_escalation_at is None
    # Hy's law clears while ALT still high: ALT is released, pages, timer restarts
    out = apply_finding(b, finding(rule="liver.hys_law", state="cleared", at=clock.advance(minutes=30)),
                        clock.now, CONFIG)
    by_rule = {x.rule_id: x for x in out}
    rel = by_rule["liver.alt_increased"]
    assert rel.inhibited_by is None and rel.notify and rel.changes == ["uninhibited"]
    assert rel.next_escalation_at == clock.now + timedelta(minutes=10)
    assert {alt.alert_id, ast.alert_id} <= {x.alert_id for x in out}


def test_acknowledged_inhibitor_still_inhibits_and_other_patients_unaffected():
    b = book()
    hy = open_alert(b, rule="liver.hys_law", severity="critical")
    apply_action(b, action("acknowledge", hy.alert_id), T0, CONFIG)
    alt = open_alert(b, rule="liver.alt_increased")
    assert alt.inhibited_by == hy.alert_id
    other = AlertBook(patient_id="p2")
    f = finding(rule="liver.alt_increased").model_copy(update={"patient_id": "p2"})
    assert only(apply_finding(other, f, T0, CONFIG)).inhibited_by is None


def test_inhibition_map_is_configurable():
    cfg = LifecycleConfig(routes={"liver": ROUTE}, inhibitions={"renal.aki": {"renal.creatinine_up"}})
    b = book()
    assert "liver.hys_law" in DEFAULT_INHIBITIONS
    hy = only(apply_finding(b, finding(rule="liver.hys_law"), T0, cfg))
    alt = only(apply_finding(b, finding(rule="liver.alt_increased"), T0, cfg))
    assert alt.inhibited_by is None and alt.notify
    aki = only(apply_finding(b, finding(rule="renal.aki"), T0, cfg))
    cr = only(apply_finding(b, finding(rule="renal.creatinine_up"), T0, cfg))
    assert cr.inhibited_by == aki.alert_id and hy.inhibited_by is None


def test_retracting_inhibitor_releases_targets():
    b = book()
    open_alert(b, rule="liver.hys_law", severity="critical")
    open_alert(b, rule="liver.alt_increased")
    out = apply_finding(b, finding(rule="liver.hys_law", state="retracted"), T0 + timedelta(minutes=1), CONFIG)
    assert {x.rule_id: x.status for x in out} == {"liver.hys_law": "retracted", "liver.alt_increased": "firing"}
    assert [x for x in out if x.rule_id == "liver.alt_increased"][0].notify


# ------------------------------------------------------------------ silences


def test_admin_silence_pauses_paging_until_expiry():
    b, clock = book(), Clock()
    a = open_alert(b, severity="high")
    until = T0 + timedelta(hours=2)
    s = only(apply_action(b, action("silence", a.alert_id, role="admin", by="admin:bob", until=until,
                                    reason="known, patient on steroids"), clock.now, CONFIG))
    assert s.silenced_until == until and s.next_escalation_at is None and s.notify is False
    assert s.status == AlertStatus.FIRING and s.history[-1].by == "admin:bob"
    assert next_deadline(b) == until
    # repeat finding while silenced: no page
    assert only(apply_finding(b, finding(at=clock.advance(minutes=30)), clock.now, CONFIG)).notify is False
    assert tick(b, clock.advance(minutes=60), CONFIG) == []
    e = only(tick(b, until, CONFIG))
    assert e.silenced_until is None and e.changes == ["silence_expired"] and e.notify
    assert e.next_escalation_at == until + timedelta(minutes=10)


def test_silence_rules():
    b = book()
    a = open_alert(b, severity="high")
    kw = dict(until=T0 + timedelta(hours=1), reason="r")
    with pytest.raises(Forbidden):
        apply_action(b, action("silence", a.alert_id, role="nurse", **kw), T0, CONFIG)
    with pytest.raises(Forbidden):
        apply_action(b, action("silence", a.alert_id, role="physician", **kw), T0, CONFIG)
    with pytest.raises(ValidationError):  # no expiry
        action("silence", a.alert_id, role="admin", reason="r")
    with pytest.raises(ValidationError):  # no reason
        action("silence", a.alert_id, role="admin", until=T0 + timedelta(hours=1), reason="  ")
    with pytest.raises(InvalidAction):
        apply_action(b, action("silence", a.alert_id, role="admin", until=T0, reason="r"), T0, CONFIG)
    with pytest.raises(InvalidAction):
        apply_action(b, action("silence", a.alert_id, role="admin", until=T0 + timedelta(days=30), reason="r"),
                     T0, CONFIG)
    crit = open_alert(b, rule="vitals.spo2_low", severity="critical")
    with pytest.raises(InvalidAction, match="critical"):
        apply_action(b, action("silence", crit.alert_id, role="admin", **kw), T0, CONFIG)
    nosev = open_alert(b, rule="x.y", severity=None)
    with pytest.raises(InvalidAction):
        apply_action(b, action("silence", nosev.alert_id, role="admin", **kw), T0, CONFIG)


def test_rise_to_critical_lifts_silence():
    b = book()
    a = open_alert(b, severity="warning")
    apply_action(b, action("silence", a.alert_id, role="admin", until=T0 + timedelta(hours=4), reason="r"),
                 T0, CONFIG)
    u = only(apply_finding(b, finding(severity="critical", at=T0 + timedelta(minutes=5)),
                           T0 + timedelta(minutes=5), CONFIG))
    assert u.silenced_until is None and u.notify and "silence_lifted" in u.changes
    assert u.next_escalation_at == T0 + timedelta(minutes=10)


# ------------------------------------------------------------------ roles and action errors


def test_resolve_roles():
    b = book()
    crit = open_alert(b, rule="liver.hys_law", severity="critical")
    high = open_alert(b, rule="liver.alt_increased", severity="high")
    warn = open_alert(b, rule="vitals.temp", severity="warning")
    with pytest.raises(Forbidden):
        apply_action(b, action("resolve", crit.alert_id, role="nurse", reason="ok"), T0, CONFIG)
    with pytest.raises(Forbidden):
        apply_action(b, action("resolve", high.alert_id, role="nurse", reason="ok"), T0, CONFIG)
    with pytest.raises(InvalidAction):
        apply_action(b, action("resolve", warn.alert_id, role="nurse"), T0, CONFIG)  # no reason
    w = only(apply_action(b, action("resolve", warn.alert_id, role="nurse", reason="probe fault"), T0, CONFIG))
    assert w.status == AlertStatus.RESOLVED and w.history[-1].note == "manual: probe fault"
    out = apply_action(b, action("resolve", crit.alert_id, role="physician", by="dr:x", reason="reviewed"),
                       T0, CONFIG)
    r = [x for x in out if x.alert_id == crit.alert_id][0]
    assert r.status == AlertStatus.RESOLVED and r.history[-1].by == "dr:x"
    # Hy's law closed: ALT released
    assert [x for x in out if x.alert_id == high.alert_id][0].inhibited_by is None
    assert only(apply_action(b, action("resolve", high.alert_id, role="admin", reason="r"), T0, CONFIG)).status \
        == AlertStatus.RESOLVED
    # resolving again is a no-op; acknowledging a resolved alert is refused
    assert apply_action(b, action("resolve", high.alert_id, role="admin", reason="r"), T0, CONFIG) == []
    with pytest.raises(InvalidAction):
        apply_action(b, action("acknowledge", high.alert_id), T0, CONFIG)
    # manual resolution closes the episode: the next finding is a new episode
    assert open_alert(b, rule="liver.hys_law", severity="critical", now=T0 + timedelta(minutes=1)).episode == 2


def test_errors_leave_book_unchanged():
    b = book()
    a = open_alert(b, severity="critical")
    before = b.to_dict()
    for act in [action("resolve", a.alert_id, role="nurse", reason="x"),
                action("silence", a.alert_id, role="admin", until=T0 + timedelta(hours=1), reason="x"),
                action("acknowledge", "no-such-alert"),
                action("acknowledge", a.alert_id, patient_id="other-patient")]:
        with pytest.raises((Forbidden, InvalidAction, UnknownAlert)) as exc:
            apply_action(b, act, T0, CONFIG)
        assert exc.value.code in {"forbidden", "invalid", "unknown_alert"}
    assert b.to_dict() == before


def test_acknowledge_any_role_idempotent_and_note_recorded():
    for role in ("nurse", "physician", "admin"):
        b = book()
        a = open_alert(b)
        ack = only(apply_action(b, action("acknowledge", a.alert_id, role=role, by=f"{role}:1",
                                          at=T0 + timedelta(seconds=30)), T0 + timedelta(minutes=1), CONFIG))
        assert ack.history[-1].at == T0 + timedelta(seconds=30) and ack.history[-1].by == f"{role}:1"
        assert apply_action(b, action("acknowledge", a.alert_id, role=role), T0, CONFIG) == []
    n = only(apply_action(b, action("note", a.alert_id, reason="called parents"), T0, CONFIG))
    assert n.history[-1].action == "note" and n.history[-1].note == "called parents" and not n.notify
    with pytest.raises(ValidationError):
        action("note", a.alert_id)


def test_action_id_replay_is_applied_once():
    b = book()
    a = open_alert(b)
    act = action("note", a.alert_id, reason="x", action_id="act-1")
    assert len(apply_action(b, act, T0, CONFIG)) == 1
    assert apply_action(b, act, T0, CONFIG) == []


def test_invalid_role_rejected_by_model():
    with pytest.raises(ValidationError):
        AlertAction(action="acknowledge", alert_id="a", by="x", role="visitor", at=T0)


# ------------------------------------------------------------------ state, deadlines, pruning


def test_book_round_trips_through_json_and_keeps_working():
    b, clock = book(), Clock()
    a = open_alert(b, severity="high")
    open_alert(b, rule="vitals.spo2_low", severity="critical")
    apply_action(b, action("note", a.alert_id, reason="x", action_id="n1"), T0, CONFIG)
    restored = AlertBook.from_dict(json.loads(json.dumps(b.to_dict())))
    assert restored == b
    e1 = tick(b, clock.advance(minutes=10), CONFIG)
    e2 = tick(restored, clock.now, CONFIG)
    assert [x.model_dump() for x in e1] == [x.model_dump() for x in e2]


def test_next_deadline():
    b = book()
    assert next_deadline(b) is None
    open_alert(b, severity="warning")
    open_alert(b, rule="vitals.spo2_low", severity="critical")
    assert next_deadline(b) == T0 + timedelta(minutes=5)


def test_closed_alerts_pruned_after_retention_but_episodes_continue():
    b = book()
    a = open_alert(b)
    apply_finding(b, finding(state="cleared", at=T0 + timedelta(minutes=1)), T0 + timedelta(minutes=1), CONFIG)
    tick(b, T0 + timedelta(days=8), CONFIG)
    assert a.alert_id not in b.alerts
    assert open_alert(b, now=T0 + timedelta(days=8)).episode == 2


def test_engine_wrapper_uses_its_config():
    eng = AlertEngine(CONFIG)
    b = eng.new_book(PID)
    a = only(eng.apply_finding(b, finding(), T0))
    assert eng.next_deadline(b) == a.next_escalation_at
    assert only(eng.tick(b, a.next_escalation_at)).escalation_tier == 1
    assert only(eng.apply_action(b, action("acknowledge", a.alert_id), T0)).status == "acknowledged"


# ------------------------------------------------------------------ property: invariants


_ops = st.lists(st.tuples(
    st.sampled_from(["present", "cleared", "retracted", "ack", "tick", "resolve", "escalate", "silence"]),
    st.sampled_from(["liver.hys_law", "liver.alt_increased", "vitals.temp"]),
    st.sampled_from([None, "info", "warning", "high", "critical"]),
    st.integers(min_value=0, max_value=40),  # minutes to advance
), max_size=40)


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(_ops)
def test_invariants_hold_for_any_sequence(ops):
    b, clock = book(), Clock()
    last_version: dict[str, int] = {}
    for kind, rule, sev, mins in ops:
        now = clock.advance(minutes=mins)
        out: list[Alert] = []
        if kind in ("present", "cleared", "retracted"):
            out = apply_finding(b, finding(rule=rule, state=kind, severity=sev, at=now), now, CONFIG)
        elif kind == "tick":
            out = tick(b, now, CONFIG)
        else:
            target = b.open_alert_for(rule)
            if target is None:
                continue
            act = {"ack": action("acknowledge", target.alert_id, at=now),
                   "resolve": action("resolve", target.alert_id, role="admin", reason="r", at=now),
                   "escalate": action("escalate", target.alert_id, at=now),
                   "silence": action("silence", target.alert_id, role="admin", reason="r", at=now,
                                     until=now + timedelta(minutes=20))}[kind]
            try:
                out = apply_action(b, act, now, CONFIG)
            except (InvalidAction, Forbidden):
                continue
        assert len({x.alert_id for x in out}) == len(out)
        for x in out:
            assert x.version == last_version.get(x.alert_id, 0) + 1  # one version per call
            last_version[x.alert_id] = x.version
            if x.severity == Severity.INFO and "escalated" not in x.changes:
                assert not x.notify
            if x.inhibited_by and "escalated" not in x.changes:
                assert not x.notify
        for k, ks in b.keys.items():
            opened = [a for a in b.alerts.values() if a.is_open and (a.rule_id, a.dedupe_key) == (ks.rule_id, ks.dedupe_key)]
            assert len(opened) <= 1
            assert (opened[0].alert_id if opened else None) == ks.open_alert_id
        for a in b.alerts.values():
            if not a.is_open or a.status == AlertStatus.ACKNOWLEDGED or a.inhibited_by or a.severity == "info":
                assert a.next_escalation_at is None
            if a.next_escalation_at is not None:
                assert a.escalation_tier < len(a.route["tiers"])
            assert a.escalation_tier <= len(a.route["tiers"])
            if a.severity == Severity.CRITICAL:
                assert a.silenced_until is None
        dl = next_deadline(b)
        assert dl is None or all(a.next_escalation_at is None or a.next_escalation_at >= dl
                                 for a in b.open_alerts())


def test_a_corrected_newest_result_resolves_an_alert_that_stood_on_earlier_valid_results():
    # issue 12 item 10: a real grade-2 nadir, then a mistyped count that is corrected: the
    # episode is resolved (the nadir happened), not retracted; a typo-only alert is retracted
    from alerts.engine import Engine
    from alerts.lifecycle import AlertEngine
    from alerts.testkit import Sim, at, dose, obs
    from schemas.alert import AlertStatus

    def run(values):
        sim, life = Sim(Engine()), AlertEngine()
        book = life.new_book("p1")
        for ev in [dose()] + values:
            for f in sim.feed([ev], now=at(30)):
                life.apply_finding(book, f, at(30))
        return [a for a in book.alerts.values() if a.rule_id == "heme.platelets_decreased"]

    real = run([obs("platelets", 63, 7, low=150, oid="d7"), obs("platelets", 36, 14, low=150, oid="d14"),
                obs("platelets", 359, 14, low=150, oid="d14", status="corrected")])
    assert [(a.episode, a.status) for a in real] == [(1, AlertStatus.RESOLVED)]
    assert real[0].history[-1].action == "resolved" and "earlier valid results" in real[0].history[-1].note
    typo = run([obs("platelets", 25, 7, low=150, oid="d7"), obs("platelets", 250, 7, low=150, oid="d7", status="corrected")])
    assert [(a.episode, a.status) for a in typo] == [(1, AlertStatus.RETRACTED)]
