"""The one action policy (alerts/policy.py) and what uses it; faust web settings pinned (L3)."""
from __future__ import annotations

from datetime import datetime, timedelta, timezone

import pytest

from alerts import policy
from schemas.alert import ActionKind, Role
from schemas.findings import Severity


@pytest.mark.parametrize("role", list(Role))
@pytest.mark.parametrize("severity", [*Severity, None])
def test_policy_table(role, severity):
    sev = Severity(severity) if severity is not None else Severity.CRITICAL
    assert policy.may(role, ActionKind.ACKNOWLEDGE, severity)
    assert policy.may(role, ActionKind.NOTE, severity)
    assert policy.may(role, ActionKind.ESCALATE, severity)
    assert policy.may(role, ActionKind.SILENCE, severity) == (role == Role.ADMIN)
    needs_doctor = sev in (Severity.HIGH, Severity.CRITICAL)
    assert policy.may(role, ActionKind.RESOLVE, severity) == (not needs_doctor or role in (Role.PHYSICIAN, Role.ADMIN))


def test_no_role_may_do_nothing_and_critical_is_never_offered_a_silence():
    assert not any(policy.may(None, k, Severity.INFO) for k in ActionKind)
    assert "silence" not in policy.allowed_actions(Role.ADMIN, Severity.CRITICAL, True)
    assert "silence" in policy.allowed_actions(Role.ADMIN, Severity.WARNING, True)
    assert policy.allowed_actions(Role.NURSE, Severity.CRITICAL, False) == ["note"]


def test_the_inbox_and_the_actions_api_use_the_same_policy():
    from monitor import actions_api
    from monitor.inbox import auth

    assert auth.may is policy.may and auth.allowed_actions is policy.allowed_actions
    from monitor.inbox import views

    assert actions_api.allowed_actions is policy.allowed_actions
    # the checks before an action is published: one function for both front ends
    assert actions_api.request_refusal is policy.request_refusal and views.request_refusal is policy.request_refusal
    assert actions_api.ID_RE is policy.ID_RE and views.ID_RE is policy.ID_RE
    assert actions_api.MAX_REASON_CHARS == policy.MAX_REASON_CHARS
    # the inbox's longest silence is the lifecycle's (it was a literal of its own)
    from alerts.lifecycle import DEFAULT_CONFIG
    assert views.MAX_SILENCE == DEFAULT_CONFIG.max_silence


NOW = datetime(2026, 11, 29, 12, tzinfo=timezone.utc)
WEEK = timedelta(days=7)


def _refusal(action, role=Role.ADMIN, severity=Severity.WARNING, is_open=True, reason="because",
             until=NOW + timedelta(hours=4), status="firing"):
    r = policy.request_refusal(ActionKind(action), role=role, severity=severity, is_open=is_open, reason=reason,
                               until=until, now=NOW, max_silence=WEEK, status=status)
    return None if r is None else r.kind


@pytest.mark.parametrize("case, expected", [
    (dict(action="acknowledge", role=Role.NURSE, reason=None), None),
    (dict(action="silence"), None),
    (dict(action="resolve", role=Role.PHYSICIAN, severity=Severity.CRITICAL), None),
    (dict(action="note", is_open=False, status="resolved"), None),  # a closed alert takes notes
    # forbidden: the role may not (checked first, whatever else is wrong)
    (dict(action="silence", role=Role.NURSE, reason=None, until=None), "forbidden"),
    (dict(action="resolve", role=Role.NURSE, severity=Severity.HIGH), "forbidden"),
    (dict(action="acknowledge", role=None), "forbidden"),
    # conflict: the alert's state or severity does not allow it
    (dict(action="silence", severity=Severity.CRITICAL), "conflict"),
    (dict(action="acknowledge", is_open=False, status="resolved"), "conflict"),
    # invalid: something missing or out of range
    (dict(action="resolve", reason="  "), "invalid"),
    (dict(action="note", reason=None), "invalid"),
    (dict(action="silence", reason=None), "invalid"),
    (dict(action="silence", until=None), "invalid"),
    (dict(action="silence", until=NOW - timedelta(seconds=1)), "invalid"),
    (dict(action="silence", until=NOW + WEEK + timedelta(seconds=1)), "invalid"),
    (dict(action="note", reason="x" * (policy.MAX_REASON_CHARS + 1)), "invalid"),
    # an alert this front end does not hold: its severity counts as critical for a silence,
    # and whether it is open is left to the lifecycle
    (dict(action="silence", severity=None, is_open=None), "invalid"),
    (dict(action="acknowledge", role=Role.NURSE, severity=None, is_open=None), None),
])
def test_request_refusal_table(case, expected):
    assert _refusal(**case) == expected


def test_a_refusal_names_what_was_refused():
    r = policy.request_refusal(ActionKind.ACKNOWLEDGE, role=Role.NURSE, severity=Severity.HIGH, is_open=False,
                               reason=None, until=None, now=NOW, max_silence=WEEK, status="resolved")
    assert r == ("conflict", "alert is resolved: only a note can be added")
    r = policy.request_refusal(ActionKind.SILENCE, role=Role.ADMIN, severity=Severity.HIGH, is_open=True,
                               reason="x", until=None, now=NOW, max_silence=WEEK)
    assert r.kind == "invalid" and "at most 7 days away" in r.message
    r = policy.request_refusal(ActionKind.RESOLVE, role=Role.NURSE, severity=Severity.CRITICAL, is_open=True,
                               reason="x", until=None, now=NOW, max_silence=WEEK)
    assert r.kind == "forbidden" and r.message.startswith("a nurse may not resolve a critical alert")


@pytest.mark.parametrize("value, ok", [("a-b.c:d_e", True), ("x" * 128, True), ("x" * 129, False), ("", False),
                                       ("abc\n", False), ("a b", False), ("a/b", False)])
def test_one_id_pattern_and_no_trailing_newline(value, ok):
    """``$`` matched before a trailing newline: the actions API's copy of the pattern took
    ``"abc\n"`` while the inbox's refused it (security review I1)."""
    assert bool(policy.ID_RE.match(value)) is ok


def test_faust_web_environment_cannot_reopen_tables_router_or_bind(monkeypatch):
    """Security review L3: APP_WEB_* variables override explicit faust arguments."""
    from monitor.app import create_app
    from monitor.settings import Settings

    monkeypatch.setenv("APP_WEB_TABLES_ENABLED", "true")
    monkeypatch.setenv("APP_WEB_ROUTER_ENABLED", "true")
    monkeypatch.setenv("APP_WEB_BIND", "0.0.0.0")
    app = create_app(Settings(web_host="127.0.0.1"))
    assert (app.conf.web_tables_enabled, app.conf.web_router_enabled, app.conf.web_bind) == (False, False, "127.0.0.1")


def test_source_label_allow_list():
    """Security review L2: with METRICS_SOURCES set, sender-chosen names beyond it are 'other'."""
    from monitor import metrics

    try:
        metrics.configure_sources(" lab-a , lab-b ")
        assert [metrics.source_label(n) for n in ("lab-a", "lab-b", "req-123", "lab-c")] == [
            "lab-a", "lab-b", "other", "other"]
        metrics.configure_sources("")
        assert metrics.source_label("req-456") == "req-456"  # unconfigured: first come, bounded
    finally:
        metrics.configure_sources(None)


def test_each_kind_of_refusal_has_its_http_status():
    assert [policy.RequestRefusal(k, "").http_status for k in ("forbidden", "conflict", "invalid")] == [403, 409, 400]
