"""Pages and JSON API of the nurse inbox (aiohttp handlers). Templates are plain Python strings,
every interpolated value passes through :func:`html.escape`.

Pages: ``/login``, ``/`` (inbox), ``/alerts/{alert_id}`` (detail), ``/patients/{ref}`` (timeline).
API: ``/api/me``, ``/api/alerts``, ``/api/alerts/{alert_id}``, ``POST /api/alerts/{alert_id}/actions``,
``/api/patients/{ref}/timeline``, ``/api/stream`` (server-sent events), ``/api/admin/status`` (admin).
URLs carry only the alert id (a hash) and an opaque patient reference (HMAC of the patient id).
"""
from __future__ import annotations

import asyncio
import hashlib
import json
import re
import secrets
import uuid
from datetime import datetime, timezone
from html import escape
from typing import Any, Awaitable, Callable

from aiohttp import web
from pydantic import ValidationError

from schemas.alert import ActionKind, Alert, AlertAction, Role

from alerts.lifecycle import DEFAULT_CONFIG as LIFECYCLE_DEFAULTS
from alerts.policy import ID_RE, request_refusal

from .auth import (
    ALL_WARDS, AUTH_KEY, CSRF_FIELD, Session, allowed_actions, current_session,
    require_role, ward_visibility,
)
from .metrics import METRICS_KEY
from .store import InboxStore

STORE_KEY = web.AppKey("inbox_store", InboxStore)
PUBLISH_KEY = web.AppKey("inbox_publish", object)  # async callable(AlertAction) -> None
STATUS_KEY = web.AppKey("inbox_status", dict)

#: the lifecycle's longest silence (the worker's lifecycle uses the same default)
MAX_SILENCE = LIFECYCLE_DEFAULTS.max_silence
_REF_RE = re.compile(r"^p-[0-9a-f]{24}$")
ACTION_LABELS = {"acknowledge": "Acknowledge", "note": "Add note", "escalate": "Escalate", "resolve": "Resolve",
                 "silence": "Silence"}


def ward_scope(request: web.Request) -> Callable[[str | None], bool]:
    """``visible(ward)`` for the signed-in user (review M5; :func:`monitor.inbox.auth.ward_visibility`,
    the one ward policy): admins and users granted ``"*"`` see every ward (also patients with none);
    others only the wards listed for them in the users file (read live, so a changed file applies
    at once)."""
    sess = current_session(request)
    user = request.app[AUTH_KEY].users.get(sess.username)
    return ward_visibility(sess.role, user.wards if user is not None else ())


def _e(v: Any) -> str:
    return escape("" if v is None else str(v), quote=True)


def site_zone():
    """The site's time zone (``INBOX_TIMEZONE``, an IANA name; default UTC): every time shown in it,
    with its offset; the UTC time on hover."""
    import os
    from zoneinfo import ZoneInfo, ZoneInfoNotFoundError

    name = os.environ.get("INBOX_TIMEZONE", "").strip() or "UTC"
    try:
        return ZoneInfo(name)
    except (ZoneInfoNotFoundError, ValueError):
        return timezone.utc


def _fmt_time(v: datetime | str | None) -> str:
    if v is None:
        return ""
    if isinstance(v, str):
        v = datetime.fromisoformat(v)
    local = v.astimezone(site_zone())
    off = local.strftime("%z")
    return local.strftime("%Y-%m-%d %H:%M ") + (f"{off[:3]}:{off[3:]}" if off else "UTC")


def _time(v: datetime | str | None) -> str:
    """A ``<time>`` in the site zone with the UTC time as its title (hover)."""
    if v is None:
        return ""
    if isinstance(v, str):
        v = datetime.fromisoformat(v)
    utc = v.astimezone(timezone.utc)
    return (f'<time datetime="{_e(utc.isoformat())}" title="{_e(utc.strftime("%Y-%m-%d %H:%M UTC"))}">'
            f'{_e(_fmt_time(v))}</time>')


def patient_banner(ident: dict) -> str:
    """Who the patient is (two identifiers: name and date of birth, plus the MRN); an unregistered
    patient is said so plainly, with the id. Shown to signed-in clinical users only."""
    if not ident.get("registered"):
        return (f'<p class="patient-banner unregistered" id="patient-banner"><strong>Unregistered patient</strong> '
                f'&middot; id <span class="pid">{_e(ident.get("patient_id"))}</span> &middot; no demographic record '
                f'on the patients feed</p>')
    bed = f' &middot; bed {_e(ident["bed"])}' if ident.get("bed") else ""
    return (f'<p class="patient-banner" id="patient-banner"><strong class="patient-name">{_e(ident["display_name"])}'
            f'</strong> &middot; MRN <span class="mrn">{_e(ident["mrn"])}</span> &middot; born '
            f'<span class="dob">{_e(ident["birth_date"])}</span>{bed}</p>')


def _num(v: float | None) -> str:
    if v is None:
        return ""
    return f"{v:.4g}"


# --------------------------------------------------------------------------- layout


def page(title: str, body: str, *, sess: Session | None = None, scripts: tuple[str, ...] = (),
         page_id: str = "", data: dict[str, str] | None = None) -> str:
    user = ""
    csrf_meta = ""
    if sess is not None:
        csrf_meta = f'<meta name="csrf-token" content="{_e(sess.csrf_token)}">'
        user = (f'<div class="user"><span class="who">{_e(sess.display_name)} '
                f'<span class="role role-{_e(sess.role.value)}">{_e(sess.role.value)}</span></span>'
                f'<form method="post" action="/logout" class="inline">'
                f'<input type="hidden" name="{CSRF_FIELD}" value="{_e(sess.csrf_token)}">'
                f'<button type="submit" class="btn btn-quiet">Sign out</button></form></div>')
    attrs = " ".join(f'data-{_e(k)}="{_e(v)}"' for k, v in (data or {}).items())
    tags = "".join(f'<script src="/static/{_e(s)}" defer></script>' for s in scripts)
    nav = ('<nav aria-label="Main"><a href="/" class="brand">SMA gene therapy monitor '
           '<span class="sub">nurse inbox</span></a> <a href="/" class="nav-link">Inbox</a> '
           '<a href="/census" class="nav-link" id="nav-census">Census</a> '
           '<a href="/handover" class="nav-link" id="nav-handover">Handover</a></nav>') if sess else '<span class="brand">SMA gene therapy monitor</span>'
    return f"""<!doctype html>
<html lang="en"><head><meta charset="utf-8">
<meta name="viewport" content="width=device-width, initial-scale=1">
<title>{_e(title)} - SMA monitor</title>{csrf_meta}
<link rel="stylesheet" href="/static/uPlot.min.css"><link rel="stylesheet" href="/static/inbox.css">{tags}
</head><body id="{_e(page_id)}" {attrs}>
<a class="skip" href="#main">Skip to content</a>
<header class="top">{nav}{user}</header>
<main id="main" tabindex="-1">{body}</main>
</body></html>"""


def html_response(text: str, status: int = 200) -> web.Response:
    return web.Response(text=text, status=status, content_type="text/html", charset="utf-8")


# --------------------------------------------------------------------------- login / logout


def _login_form(csrf: str, error: str = "", username: str = "") -> str:
    err = f'<p class="error" role="alert">{_e(error)}</p>' if error else ""
    return f"""<section class="card login">
<h1>Sign in</h1>{err}
<form method="post" action="/login" id="login-form">
<input type="hidden" name="{CSRF_FIELD}" value="{_e(csrf)}">
<label for="username">User name</label>
<input id="username" name="username" autocomplete="username" required autofocus value="{_e(username)}">
<label for="password">Password</label>
<input id="password" name="password" type="password" autocomplete="current-password" required>
<button type="submit" class="btn btn-primary">Sign in</button>
</form></section>"""


async def login_page(request: web.Request) -> web.StreamResponse:
    cfg = request.app[AUTH_KEY]
    if cfg.sessions.get(request.cookies.get(cfg.session_cookie), touch=False):
        raise web.HTTPFound("/")
    # reuse the pending token so two tabs (or a re-fetch of the page) keep working
    existing = request.cookies.get(cfg.login_csrf_cookie, "")
    csrf = existing if re.fullmatch(r"[A-Za-z0-9_-]{32}", existing) else secrets.token_urlsafe(24)
    resp = html_response(page("Sign in", _login_form(csrf), page_id="page-login"))
    cfg.set_cookie(request, resp, cfg.login_csrf_cookie, csrf, max_age=3600)
    return resp


def _count_login(request: web.Request, outcome: str) -> None:
    metrics = request.app.get(METRICS_KEY)
    if metrics is not None:
        metrics.login(outcome)


def _count_action(request: web.Request, action: str, outcome: str) -> None:
    metrics = request.app.get(METRICS_KEY)
    if metrics is not None:
        metrics.action(action, outcome)


def _client_address(request: web.Request) -> str:
    return request.app[AUTH_KEY].client_address(request)


#: password verifications running at once (scrypt at N=2^17 is ~128 MiB and a few hundred ms
#: each) and waiting; beyond that a sign-in is answered 503 (review M1: bounded pre-auth work)
MAX_VERIFYING, MAX_WAITING = 2, 16
VERIFY_KEY = _VERIFY_KEY = web.AppKey("inbox_verify_slots", dict)


def _verify_slots(app: web.Application) -> dict:
    return app[_VERIFY_KEY]


def verify_slots() -> dict:
    """A fresh slot record for :func:`create_inbox_app` (``app[_VERIFY_KEY]``)."""
    return {"sem": asyncio.Semaphore(MAX_VERIFYING), "waiting": 0}


async def login_submit(request: web.Request) -> web.StreamResponse:
    cfg = request.app[AUTH_KEY]
    form = await request.post()
    username = str(form.get("username", ""))[:128].strip()
    password = str(form.get("password", ""))[:1024]
    sent = str(form.get(CSRF_FIELD, ""))
    cookie = request.cookies.get(cfg.login_csrf_cookie, "")
    if not sent or not cookie or not secrets.compare_digest(sent.encode("utf-8"), cookie.encode("utf-8")):
        _count_login(request, "expired_form")
        return html_response(page("Sign in", "<p class='error' role='alert'>Your sign-in form expired. "
                                  "<a href='/login'>Try again</a>.</p>", page_id="page-login"), status=403)
    addr = _client_address(request)
    slots = _verify_slots(request.app)
    if slots["waiting"] >= MAX_WAITING:
        _count_login(request, "busy")
        return web.Response(status=503, text="Too many sign-ins at once; try again in a moment.",
                            headers={"Retry-After": "2"})
    wait = cfg.throttle.begin(username, addr)  # counted now, before the (slow) verification
    if wait > 0:
        _count_login(request, "throttled")
        csrf = secrets.token_urlsafe(24)
        resp = html_response(page("Sign in", _login_form(csrf, f"Too many failed attempts. Try again in "
                                                           f"{int(wait) + 1} seconds.", username),
                                  page_id="page-login"), status=429)
        resp.headers["Retry-After"] = str(int(wait) + 1)
        cfg.set_cookie(request, resp, cfg.login_csrf_cookie, csrf, max_age=3600)
        return resp
    slots["waiting"] += 1
    try:
        async with slots["sem"]:
            user = await asyncio.get_running_loop().run_in_executor(None, cfg.users.authenticate, username, password)
    finally:
        slots["waiting"] -= 1
    if user is None:  # the failure was counted by begin()
        _count_login(request, "failed")
        csrf = secrets.token_urlsafe(24)
        resp = html_response(page("Sign in", _login_form(csrf, "User name or password is wrong.", username),
                                  page_id="page-login"), status=401)
        cfg.set_cookie(request, resp, cfg.login_csrf_cookie, csrf, max_age=3600)
        return resp
    cfg.throttle.success(username, addr)
    _count_login(request, "succeeded")
    cfg.sessions.destroy(request.cookies.get(cfg.session_cookie))  # no session fixation
    token, _ = cfg.sessions.create(user)
    resp = web.Response(status=303, headers={"Location": "/"})
    cfg.set_cookie(request, resp, cfg.session_cookie, token)
    resp.del_cookie(cfg.login_csrf_cookie, path="/")
    return resp


async def logout(request: web.Request) -> web.StreamResponse:
    cfg = request.app[AUTH_KEY]
    cfg.sessions.destroy(request.cookies.get(cfg.session_cookie))
    resp = web.Response(status=303, headers={"Location": "/login"})
    resp.del_cookie(cfg.session_cookie, path="/")
    return resp


# --------------------------------------------------------------------------- pages


async def inbox_page(request: web.Request) -> web.Response:
    sess = current_session(request)
    body = """<h1>Open alerts</h1>
<form class="filters" id="filters" role="search" aria-label="Filter alerts">
<label for="f-ward">Ward</label><select id="f-ward" name="ward"><option value="">All wards</option></select>
<label for="f-team">Care team</label><select id="f-team" name="team"><option value="">All teams</option></select>
<span class="live" id="live-state" aria-live="polite">Connecting...</span>
</form>
<p class="notify"><label for="notify-opt"><input type="checkbox" id="notify-opt">
Notify me of new critical and high alerts on my wards (browser notification and sound)</label>
<span id="notify-state" class="hint" aria-live="polite"></span></p>
<p class="count" id="alert-count" aria-live="polite"></p>
<div class="table-wrap"><table class="alerts" id="alert-table">
<caption class="sr-only">Open alerts, most severe first, then oldest first</caption>
<thead><tr><th scope="col">Severity</th><th scope="col">Patient</th><th scope="col">Alert</th><th scope="col">Ward / team</th>
<th scope="col">Age</th><th scope="col">Status</th></tr></thead>
<tbody id="alert-rows"><tr><td colspan="6">Loading...</td></tr></tbody></table></div>
<p class="empty hidden" id="no-alerts">No open alerts.</p>"""
    # data-user keys the notification preference (localStorage, per user on a shared workstation)
    return html_response(page("Inbox", body, sess=sess, scripts=("inbox.js",), page_id="page-inbox",
                              data={"user": sess.username}))


def _alert_or_404(request: web.Request) -> Alert:
    alert_id = request.match_info["alert_id"]
    if not ID_RE.match(alert_id):
        raise web.HTTPNotFound(text="no such alert")
    store = request.app[STORE_KEY]
    alert = store.alerts.get(alert_id)
    if alert is None or not ward_scope(request)(store.ward_team(alert)[0]):  # out of scope: as if absent
        raise web.HTTPNotFound(text="no such alert")
    return alert


def _dose_ward(d: dict) -> str:
    """" (dose ward X)" when the patient has moved since the dose (ADT transfer)."""
    return f' <span class="dose-ward">(dose ward {_e(d["dose_ward"])})</span>' if d.get("dose_ward") else ""


def _evidence_rows(d: dict) -> str:
    rows = []
    for e in d["evidence"]:
        limit = f"{e.get('comparison') or ''} {_num(e.get('limit'))} {e.get('limit_unit') or ''}".strip()
        mult = f"{e['multiple']:.2f}x {'ULN' if e.get('basis') == 'uln' else e.get('basis') or ''}" \
            if e.get("multiple") is not None else ""
        rows.append(
            f"<tr><th scope='row'>{_e(e['analyte'])}</th><td class='num'>{_e(_num(e.get('value')))}</td>"
            f"<td>{_e(e.get('unit'))}</td><td>{_e(limit)}</td><td>{_e(mult)}</td><td>{_e(e.get('basis'))}</td>"
            f"<td>{_e(_fmt_time(e.get('effective_at')))}</td><td>{_e(e.get('note'))}</td></tr>")
    if not rows:
        rows.append("<tr><td colspan='8'>No evidence recorded.</td></tr>")
    return "".join(rows)


def _history_rows(d: dict) -> str:
    rows = []
    for h in reversed(d["history"]):
        change = ""
        if h.get("from_status") or h.get("to_status"):
            change = f"{_e(h.get('from_status') or '')} &rarr; {_e(h.get('to_status') or '')}"
        rows.append(f"<tr><td>{_e(_fmt_time(h['at']))}</td><td>{_e(h['action'])}</td><td>{_e(h['by'])}"
                    f"{' (' + _e(h['role']) + ')' if h.get('role') else ''}</td><td>{change}</td>"
                    f"<td>{_e(h.get('severity'))}</td><td>{_e(h.get('note'))}</td></tr>")
    omitted = int(d.get("history_omitted") or 0)
    if omitted:
        # the inbox merges every version it reads; these were on versions no longer on the topic
        rows.append(f"<tr class='history-omitted'><td colspan='6'>{omitted} earlier automatic "
                    f"{'entry is' if omitted == 1 else 'entries are'} not shown (alert versions no longer "
                    "on the alerts topic). Every action by a person is listed.</td></tr>")
    return "".join(rows) or "<tr><td colspan='6'>No history.</td></tr>"


def _action_forms(d: dict, sess: Session) -> str:
    allowed = allowed_actions(sess.role, d["severity"], d["open"])
    tok = f'<input type="hidden" name="{CSRF_FIELD}" value="{_e(sess.csrf_token)}">'
    url = f"/api/alerts/{_e(d['alert_id'])}/actions"
    parts = []

    def form(kind: str, inner: str, cls: str = "btn") -> str:
        return (f'<form method="post" action="{url}" class="action-form" data-action="{kind}" id="form-{kind}">'
                f'{tok}<input type="hidden" name="action" value="{kind}">{inner}'
                f'<button type="submit" class="{cls}" id="btn-{kind}">{ACTION_LABELS[kind]}</button></form>')

    if "acknowledge" in allowed and d["status"] == "firing":
        parts.append(form("acknowledge", "", "btn btn-primary"))
    if "escalate" in allowed:
        parts.append(form("escalate", '<label for="escalate-reason">Reason (optional)</label>'
                                      '<input id="escalate-reason" name="reason" maxlength="500">'))
    if "note" in allowed:
        parts.append(form("note", '<label for="note-text">Note</label>'
                                  '<textarea id="note-text" name="reason" rows="2" required maxlength="2000"></textarea>'))
    if "resolve" in allowed:
        parts.append(form("resolve", '<label for="resolve-reason">Reason for resolving</label>'
                                     '<textarea id="resolve-reason" name="reason" rows="2" required maxlength="2000">'
                                     '</textarea>'))
    elif d["open"]:
        parts.append('<p class="hint">Resolving a high or critical alert needs a physician.</p>')
    if "silence" in allowed:
        parts.append(form("silence", '<label for="silence-until">Silence until (site time)</label>'
                                     '<input id="silence-until" name="until" type="datetime-local" required>'
                                     '<label for="silence-reason">Reason</label>'
                                     '<input id="silence-reason" name="reason" required maxlength="500">'))
    return "".join(parts)


async def alert_page(request: web.Request) -> web.Response:
    sess = current_session(request)
    store = request.app[STORE_KEY]
    alert = _alert_or_404(request)
    d = store.detail(alert)
    pending = "".join(f"<li>{_e(p['action'])} sent by {_e(p['by'])} at {_e(_fmt_time(p['at']))}</li>"
                      for p in d["pending"])
    sent = request.query.get("sent")
    notice = (f'<p class="notice" role="status">{_e(ACTION_LABELS.get(sent, sent))} sent.</p>'
              if sent in ACTION_LABELS else "")
    body = f"""<p class="crumbs"><a href="/">&larr; Inbox</a></p>
{patient_banner(d['patient'])}
<article class="alert-detail sev-{_e(d['severity'])}" data-alert-id="{_e(d['alert_id'])}">
<header class="alert-head">
<span class="badge sev-{_e(d['severity'])}">{_e(d['severity'])}{' grade ' + _e(d['grade']) if d['grade'] else ''}</span>
<span class="status status-{_e(d['status'])}" id="alert-status">{_e(d['status'])}</span>
<h1 id="alert-title">{_e(d['text']['what'])}</h1>
<p class="meta">Alert {_e(d['pseudonym'])} &middot; rule <code>{_e(d['rule_id'])}</code> &middot;
opened {_e(_fmt_time(d['opened_at']))} &middot; updated {_e(_fmt_time(d['updated_at']))} &middot; version {_e(d['version'])}
&middot; {_e(d['ward'] or 'no ward')} / {_e(d['care_team'] or 'no team')}{_dose_ward(d)}</p>
</header>
<div id="action-status" role="status" aria-live="polite">{notice}</div>
<ul class="pending" id="pending">{pending}</ul>
<section class="nurse-text card" aria-labelledby="h-text"><h2 id="h-text" class="sr-only">For the nurse</h2>
<dl><dt>What happened</dt><dd>{_e(d['text']['what'])}</dd>
<dt>Why it matters</dt><dd>{_e(d['text']['why'])}</dd>
<dt>What the protocol says to do</dt><dd class="todo">{_e(d['text']['action'])}</dd></dl></section>
<section class="card actions" aria-labelledby="h-actions"><h2 id="h-actions">Actions</h2>{_action_forms(d, sess)}</section>
<section class="card" aria-labelledby="h-ev"><h2 id="h-ev">Evidence</h2><div class="table-wrap"><table class="evidence">
<thead><tr><th scope="col">Analyte</th><th scope="col">Value</th><th scope="col">Unit</th><th scope="col">Limit</th>
<th scope="col">Multiple</th><th scope="col">Basis</th><th scope="col">Taken</th><th scope="col">Note</th></tr></thead>
<tbody>{_evidence_rows(d)}</tbody></table></div></section>
<section class="card" aria-labelledby="h-course"><h2 id="h-course">Course since dose</h2>
<p><a href="/patients/{_e(d['patient_ref'])}" id="timeline-link">Full patient timeline</a></p>
<div class="charts" id="charts" data-patient-ref="{_e(d['patient_ref'])}" data-panels="liver"></div></section>
<section class="card" aria-labelledby="h-proto"><h2 id="h-proto">Protocol and routing</h2><dl class="inline-dl">
<dt>Protocol</dt><dd id="protocol">{_e(d['protocol']['id'])} version {_e(d['protocol']['version'])}</dd>
<dt>Route</dt><dd>{_e(d['route_id'])}, tier {_e(d['escalation_tier'])}</dd>
<dt>Now with</dt><dd>{_e(', '.join(d['recipients']))}</dd>
{'<dt>Held back by</dt><dd>' + _e(d['inhibited_by']) + '</dd>' if d['inhibited_by'] else ''}
{'<dt>Silenced until</dt><dd>' + _e(_fmt_time(d['silenced_until'])) + ' - ' + _e(d['silence_reason']) + '</dd>' if d['silenced_until'] else ''}
</dl></section>
<section class="card" aria-labelledby="h-hist"><h2 id="h-hist">History</h2><div class="table-wrap"><table class="history">
<thead><tr><th scope="col">When</th><th scope="col">What</th><th scope="col">By</th><th scope="col">Status</th>
<th scope="col">Severity</th><th scope="col">Note</th></tr></thead><tbody>{_history_rows(d)}</tbody></table></div></section>
</article>"""
    return html_response(page(d["text"]["what"], body, sess=sess, scripts=("uPlot.iife.min.js", "inbox.js",
                                                                            "timeline.js"),
                              page_id="page-alert", data={"alert-id": d["alert_id"], "version": str(d["version"])}))


def _patient_or_404(request: web.Request) -> str:
    ref = request.match_info["ref"]
    store = request.app[STORE_KEY]
    pid = store.by_ref.get(ref) if _REF_RE.match(ref) else None
    if pid is None or not ward_scope(request)(store.patient_ward(pid)):
        raise web.HTTPNotFound(text="no such patient")
    return pid


async def patient_page(request: web.Request) -> web.Response:
    sess = current_session(request)
    store = request.app[STORE_KEY]
    pid = _patient_or_404(request)
    pv = store.patient(pid)
    dose = pv.dose
    ward = store.patient_ward(pid)  # where the patient is now (ADT), else the dose's ward
    moved = f' <span class="dose-ward">(dose ward {_e(dose.ward)})</span>' if dose and dose.ward and dose.ward != ward else ""
    info = (f"{_e(dose.product.value)} dosed {_e(_fmt_time(dose.administered_at))} &middot; "
            f"{_e(ward or 'no ward')} / {_e(dose.care_team or 'no team')}{moved}") if dose else "No dose recorded."
    body = f"""<p class="crumbs"><a href="/">&larr; Inbox</a></p>
<h1>Patient timeline</h1>{patient_banner(store.identity(pid))}<p class="meta">{info}</p>
<section class="card" aria-labelledby="h-sched"><h2 id="h-sched">Samples due</h2><div id="schedule">Loading...</div></section>
<section class="card" aria-labelledby="h-alerts"><h2 id="h-alerts">Alerts</h2><ul id="patient-alerts" class="plain"></ul></section>
<div class="charts" id="charts" data-patient-ref="{_e(pv.ref)}" data-panels="all"></div>"""
    return html_response(page("Patient timeline", body, sess=sess,
                              scripts=("uPlot.iife.min.js", "inbox.js", "timeline.js"), page_id="page-patient"))


def _who(ident: dict) -> str:
    if not ident.get("registered"):
        return f'<span class="unregistered">Unregistered</span> <span class="pid">id {_e(ident.get("patient_id"))}</span>'
    return (f'<span class="patient-name">{_e(ident["display_name"])}</span><br><span class="patient-ids">MRN '
            f'{_e(ident["mrn"])} &middot; born {_e(ident["birth_date"])}</span>')


def _ward_filter(request: web.Request, action: str, wards: list[str]) -> str:
    cur = request.query.get("ward", "")
    opts = "".join(f'<option value="{_e(w)}"{" selected" if w == cur else ""}>{_e(w)}</option>' for w in wards)
    return (f'<form class="filters no-print" method="get" action="{action}" role="search">'
            f'<label for="f-ward">Ward</label><select id="f-ward" name="ward"><option value="">All my wards</option>'
            f'{opts}</select><button type="submit" class="btn">Show</button></form>')


def _my_wards(request: web.Request) -> list[str]:
    store = request.app[STORE_KEY]
    visible = ward_scope(request)
    return sorted({w for pid in store.patients if (w := store.patient_ward(pid)) and visible(w)})


async def census_page(request: web.Request) -> web.Response:
    sess = current_session(request)
    store = request.app[STORE_KEY]
    ward = request.query.get("ward") or None
    rows = store.census(visible=ward_scope(request), ward=ward)
    sev_order = ("critical", "high", "warning", "info")
    out = []
    for r in rows:
        alerts = " ".join(f'<span class="badge sev-{s}">{r["open_alerts"][s]} {s}</span>'
                          for s in sev_order if r["open_alerts"].get(s)) or "none"
        overdue = "; ".join(_e(", ".join(u.get("analytes") or [u.get("analyte") or ""])) for u in r["overdue"])
        nxt = "; ".join(f'{_e(", ".join(u["analytes"]))} day {_e(u["due_day"])}' for u in r["next_due"])
        bed = f' bed {_e(r["patient"]["bed"])}' if r["patient"].get("bed") else ""
        out.append(f'<tr data-patient-ref="{_e(r["patient_ref"])}"><td><a href="/patients/{_e(r["patient_ref"])}">'
                   f'{_who(r["patient"])}</a></td><td>{_e(r["ward"] or "no ward")}{bed}</td>'
                   f'<td class="num day">{_e(r["day"])}</td><td>{_e(r["product"])}<br>{_time(r["dosed_at"])}</td>'
                   f'<td>{_e(r["steroid_phase"] or "none")}</td>'
                   f'<td class="overdue">{overdue or "none"}</td><td>{nxt or "-"}</td><td>{alerts}</td></tr>')
    body = f"""<h1>Census</h1>{_ward_filter(request, "/census", _my_wards(request))}
<p class="count" id="census-count">{len(rows)} monitored patient{'' if len(rows) == 1 else 's'}</p>
<div class="table-wrap"><table class="census" id="census-table">
<caption class="sr-only">Monitored patients: open alerts first</caption>
<thead><tr><th scope="col">Patient</th><th scope="col">Ward</th><th scope="col">Day since dose</th>
<th scope="col">Product / dosed</th><th scope="col">Steroid phase</th><th scope="col">Samples overdue</th>
<th scope="col">Next samples due</th><th scope="col">Open alerts</th></tr></thead>
<tbody>{''.join(out) or '<tr><td colspan="8">No monitored patients on your wards.</td></tr>'}</tbody></table></div>"""
    return html_response(page("Census", body, sess=sess, page_id="page-census"))


async def handover_page(request: web.Request) -> web.Response:
    sess = current_session(request)
    store = request.app[STORE_KEY]
    ward = request.query.get("ward") or None
    try:
        hours = min(max(float(request.query.get("hours", "12")), 1.0), 72.0)
    except ValueError:
        hours = 12.0
    h = store.handover(visible=ward_scope(request), ward=ward, hours=hours)

    def alert_rows(rows: list[dict], closed: bool) -> str:
        return "".join(
            f'<tr><td><span class="badge sev-{_e(a["severity"])}">{_e(a["severity"])}</span></td>'
            f'<td>{_who(a["patient"])}</td><td><a href="/alerts/{_e(a["alert_id"])}">{_e(a["what"])}</a></td>'
            f'<td>{_e(a["ward"] or "")}{_dose_ward(a)}</td><td>{_e(a["status"])}</td>'
            f'<td>{_time(a["closed_at"] if closed else a["opened_at"])}</td></tr>' for a in rows
        ) or f'<tr><td colspan="6">None.</td></tr>'

    acts = "".join(f'<tr><td>{_time(x["at"])}</td><td>{_e(x["by"])}{" (" + _e(x["role"]) + ")" if x["role"] else ""}'
                   f'</td><td>{_e(x["action"])}</td><td>{_who(x["patient"])}</td><td>{_e(x["what"])}</td>'
                   f'<td>{_e(x["note"])}</td></tr>' for x in h["actions"]) or '<tr><td colspan="6">None.</td></tr>'
    due = "".join(f'<tr><td>{_who(d["patient"])}</td><td>{_e(d["ward"] or "")}</td><td>{_e(d["what"])}</td>'
                  f'<td>{"OVERDUE" if d["overdue"] else "day " + _e(d["due_day"])}</td></tr>' for d in h["due"]) \
        or '<tr><td colspan="4">None.</td></tr>'
    head = '<thead><tr><th scope="col">Severity</th><th scope="col">Patient</th><th scope="col">Alert</th>' \
           '<th scope="col">Ward</th><th scope="col">Status</th><th scope="col">{}</th></tr></thead>'
    body = f"""<h1>Shift handover</h1>{_ward_filter(request, "/handover", _my_wards(request))}
<p class="meta">{_e(ward or "All my wards")} &middot; prepared {_time(h["now"])} by {_e(sess.display_name)} &middot;
changes since {_time(h["since"])} ({_e(int(hours))} h). Print with the browser (Ctrl+P).</p>
<section class="card"><h2>Open alerts ({len(h["open"])})</h2><table class="handover" id="handover-open">
{head.format("Opened")}<tbody>{alert_rows(h["open"], False)}</tbody></table></section>
<section class="card"><h2>Closed in the last {_e(int(hours))} h ({len(h["closed"])})</h2>
<table class="handover" id="handover-closed">{head.format("Closed")}<tbody>{alert_rows(h["closed"], True)}</tbody></table></section>
<section class="card"><h2>Who acknowledged, escalated or resolved what</h2><table class="handover" id="handover-actions">
<thead><tr><th scope="col">When</th><th scope="col">By</th><th scope="col">Action</th><th scope="col">Patient</th>
<th scope="col">Alert</th><th scope="col">Note</th></tr></thead><tbody>{acts}</tbody></table></section>
<section class="card"><h2>Samples due in the next 24 h</h2><table class="handover" id="handover-due">
<thead><tr><th scope="col">Patient</th><th scope="col">Ward</th><th scope="col">Samples</th><th scope="col">Due</th></tr>
</thead><tbody>{due}</tbody></table></section>"""
    return html_response(page("Shift handover", body, sess=sess, page_id="page-handover"))


# --------------------------------------------------------------------------- API


async def api_me(request: web.Request) -> web.Response:
    sess = current_session(request)
    return web.json_response({"username": sess.username, "display_name": sess.display_name,
                              "role": sess.role.value, "csrf_token": sess.csrf_token})


async def api_alerts(request: web.Request) -> web.Response:
    store = request.app[STORE_KEY]
    ward = request.query.get("ward") or None
    team = request.query.get("team") or None
    visible = ward_scope(request)
    alerts = [store.summary(a) for a in store.open_alerts(ward=ward, team=team, visible=visible)]
    return web.json_response({"alerts": alerts, "facets": store.facets(visible), "count": len(alerts),
                              "now": datetime.now(timezone.utc).isoformat()})


async def api_alert(request: web.Request) -> web.Response:
    sess = current_session(request)
    alert = _alert_or_404(request)
    d = request.app[STORE_KEY].detail(alert)
    d["allowed_actions"] = allowed_actions(sess.role, d["severity"], d["open"])
    return web.json_response(d)


async def api_timeline(request: web.Request) -> web.Response:
    pid = _patient_or_404(request)
    return web.json_response(request.app[STORE_KEY].timeline(pid))


def _bad(request: web.Request, status: int, message: str, form: bool) -> web.StreamResponse:
    if form:
        return web.Response(status=status, text=message, content_type="text/plain")
    return web.json_response({"error": message}, status=status)


def _parse_until(raw: Any) -> datetime | None:
    if raw in (None, ""):
        return None
    t = datetime.fromisoformat(str(raw).replace("Z", "+00:00"))
    return t if t.tzinfo else t.replace(tzinfo=site_zone())  # entered in the site's zone


async def api_action(request: web.Request) -> web.StreamResponse:
    sess = current_session(request)
    store = request.app[STORE_KEY]
    alert = _alert_or_404(request)
    is_form = request.content_type in ("application/x-www-form-urlencoded", "multipart/form-data")
    try:
        body: dict[str, Any] = dict(await request.post()) if is_form else await request.json()
        if not isinstance(body, dict):
            raise ValueError
    except (ValueError, json.JSONDecodeError, RecursionError):  # RecursionError: deeply nested JSON (L5)
        return _bad(request, 400, "expected a JSON object", is_form)
    try:
        kind = ActionKind(str(body.get("action", "")))
    except ValueError:
        return _bad(request, 400, "unknown action", is_form)
    reason = body.get("reason")
    reason = (str(reason).strip() or None) if reason not in (None, "") else None
    now = datetime.now(timezone.utc)
    try:
        until, bad_until = _parse_until(body.get("until")), False
    except ValueError:
        until, bad_until = None, True
    # the one action policy's pre-checks (alerts.policy); the lifecycle stays authoritative
    refused = request_refusal(kind, role=sess.role, severity=alert.severity, is_open=alert.is_open, reason=reason,
                              until=until, now=now, max_silence=MAX_SILENCE, status=alert.status.value)
    if refused is not None:
        if refused.kind == "forbidden":
            _count_action(request, kind.value, "refused")
        return _bad(request, refused.http_status, refused.message, is_form)
    if bad_until:
        return _bad(request, 400, "invalid 'until'", is_form)
    try:
        action = AlertAction(action=kind, alert_id=alert.alert_id, patient_id=alert.patient_id, by=sess.username,
                             role=sess.role, at=now, reason=reason,
                             until=until if kind == ActionKind.SILENCE else None, action_id=uuid.uuid4().hex)
    except ValidationError as exc:
        return _bad(request, 400, exc.errors()[0].get("msg", "invalid action"), is_form)
    publish: Callable[[AlertAction], Awaitable[None]] = request.app[PUBLISH_KEY]  # type: ignore[assignment]
    try:
        await publish(action)
    except Exception:
        _count_action(request, kind.value, "failed")
        return _bad(request, 503, "the action could not be sent; try again", is_form)
    store.note_pending(alert, action)
    _count_action(request, kind.value, "sent")
    if is_form:
        raise web.HTTPSeeOther(f"/alerts/{alert.alert_id}?sent={kind.value}")
    out = action.model_dump(mode="json")
    out.pop("patient_id", None)
    return web.json_response({"status": "sent", "action": out}, status=202)


async def api_admin_status(request: web.Request) -> web.Response:
    require_role(request, Role.ADMIN)
    cfg = request.app[AUTH_KEY]
    store = request.app[STORE_KEY]
    return web.json_response({"sessions": len(cfg.sessions), "counts": store.counts,
                              "alerts": len(store.alerts), "patients": len(store.patients),
                              **request.app[STATUS_KEY]})


async def api_stream(request: web.Request) -> web.StreamResponse:
    """Server-sent events: ``alert`` (a changed alert's summary), ``pending``, ``resync``."""
    cfg = request.app[AUTH_KEY]
    token = request.cookies.get(cfg.session_cookie) or ""
    store = request.app[STORE_KEY]
    streams = request.app[STREAMS_KEY]
    key = hashlib.sha256(token.encode()).hexdigest()
    if streams.get(key, 0) >= MAX_STREAMS_PER_SESSION:  # review L5: bounded subscriptions per session
        return web.json_response({"error": "too many live streams for this session"}, status=429,
                                 headers={"Retry-After": "5"})
    streams[key] = streams.get(key, 0) + 1
    try:
        return await _stream(request, cfg, token, store, ward_scope(request))
    finally:
        left = streams.get(key, 1) - 1
        if left > 0:
            streams[key] = left
        else:
            streams.pop(key, None)


#: live event streams one session may hold at once (a few tabs)
MAX_STREAMS_PER_SESSION = 4
STREAMS_KEY = web.AppKey("inbox_streams", dict)


async def _stream(request: web.Request, cfg, token: str, store, visible=None) -> web.StreamResponse:
    resp = web.StreamResponse(headers={"Content-Type": "text/event-stream", "Cache-Control": "no-store",
                                       "X-Accel-Buffering": "no", "X-Content-Type-Options": "nosniff"})
    await resp.prepare(request)
    q = store.subscribe()
    try:
        await resp.write(b"retry: 3000\nevent: hello\ndata: {}\n\n")
        while True:
            try:
                msg = await asyncio.wait_for(q.get(), timeout=15.0)
            except asyncio.TimeoutError:
                if cfg.valid_session(token, touch=False) is None:
                    await resp.write(b"event: logout\ndata: {}\n\n")
                    break
                await resp.write(b": keepalive\n\n")
                continue
            if msg.get("type") == "shutdown":
                break
            if cfg.valid_session(token, touch=False) is None:
                await resp.write(b"event: logout\ndata: {}\n\n")
                break
            if msg.get("type") == "alert" and visible is not None and not visible(msg["alert"].get("ward")):
                continue  # another ward's alert: not for this user (review M5)
            if msg.get("type") == "pending" and msg.get("alert_id") in store.alerts and visible is not None \
                    and not visible(store.ward_team(store.alerts[msg["alert_id"]])[0]):
                continue
            data = json.dumps(msg, separators=(",", ":"))
            await resp.write(f"event: {msg.get('type', 'message')}\ndata: {data}\n\n".encode())
    except (ConnectionResetError, asyncio.CancelledError):
        pass
    finally:
        store.unsubscribe(q)
    return resp


async def healthz(request: web.Request) -> web.Response:
    """Liveness: the process answers (whatever the broker does)."""
    return web.json_response({"ok": True, **request.app[STATUS_KEY]})


async def readyz(request: web.Request) -> web.Response:
    """Readiness: 200 once the store has read its topics to the end (``caught_up``), 503 before,
    so a restarting inbox is not shown half-filled (an alert missing from a list looks like no
    alert). A broker outage later does NOT make it unready: the store keeps what it has, and
    staleness is an ops alert (``InboxStoreStale``), not an empty page."""
    status = request.app[STATUS_KEY]
    ready = bool(status.get("caught_up"))
    return web.json_response({"ready": ready, **status}, status=200 if ready else 503)


def add_routes(app: web.Application, static_dir: str) -> None:
    r = app.router
    r.add_get("/login", login_page)
    r.add_post("/login", login_submit)
    r.add_post("/logout", logout)
    r.add_get("/healthz", healthz)
    r.add_get("/readyz", readyz)
    r.add_get("/", inbox_page)
    r.add_get("/alerts/{alert_id}", alert_page)
    r.add_get("/patients/{ref}", patient_page)
    r.add_get("/census", census_page)
    r.add_get("/handover", handover_page)
    r.add_get("/api/me", api_me)
    r.add_get("/api/alerts", api_alerts)
    r.add_get("/api/alerts/{alert_id}", api_alert)
    r.add_post("/api/alerts/{alert_id}/actions", api_action)
    r.add_get("/api/patients/{ref}/timeline", api_timeline)
    r.add_get("/api/stream", api_stream)
    r.add_get("/api/admin/status", api_admin_status)
    r.add_static("/static/", static_dir, show_index=False, append_version=False)


#: every route that needs a session, for tests: (method, path)
PROTECTED_ROUTES = [
    ("GET", "/"), ("GET", "/alerts/{alert_id}"), ("GET", "/patients/{ref}"), ("GET", "/census"), ("GET", "/handover"),
    ("POST", "/logout"),
    ("GET", "/api/me"), ("GET", "/api/alerts"), ("GET", "/api/alerts/{alert_id}"),
    ("POST", "/api/alerts/{alert_id}/actions"), ("GET", "/api/patients/{ref}/timeline"), ("GET", "/api/stream"),
    ("GET", "/api/admin/status"),
]
