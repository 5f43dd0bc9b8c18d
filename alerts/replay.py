"""Protocol replay: run recorded patients' courses through a baseline and a candidate protocol
set and compare the alerts (pure; no Kafka). Issue 17.

Each patient's course (canonical observations, corrections and withdrawals included, dose and
steroid events) is fed in arrival order through the real engine and lifecycle with the
worker's hourly clock (:class:`alerts.course.Course`, the code the clinicians' scenario runner
uses), once per protocol set, up to the end of the replay window. Every alert version the
lifecycle emits is collected into :class:`Episode` records (one per alert id: rule, dedupe key,
episode number, opening time, highest severity, closing time).

Comparison (:func:`compare`):

- per rule and severity (an episode counts at the highest severity it reached): alerts opened,
  and pages (episodes that reached warning or above) per 100 patient-days, baseline and
  candidate;
- episodes are matched per patient, rule and dedupe key, in time order, a baseline episode with
  the first unmatched candidate episode whose open interval overlaps it; unmatched candidate
  episodes are *gained*, unmatched baseline ones *lost*, matched ones whose highest severity
  differs *changed*; for matched episodes the difference in time to first alert (candidate
  opening minus baseline opening) is reported, and a non-zero one counts as a *timing*
  difference;
- ``differences`` = gained + lost + changed + timing; the patients with any difference are
  listed by pseudonymous reference (``p-`` + HMAC-SHA256 under the service's pseudonym
  secret, the same reference the nurse inbox shows), or by id when ``identify`` is set.

Patient-days: from a patient's first recorded event (or the window start) to the end of the
window. A window start (``since``) does not cut the courses: each is fed from its first
recorded event (the dose names the protocol, earlier results are baselines), and only the
episodes overlapping the window are compared.
"""
from __future__ import annotations

import hashlib
import hmac
from dataclasses import dataclass, field
from datetime import datetime, timedelta, timezone
from typing import Callable, Iterable, Sequence

from schemas.alert import Alert
from schemas.events import DoseEvent, Observation, SteroidEvent
from schemas.findings import SEVERITY_ORDER, SEVERITY_RANK, Severity

from .course import HOURLY, Course, lifecycle_for
from .engine import Engine
from .protocol import Protocol

__all__ = [
    "CourseEvent", "PatientCourse", "Episode", "RunResult", "ReplayReport", "SEVERITIES", "PAGE_SEVERITIES",
    "patient_ref", "run_protocols", "compare", "replay",
]

SEVERITIES = tuple(s.value for s in SEVERITY_ORDER)
SEV_RANK = SEVERITY_RANK
#: severities that page a clinician (warning and above)
PAGE_SEVERITIES = frozenset(s for s in SEVERITIES if SEV_RANK[s] >= Severity.WARNING.rank)
#: the clock grid: the worker ticks every patient about hourly; the replay ticks on whole hours
CLOCK_ANCHOR = datetime(2000, 1, 1, tzinfo=timezone.utc)
DAY = timedelta(days=1)


def patient_ref(secret: bytes | str, patient_id: str) -> str:
    """Pseudonymous patient reference: ``p-`` + HMAC-SHA256(secret, id), 24 hex characters
    (the same as the nurse inbox's ``monitor.inbox.store.patient_ref``)."""
    key = secret.encode("utf-8") if isinstance(secret, str) else secret
    return "p-" + hmac.new(key, patient_id.encode("utf-8"), hashlib.sha256).hexdigest()[:24]


@dataclass(frozen=True)
class CourseEvent:
    """One recorded input: ``arrival`` is when the service received it (the clock it was
    processed at), ``seq`` the recorded order among equal arrivals."""
    arrival: datetime
    seq: int
    event: Observation | DoseEvent | SteroidEvent


@dataclass
class PatientCourse:
    patient_id: str
    events: list[CourseEvent] = field(default_factory=list)

    def sorted_events(self) -> list[CourseEvent]:
        return sorted(self.events, key=lambda e: (e.arrival, e.seq))

    @property
    def first_arrival(self) -> datetime | None:
        return min((e.arrival for e in self.events), default=None)


@dataclass
class Episode:
    patient_id: str
    rule_id: str
    dedupe_key: str
    episode: int
    opened_at: datetime
    severity: str  # highest reached
    first_severity: str
    closed_at: datetime | None = None
    status: str = "firing"

    @property
    def paged(self) -> bool:
        return self.severity in PAGE_SEVERITIES

    def end(self, horizon: datetime) -> datetime:
        return self.closed_at or horizon

    def describe(self) -> dict:
        return {"rule": self.rule_id, "dedupe": self.dedupe_key, "episode": self.episode,
                "severity": self.severity, "opened_at": self.opened_at.isoformat(),
                "closed_at": self.closed_at.isoformat() if self.closed_at else None}


@dataclass
class RunResult:
    """The episodes of one protocol set over every patient."""
    episodes: dict[str, list[Episode]]  # patient id -> episodes in opening order
    patient_days: float
    patients: int


def _sev(a: Alert) -> str:
    return a.severity.value if a.severity is not None else "critical"


def run_protocols(courses: Sequence[PatientCourse], protocols: Sequence[Protocol], end: datetime, *,
                  step: timedelta = HOURLY, pseudonym_secret: bytes | str = "protocol-replay",
                  progress: Callable[[int, int], None] | None = None, since: datetime | None = None) -> RunResult:
    """Feed every course through ``protocols`` (engine + lifecycle + hourly clock) up to ``end``.
    With ``since``, the whole course is still fed (its history is its context) but only the
    episodes overlapping ``[since, end]`` are kept, and patient-days start at ``since``."""
    engine = Engine(list(protocols))
    life = lifecycle_for(protocols, pseudonym_secret)
    out: dict[str, list[Episode]] = {}
    days = 0.0
    for i, pc in enumerate(courses, 1):
        events = pc.sorted_events()
        if not events:
            continue
        eps: dict[str, Episode] = {}

        def collect(alerts: list[Alert], eps=eps) -> None:
            for a in alerts:
                ep = eps.get(a.alert_id)
                sev = _sev(a)
                if ep is None:
                    ep = eps[a.alert_id] = Episode(a.patient_id, a.rule_id, a.dedupe_key, a.episode, a.opened_at,
                                                   sev, sev)
                elif SEV_RANK[sev] > SEV_RANK[ep.severity]:
                    ep.severity = sev
                ep.status = a.status.value
                ep.closed_at = a.closed_at

        course = Course(engine, life, pc.patient_id, anchor=CLOCK_ANCHOR, step=step, on_alerts=collect)
        first = events[0].arrival
        course.start(first)
        for ev in events:
            if ev.arrival > end:
                break
            course.advance(ev.arrival, inclusive=False)
            if isinstance(ev.event, Observation):
                course.observe(ev.event, ev.arrival)
            else:
                course.treat(ev.event, ev.arrival)
        course.advance(end)
        kept = [e for e in eps.values() if since is None or e.end(end) >= since]
        out[pc.patient_id] = sorted(kept, key=lambda e: (e.opened_at, e.rule_id, e.dedupe_key, e.episode))
        days += max(0.0, (end - max(first, since or first)) / DAY)
        if progress is not None:
            progress(i, len(courses))
    return RunResult(episodes=out, patient_days=days, patients=len(out))


# --------------------------------------------------------------------------- comparison

@dataclass
class RuleStats:
    opened: dict[str, dict[str, int]] = field(default_factory=lambda: {"baseline": {}, "candidate": {}})
    pages: dict[str, int] = field(default_factory=lambda: {"baseline": 0, "candidate": 0})
    gained: int = 0
    lost: int = 0
    changed: int = 0
    timing: int = 0
    deltas_h: list[float] = field(default_factory=list)


@dataclass
class ReplayReport:
    patients: int
    patient_days: float
    differences: int
    rules: dict[str, dict]
    patients_changed: list[dict]
    baseline: list[str] = field(default_factory=list)
    candidate: list[str] = field(default_factory=list)
    window: dict = field(default_factory=dict)

    def to_json(self) -> dict:
        return {"patients": self.patients, "patient_days": round(self.patient_days, 2),
                "differences": self.differences, "rules": self.rules, "patients_changed": self.patients_changed,
                "baseline": self.baseline, "candidate": self.candidate, "window": self.window}


def _match(base: list[Episode], cand: list[Episode], horizon: datetime):
    """Greedy time-ordered matching of episodes of one (patient, rule, dedupe key)."""
    used: set[int] = set()
    pairs: list[tuple[Episode, Episode]] = []
    lost: list[Episode] = []
    for b in base:
        hit = None
        for j, c in enumerate(cand):
            if j in used:
                continue
            if c.opened_at <= b.end(horizon) and b.opened_at <= c.end(horizon):
                hit = j
                break
        if hit is None:
            lost.append(b)
        else:
            used.add(hit)
            pairs.append((b, cand[hit]))
    gained = [c for j, c in enumerate(cand) if j not in used]
    return pairs, lost, gained


def _per100(n: int, days: float) -> float:
    return round(100.0 * n / days, 3) if days > 0 else 0.0


def compare(base: RunResult, cand: RunResult, horizon: datetime, *, secret: bytes | str,
            identify: bool = False) -> ReplayReport:
    stats: dict[str, RuleStats] = {}

    def st(rule: str) -> RuleStats:
        return stats.setdefault(rule, RuleStats())

    for name, run in (("baseline", base), ("candidate", cand)):
        for eps in run.episodes.values():
            for e in eps:
                s = st(e.rule_id)
                s.opened[name][e.severity] = s.opened[name].get(e.severity, 0) + 1
                if e.paged:
                    s.pages[name] += 1
    changed_patients: list[dict] = []
    differences = 0
    for pid in sorted(set(base.episodes) | set(cand.episodes)):
        b_eps = base.episodes.get(pid, [])
        c_eps = cand.episodes.get(pid, [])
        keys = sorted({(e.rule_id, e.dedupe_key) for e in b_eps + c_eps})
        entry: dict = {"gained": [], "lost": [], "changed": [], "timing": []}
        for rule, dk in keys:
            bl = [e for e in b_eps if e.rule_id == rule and e.dedupe_key == dk]
            cl = [e for e in c_eps if e.rule_id == rule and e.dedupe_key == dk]
            pairs, lost, gained = _match(bl, cl, horizon)
            s = st(rule)
            for e in gained:
                s.gained += 1
                entry["gained"].append(e.describe())
            for e in lost:
                s.lost += 1
                entry["lost"].append(e.describe())
            for b, c in pairs:
                delta = (c.opened_at - b.opened_at).total_seconds() / 3600.0
                s.deltas_h.append(delta)
                if b.severity != c.severity:
                    s.changed += 1
                    entry["changed"].append({"rule": rule, "dedupe": dk, "baseline": b.severity,
                                             "candidate": c.severity, "opened_at": b.opened_at.isoformat(),
                                             "time_to_first_alert_delta_h": round(delta, 3)})
                elif delta != 0:
                    s.timing += 1
                    entry["timing"].append({"rule": rule, "dedupe": dk, "severity": b.severity,
                                            "baseline_opened_at": b.opened_at.isoformat(),
                                            "candidate_opened_at": c.opened_at.isoformat(),
                                            "time_to_first_alert_delta_h": round(delta, 3)})
        n = sum(len(v) for v in entry.values())
        if n:
            differences += n
            who = {"patient_id": pid} if identify else {"patient": patient_ref(secret, pid)}
            changed_patients.append({**who, "differences": n, **entry})
    days = base.patient_days
    rules: dict[str, dict] = {}
    for rule in sorted(stats):
        s = stats[rule]
        sev_rows = {}
        for sev in SEVERITIES:
            b = s.opened["baseline"].get(sev, 0)
            c = s.opened["candidate"].get(sev, 0)
            if b or c:
                sev_rows[sev] = {"baseline": b, "candidate": c,
                                 "baseline_per_100_patient_days": _per100(b, days),
                                 "candidate_per_100_patient_days": _per100(c, days)}
        d = s.deltas_h
        rules[rule] = {
            "opened": {"baseline": sum(s.opened["baseline"].values()), "candidate": sum(s.opened["candidate"].values())},
            "opened_per_100_patient_days": {"baseline": _per100(sum(s.opened["baseline"].values()), days),
                                            "candidate": _per100(sum(s.opened["candidate"].values()), days)},
            "pages": dict(s.pages),
            "pages_per_100_patient_days": {"baseline": _per100(s.pages["baseline"], days),
                                           "candidate": _per100(s.pages["candidate"], days)},
            "by_severity": sev_rows,
            "gained": s.gained, "lost": s.lost, "changed_severity": s.changed, "timing_changed": s.timing,
            "time_to_first_alert_delta_h": ({"matched": len(d), "mean": round(sum(d) / len(d), 3),
                                             "min": round(min(d), 3), "max": round(max(d), 3)}
                                            if d else {"matched": 0}),
        }
    return ReplayReport(patients=max(base.patients, cand.patients), patient_days=days, differences=differences,
                        rules=rules, patients_changed=changed_patients)


def replay(courses: Sequence[PatientCourse], baseline: Sequence[Protocol], candidate: Sequence[Protocol],
           end: datetime, *, secret: bytes | str, identify: bool = False, step: timedelta = HOURLY,
           progress: Callable[[str, int, int], None] | None = None, since: datetime | None = None) -> ReplayReport:
    """Run both protocol sets over the courses and compare them."""
    def prog(label):
        return None if progress is None else (lambda i, n: progress(label, i, n))

    b = run_protocols(courses, baseline, end, step=step, pseudonym_secret=secret, progress=prog("baseline"),
                      since=since)
    c = run_protocols(courses, candidate, end, step=step, pseudonym_secret=secret, progress=prog("candidate"),
                      since=since)
    rep = compare(b, c, end, secret=secret, identify=identify)
    rep.baseline = [f"{p.id} {p.version}" for p in baseline]
    rep.candidate = [f"{p.id} {p.version}" for p in candidate]
    return rep


def with_candidate(shipped: Iterable[Protocol], candidate: Iterable[Protocol]) -> list[Protocol]:
    """The candidate protocols plus the shipped/deployed ones for products no candidate covers
    (as the scenario runner combines them)."""
    cand = list(candidate)
    products = {pr for p in cand for pr in p.products}
    return cand + [q for q in shipped if not set(q.products) & products]
