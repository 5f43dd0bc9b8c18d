"""The one action policy (alerts/policy.py) and what uses it; faust web settings pinned (L3)."""
from __future__ import annotations

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
    assert actions_api.may is policy.may and actions_api.allowed_actions is policy.allowed_actions


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
