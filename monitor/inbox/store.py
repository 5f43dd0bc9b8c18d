"""In-memory views the inbox serves, built from the ``alerts``, ``observations`` and ``treatments`` topics.

* alerts: the latest version per ``alert_id`` (a lower or equal version never replaces a newer one);
* per patient: observations (bounded, newest kept; corrections and withdrawals applied) as
  the points the timeline draws (``TimelinePoint``), the dose and the steroid events;
* opaque patient references: ``HMAC(secret, patient_id)``; the raw patient id never leaves
  the server in a URL or a JSON response;
* subscribers (server-sent events) get a small message whenever an alert changes.

Pure Python and asyncio queues; the Kafka consumer lives in ``app.py``.
"""
from __future__ import annotations

import asyncio
import hashlib
import hmac
import json
import logging
import sys
from collections import deque
from dataclasses import dataclass, field
from datetime import datetime, timezone
from typing import Any, NamedTuple

from pydantic import ValidationError

from schemas.alert import OPEN_STATUSES, Alert, AlertAction, HistoryEntry
from schemas.errors import Rejected
from schemas.events import DoseEvent, Observation, RETRACTING_STATUSES, SteroidEvent
from schemas.ingest import check_patient_id
from schemas.patients import PatientRecord

log = logging.getLogger(__name__)

#: analytes drawn on the timeline, by panel
TIMELINE_PANELS: list[dict[str, Any]] = [
    {"id": "liver", "title": "ALT and AST (multiples of ULN, log scale)", "analytes": ["alt", "ast"], "uln": True,
     "log": True, "lines": [3, 5, 20]},
    {"id": "bilirubin", "title": "Total bilirubin", "analytes": ["bilirubin_total", "bilirubin_direct"]},
    {"id": "platelets", "title": "Platelets", "analytes": ["platelets"]},
    {"id": "hemoglobin", "title": "Haemoglobin", "analytes": ["hemoglobin"]},
    {"id": "creatinine", "title": "Creatinine", "analytes": ["creatinine"]},
    {"id": "troponin", "title": "Troponin I", "analytes": ["troponin_i", "troponin_i_hs"]},
    {"id": "vitals", "title": "Vital signs", "analytes": ["temperature", "heart_rate", "respiratory_rate", "spo2",
                                                          "systolic_bp"]},
]
#: ULN used when an ALT/AST result carries no reference range (shown as "assumed" on the page)
DEFAULT_ULN = {"alt": 40.0, "ast": 50.0}


def _entry_key(h: HistoryEntry) -> tuple:
    return (h.at, h.by, h.action, h.from_status, h.to_status, h.severity, h.tier, h.note)


def merged_history(held: Alert, new: Alert) -> Alert:
    """``new`` with the history entries of ``held`` (an earlier version of the same alert, its
    history already merged) that ``new`` no longer lists: the lifecycle bounds the history a
    version carries (``history_omitted``), the inbox shows every entry it has seen.

    History is append-only, so the entries added since ``held`` come after all of ``held``'s:
    the full known timeline is ``held``'s entries followed by those. A version always lists
    the entries it added (``changes`` names them), so for the next version they are its last
    ``len(changes)`` entries; after a gap (versions the inbox never read) the added entries
    are told apart by identity. ``history_omitted`` of the result counts the automatic
    entries no version read lists (versions that left the topic before the inbox read them).
    """
    total = len(new.history) + new.history_omitted  # entries of the whole timeline at ``new``
    k = len(new.changes)
    if 0 < k <= len(new.history) and total - (len(held.history) + held.history_omitted) == k \
            and new.version == held.version + 1:
        added = new.history[-k:]
    else:
        known = {_entry_key(h) for h in held.history}
        added = [h for h in new.history if _entry_key(h) not in known]
    history = [*held.history, *added]
    return new.model_copy(update={"history": history, "history_omitted": max(0, total - len(history))})


def patient_ref(secret: bytes, patient_id: str) -> str:
    return "p-" + hmac.new(secret, patient_id.encode("utf-8"), hashlib.sha256).hexdigest()[:24]


class TimelinePoint(NamedTuple):
    """What the timeline draws of an observation, all the inbox keeps of it: a validated
    ``Observation`` held about 3 KB (100 patients with 90 days of 4-hourly vitals and weekly labs,
    280,000 observations, took 860 MiB; ``bench/bench_inbox.py`` prints the bytes per observation)."""
    effective_at: datetime
    analyte: str
    unit: str
    value: float | None
    #: the upper reference limit (ALT/AST are drawn as multiples of it)
    uln: float | None

    @classmethod
    def of(cls, obs: Observation) -> "TimelinePoint":
        rr = obs.reference_range
        return cls(obs.effective_at, sys.intern(obs.analyte), sys.intern(obs.unit), obs.value,
                   rr.high if rr is not None else None)


@dataclass
class PatientView:
    patient_id: str
    ref: str
    observations: dict[str, TimelinePoint] = field(default_factory=dict)
    order: deque = field(default_factory=deque)
    dose: DoseEvent | None = None
    steroids: dict[str, SteroidEvent] = field(default_factory=dict)
    #: demographics from the ``patients`` topic (None: unregistered)
    record: PatientRecord | None = None


class InboxStore:
    def __init__(self, secret: bytes, *, max_observations_per_patient: int = 20_000,
                 max_patients: int = 100_000, protocols: list | None = None):
        self.secret = secret
        self.max_obs = max_observations_per_patient
        self.max_patients = max_patients
        self.alerts: dict[str, Alert] = {}
        self.patients: dict[str, PatientView] = {}
        self.by_ref: dict[str, str] = {}
        #: actions sent from this inbox, shown as pending until a newer alert version arrives
        self.pending: dict[str, list[dict[str, Any]]] = {}
        self._subscribers: set[asyncio.Queue] = set()
        self.counts = {"alerts": 0, "observations": 0, "treatments": 0, "invalid": 0}
        self._protocols = protocols

    # ------------------------------------------------------------------ ingestion
    def ref_of(self, patient_id: str) -> str:
        return self.patient(patient_id).ref

    def patient(self, patient_id: str) -> PatientView:
        pv = self.patients.get(patient_id)
        if pv is None:
            pv = PatientView(patient_id, patient_ref(self.secret, patient_id))
            self.patients[patient_id] = pv
            self.by_ref[pv.ref] = patient_id
        return pv

    def _decoded(self, model: Any, raw: bytes | None) -> Any:
        """``raw`` as a ``model``, or None (counted as invalid: the store skips it). A patient id
        must meet ingest's rule (not empty, bounded, printable), as the clinical stage checks it
        again: a record written past ingest must not show as a patient with no id."""
        try:
            return self._checked(model.model_validate_json(raw or b""))
        except (ValidationError, ValueError, Rejected):
            self.counts["invalid"] += 1
            return None

    @staticmethod
    def _checked(obj: Any) -> Any:
        check_patient_id(obj.patient_id)
        return obj

    def apply_alert_bytes(self, raw: bytes | None) -> Alert | None:
        alert = self._decoded(Alert, raw)
        return self.apply_alert(alert) if alert is not None else None

    def apply_alert(self, alert: Alert) -> Alert | None:
        cur = self.alerts.get(alert.alert_id)
        if cur is not None and cur.version >= alert.version:
            return None
        if cur is not None and alert.history_omitted:
            alert = merged_history(cur, alert)
        self.alerts[alert.alert_id] = alert
        self.counts["alerts"] += 1
        self.patient(alert.patient_id)
        pend = self.pending.get(alert.alert_id)
        if pend:
            pend[:] = [p for p in pend if p["version"] >= alert.version]
            if not pend:
                del self.pending[alert.alert_id]
        summary = self.summary(alert)
        summary.pop("patient", None)  # the live message carries no identity; pages fetch it
        self.publish({"type": "alert", "alert": summary})
        return alert

    def apply_observation_bytes(self, raw: bytes | None) -> Observation | None:
        obs = self._decoded(Observation, raw)
        if obs is not None:
            self.apply_observation(obs)
        return obs

    def apply_observation(self, obs: Observation) -> None:
        pv = self.patient(obs.patient_id)
        self.counts["observations"] += 1
        replaced = obs.replaces
        if replaced and replaced in pv.observations:
            del pv.observations[replaced]
        if obs.status in RETRACTING_STATUSES:
            return
        if obs.observation_id not in pv.observations:
            pv.order.append(obs.observation_id)
        pv.observations[obs.observation_id] = TimelinePoint.of(obs)
        while len(pv.observations) > self.max_obs and pv.order:
            pv.observations.pop(pv.order.popleft(), None)
        if len(pv.order) > 2 * self.max_obs:
            pv.order = deque(k for k in pv.order if k in pv.observations)

    def apply_patient_bytes(self, raw: bytes | None) -> PatientRecord | None:
        rec = self._decoded(PatientRecord, raw)
        if rec is not None:
            self.apply_patient(rec)
        return rec

    def apply_patient(self, rec: PatientRecord) -> None:
        pv = self.patient(rec.patient_id)
        pv.record = rec
        self.counts["patients"] = self.counts.get("patients", 0) + 1
        self.publish({"type": "resync"})  # names on open rows may change

    def identity(self, patient_id: str) -> dict[str, Any]:
        """What a signed-in clinical user sees of who the patient is (PHI: never logged or sent out)."""
        pv = self.patients.get(patient_id)
        rec = pv.record if pv else None
        if rec is None:
            return {"registered": False, "display_name": None, "mrn": None, "birth_date": None,
                    "patient_id": patient_id, "label": f"unregistered patient {patient_id}"}
        return {"registered": True, "display_name": rec.display_name, "mrn": rec.mrn,
                "mrn_authority": rec.mrn_authority, "birth_date": rec.birth_date.isoformat(),
                "patient_id": patient_id, "bed": rec.bed,
                "label": f"{rec.display_name} (MRN {rec.mrn}, born {rec.birth_date.isoformat()})"}

    def patient_ward(self, patient_id: str) -> str | None:
        pv = self.patients.get(patient_id)
        if pv is None:
            return None
        if pv.record is not None and pv.record.ward:
            return pv.record.ward
        return pv.dose.ward if pv.dose else None

    def apply_treatment_bytes(self, raw: bytes | None) -> Any:
        try:
            obj = json.loads(raw or b"")
            if isinstance(obj, dict) and "event" in obj and "type" not in obj:
                obj = obj["event"]
            kind = obj.get("type") if isinstance(obj, dict) else None
            ev = self._checked(DoseEvent.model_validate(obj) if kind == "dose" else SteroidEvent.model_validate(obj))
        except (ValidationError, ValueError, AttributeError, Rejected):
            self.counts["invalid"] += 1
            return None
        self.apply_treatment(ev)
        return ev

    def apply_treatment(self, ev: DoseEvent | SteroidEvent) -> None:
        pv = self.patient(ev.patient_id)
        self.counts["treatments"] += 1
        if isinstance(ev, DoseEvent):
            pv.dose = ev
        else:
            pv.steroids[ev.event_id] = ev

    def note_pending(self, alert: Alert, action: AlertAction) -> None:
        self.pending.setdefault(alert.alert_id, []).append(
            {"action": action.action.value, "by": action.by, "at": action.at.isoformat(), "version": alert.version})
        self.publish({"type": "pending", "alert_id": alert.alert_id})

    # ------------------------------------------------------------------ SSE fan-out
    def subscribe(self, maxsize: int = 256) -> asyncio.Queue:
        q: asyncio.Queue = asyncio.Queue(maxsize=maxsize)
        self._subscribers.add(q)
        return q

    def unsubscribe(self, q: asyncio.Queue) -> None:
        self._subscribers.discard(q)

    def publish(self, message: dict[str, Any]) -> None:
        for q in list(self._subscribers):
            try:
                q.put_nowait(message)
            except asyncio.QueueFull:  # a slow client: tell it to reload the list
                try:
                    while True:
                        q.get_nowait()
                except asyncio.QueueEmpty:
                    pass
                q.put_nowait({"type": "resync"})

    # ------------------------------------------------------------------ views
    def ward_team(self, alert: Alert) -> tuple[str | None, str | None]:
        """Where the patient is now: the ward of the ADT record (``patients``: a transfer moves the
        alert to the new ward's nurses), else the alert's ward (from the dose record), else the
        dose's. Ward scoping, lists, filters and the live stream all use this ward."""
        pv = self.patients.get(alert.patient_id)
        dose = pv.dose if pv else None
        rec = pv.record if pv else None
        return ((rec.ward if rec else None) or self.dose_ward(alert),
                alert.care_team or (dose.care_team if dose else None) or (rec.care_team if rec else None))

    def dose_ward(self, alert: Alert) -> str | None:
        """The ward on the alert (the dose record's): shown as "dose ward" when the patient has
        since moved (ADT transfer)."""
        pv = self.patients.get(alert.patient_id)
        return alert.ward or (pv.dose.ward if pv and pv.dose else None)

    def summary(self, alert: Alert) -> dict[str, Any]:
        ward, team = self.ward_team(alert)
        return {
            "alert_id": alert.alert_id, "pseudonym": alert.pseudonym, "patient_ref": self.ref_of(alert.patient_id),
            "rule_id": alert.rule_id, "severity": alert.severity.value, "grade": alert.grade,
            "status": alert.status.value, "what": alert.text.what, "opened_at": alert.opened_at.isoformat(),
            "updated_at": alert.updated_at.isoformat(), "version": alert.version, "ward": ward, "care_team": team,
            "dose_ward": dw if (dw := self.dose_ward(alert)) != ward else None,
            "escalation_tier": alert.escalation_tier, "inhibited_by": alert.inhibited_by,
            "silenced_until": alert.silenced_until.isoformat() if alert.silenced_until else None,
            "open": alert.is_open, "pending": list(self.pending.get(alert.alert_id, [])),
            "patient": self.identity(alert.patient_id),
        }

    def open_alerts(self, *, ward: str | None = None, team: str | None = None,
                    visible: Any = None) -> list[Alert]:
        """Open alerts; ``visible(ward) -> bool`` scopes them to a user's wards."""
        out = []
        for a in self.alerts.values():
            if a.status not in OPEN_STATUSES:
                continue
            w, t = self.ward_team(a)
            if visible is not None and not visible(w):
                continue
            if ward and w != ward:
                continue
            if team and t != team:
                continue
            out.append(a)
        # most severe first; within a severity, firing before acknowledged, then oldest first
        out.sort(key=lambda a: (-a.severity.rank, a.status != "firing", a.opened_at))
        return out

    def facets(self, visible: Any = None) -> dict[str, list[str]]:
        wards, teams = set(), set()
        for a in self.alerts.values():
            if a.is_open:
                w, t = self.ward_team(a)
                if visible is not None and not visible(w):
                    continue
                if w:
                    wards.add(w)
                if t:
                    teams.add(t)
        return {"wards": sorted(wards), "teams": sorted(teams)}

    def detail(self, alert: Alert) -> dict[str, Any]:
        d = self.summary(alert)
        d.update({
            "text": alert.text.model_dump(), "protocol": alert.protocol.model_dump(),
            "evidence": [e.model_dump(mode="json") for e in alert.evidence],
            "history": [h.model_dump(mode="json") for h in alert.history],
            "history_omitted": alert.history_omitted,
            "closed_at": alert.closed_at.isoformat() if alert.closed_at else None,
            "recipients": alert.current_recipients(),
            "route_id": alert.route.get("id"),
            "silence_reason": alert.silence_reason,
        })
        return d

    def timeline(self, patient_id: str, now: datetime | None = None) -> dict[str, Any]:
        """Series per analyte in days since dose; ALT/AST also as multiples of ULN; steroid phases;
        alerts; overdue and upcoming samples."""
        now = now or datetime.now(timezone.utc)
        pv = self.patient(patient_id)
        obs = sorted(pv.observations.values(), key=lambda o: o.effective_at)
        if pv.dose is not None:
            t0 = pv.dose.administered_at
        elif obs:
            t0 = obs[0].effective_at
        else:
            t0 = now

        def day(t: datetime) -> float:
            return round((t - t0).total_seconds() / 86400.0, 4)

        series: dict[str, dict[str, Any]] = {}
        for o in obs:
            if o.value is None:
                continue
            s = series.setdefault(o.analyte, {"analyte": o.analyte, "unit": o.unit, "x": [], "y": [], "ids": []})
            s["x"].append(day(o.effective_at))
            s["y"].append(o.value)
            if o.analyte in DEFAULT_ULN:
                s.setdefault("uln", []).append(o.uln or None)
        for a, s in series.items():
            if a in DEFAULT_ULN:
                known = [u for u in s["uln"] if u]
                fallback = known[-1] if known else DEFAULT_ULN[a]
                s["uln_assumed"] = not known
                s["xuln"] = [round(y / (u or fallback), 3) for y, u in zip(s["y"], s["uln"])]
            s.pop("ids", None)

        steroids = sorted(pv.steroids.values(), key=lambda e: e.at)
        phases = []
        for i, ev in enumerate(steroids):
            end = steroids[i + 1].at if i + 1 < len(steroids) else None
            if ev.phase.value == "stopped":
                continue
            phases.append({"phase": ev.phase.value, "from": day(ev.at), "to": day(end) if end else None,
                           "dose_mg_per_kg_day": ev.dose_mg_per_kg_day, "drug": ev.drug})

        alerts = []
        overdue = []
        for a in sorted((a for a in self.alerts.values() if a.patient_id == patient_id), key=lambda a: a.opened_at):
            # mark the alert where its evidence was taken (event time), not when it was processed
            ev_times = [e.effective_at for e in a.evidence if e.effective_at is not None]
            mark = min([a.opened_at, *ev_times])
            alerts.append({"alert_id": a.alert_id, "day": day(mark), "opened_day": day(a.opened_at), "severity": a.severity.value,
                           "status": a.status.value, "rule_id": a.rule_id, "what": a.text.what})
            if a.rule_id == "schedule.overdue" and a.is_open:
                for e in a.evidence:
                    overdue.append({"analyte": e.analyte, "since_day": day(a.effective_at),
                                    "last_day": day(e.effective_at) if e.effective_at else None,
                                    "note": e.note, "alert_id": a.alert_id})
        return {
            "patient_ref": pv.ref, "patient": self.identity(patient_id),
            "dose_day0": t0.isoformat(), "has_dose": pv.dose is not None,
            "product": pv.dose.product.value if pv.dose else None,
            "ward": pv.dose.ward if pv.dose else None, "care_team": pv.dose.care_team if pv.dose else None,
            "today": day(now), "series": series, "steroid_phases": phases, "alerts": alerts,
            "overdue": overdue, "upcoming": self._upcoming(pv, series, now, day),
            "panels": TIMELINE_PANELS,
        }

    def _upcoming(self, pv: PatientView, series: dict, now: datetime, day) -> list[dict[str, Any]]:
        """Next due sample per schedule group from the protocol's schedule periods (simple: the
        period containing today; anchor = latest sample of the group, or the dose)."""
        if pv.dose is None:
            return []
        try:
            from alerts.protocol import protocol_for_product

            proto = protocol_for_product(pv.dose.product, self._protocols)
        except Exception:  # pragma: no cover - protocol problems must not break the page
            return []
        today = day(now)
        out = []
        for sch in proto.schedules:
            period = next((p for p in sch.periods if p.from_day <= today < p.to_day and not p.steroid_phases
                           and p.phase_days is None), None)
            if period is None:
                continue
            lasts = [series[a]["x"][-1] for a in sch.analytes if a in series and series[a]["x"]]
            anchor = max(lasts) if lasts else 0.0
            due = max(anchor, 0.0) + period.every_days
            out.append({"group": sch.group, "analytes": sch.analytes, "due_day": round(due, 2),
                        "overdue": today > due + sch.grace_hours / 24.0, "every_days": period.every_days})
        return out

    # ------------------------------------------------------------------ census and handover
    def census(self, *, visible: Any = None, ward: str | None = None,
               now: datetime | None = None) -> list[dict[str, Any]]:
        """Monitored patients (those with a dose) the user may see: who, where, day since dose,
        product, steroid phase now, samples overdue and next due, open alerts by severity."""
        now = now or datetime.now(timezone.utc)
        open_by: dict[str, dict[str, int]] = {}
        for a in self.alerts.values():
            if a.is_open:
                counts = open_by.setdefault(a.patient_id, {})
                counts[a.severity.value] = counts.get(a.severity.value, 0) + 1
        rows = []
        for pid, pv in self.patients.items():
            if pv.dose is None:
                continue
            w = self.patient_ward(pid)
            if visible is not None and not visible(w):
                continue
            if ward and w != ward:
                continue
            tl = self.timeline(pid, now)
            past = [e for e in pv.steroids.values() if e.at <= now]
            phase = max(past, key=lambda e: e.at).phase.value if past else None
            upcoming = sorted(tl["upcoming"], key=lambda u: u["due_day"])
            rows.append({
                "patient_ref": pv.ref, "patient": self.identity(pid), "ward": w,
                "care_team": pv.dose.care_team, "product": pv.dose.product.value,
                "dosed_at": pv.dose.administered_at.isoformat(), "day": int(tl["today"]) if tl["today"] >= 0 else 0,
                "steroid_phase": phase,
                "overdue": [u for u in upcoming if u["overdue"]] + tl["overdue"],
                "next_due": [u for u in upcoming if not u["overdue"]][:3],
                "open_alerts": open_by.get(pid, {}),
            })
        rank = {"critical": 0, "high": 1, "warning": 2, "info": 3}
        rows.sort(key=lambda r: (min((rank.get(k, 9) for k in r["open_alerts"]), default=9), r["ward"] or "",
                                 r["patient"]["display_name"] or r["patient"]["patient_id"]))
        return rows

    def handover(self, *, visible: Any = None, ward: str | None = None, hours: float = 12.0,
                 now: datetime | None = None) -> dict[str, Any]:
        """A shift handover: open alerts, alerts closed in the last ``hours``, who acknowledged /
        escalated / resolved what in that window, and samples due in the next 24 h."""
        from datetime import timedelta

        now = now or datetime.now(timezone.utc)
        since = now - timedelta(hours=hours)
        open_, closed, actions = [], [], []
        for a in self.alerts.values():
            w, _ = self.ward_team(a)
            if (visible is not None and not visible(w)) or (ward and w != ward):
                continue
            row = {**self.summary(a), "closed_at": a.closed_at.isoformat() if a.closed_at else None}
            if a.is_open:
                open_.append(row)
            elif a.closed_at and a.closed_at >= since:
                closed.append(row)
            for h in a.history:
                if h.at >= since and h.by and h.by != "system":
                    actions.append({"at": h.at.isoformat(), "by": h.by, "role": h.role, "action": h.action,
                                    "alert_id": a.alert_id, "what": a.text.what, "patient": row["patient"],
                                    "note": h.note})
        rank = {"critical": 0, "high": 1, "warning": 2, "info": 3}
        open_.sort(key=lambda r: (rank.get(r["severity"], 9), r["opened_at"]))
        closed.sort(key=lambda r: r["closed_at"] or "", reverse=True)
        actions.sort(key=lambda r: r["at"])
        due = []
        for row in self.census(visible=visible, ward=ward, now=now):
            for u in row["overdue"] + row["next_due"]:
                if "due_day" in u and u["due_day"] > row["day"] + 1 and not u.get("overdue"):
                    continue
                due.append({"patient": row["patient"], "patient_ref": row["patient_ref"], "ward": row["ward"],
                            "what": ", ".join(u.get("analytes") or [u.get("analyte") or ""]),
                            "group": u.get("group"), "due_day": u.get("due_day"),
                            "overdue": bool(u.get("overdue", True)), "day": row["day"]})
        return {"open": open_, "closed": closed, "actions": actions, "due": due, "since": since.isoformat(),
                "now": now.isoformat(), "hours": hours}

