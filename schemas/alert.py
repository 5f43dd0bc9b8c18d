"""Alerts (JSON on the ``alerts`` topic, keyed by patient) and the actions people take on them.

One :class:`Alert` is one episode of one problem (patient + rule + dedupe key). Every change
produces a new ``version``; sinks use ``alert_id:version`` as their idempotency key. The
``notify`` flag says whether *this* version should page someone.

``pseudonym`` is a short HMAC of the alert id under a configured secret: it lets a pager,
Alertmanager or a chat message refer to the alert without revealing the patient.
"""
from __future__ import annotations

import hmac
from enum import StrEnum
from typing import Any

from pydantic import AwareDatetime, BaseModel, ConfigDict, Field, model_validator

from schemas.findings import Evidence, ProtocolRef, Severity, fast_enum_value

__all__ = [
    "AlertStatus", "OPEN_STATUSES", "CLOSED_STATUSES", "AlertText", "HistoryEntry", "Alert",
    "ActionKind", "Role", "AlertAction", "make_alert_id", "make_pseudonym",
]


class AlertStatus(StrEnum):
    FIRING = "firing"
    ACKNOWLEDGED = "acknowledged"
    RESOLVED = "resolved"
    RETRACTED = "retracted"


fast_enum_value(AlertStatus)

OPEN_STATUSES = frozenset({AlertStatus.FIRING, AlertStatus.ACKNOWLEDGED})
CLOSED_STATUSES = frozenset({AlertStatus.RESOLVED, AlertStatus.RETRACTED})


def make_alert_id(patient_id: str, rule_id: str, dedupe_key: str, episode: int, *, key: bytes | str) -> str:
    """Deterministic, KEYED alert id: 32 hex chars of HMAC-SHA256(key, patient, rule, dedupe key, episode).

    The id leaves the service (webhook body, ``Idempotency-Key``, inbox URLs, logs), so it
    must not be a plain hash of the patient id: an MRN space is small enough to brute-force
    (security review H2). Keyed with the deployment's pseudonym secret, it reveals nothing
    without that secret. The caller passes the key in; nothing here reads the environment.
    Same key, same inputs, same id: replays stay idempotent.

    Ids of alerts opened before keying (plain sha256) are kept as stored: they are never
    recomputed, so existing alerts keep working; new episodes get keyed ids.
    """
    k = key.encode("utf-8") if isinstance(key, str) else key
    raw = "\x1f".join(["alert-id", patient_id, rule_id, dedupe_key or "", str(int(episode))])
    return hmac.digest(k, raw.encode("utf-8"), "sha256").hex()[:32]


def make_pseudonym(alert_id: str, secret: bytes | str, length: int = 12) -> str:
    """Short pseudonymous reference: HMAC-SHA256(secret, alert_id), hex, ``length`` chars.

    Without the secret it cannot be linked back to the alert id, and the alert id is
    itself keyed (:func:`make_alert_id`), so neither reveals the patient id.
    """
    key = secret.encode("utf-8") if isinstance(secret, str) else secret
    return "a-" + hmac.digest(key, alert_id.encode("utf-8"), "sha256").hex()[:length]


class AlertText(BaseModel):
    """What the nurse reads: what happened, why it matters, what the protocol says to do."""

    #: frozen, as every value an alert holds (``monitor.clinical.store.alert_fingerprint``)
    model_config = ConfigDict(frozen=True)

    what: str
    why: str
    action: str


class HistoryEntry(BaseModel):
    #: frozen: versions already emitted share their entries with the book's alert
    model_config = ConfigDict(frozen=True)

    at: AwareDatetime
    #: a person ("nurse:jdoe"), or "system" for automatic transitions
    by: str
    #: opened, updated, severity_raised, severity_lowered, acknowledged, resolved, retracted,
    #: escalated, silenced, silence_expired, silence_lifted, inhibited, uninhibited, note,
    #: reopened, stale_ignored
    action: str
    from_status: AlertStatus | None = None
    to_status: AlertStatus | None = None
    severity: Severity | None = None
    role: str | None = None
    #: escalation level after this entry (index into route tiers; len(tiers) = failsafe)
    tier: int | None = None
    note: str | None = None


class Alert(BaseModel):
    model_config = ConfigDict(extra="ignore")

    alert_id: str
    patient_id: str
    rule_id: str
    dedupe_key: str = ""
    episode: int = Field(ge=1)
    #: effective severity: a finding without one is recorded as critical (fail safe)
    severity: Severity
    grade: int | None = None
    status: AlertStatus = AlertStatus.FIRING
    #: status of the previous version (None for the first version): lets sinks see transitions
    previous_status: AlertStatus | None = None
    protocol: ProtocolRef
    evidence: list[Evidence] = Field(default_factory=list)
    opened_at: AwareDatetime
    updated_at: AwareDatetime
    #: event time of the newest finding applied (an older finding never overrides a newer one)
    effective_at: AwareDatetime
    closed_at: AwareDatetime | None = None
    #: the route (a RouteSpec dumped to a dict) copied when the alert opened
    route: dict[str, Any]
    #: escalation level: index into ``route["tiers"]``; ``len(tiers)`` means the failsafe
    escalation_tier: int = 0
    #: when the current level is entered: the base of its timeout
    tier_entered_at: AwareDatetime | None = None
    next_escalation_at: AwareDatetime | None = None
    #: bounded (issue #13): every entry by a person, the first entry, the first entry of each
    #: (severity, tier) the alert had and the newest automatic entries; see ``history_omitted``
    history: list[HistoryEntry] = Field(default_factory=list)
    #: how many automatic ("system") entries of this alert's full history ``history`` no longer
    #: lists (0: it is complete). Every version carries its new entries, so a reader of every
    #: version (the inbox) can rebuild the full timeline.
    history_omitted: int = Field(default=0, ge=0)
    text: AlertText
    version: int = Field(default=1, ge=1)
    #: whether this version should page (a paging sink delivers ``notify`` versions and
    #: status transitions)
    notify: bool = False
    #: the kinds of change that produced this version (history actions of this version)
    changes: list[str] = Field(default_factory=list)
    inhibited_by: str | None = None
    silenced_until: AwareDatetime | None = None
    silence_reason: str | None = None
    ward: str | None = None
    care_team: str | None = None
    pseudonym: str
    #: finding ids applied to this alert (dedupe of replayed findings), newest last, bounded
    finding_ids: list[str] = Field(default_factory=list)

    @property
    def is_open(self) -> bool:
        return self.status in OPEN_STATUSES

    @property
    def status_changed(self) -> bool:
        return self.previous_status is not None and self.previous_status != self.status

    @property
    def idempotency_key(self) -> str:
        return f"{self.alert_id}:{self.version}"

    def current_recipients(self) -> list[str]:
        tiers = self.route.get("tiers", [])
        if self.escalation_tier < len(tiers):
            return list(tiers[self.escalation_tier].get("recipients", []))
        return list(self.route.get("failsafe", {}).get("recipients", []))

    def public_dict(self, include_patient_id: bool = False) -> dict[str, Any]:
        """JSON-ready dict for third-party sinks.

        Unless asked, it carries nothing that can identify the patient: no ``patient_id``,
        no lab-assigned observation or finding ids (accession numbers often embed an MRN),
        and no free-text notes from the history.
        """
        data = self.model_dump(mode="json")
        if not include_patient_id:
            data.pop("patient_id", None)
            data.pop("finding_ids", None)
            for ev in data.get("evidence") or []:
                ev.pop("observation_id", None)
            for h in data.get("history") or []:
                if h.get("note"):
                    h["note"] = "[note withheld]"
            # free text typed by a person (review M4): may name the patient
            if data.get("silence_reason"):
                data["silence_reason"] = "[reason withheld]"
        return data


class ActionKind(StrEnum):
    ACKNOWLEDGE = "acknowledge"
    RESOLVE = "resolve"
    SILENCE = "silence"
    NOTE = "note"
    ESCALATE = "escalate"


class Role(StrEnum):
    NURSE = "nurse"
    PHYSICIAN = "physician"
    ADMIN = "admin"


class AlertAction(BaseModel):
    """One action on one alert (topic ``alert-actions``, keyed by patient; and the HTTP API)."""

    model_config = ConfigDict(extra="ignore", frozen=True)

    action: ActionKind
    alert_id: str = Field(min_length=1)
    patient_id: str | None = None
    #: the sender's user name: the worker resolves the role from the user directory by it
    by: str = Field(min_length=1)
    #: informational only: the worker never authorises by it (security review H4)
    role: Role | None = None
    at: AwareDatetime
    reason: str | None = None
    #: required for ``silence``: when the silence expires
    until: AwareDatetime | None = None
    #: optional client-chosen id so a replayed action is applied once
    action_id: str | None = None

    @model_validator(mode="after")
    def _check(self) -> "AlertAction":
        if self.action == ActionKind.SILENCE:
            if self.until is None:
                raise ValueError("a silence needs an expiry ('until')")
            if not (self.reason and self.reason.strip()):
                raise ValueError("a silence needs a reason")
        if self.action == ActionKind.NOTE and not (self.reason and self.reason.strip()):
            raise ValueError("a note needs text ('reason')")
        return self

