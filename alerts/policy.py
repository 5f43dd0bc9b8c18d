"""The one action policy: which role may do what to an alert of which severity (review H4,
architecture review §6.3). Pure: used by the lifecycle (authoritative), the worker's actions
API and the inbox (pre-checks and the buttons they show).

* everyone (nurse, physician, admin) may acknowledge, note and escalate;
* resolving a high or critical alert needs a physician or admin (info/warning: anyone);
* silencing is admin only, and a critical alert is never silenced;
* an alert whose severity is unknown is judged as critical.
"""
from __future__ import annotations

import re
from datetime import datetime, timedelta
from typing import NamedTuple

from schemas.alert import ActionKind, Role
from schemas.findings import Severity

__all__ = ["RESOLVE_NEEDS_PHYSICIAN", "NEEDS_REASON", "MAX_REASON_CHARS", "ID_RE", "RequestRefusal", "refusal", "may",
           "allowed_actions", "request_refusal"]

RESOLVE_NEEDS_PHYSICIAN = frozenset({Severity.HIGH, Severity.CRITICAL})
#: actions that need a reason (the text of a note, why an alert was resolved or silenced)
NEEDS_REASON = frozenset({ActionKind.RESOLVE, ActionKind.NOTE, ActionKind.SILENCE})
#: the longest reason a front end takes
MAX_REASON_CHARS = 2000
#: an alert id or action id a front end takes: letters, digits and . _ : - (1-128). ``\Z``,
#: not ``$``: ``$`` also matches before a trailing newline (security review I1)
ID_RE = re.compile(r"[A-Za-z0-9._:\-]{1,128}\Z")


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


class RequestRefusal(NamedTuple):
    """Why a front end refuses an action before publishing it. ``kind``: ``forbidden`` (the
    role may not), ``conflict`` (the alert's state does not allow it) or ``invalid`` (the
    request lacks something); the HTTP front ends answer 403, 409 and 400."""

    kind: str
    message: str

    @property
    def http_status(self) -> int:
        return _HTTP_STATUS[self.kind]


_HTTP_STATUS = {"forbidden": 403, "conflict": 409, "invalid": 400}


def request_refusal(action: ActionKind, *, role: Role | str | None, severity: Severity | str | None,
                    is_open: bool | None, reason: str | None, until: datetime | None, now: datetime,
                    max_silence: timedelta, status: str | None = None) -> RequestRefusal | None:
    """The checks the worker's actions API and the inbox make before they publish an
    action, in one order; the lifecycle (:func:`alerts.lifecycle.apply_action`) stays
    authoritative and makes them again where the alert is.

    ``severity`` / ``is_open`` None: the front end does not hold the alert (the actions API
    of a worker that does not own the patient). An unknown severity is judged as critical
    (as the lifecycle does), so a silence cannot be checked and is refused; the open-alert
    check is left to the lifecycle. ``status``: the alert's status, named when it is closed."""
    action = ActionKind(action)
    why = refusal(role, action, severity)
    if why is not None:
        what = f"a {Severity(severity).value} alert" if severity is not None else "an alert whose severity is unknown here"
        return RequestRefusal("forbidden", f"a {Role(role).value if role else 'user without a role'} may not "
                                           f"{action.value} {what} ({why})")
    if action == ActionKind.SILENCE and severity is None:
        return RequestRefusal("invalid", "the alert is not held here: cannot check it is not critical")
    if action == ActionKind.SILENCE and Severity(severity) == Severity.CRITICAL:
        return RequestRefusal("conflict", "critical alerts cannot be silenced")
    if is_open is False and action != ActionKind.NOTE:
        return RequestRefusal("conflict", f"alert is {status or 'closed'}: only a note can be added")
    if action in NEEDS_REASON and not (reason and reason.strip()):
        return RequestRefusal("invalid", f"{action.value} needs a reason")
    if reason is not None and len(reason) > MAX_REASON_CHARS:
        return RequestRefusal("invalid", f"a reason has at most {MAX_REASON_CHARS} characters")
    if action == ActionKind.SILENCE and (until is None or until <= now or until - now > max_silence):
        return RequestRefusal("invalid", f"a silence needs an expiry ('until') in the future, at most "
                                         f"{_span(max_silence)} away")
    return None


def _span(d: timedelta) -> str:
    if d.seconds == 0 and d.microseconds == 0:
        return f"{d.days} day{'s' if d.days != 1 else ''}"
    return str(d)
