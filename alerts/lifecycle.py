"""The alert lifecycle: pure state machine, no I/O, the clock passed in as ``now``.

One :class:`AlertBook` per patient holds that patient's alerts (open ones and recently
closed ones) plus, per dedupe key, the episode counter and the event-time watermark. The
book is a pydantic model: ``book.to_dict()`` / ``AlertBook.from_dict(d)`` round-trip it
through a changelog-backed table.

Entry points (each mutates the book and returns the alert versions to emit, one per
changed alert, newest version, already copied):

* :func:`apply_finding` - a finding from the rule engine (present / cleared / retracted)
* :func:`apply_action`  - a person acting on an alert (raises :class:`ActionError`)
* :func:`tick`          - timers: escalation and silence expiry (and pruning)
* :func:`next_deadline` - when ``tick`` next has something to do

Semantics
---------
* Dedupe key: patient + rule + ``dedupe_key``. A repeat ``present`` finding updates the open
  alert (evidence, grade, text, event time). The finding the key's alert shows now, again
  (a replay: the same ``finding_id`` as its last applied) is ignored; every other finding is
  applied in the order the engine emits it. The engine judges by event time and emits a
  finding only when its verdict changes, so an older result never resolves, downgrades or
  reopens a newer alert there; a finding it emits that rests on older results is its verdict
  after a withdrawal, and stands.
* Severity: missing -> critical. A rise re-notifies (``notify`` True); on an acknowledged
  alert a rise returns it to ``firing`` (the acknowledgement covered a lesser problem) and
  restarts the current tier's timer. A fall only updates (``notify`` False) and never
  slows an escalation timer already running.
* Info severity: the alert opens and is visible (inbox) but never pages and never escalates.
* Acknowledged: escalation stops; the alert stays open until a ``cleared`` finding, which
  resolves it. A ``present`` finding after resolution opens a new episode (new alert_id).
* ``retracted`` finding (evidence corrected away / entered in error): the open alert is
  retracted, whatever its state.
* Escalation: an unacknowledged, un-inhibited, un-silenced, non-info firing alert moves to
  the next tier when the current tier's per-severity timeout passes, and after the last
  tier to the route's mandatory failsafe (which does not escalate further). Missed
  deadlines (worker down) are caught up in one tick, timed as if on schedule; one version
  is emitted, history shows each step.
* Route: copied onto the alert when it opens; a protocol change does not reroute it.
* Inhibition: ``inhibitions`` maps an inhibiting rule to the rules it holds back on the
  same patient. While an inhibitor alert is open (firing or acknowledged) the target alerts
  stay visible (``firing``, ``inhibited_by`` set) but do not page or escalate. When the
  inhibitor closes, a still-firing target is re-notified and its tier timer restarts.
* Silence: ``silence`` action with a reason and an expiry in the future (at most
  ``max_silence`` away). Critical alerts cannot be silenced; a silenced alert whose severity
  rises to critical has its silence lifted. On expiry a still-firing alert is re-notified.
* Every transition is appended to ``history`` with who (a person, or ``system``) and when.
  ``version`` increments once per call that changes the alert; ``changes`` lists what
  changed in that version, ``previous_status`` the status of the version before.
* History is bounded (:func:`_trim_history`): a version keeps every entry made by a person
  (the audit trail), the first entry (opened), the first entry of each (severity, tier) the
  alert had (sinks end earlier label sets from them), and the newest
  ``history_recent_system_entries`` system entries; the other system entries are dropped
  and counted in ``history_omitted``. The inbox, which reads every version, merges them back.

Role rules (:func:`apply_action`)
---------------------------------
=============  =========================================================================
acknowledge    nurse, physician, admin. Open alerts; repeat acknowledge is a no-op.
note           nurse, physician, admin. Any alert, needs text (``reason``).
escalate       nurse, physician, admin. Open alerts not yet at the failsafe; pages the next
               level immediately (even if acknowledged, inhibited or silenced).
resolve        needs a reason. info/warning: any role; high/critical: physician or admin.
               Manual resolution closes the episode: if the condition is still present the
               next finding opens a new episode (and pages).
silence        admin only; not for critical alerts; needs ``until`` (future, within
               ``max_silence``) and a reason.
=============  =========================================================================

Errors: unknown alert -> :class:`UnknownAlert`; role not allowed -> :class:`Forbidden`;
bad request or wrong state -> :class:`InvalidAction`. All subclass :class:`ActionError`
(with a ``code``), and none of them changes the book.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from datetime import datetime, timedelta
from typing import Any, Mapping

from pydantic import BaseModel, ConfigDict, Field
from pydantic_core import to_json

from alerts import policy
from alerts.routing import FALLBACK_ROUTE, RouteSpec, copy_route, route_from_alert
from schemas.alert import (
    ActionKind,
    Alert,
    AlertAction,
    AlertStatus,
    AlertText,
    HistoryEntry,
    Role,
    make_alert_id,
    make_pseudonym,
)
from schemas.findings import WITHDRAWN_NOTE, Finding, Severity, effective_severity

__all__ = [
    "DEFAULT_INHIBITIONS", "LifecycleConfig", "DEFAULT_CONFIG", "KeyState", "AlertBook",
    "ActionError", "UnknownAlert", "Forbidden", "InvalidAction", "AlertEngine",
    "apply_finding", "apply_action", "tick", "next_deadline", "SYSTEM",
]

SYSTEM = "system"
_EPISODE_EVIDENCE_MAX = 8

#: inhibiting rule -> rules it holds back on the same patient
DEFAULT_INHIBITIONS: Mapping[str, frozenset[str]] = {
    "liver.hys_law": frozenset({"liver.alt_increased", "liver.ast_increased", "liver.bilirubin_increased"}),
}


@dataclass(frozen=True)
class LifecycleConfig:
    #: route id -> route (adapted from the protocol)
    routes: Mapping[str, RouteSpec] = field(default_factory=dict)
    #: used when a finding has no route or an unknown one; FALLBACK_ROUTE if None
    default_route: RouteSpec | None = None
    inhibitions: Mapping[str, frozenset[str] | set[str] | list[str]] = field(
        default_factory=lambda: dict(DEFAULT_INHIBITIONS))
    #: secret for alert pseudonyms; the worker must set a real one
    pseudonym_secret: bytes | str = b"dev-only-pseudonym-secret"
    #: closed alerts are dropped from the book this long after closing (episode counters stay)
    retention: timedelta = timedelta(days=7)
    max_silence: timedelta = timedelta(days=7)
    #: finding / action ids remembered for replay dedupe
    max_remembered_ids: int = 64
    #: automatic ("system") history entries an alert version keeps beyond its first entry and
    #: the first entry of each (severity, tier) it had: the newest this many. A record-keeping
    #: bound (issue #13: a version carried its whole history), not a clinical threshold.
    #: Entries made by a person are never dropped; dropped ones are counted in
    #: ``Alert.history_omitted``.
    history_recent_system_entries: int = 10

    def __post_init__(self) -> None:
        if self.history_recent_system_entries < 0:
            raise ValueError("history_recent_system_entries must be >= 0")

    def route_for(self, route_id: str | None) -> tuple[RouteSpec, str | None]:
        """(route, note) - note explains a fallback."""
        if route_id and route_id in self.routes:
            return self.routes[route_id], None
        fallback = self.default_route or FALLBACK_ROUTE
        why = f"route {route_id!r} unknown" if route_id else "finding names no route"
        return fallback, f"{why}; used route {fallback.id!r}"

    def inhibitors_of(self, rule_id: str) -> set[str]:
        return {src for src, targets in self.inhibitions.items() if rule_id in targets}


DEFAULT_CONFIG = LifecycleConfig()


class KeyState(BaseModel):
    rule_id: str
    dedupe_key: str = ""
    #: number of the latest episode (0: none yet)
    episode: int = 0
    open_alert_id: str | None = None
    last_alert_id: str | None = None
    #: evidence observation ids of the present findings applied to the open episode (newest
    #: last, bounded): a retraction of the newest evidence resolves, rather than retracts, an
    #: alert that had also stood on other valid results
    episode_evidence: list[list[str]] = Field(default_factory=list)


def _function() -> None:
    pass


class AlertBook(BaseModel):
    """One patient's alerts; serialisable for a changelog-backed table."""

    # its methods are functions of this module's kind: plain functions, or Cython's when the
    # module runs compiled (alerts.compiled_core), which pydantic would take for fields
    model_config = ConfigDict(ignored_types=(type(_function),))

    patient_id: str
    alerts: dict[str, Alert] = Field(default_factory=dict)
    keys: dict[str, KeyState] = Field(default_factory=dict)
    applied_actions: list[str] = Field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        return self.model_dump(mode="json")

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> "AlertBook":
        return cls.model_validate(data)

    def get(self, alert_id: str) -> Alert | None:
        return self.alerts.get(alert_id)

    def open_alerts(self) -> list[Alert]:
        return [a for a in self.alerts.values() if a.is_open]

    def open_alert_for(self, rule_id: str, dedupe_key: str = "") -> Alert | None:
        ks = self.keys.get(_key(rule_id, dedupe_key))
        return self.alerts.get(ks.open_alert_id) if ks and ks.open_alert_id else None


class ActionError(ValueError):
    code = "invalid"

    def __init__(self, message: str, *, alert_id: str | None = None):
        super().__init__(message)
        self.alert_id = alert_id


class UnknownAlert(ActionError):
    code = "unknown_alert"


class Forbidden(ActionError):
    code = "forbidden"


class InvalidAction(ActionError):
    code = "invalid"


# --------------------------------------------------------------------------- helpers

def _key(rule_id: str, dedupe_key: str) -> str:
    return f"{rule_id}\x1f{dedupe_key or ''}"


def _silenced(alert: Alert, now: datetime) -> bool:
    return alert.silenced_until is not None and alert.silenced_until > now


def _escalatable(alert: Alert, now: datetime) -> bool:
    """Would page and escalate: firing, not inhibited, not silenced, not info."""
    return (alert.status == AlertStatus.FIRING and alert.inhibited_by is None
            and not _silenced(alert, now) and alert.severity != Severity.INFO)


#: routes rebuilt from alerts, by the JSON of the route dict (``RouteSpec`` is frozen: one
#: object can serve every alert with the same route); bounded
_ROUTES: dict[bytes, RouteSpec] = {}
_ROUTES_MAX = 256


def _route(route: dict[str, Any]) -> RouteSpec:
    """``route_from_alert(route)``, validated once per distinct route (the same JSON gives
    the same model: JSON tells 5 from 5.0 and true from 1)."""
    try:
        key = to_json(route)
    except Exception:  # not JSON (never the case for a route copied by copy_route): no cache
        return route_from_alert(route)
    spec = _ROUTES.get(key)
    if spec is None:
        spec = route_from_alert(route)
        if len(_ROUTES) >= _ROUTES_MAX:
            _ROUTES.clear()
        _ROUTES[key] = spec
    return spec


def _timeout(alert: Alert) -> timedelta | None:
    minutes = _route(alert.route).timeout_minutes(alert.escalation_tier, alert.severity)
    return None if minutes is None else timedelta(minutes=minutes)


# The lifecycle changes several fields of an alert at a time. ``_set`` does what pydantic's
# ``__setattr__`` does for a field of a model without ``validate_assignment`` (store the value,
# mark the field set), once for all of them.
assert not Alert.model_config.get("validate_assignment") and not Alert.model_config.get("frozen")


def _set(alert: Alert, **values: Any) -> None:
    alert.__dict__.update(values)
    alert.__pydantic_fields_set__.update(values)


def _restart_timer(alert: Alert, now: datetime) -> None:
    """(Re)enter the current level at ``now`` and schedule its timeout if escalatable."""
    alert.tier_entered_at = now
    t = _timeout(alert)
    alert.next_escalation_at = now + t if (t is not None and _escalatable(alert, now)) else None


def _remember(ids: list[str], new_id: str, limit: int) -> None:
    ids.append(new_id)
    if len(ids) > limit:
        del ids[: len(ids) - limit]


_UNSET: Any = object()


class _Txn:
    """Collects the changes of one call; ``finish`` bumps versions and returns copies."""

    def __init__(self, book: AlertBook, now: datetime, config: LifecycleConfig | None = None):
        self.book = book
        self.now = now
        self.keep_recent = (config or DEFAULT_CONFIG).history_recent_system_entries
        self._touched: dict[str, dict[str, Any]] = {}

    def _slot(self, alert: Alert, new: bool = False, before: Any = _UNSET) -> dict[str, Any]:
        if alert.alert_id not in self._touched:
            self._touched[alert.alert_id] = {
                "before": None if new else (alert.status if before is _UNSET else before),
                "new": new, "changes": [],
                "page": False, "force": False,
            }
        return self._touched[alert.alert_id]

    def opened(self, alert: Alert) -> None:
        self._slot(alert, new=True)

    def record(self, alert: Alert, action: str, *, by: str = SYSTEM, from_status: Any = _UNSET,
               at: datetime | None = None, note: str | None = None, role: str | None = None,
               page: bool = False, force_page: bool = False) -> None:
        slot = self._slot(alert, before=from_status)
        slot["changes"].append(action)
        slot["page"] = slot["page"] or page or force_page
        slot["force"] = slot["force"] or force_page
        alert.history.append(HistoryEntry(
            at=at or self.now, by=by, action=action,
            from_status=alert.status if from_status is _UNSET else from_status,
            to_status=alert.status, severity=alert.severity, role=role,
            tier=alert.escalation_tier, note=note,
        ))

    def finish(self) -> list[Alert]:
        out: list[Alert] = []
        for alert_id, slot in self._touched.items():
            alert = self.book.alerts[alert_id]
            if not slot["new"]:
                alert.version += 1
            _set(alert, previous_status=slot["before"], changes=list(slot["changes"]),
                 notify=bool(slot["force"] or (slot["page"] and _escalatable(alert, self.now))),
                 updated_at=self.now)
            _trim_history(alert, self.keep_recent, fresh=len(slot["changes"]))
            out.append(_snapshot(alert))
        return out


def _trim_history(alert: Alert, keep_recent: int, fresh: int = 0) -> None:
    """Drop the system entries a version need not carry; count them in ``history_omitted``.

    Kept, in their order: every entry by a person; the first entry; the first entry of each
    (severity, tier) pair; the newest ``keep_recent`` system entries; and the ``fresh``
    entries this version appended (so every entry is on at least one version: a reader of
    every version misses none, even with ``keep_recent`` 0). Whether an entry is kept
    depends only on the entries before it (first of a pair) and how many system entries
    follow it (newest), and an entry kept as "first" never stops being first: trimming
    once per version (``_Txn.finish``) is enough, a "first" entry is kept for good, and
    ``history_omitted`` only grows.
    """
    hist = alert.history
    n = len(hist)
    if n <= keep_recent + 1 or n <= fresh + 1:  # nothing droppable beyond what is kept anyway
        return
    # entries from ``recent_from`` on are kept: the newest keep_recent system ones, this version's
    recent_from = n - fresh
    if keep_recent:
        left = keep_recent
        i = n
        while left and i > 0:
            i -= 1
            if hist[i].by == SYSTEM:
                left -= 1
        if left:  # fewer system entries than keep_recent
            return
        recent_from = min(recent_from, i)
    seen: set[tuple[Any, Any]] = set()
    kept: list[HistoryEntry] = []
    for h in hist[:recent_from]:
        pair = (h.severity, h.tier)
        if pair not in seen:  # the first entry of its pair (the alert's first entry is one)
            seen.add(pair)
            kept.append(h)
        elif h.by != SYSTEM:
            kept.append(h)
    dropped = recent_from - len(kept)
    if dropped:
        kept += hist[recent_from:]
        hist[:] = kept  # in place: snapshots already emitted hold their own lists
        alert.history_omitted += dropped


def _snapshot(alert: Alert) -> Alert:
    """A copy of ``alert`` the caller may keep while the book changes on.

    The lifecycle replaces nested values (text, evidence) and appends to lists (history,
    changes, finding ids); it never changes a nested model or the copied route in place.
    So a shallow copy with fresh lists and a fresh route dict is as independent as a deep
    copy, at a fraction of its cost (the deep copy of a growing history was most of the
    clinical stage's time per alert-changing event)."""
    d = alert.__dict__
    if type(alert) is not Alert or alert.__pydantic_extra__ is not None or alert.__pydantic_private__ is not None:
        return alert.model_copy(update={
            "evidence": list(alert.evidence), "history": list(alert.history), "changes": list(alert.changes),
            "finding_ids": list(alert.finding_ids), "route": dict(alert.route),
        })
    # what model_copy(update=...) does for an Alert (no extra, no private attributes), inline
    new = d.copy()
    new["evidence"] = list(d["evidence"])
    new["history"] = list(d["history"])
    new["changes"] = list(d["changes"])
    new["finding_ids"] = list(d["finding_ids"])
    new["route"] = dict(d["route"])
    m = Alert.__new__(Alert)
    _object_setattr(m, "__dict__", new)
    _object_setattr(m, "__pydantic_extra__", None)
    fields_set = set(alert.__pydantic_fields_set__)
    fields_set.update(_SNAPSHOT_FRESH)
    _object_setattr(m, "__pydantic_fields_set__", fields_set)
    _object_setattr(m, "__pydantic_private__", None)
    return m


_SNAPSHOT_FRESH = ("evidence", "history", "changes", "finding_ids", "route")
_object_setattr = object.__setattr__


def _reconcile_inhibition(book: AlertBook, txn: _Txn, config: LifecycleConfig, now: datetime) -> None:
    inhibitions = config.inhibitions
    for a in book.alerts.values():
        if a.is_open and (a.inhibited_by is not None or a.rule_id in inhibitions):
            break
    else:
        # no open alert is held back or can hold one back: every open alert keeps
        # ``inhibited_by`` None (what the loop below would conclude for each)
        return
    open_by_rule: dict[str, list[Alert]] = {}
    for a in book.alerts.values():
        if a.is_open:
            open_by_rule.setdefault(a.rule_id, []).append(a)
    for alert in sorted(book.open_alerts(), key=lambda a: (a.opened_at, a.alert_id)):
        candidates = [
            src for rule in config.inhibitors_of(alert.rule_id) for src in open_by_rule.get(rule, [])
            if src.alert_id != alert.alert_id
        ]
        inhibitor = min(candidates, key=lambda a: (a.opened_at, a.alert_id)) if candidates else None
        new_ref = inhibitor.alert_id if inhibitor else None
        if new_ref == alert.inhibited_by:
            continue
        was = alert.inhibited_by
        alert.inhibited_by = new_ref
        if new_ref is not None:
            alert.next_escalation_at = None
            if was is None:
                txn.record(alert, "inhibited", note=f"held back by {inhibitor.rule_id} alert {new_ref}")
            else:
                txn.record(alert, "inhibited", note=f"now held back by {inhibitor.rule_id} alert {new_ref}")
        else:
            _restart_timer(alert, now)
            txn.record(alert, "uninhibited", note=f"inhibiting alert {was} closed", page=True)


# --------------------------------------------------------------------------- findings

def _close(alert: Alert, status: AlertStatus, now: datetime) -> AlertStatus:
    """Close ``alert`` with ``status`` (no more escalation or silence); returns the old status."""
    before = alert.status
    _set(alert, status=status, closed_at=now, next_escalation_at=None, silenced_until=None)
    return before


def apply_finding(book: AlertBook, finding: Finding, now: datetime,
                  config: LifecycleConfig | None = None) -> list[Alert]:
    """Apply one finding; return the changed alert versions to emit (possibly none)."""
    config = config or DEFAULT_CONFIG
    if finding.patient_id != book.patient_id:
        raise ValueError("finding is for another patient than this book")
    k = _key(finding.rule_id, finding.dedupe_key)
    ks = book.keys.get(k)
    if ks is None:
        ks = book.keys[k] = KeyState(rule_id=finding.rule_id, dedupe_key=finding.dedupe_key)
    open_alert = book.alerts.get(ks.open_alert_id) if ks.open_alert_id else None
    last_alert = book.alerts.get(ks.last_alert_id) if ks.last_alert_id else None

    # the finding the alert shows now, again (a replayed record): nothing to do. The engine
    # emits a finding only when its verdict on the rule changes, in the order it reached them,
    # so any other finding is its verdict now and is applied, also one applied before and
    # superseded since, or one older than what the alert showed: after a withdrawn result the
    # verdict rests on older results again, and after a late worse result was shown the
    # newest result's verdict follows. Dropping those (as replays, or as late findings) left
    # the alert on a withdrawn or superseded result, or resolved while the engine's verdict
    # was present (tests/unit/test_processor_order.py; protocol tests
    # liver-withdrawn-normal-result-reopens-iv, heme-withdrawn-milder-result-iv,
    # late-worse-result-then-newest-iv).
    shown = open_alert if open_alert is not None else last_alert
    if shown is not None and shown.finding_ids and shown.finding_ids[-1] == finding.finding_id:
        return []

    txn = _Txn(book, now, config)
    note = f"finding {finding.finding_id}"

    if finding.state == "retracted":
        if open_alert is None:
            return []
        gone = {e.observation_id for e in finding.evidence if e.note == WITHDRAWN_NOTE and e.observation_id}
        stood = bool(gone) and any(ids and not (set(ids) & gone) for ids in ks.episode_evidence)
        if stood:
            # an earlier finding of this episode rested on other, valid results: the condition
            # was real; its newest evidence is gone and it no longer holds: resolved
            before = _close(open_alert, AlertStatus.RESOLVED, now)
            why = f"{note}: the newest evidence was corrected or withdrawn; the alert had stood on earlier " \
                  "valid results, which no longer show the condition"
            action = "resolved"
        else:
            before = _close(open_alert, AlertStatus.RETRACTED, now)
            why = f"{note}: evidence corrected or withdrawn"
            action = "retracted"
        _remember(open_alert.finding_ids, finding.finding_id, config.max_remembered_ids)
        ks.open_alert_id = None
        ks.episode_evidence = []
        txn.record(open_alert, action, from_status=before, note=why)
        _reconcile_inhibition(book, txn, config, now)
        return txn.finish()

    if finding.state == "cleared":
        if open_alert is None:
            return []
        before = _close(open_alert, AlertStatus.RESOLVED, now)
        open_alert.effective_at = finding.effective_at
        if finding.evidence:
            open_alert.evidence = list(finding.evidence)
        _remember(open_alert.finding_ids, finding.finding_id, config.max_remembered_ids)
        ks.open_alert_id = None
        txn.record(open_alert, "resolved", from_status=before, note=f"{note}: condition cleared")
        _reconcile_inhibition(book, txn, config, now)
        return txn.finish()

    # present
    severity = effective_severity(finding.severity)
    if open_alert is None:
        ks.episode_evidence = []
        _open(book, ks, finding, severity, now, txn, config)
    else:
        _update(open_alert, finding, severity, now, txn, config)
    ids = sorted({e.observation_id for e in finding.evidence if e.observation_id})
    if ids and (not ks.episode_evidence or ks.episode_evidence[-1] != ids):
        ks.episode_evidence.append(ids)
        del ks.episode_evidence[: -_EPISODE_EVIDENCE_MAX]
    _reconcile_inhibition(book, txn, config, now)
    return txn.finish()


def _text_of(finding: Finding) -> AlertText:
    if finding.text is not None:
        return AlertText(what=finding.text.what, why=finding.text.why, action=finding.text.action)
    label = finding.rule_id + (f" ({finding.dedupe_key})" if finding.dedupe_key else "")
    return AlertText(what=f"{label} fired", why="A protocol rule fired; see the evidence.",
                     action="Review the patient per the monitoring protocol.")


def _open(book: AlertBook, ks: KeyState, finding: Finding, severity: Severity, now: datetime,
          txn: _Txn, config: LifecycleConfig) -> Alert:
    ks.episode += 1
    alert_id = make_alert_id(book.patient_id, finding.rule_id, finding.dedupe_key, ks.episode,
                             key=config.pseudonym_secret)
    route, route_note = config.route_for(finding.route)
    alert = Alert(
        alert_id=alert_id, patient_id=book.patient_id, rule_id=finding.rule_id,
        dedupe_key=finding.dedupe_key, episode=ks.episode, severity=severity, grade=finding.grade,
        status=AlertStatus.FIRING, protocol=finding.protocol, evidence=list(finding.evidence),
        opened_at=now, updated_at=now, effective_at=finding.effective_at, route=copy_route(route),
        escalation_tier=0, text=_text_of(finding), ward=finding.ward, care_team=finding.care_team,
        pseudonym=make_pseudonym(alert_id, config.pseudonym_secret), finding_ids=[finding.finding_id],
    )
    book.alerts[alert_id] = alert
    ks.open_alert_id = alert_id
    ks.last_alert_id = alert_id
    _restart_timer(alert, now)
    txn.opened(alert)
    notes = [f"finding {finding.finding_id}", f"episode {ks.episode}", f"route {route.id}"]
    if finding.severity is None:
        notes.append("severity missing: treated as critical")
    if severity == Severity.INFO:
        notes.append("info: visible, does not page")
    if route_note:
        notes.append(route_note)
    txn.record(alert, "opened", from_status=None, note="; ".join(notes), page=True)
    return alert


def _update(alert: Alert, finding: Finding, severity: Severity, now: datetime, txn: _Txn,
            config: LifecycleConfig) -> None:
    note = f"finding {finding.finding_id}"
    old = alert.severity
    values = {"evidence": list(finding.evidence) or alert.evidence,
              "grade": finding.grade if finding.grade is not None else alert.grade,
              "effective_at": max(alert.effective_at, finding.effective_at),
              "ward": finding.ward or alert.ward, "care_team": finding.care_team or alert.care_team}
    if finding.text is not None:
        values["text"] = _text_of(finding)
    _set(alert, **values)
    _remember(alert.finding_ids, finding.finding_id, config.max_remembered_ids)

    if severity.rank > old.rank:
        alert.severity = severity
        before = alert.status
        if severity == Severity.CRITICAL and alert.silenced_until is not None:
            alert.silenced_until = None
            alert.silence_reason = None
            txn.record(alert, "silence_lifted", note="critical alerts cannot be silenced")
        if alert.status == AlertStatus.ACKNOWLEDGED:
            alert.status = AlertStatus.FIRING
            _restart_timer(alert, now)
            txn.record(alert, "severity_raised", from_status=before,
                       note=f"{note}: {old} -> {severity}; acknowledgement covered a lesser severity", page=True)
        else:
            t = _timeout(alert)
            if t is not None and _escalatable(alert, now):
                cand = now + t
                alert.next_escalation_at = min(alert.next_escalation_at, cand) if alert.next_escalation_at else cand
            txn.record(alert, "severity_raised", from_status=before, note=f"{note}: {old} -> {severity}", page=True)
    elif severity.rank < old.rank:
        alert.severity = severity
        if severity == Severity.INFO:
            alert.next_escalation_at = None
        txn.record(alert, "severity_lowered", note=f"{note}: {old} -> {severity}")
    else:
        txn.record(alert, "updated", note=note)


# --------------------------------------------------------------------------- actions

def _who(action: AlertAction) -> str:
    return action.by


def apply_action(book: AlertBook, action: AlertAction, now: datetime,
                 config: LifecycleConfig | None = None, *, role: Role | None = None) -> list[Alert]:
    """Apply a person's action; raises :class:`ActionError` (book unchanged) if refused.

    ``role`` is the sender's role as resolved by the caller from a trusted source (the user
    directory; security review H4). Without it the action's own ``role`` field is used,
    which only in-process callers that built the action themselves may rely on; an action
    with neither is refused. Who may do what is decided by :mod:`alerts.policy`.

    A repeated action (same ``action_id``, or acknowledging an acknowledged alert,
    resolving a resolved one) is a no-op returning ``[]``.
    """
    config = config or DEFAULT_CONFIG
    alert = book.alerts.get(action.alert_id)
    if alert is None:
        raise UnknownAlert(f"no alert {action.alert_id} for this patient", alert_id=action.alert_id)
    if action.patient_id is not None and action.patient_id != book.patient_id:
        raise UnknownAlert(f"alert {action.alert_id} does not belong to the given patient",
                           alert_id=action.alert_id)
    if action.action_id and action.action_id in book.applied_actions:
        return []
    role = role if role is not None else action.role
    kind = action.action
    if role is None:
        raise Forbidden(f"no role for {kind}", alert_id=alert.alert_id)
    txn = _Txn(book, now, config)
    before = alert.status
    common = dict(by=_who(action), role=role.value, at=action.at)

    def need_open() -> None:
        if not alert.is_open:
            raise InvalidAction(f"alert is {alert.status}; cannot {kind}", alert_id=alert.alert_id)

    if kind == ActionKind.ACKNOWLEDGE:
        if alert.status == AlertStatus.ACKNOWLEDGED:
            return []
        need_open()
        alert.status = AlertStatus.ACKNOWLEDGED
        alert.next_escalation_at = None
        txn.record(alert, "acknowledged", from_status=before, note=action.reason, **common)

    elif kind == ActionKind.NOTE:
        txn.record(alert, "note", note=action.reason, **common)

    elif kind == ActionKind.ESCALATE:
        need_open()
        route = _route(alert.route)
        if alert.escalation_tier >= route.last_index:
            raise InvalidAction("alert is already at the failsafe", alert_id=alert.alert_id)
        alert.escalation_tier += 1
        _restart_timer(alert, now)
        txn.record(alert, "escalated", note=f"manual escalation to {route.level_name(alert.escalation_tier)}"
                   + (f": {action.reason}" if action.reason else ""), force_page=True, **common)

    elif kind == ActionKind.RESOLVE:
        if alert.status == AlertStatus.RESOLVED:
            return []
        need_open()
        why = policy.refusal(role, kind, alert.severity)
        if why:
            raise Forbidden(why, alert_id=alert.alert_id)
        if not (action.reason and action.reason.strip()):
            raise InvalidAction("a manual resolution needs a reason", alert_id=alert.alert_id)
        _close(alert, AlertStatus.RESOLVED, now)
        ks = book.keys.get(_key(alert.rule_id, alert.dedupe_key))
        if ks is not None and ks.open_alert_id == alert.alert_id:
            ks.open_alert_id = None
        txn.record(alert, "resolved", from_status=before, note=f"manual: {action.reason}", **common)

    elif kind == ActionKind.SILENCE:
        why = policy.refusal(role, kind, alert.severity)
        if why:
            raise Forbidden(why, alert_id=alert.alert_id)
        need_open()
        if alert.severity == Severity.CRITICAL:
            raise InvalidAction("critical alerts cannot be silenced", alert_id=alert.alert_id)
        assert action.until is not None  # model validation
        if action.until <= now:
            raise InvalidAction("silence expiry must be in the future", alert_id=alert.alert_id)
        if action.until - now > config.max_silence:
            raise InvalidAction(f"silence longer than {config.max_silence}", alert_id=alert.alert_id)
        alert.silenced_until = action.until
        alert.silence_reason = action.reason
        alert.next_escalation_at = None
        txn.record(alert, "silenced", note=f"until {action.until.isoformat()}: {action.reason}", **common)

    else:  # pragma: no cover - enum exhaustive
        raise InvalidAction(f"unknown action {kind}")

    if action.action_id:
        _remember(book.applied_actions, action.action_id, config.max_remembered_ids)
    _reconcile_inhibition(book, txn, config, now)
    return txn.finish()


# --------------------------------------------------------------------------- timers

def tick(book: AlertBook, now: datetime, config: LifecycleConfig | None = None) -> list[Alert]:
    """Fire due timers: silence expiry, then escalation (catching up missed deadlines)."""
    config = config or DEFAULT_CONFIG
    txn = _Txn(book, now, config)
    for alert in sorted(book.open_alerts(), key=lambda a: (a.opened_at, a.alert_id)):
        if alert.silenced_until is not None and alert.silenced_until <= now:
            until = alert.silenced_until
            alert.silenced_until = None
            alert.silence_reason = None
            _restart_timer(alert, now)
            txn.record(alert, "silence_expired", note=f"silence until {until.isoformat()} expired", page=True)
        if alert.next_escalation_at is None or alert.next_escalation_at > now or not _escalatable(alert, now):
            continue
        route = _route(alert.route)
        while (alert.next_escalation_at is not None and alert.next_escalation_at <= now
               and alert.escalation_tier < route.last_index):
            due = alert.next_escalation_at
            alert.escalation_tier += 1
            alert.tier_entered_at = due
            t = _timeout(alert)
            alert.next_escalation_at = due + t if t is not None else None
            target = "failsafe " if alert.escalation_tier == route.last_index else ""
            txn.record(alert, "escalated", page=True,
                       note=f"unacknowledged; due {due.isoformat()}; to {target}{route.level_name(alert.escalation_tier)}")
    _prune(book, now, config)
    return txn.finish()


def _prune(book: AlertBook, now: datetime, config: LifecycleConfig) -> None:
    for alert_id in [a.alert_id for a in book.alerts.values()
                     if not a.is_open and a.closed_at is not None and a.closed_at + config.retention < now]:
        del book.alerts[alert_id]
        for ks in book.keys.values():
            if ks.last_alert_id == alert_id:
                ks.last_alert_id = None


def next_deadline(book: AlertBook) -> datetime | None:
    """Earliest time ``tick`` has work: an escalation or a silence expiry (None: nothing)."""
    times = []
    for a in book.open_alerts():
        if a.next_escalation_at is not None:
            times.append(a.next_escalation_at)
        if a.silenced_until is not None:
            times.append(a.silenced_until)
    return min(times) if times else None


class AlertEngine:
    """The lifecycle bound to one configuration (routes, inhibition map, secrets)."""

    def __init__(self, config: LifecycleConfig | None = None):
        self.config = config or DEFAULT_CONFIG

    def new_book(self, patient_id: str) -> AlertBook:
        return AlertBook(patient_id=patient_id)

    def apply_finding(self, book: AlertBook, finding: Finding, now: datetime) -> list[Alert]:
        return apply_finding(book, finding, now, self.config)

    def apply_action(self, book: AlertBook, action: AlertAction, now: datetime) -> list[Alert]:
        return apply_action(book, action, now, self.config)

    def tick(self, book: AlertBook, now: datetime) -> list[Alert]:
        return tick(book, now, self.config)

    @staticmethod
    def next_deadline(book: AlertBook) -> datetime | None:
        return next_deadline(book)
