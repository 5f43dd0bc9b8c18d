"""Authenticated HTTP API for alert actions, on the worker's own web server.

Routes (JSON in and out; every response ``Cache-Control: no-store``)::

    POST /api/alerts/{alert_id}/actions   {action, patient_id?, reason?, until?, action_id?}  -> 202 {action_id}
    GET  /api/alerts/{alert_id}           the alert, if this worker holds it                   -> 200 | 404

* Authentication: HTTP Basic against the inbox's users file (``INBOX_USERS_FILE``, the same
  scrypt hashes; loading and verification come from :mod:`monitor.inbox.auth`). The file is
  re-read when it changes. Without a configured file the API answers 503 ("actions API
  disabled: no users configured"). Failed logins are throttled per client address (and per
  user name at that address) with :class:`monitor.inbox.auth.LoginThrottle`: 429 + Retry-After.
* The role is the user's role from the users file and ``by`` is the user name; ``role``,
  ``by`` or ``at`` fields in the body are ignored.
* Role pre-checks use the lifecycle's own policy, :mod:`alerts.policy` (nurse: acknowledge, note, escalate, resolve only
  info/warning; physician/admin: resolve anything; admin: silence, never a critical alert).
  When the alert is not held by this worker its severity is unknown and it is treated as
  critical (as the lifecycle treats a missing severity). The authoritative check stays in the
  lifecycle (:func:`alerts.lifecycle.apply_action`), with the role the worker resolves from the
  users file again (never the published ``role``): a refused action is dead-lettered there.
* The action is published to ``alert-actions`` keyed by patient id; the answer (202) means the
  broker has it, not that the lifecycle applied it: watch the ``alerts`` topic (or GET the
  alert) for the new version. A client that retries after a 503 or a lost answer should send
  its own ``action_id``: the lifecycle applies an action id once.
* Ward scoping (review M5), the inbox's one ward policy
  (:func:`monitor.inbox.auth.ward_visibility`): a user whose ``wards`` in the users file do not
  include the alert's ward gets 403 on the alert (GET and actions); admins and users granted
  ``"*"`` reach every ward. An alert this worker does not hold has no known ward, so only they
  may act on it here. The refusal is logged (user, role, ward; never the patient or alert id).
* ``patient_id`` may be left out when this worker holds the alert (its ``patients`` table);
  otherwise 400 asks for it.
* Cross-site safety for a Basic-auth API: state changes need ``Content-Type: application/json``
  (415 otherwise, so a plain HTML form cannot post here) and a request whose ``Origin`` names
  another host is refused (403).
* Nothing here logs credentials or patient ids at INFO or above.

Status codes: 202 accepted, 400 invalid body, 401 unauthenticated (``WWW-Authenticate: Basic``),
403 role, ward or origin refused, 404 unknown alert (GET), 409 alert state forbids the action,
413 body too large, 415 not JSON, 429 throttled, 503 disabled or the broker unreachable.
"""
from __future__ import annotations

import asyncio
import base64
import binascii
import hashlib
import hmac
import json
import logging
import os
import secrets
import time
import uuid
from datetime import datetime, timezone
from typing import Any, Awaitable, Callable
from urllib.parse import urlsplit

from aiohttp import web
from faust.web import Request, Response, View
from pydantic import ValidationError

from schemas.alert import ActionKind, Alert, AlertAction

from alerts.policy import ID_RE, MAX_REASON_CHARS, allowed_actions, request_refusal

from .inbox.auth import LoginThrottle, User, UserDirectory, load_users, ward_visibility

log = logging.getLogger(__name__)

__all__ = ["ActionsAPI", "register_actions_api"]

REALM = 'Basic realm="sma-monitor actions", charset="UTF-8"'
DISABLED = "actions API disabled: no users configured"
EXPOSED = ("actions API disabled: the worker's port is not bound to loopback and Basic auth must not cross "
           "the network in cleartext; act through the inbox (or set ACTIONS_API_ALLOW_EXPOSED=true behind TLS)")


MAX_BODY_BYTES = 16 * 1024
PUBLISH_TIMEOUT_SECONDS = 15.0
_NO_STORE = {"Cache-Control": "no-store"}

#: find_alert(alert_id) -> the alert if this worker holds it (read-only copy), else None
FindAlert = Callable[[str], "Alert | None"]
#: publish(key, value) -> awaitable completing when the broker holds the record
Publish = Callable[[bytes, bytes], Awaitable[Any]]


class ApiError(Exception):
    def __init__(self, status: int, message: str, headers: dict[str, str] | None = None):
        super().__init__(message)
        self.status = status
        self.message = message
        self.headers = headers or {}


# --------------------------------------------------------------------------- users and authentication


class _Users:
    """The users file, loaded lazily and re-read when its mtime or size changes."""

    def __init__(self, path: str):
        self.path = path.strip()
        self._dir: UserDirectory | None = None
        self._sig: tuple[float, int] | None = None
        self.generation = 0

    @property
    def configured(self) -> bool:
        return bool(self.path)

    def directory(self) -> UserDirectory:
        try:
            st = os.stat(self.path)
        except OSError:
            if self._dir is not None:  # keep serving the last good file
                return self._dir
            log.warning("actions API: users file cannot be read")
            raise ApiError(503, "actions API unavailable: users file cannot be read") from None
        sig = (st.st_mtime, st.st_size)
        if self._dir is None or sig != self._sig:
            try:
                self._dir = load_users(self.path)
            except (OSError, ValueError) as exc:
                if self._dir is not None:
                    log.warning("actions API: users file invalid, keeping the previous one: %s", type(exc).__name__)
                    self._sig = sig
                    return self._dir
                log.warning("actions API: users file invalid: %s", type(exc).__name__)
                raise ApiError(503, "actions API unavailable: users file is invalid") from None
            self._sig = sig
            self.generation += 1
        return self._dir


def _basic_credentials(header: str | None) -> tuple[str, str] | None:
    if not header:
        return None
    scheme, _, param = header.strip().partition(" ")
    if scheme.lower() != "basic" or not param.strip() or len(param) > 4096:
        return None
    try:
        decoded = base64.b64decode(param.strip(), validate=True).decode("utf-8")
    except (binascii.Error, ValueError, UnicodeDecodeError):
        return None
    username, sep, password = decoded.partition(":")
    if not sep or not username or not password:
        return None
    return username, password


class ActionsAPI:
    """Authentication, validation and publishing; the faust views below are thin wrappers."""

    def __init__(self, users_file: str, *, find_alert: FindAlert, publish: Publish, max_silence,
                 throttle: LoginThrottle | None = None, cache_seconds: float = 60.0,
                 max_concurrent_verifications: int = 4, exposed: bool = False):
        #: the worker's web port is bound beyond loopback and nobody allowed Basic auth there (review M7)
        self.exposed = exposed
        self.users = _Users(users_file)
        self.find_alert = find_alert
        self.publish = publish
        self.max_silence = max_silence
        self.throttle = throttle or LoginThrottle()
        self.cache_seconds = cache_seconds
        self._cache_key = secrets.token_bytes(32)
        #: hmac(user, password) -> (user, expires, users generation): spares scrypt on every call
        self._verified: dict[bytes, tuple[User, float, int]] = {}
        self._verify_slots = asyncio.Semaphore(max_concurrent_verifications)

    # ---- authentication

    async def authenticate(self, request: Request) -> User:
        if not self.users.configured:
            raise ApiError(503, DISABLED)
        if self.exposed:
            raise ApiError(503, EXPOSED)
        directory = self.users.directory()
        creds = _basic_credentials(request.headers.get("Authorization"))
        if creds is None:
            raise ApiError(401, "authentication required", {"WWW-Authenticate": REALM})
        username, password = creds
        address = request.remote or "unknown"
        wait = self.throttle.begin(username, address)  # counted before verification (review M1)
        if wait > 0:
            raise ApiError(429, "too many failed logins; try again later", {"Retry-After": str(int(wait) + 1)})
        key = hmac.new(self._cache_key, f"{username}\x00{password}".encode("utf-8"), hashlib.sha256).digest()
        now = time.monotonic()
        hit = self._verified.get(key)
        if hit is not None and hit[1] > now and hit[2] == self.users.generation:
            user = directory.get(username)
            if user is not None and user == hit[0]:
                self.throttle.success(username, address)  # take back the attempt begin() counted
                return user
        async with self._verify_slots:  # scrypt is CPU-bound: off the event loop, bounded
            user = await asyncio.get_running_loop().run_in_executor(None, directory.authenticate, username, password)
        if user is None:  # the failure was counted by begin()
            log.warning("actions API: failed login from %s", address)
            raise ApiError(401, "invalid credentials", {"WWW-Authenticate": REALM})
        self.throttle.success(username, address)
        if len(self._verified) > 1024:
            self._verified = {k: v for k, v in self._verified.items() if v[1] > now}
            if len(self._verified) > 1024:
                self._verified.clear()
        self._verified[key] = (user, now + self.cache_seconds, self.users.generation)
        return user

    # ---- requests

    @staticmethod
    def _check_alert_id(alert_id: str) -> str:
        if not isinstance(alert_id, str) or not ID_RE.match(alert_id):
            raise ApiError(400, "invalid alert id")
        return alert_id

    @staticmethod
    def _check_origin(request: Request) -> None:
        origin = request.headers.get("Origin")
        if origin is None:
            return
        if origin == "null" or urlsplit(origin).netloc.lower() != (request.host or "").lower():
            raise ApiError(403, "cross-origin request refused")

    @staticmethod
    async def _json_body(request: Request) -> dict[str, Any]:
        if request.content_type != "application/json":
            raise ApiError(415, "send the action as application/json")
        if request.content_length is not None and request.content_length > MAX_BODY_BYTES:
            raise ApiError(413, "request body too large")
        try:
            raw = await request.read()  # bounded by the server's client_max_size as well
        except web.HTTPRequestEntityTooLarge:
            raise ApiError(413, "request body too large") from None
        if len(raw) > MAX_BODY_BYTES:
            raise ApiError(413, "request body too large")
        try:
            body = json.loads(raw)
        except (ValueError, UnicodeDecodeError):
            raise ApiError(400, "body is not valid JSON") from None
        if not isinstance(body, dict):
            raise ApiError(400, "body must be a JSON object")
        return body

    @staticmethod
    def _opt_str(body: dict[str, Any], name: str, limit: int) -> str | None:
        v = body.get(name)
        if v is None or v == "":
            return None
        if not isinstance(v, str):
            raise ApiError(400, f"'{name}' must be a string")
        v = v.strip()
        if len(v) > limit:
            raise ApiError(400, f"'{name}' is longer than {limit} characters")
        return v or None

    @staticmethod
    def _until(body: dict[str, Any]) -> datetime | None:
        raw = body.get("until")
        if raw in (None, ""):
            return None
        if not isinstance(raw, str):
            raise ApiError(400, "'until' must be an ISO 8601 date-time")
        try:
            t = datetime.fromisoformat(raw.replace("Z", "+00:00"))
        except ValueError:
            raise ApiError(400, "'until' must be an ISO 8601 date-time") from None
        return t if t.tzinfo else t.replace(tzinfo=timezone.utc)

    @staticmethod
    def _check_ward(user: User, alert: "Alert | None", what: str) -> None:
        """403 unless the user's wards cover the alert's (the inbox's ward policy)."""
        ward = alert.ward if alert is not None else None
        if ward_visibility(user.role, user.wards)(ward):
            return
        # the reason, never the patient or alert id (review L6)
        log.warning("actions API: %s refused: %s, user %s (%s), wards %s", what,
                    f"ward {ward!r} is not among the user's wards" if alert is not None
                    else "alert not held here, its ward is unknown", user.username[:64], user.role.value,
                    ",".join(user.wards) or "none")
        if alert is None:
            raise ApiError(403, "this worker does not hold the alert: its ward cannot be checked against yours")
        raise ApiError(403, "this alert is not on your wards")

    async def post_action(self, request: Request, alert_id: str) -> tuple[int, dict[str, Any]]:
        self._check_origin(request)
        user = await self.authenticate(request)
        alert_id = self._check_alert_id(alert_id)
        body = await self._json_body(request)
        try:
            kind = ActionKind(str(body.get("action", "")))
        except ValueError:
            raise ApiError(400, f"'action' must be one of {', '.join(k.value for k in ActionKind)}") from None
        # role, by and at are never taken from the request
        patient_id = self._opt_str(body, "patient_id", 128)
        reason = self._opt_str(body, "reason", MAX_REASON_CHARS)
        action_id = self._opt_str(body, "action_id", 128)
        if action_id is not None and not ID_RE.match(action_id):
            raise ApiError(400, "'action_id' may hold letters, digits and . _ : - (at most 128)")
        until = self._until(body)

        alert = self.find_alert(alert_id)
        if alert is not None:
            if patient_id is not None and patient_id != alert.patient_id:
                raise ApiError(400, "patient_id does not match the alert")
            patient_id = alert.patient_id
        elif patient_id is None:
            raise ApiError(400, "this worker does not hold the alert: give its patient_id in the body")
        severity = alert.severity if alert is not None else None
        self._check_ward(user, alert, kind.value)

        # the one action policy's pre-checks; the lifecycle stays authoritative
        now = datetime.now(timezone.utc)
        refused = request_refusal(kind, role=user.role, severity=severity,
                                  is_open=alert.is_open if alert is not None else None, reason=reason, until=until,
                                  now=now, max_silence=self.max_silence,
                                  status=alert.status.value if alert is not None else None)
        if refused is not None:
            raise ApiError(refused.http_status, refused.message)
        try:
            action = AlertAction(action=kind, alert_id=alert_id, patient_id=patient_id, by=user.username,
                                 role=user.role, at=now, reason=reason,
                                 until=until if kind == ActionKind.SILENCE else None,
                                 action_id=action_id or uuid.uuid4().hex)
        except ValidationError as exc:
            raise ApiError(400, str(exc.errors(include_url=False, include_input=False)[0].get("msg", "invalid action"))) from None
        try:
            fut = asyncio.ensure_future(self.publish(patient_id.encode("utf-8"),
                                                     action.model_dump_json().encode("utf-8")))
            # shield: on a timeout the send is not cancelled (it may still land; action_id dedupes a retry)
            await asyncio.wait_for(asyncio.shield(fut), PUBLISH_TIMEOUT_SECONDS)
        except Exception as exc:
            log.warning("actions API: publishing failed: %s", type(exc).__name__)
            raise ApiError(503, "the action could not be sent; try again") from None
        # no alert id at INFO (review L6): the action and role are enough to follow traffic
        log.info("actions API: %s by a %s accepted", kind.value, user.role.value)
        log.debug("actions API: %s on alert %s accepted", kind.value, alert_id)
        return 202, {"status": "accepted", "action_id": action.action_id, "alert_id": alert_id,
                     "action": kind.value, "by": user.username, "role": user.role.value,
                     "at": now.isoformat()}

    async def get_alert(self, request: Request, alert_id: str) -> tuple[int, dict[str, Any]]:
        user = await self.authenticate(request)
        alert_id = self._check_alert_id(alert_id)
        alert = self.find_alert(alert_id)
        if alert is None:
            raise ApiError(404, "alert not held by this worker")
        self._check_ward(user, alert, "read")
        out = alert.model_dump(mode="json")
        out.pop("patient_id", None)  # like the inbox: no raw patient id in responses (review L6)
        out["allowed_actions"] = allowed_actions(user.role, alert.severity, alert.is_open)
        return 200, out


async def _respond(view: View, call) -> Response:
    try:
        status, payload = await call
        return view.json(payload, status=status, headers=dict(_NO_STORE))
    except ApiError as exc:
        return view.json({"error": exc.message}, status=exc.status, headers={**_NO_STORE, **exc.headers})
    except Exception as exc:  # never a stack trace (or a body) to the caller or the log at INFO+
        log.warning("actions API: unexpected %s", type(exc).__name__, exc_info=log.isEnabledFor(logging.DEBUG))
        return view.json({"error": "internal error"}, status=500, headers=dict(_NO_STORE))


def register_actions_api(app, api: ActionsAPI) -> None:
    """The two routes on the worker's faust web server."""

    class AlertActionsView(View):
        async def post(self, request: Request, alert_id: str) -> Response:
            return await _respond(self, api.post_action(request, alert_id))

    class AlertView(View):
        async def get(self, request: Request, alert_id: str) -> Response:
            return await _respond(self, api.get_alert(request, alert_id))

    app.page("/api/alerts/{alert_id}/actions", name="alert_actions")(AlertActionsView)
    app.page("/api/alerts/{alert_id}", name="alert_detail")(AlertView)
