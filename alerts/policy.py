"""The one action policy: which role may do what to an alert of which severity (review H4,
architecture review §6.3). Pure: used by the lifecycle (authoritative), the worker's actions
API and the inbox (pre-checks and the buttons they show).

* everyone (nurse, physician, admin) may acknowledge, note and escalate;
* resolving a high or critical alert needs a physician or admin (info/warning: anyone);
* silencing is admin only, and a critical alert is never silenced;
* an alert whose severity is unknown is judged as critical.
"""
from __future__ import annotations

from schemas.alert import ActionKind, Role
from schemas.findings import Severity

__all__ = ["RESOLVE_NEEDS_PHYSICIAN", "refusal", "may", "allowed_actions"]

RESOLVE_NEEDS_PHYSICIAN = frozenset({Severity.HIGH, Severity.CRITICAL})


def refusal(role: Role | str | None, action: ActionKind | str, severity: Severity | str | None = None) -> str | None:
    """Why ``role`` may not ``action`` an alert of ``severity`` (None: allowed). A missing
    role is refused everything."""
    action = ActionKind(action)
    if role is None:
        return f"no role: cannot {action.value}"
    role = Role(role)
    sev = Severity(severity) if severity is not None else Severity.CRITICAL
    if action == ActionKind.SILENCE and role != Role.ADMIN:
        return "only an admin may silence an alert"
    if action == ActionKind.RESOLVE and sev in RESOLVE_NEEDS_PHYSICIAN and role not in (Role.PHYSICIAN, Role.ADMIN):
        return f"only a physician or admin may resolve a {sev.value} alert"
    return None


def may(role: Role | str | None, action: ActionKind | str, severity: Severity | str | None = None) -> bool:
    return refusal(role, action, severity) is None


def allowed_actions(role: Role | str | None, severity: Severity | str | None, is_open: bool) -> list[str]:
    """The actions to offer ``role`` on an alert (closed alerts take notes only; critical
    alerts are never silenced)."""
    kinds = [ActionKind.NOTE] if not is_open else [ActionKind.ACKNOWLEDGE, ActionKind.NOTE, ActionKind.ESCALATE,
                                                    ActionKind.RESOLVE, ActionKind.SILENCE]
    out = [k.value for k in kinds if may(role, k, severity)]
    if is_open and Severity(severity or "critical") == Severity.CRITICAL and "silence" in out:
        out.remove("silence")
    return out
