"""The evaluation engine: observations and treatment events in, findings out (pure).

``Engine`` MUTATES the ``PatientState`` it is given, in place, and returns the findings
that changed. Persist ``state.to_dict()`` after each call.

Findings
- ``present``: the rule's condition holds. Emitted when it first holds and whenever its
  severity, grade or evidence (observation ids) change.
- ``cleared``: the rule was present and a newer evaluation finds it absent.
- ``retracted``: the rule was present, and it became absent because a result it rested
  on was corrected or entered in error / cancelled.
Nothing is emitted when a re-evaluation gives the same outcome, so a replay of the same
input gives no new findings, and a fresh replay gives the same findings (ids included).

``finding_id`` is a hash of patient, rule, dedupe key, state, severity, grade and the
evidence ids: deterministic, so processing the same input twice gives the same ids.
``evaluated_at`` is the ``now`` passed in (wall clock), the only non-deterministic field.

Patients without a dose event: results are stored (they become baselines) but no rule
is evaluated, because the product, protocol, dose day and age are unknown. The dose
event evaluates everything held so far, but pre-dose results are baselines and never
evidence, so the dose event raises nothing from them.

Clock-driven findings (``check_schedule``, called from a timer):
- ``schedule.overdue`` (one per schedule group) is raised at the first check after a
  sample's deadline + grace and cleared when the sample arrives. The deadline runs from the
  last sample, so a sample skipped mid-course and followed by a later one is not flagged
  afterwards (the later sample satisfies the schedule).
- ``monitoring.complete`` needs, for every required analyte, a result taken at or after
  the end of the minimum period (dose + ``min_days``) meeting the label's criteria, and is
  withheld while any sample is overdue. Completion never hides an overdue sample: it only
  ends schedule periods marked ``ends_on_completion`` (the label's "continue until
  unremarkable" after month 3).
"""
from __future__ import annotations

import hashlib
from datetime import datetime
from typing import Iterable, Mapping

from schemas.events import (
    RETRACTING_STATUSES,
    DoseEvent,
    Observation,
    ResultStatus,
    SteroidEvent,
)
from schemas.findings import Evidence, Finding, FindingText

from .protocol import Protocol, default_protocols
from .rules import (
    KEEP,
    SEV_BY_RANK,
    CompiledProtocol,
    CRule,
    Ev,
    Hit,
    _day,
    compile_protocol,
)
from .state import PRE_DOSE_LIMIT, PatientState, date_epoch, epoch, from_epoch

OVERDUE_RULE = "schedule.overdue"
_EMPTY: frozenset = frozenset()


def finding_id(patient_id: str, rule_id: str, dedupe_key: str, state: str, rank: int, grade, ids: str) -> str:
    raw = f"{patient_id}\x1f{rule_id}\x1f{dedupe_key}\x1f{state}\x1f{rank}\x1f{grade}\x1f{ids}"
    return hashlib.sha256(raw.encode()).hexdigest()[:32]


class Engine:
    """Evaluate observations, treatment events and the clock against versioned protocols.

    ``protocols``: a ``Protocol``, an iterable of them, a mapping product -> Protocol, or
    ``None`` for the shipped defaults. The patient's product (from the dose event) picks
    the protocol.
    """

    def __init__(self, protocols: Protocol | Iterable[Protocol] | Mapping[str, Protocol] | None = None) -> None:
        if protocols is None:
            plist = default_protocols()
        elif isinstance(protocols, Protocol):
            plist = [protocols]
        elif isinstance(protocols, Mapping):
            plist = list(protocols.values())
        else:
            plist = list(protocols)
        self.compiled: dict[str, CompiledProtocol] = {}
        for p in plist:
            cp = compile_protocol(p)
            for prod in p.products:
                self.compiled.setdefault(prod.value, cp)
        #: analyte -> how far back readings of a sustained band are held (twice the
        #: longest duration any protocol asks for: the run's first reading stays known)
        self.sustain_windows: dict[str, float] = {}
        for cp in self.compiled.values():
            for a, for_s in cp.sustain_for_s.items():
                self.sustain_windows[a] = max(self.sustain_windows.get(a, 0.0), 2.0 * for_s)
        #: the no-dose-record rule used before any protocol is known: the shortest grace of
        #: the loaded protocols (ties: the protocol id), so the choice does not depend on order
        nd = sorted(((cp.no_dose.grace, cp.ref.id, i) for i, cp in enumerate(self.compiled.values())
                     if cp.no_dose is not None))
        self.no_dose: tuple[CompiledProtocol, CRule] | None = None
        if nd:
            cp = list(self.compiled.values())[nd[0][2]]
            self.no_dose = (cp, cp.no_dose)

    def protocol_for(self, state: PatientState) -> CompiledProtocol | None:
        if state.product is None:
            return None
        return self.compiled.get(state.product)

    # -- inputs ------------------------------------------------------------------
    def evaluate_observation(self, state: PatientState, obs: Observation, now: datetime) -> list[Finding]:
        """Place ``obs`` in ``state`` (by effective time) and return the findings that changed."""
        if obs.patient_id != state.patient_id:
            raise ValueError("observation is for another patient")
        product = state.product
        cp = self.compiled.get(product) if product is not None else None
        status = obs.status
        retract_ids: frozenset = _EMPTY
        late = None
        analyte = obs.analyte
        analytes = [analyte]
        if (status is ResultStatus.FINAL or status is ResultStatus.PRELIMINARY) and obs.corrects is None:
            replaced = None
        else:
            replaced = obs.replaces
        if status in RETRACTING_STATUSES:
            rid = replaced or obs.observation_id
            found = state.remove(rid, analyte)
            analytes = found or [analyte]
            retract_ids = frozenset((rid,))
            if cp is not None:
                for a in analytes:
                    hot = cp.sustain.get(a)
                    if hot is not None:
                        state.rebuild_run(a, hot)
        else:
            if replaced is not None:
                found = state.remove(replaced, analyte)
                retract_ids = frozenset((replaced,))
                for a in found:
                    if a not in analytes:
                        analytes.append(a)
            value = obs.value
            if value is None:
                return []
            rr = obs.reference_range
            t = int(round(obs.effective_at.timestamp()))
            if rr is None:
                entry = (t, value, obs.observation_id, None, None)
            else:
                entry = (t, value, obs.observation_id, rr.low, rr.high)
            dose_at = state.dose_at
            if cp is not None and dose_at is not None:
                limit = cp.history_limit(analyte)
            else:  # no dose record yet: hold more, so a late dose still finds baselines and peaks
                limit = PRE_DOSE_LIMIT
                if state.first is None or t < state.first:
                    state.first = t
            h = state.hist.get(analyte)
            if h and _newer(h[-1], entry) and not _holds(state, analyte, entry):
                late = entry  # older than a result already held, and not a replay: a late arrival
            state.insert(analyte, entry, limit)
            if cp is not None and dose_at is not None and analyte in cp.episode:
                if t >= dose_at:
                    state.drop_episode(analyte, entry[2])
                    if cp.relevant(state, analyte, entry):
                        state.hold_episode(analyte, entry, cp.episode[analyte][0])
                else:  # a pre-dose result may be a new baseline: judge the episode results again
                    cp.rejudge(state, analyte)
            if late is not None and not _holds(state, analyte, late):
                # older than every result held: a replay cannot be told from a late arrival,
                # so only the newest results and the episode results are surfaced
                late = None
            window = self.sustain_windows.get(analyte)
            if window is not None:  # held even before the dose tells which protocol applies
                state.record_sustained(analyte, entry, window, cp.sustain.get(analyte) if cp is not None else None)
            on_oxygen = obs.on_oxygen
            if on_oxygen is not None and (state.o2 is None or t >= state.o2[0]):
                state.o2 = [t, bool(on_oxygen)]
        if cp is None or state.dose_at is None:
            return []
        out: list[Finding] = []
        if len(analytes) == 1:
            rules = cp.by_analyte.get(analytes[0], ())
        else:
            seen: dict[str, CRule] = {}
            for a in analytes:
                for r in cp.by_analyte.get(a, ()):
                    seen.setdefault(r.id, r)
            rules = tuple(seen.values())
        if late is not None and late[0] >= state.dose_at:
            note = (f"This result (taken {_day(late[0])}) arrived after newer results; it is shown because "
                    f"it is worse than what the newest result shows.")
            for rule in rules:
                if rule.kind == "graded":
                    self._surface(state, cp, rule, [(analyte, late)], note, now, out)
        for rule in rules:
            hit = rule.evaluate(state, cp)
            if late is not None and hit is not None and hit is not KEEP and not hit.note and any(
                    ev[1] is not None and ev[1][2] == late[2] for ev in hit.evidence):
                hit.note = f"Includes a result taken {_day(late[0])} that arrived late (after newer results)."
            self._diff(state, cp, rule, rule.id, hit, now, retract_ids, out)
        # a result that arrives can settle an overdue finding or unsettle completion: re-run
        # the clock check (the same outcome a timer tick at ``now`` would give)
        if state.active:
            touched = False
            for a in analytes:
                for sched in cp.schedule_by_analyte.get(a, ()):
                    if f"{OVERDUE_RULE}|{sched.group}" in state.active:
                        touched = True
            comp = cp.completion
            if comp is not None and comp.id in state.active and any(a in comp.analytes for a in analytes):
                touched = True
            if touched:
                self._clock(state, cp, now, out, retract_ids)
        return out

    def apply_treatment(self, state: PatientState, event: DoseEvent | SteroidEvent,
                        now: datetime | None = None) -> list[Finding]:
        """Record a dose or steroid-phase change and re-evaluate every rule.

        A dose record that arrives after results re-evaluates every post-dose result it now
        governs (pre-dose ones stay baselines) and surfaces a worse earlier result that an
        in-order stream would have raised, saying it was re-evaluated late."""
        if event.patient_id != state.patient_id:
            raise ValueError("event is for another patient")
        out: list[Finding] = []
        fresh = False  # a new or changed record (a replay re-surfaces nothing)
        if isinstance(event, DoseEvent):
            fresh = state.dose_at != epoch(event.administered_at) or state.product != event.product.value
            state.product = event.product.value
            state.dose_id = event.event_id
            state.birth = date_epoch(event.birth_date)
            state.weight = event.weight_kg
            state.ward = event.ward
            state.care_team = event.care_team
            state.set_dose(epoch(event.administered_at))
            cp = self.protocol_for(state)
            when = event.administered_at
            note = "Re-evaluated when the dose record arrived (after this result)."
            if cp is not None:
                for a, hot in cp.sustain.items():
                    if a in state.hist:
                        state.rebuild_run(a, hot)
                for a in list(state.ev) + [a for a in state.hist if a not in state.ev]:
                    cp.rejudge(state, a)
                if fresh:
                    self._surface_held(state, cp, note, now or when, out)
                for a, h in state.hist.items():  # the dose is known: back to the protocol's limits
                    lim = cp.history_limit(a)
                    if len(h) > lim:
                        del h[: len(h) - lim]
                state.first = None
                if self.no_dose is not None and self.no_dose[1].id in state.active:
                    ncp, rule = self.no_dose
                    self._diff(state, ncp, rule, rule.id, None, now or when, _EMPTY, out)
        else:
            fresh = [epoch(event.at), event.phase.value] not in state.steroid
            state.add_steroid(epoch(event.at), event.phase.value)
            when = event.at
            cp = self.protocol_for(state)
            note = "Re-evaluated when a steroid phase change recorded late (after this result) arrived."
            if fresh and cp is not None and state.dose_at is not None:
                self._surface_held(state, cp, note, now or when, out, since=epoch(event.at))
        late = fresh and state.dose_at is not None and any(
            h[-1][0] >= (state.dose_at if isinstance(event, DoseEvent) else epoch(event.at))
            for h in state.hist.values() if h)
        out += self._reevaluate(state, now or when, note if late else "")
        return out

    def reevaluate(self, state: PatientState, now: datetime) -> list[Finding]:
        """Evaluate every observation-driven rule against the current state."""
        return self._reevaluate(state, now, "")

    def _reevaluate(self, state: PatientState, now: datetime, note: str) -> list[Finding]:
        cp = self.protocol_for(state)
        if cp is None or state.dose_at is None:
            return []
        out: list[Finding] = []
        for rule in cp.obs_rules:
            hit = rule.evaluate(state, cp)
            if note and hit is not None and hit is not KEEP and not hit.note:
                hit.note = note
            self._diff(state, cp, rule, rule.id, hit, now, frozenset(), out)
        return out

    def check_schedule(self, state: PatientState, now: datetime) -> list[Finding]:
        """Clock-driven: overdue samples (``schedule.overdue``, one per schedule group),
        ``monitoring.complete``, and ``monitoring.no_dose_record`` for results of a patient
        with no (usable) dose record. Call from a timer; ``now`` is the clock, not an event time."""
        cp = self.protocol_for(state)
        out: list[Finding] = []
        if cp is None or state.dose_at is None:
            self._no_dose(state, now, out)
            return out
        self._clock(state, cp, now, out, _EMPTY)
        return out

    # -- internals ---------------------------------------------------------------
    def _clock(self, state: PatientState, cp: CompiledProtocol, now: datetime, out: list,
               retract_ids: frozenset) -> None:
        """Overdue per schedule group, then completion (withheld while anything is overdue)."""
        nowt = now.timestamp()
        comp = cp.completion
        comp_hit = comp.evaluate_at(state, cp, nowt) if comp is not None else None
        any_overdue = False
        for sched in cp.schedules:
            if self._overdue_one(state, cp, sched, nowt, now, out, comp_hit is not None):
                any_overdue = True
        if comp is not None:
            self._diff(state, cp, comp, comp.id, None if any_overdue else comp_hit, now, retract_ids, out)

    def _no_dose(self, state: PatientState, now: datetime, out: list) -> None:
        """Results held, no usable dose record, grace passed: ``monitoring.no_dose_record``."""
        if self.no_dose is None:
            return
        ncp, rule = self.no_dose
        hit = None
        first = state.first
        if first is None and state.dose_at is not None and state.hist:
            first = min(h[0][0] for h in state.hist.values() if h)
        if first is not None and now.timestamp() >= first + rule.grace:
            if state.dose_at is None:
                summary = (f"results held since {_day(first)} (first result's effective time) and no dose record "
                           f"after {rule.grace / 3600:g} h: no rule can evaluate them")
            else:
                summary = (f"the dose record names product {state.product}, for which no protocol is loaded: "
                           f"no rule can evaluate the results")
            hit = Hit(rule.rank, None, [], first, extra=f"first@{first}", summary=summary)
        self._diff(state, ncp, rule, rule.id, hit, now, _EMPTY, out)

    def _surface(self, state: PatientState, cp: CompiledProtocol, rule, candidates, note: str,
                 now: datetime, out: list) -> None:
        """Raise what ``rule`` said of an earlier result (a late one, or one re-evaluated after a
        late dose/steroid record) when it is worse than what the rule says now, so a critical
        result is never hidden behind a newer normal one. The current outcome follows."""
        best = None
        for a, e in candidates:
            h = rule.evaluate_entry(state, cp, a, e)
            if h is not None and (best is None or (h.rank, h.grade or 0) > (best.rank, best.grade or 0)):
                best = h
        if best is None:
            return
        cur = rule.evaluate(state, cp)
        prev = state.active.get(rule.id)
        levels = []
        if cur is not None:
            levels.append((cur.rank, cur.grade or 0))
        if prev is not None:
            levels.append((prev[0], prev[1] or 0))
        if levels and max(levels) >= (best.rank, best.grade or 0):
            return
        newest = max((state.hist[a][-1][0] for a in rule.analytes if state.hist.get(a)), default=best.t)
        best.t = max(best.t, newest)  # not older than what the alert already reflects
        best.note = note
        self._diff(state, cp, rule, rule.id, best, now, _EMPTY, out)

    def _surface_held(self, state: PatientState, cp: CompiledProtocol, note: str, now: datetime, out: list,
                      since: float | None = None) -> None:
        dose = state.dose_at
        for rule in cp.graded:
            cands = []
            for a in rule.analytes:
                h = state.hist.get(a)
                if not h:
                    continue
                seen = {h[-1][2]}
                for e in h[:-1] + state.ev.get(a, []):
                    if e[2] not in seen and e[0] >= dose and (since is None or e[0] >= since):
                        seen.add(e[2])
                        cands.append((a, e))
            if cands:
                self._surface(state, cp, rule, cands, note, now, out)

    def _overdue_one(self, state, cp, sched, nowt: float, now: datetime, out: list, complete: bool) -> bool:
        rule = cp.overdue
        if rule is None:
            return False
        key = f"{OVERDUE_RULE}|{sched.group}"
        hit = None
        items = sched.overdue(state, nowt, complete)
        if items:
            evidence = []
            for a, e, deadline in items:
                note = f"due by {from_epoch(deadline).isoformat()}"
                if e is None:
                    note = "no result since dosing; " + note
                evidence.append(Ev(a, e, None, None, "schedule", None, note))
            extra = ",".join(f"{a}@{int(d)}" for a, _, d in items)
            first = min(d for _, _, d in items)
            hit = Hit(rule.rank, None, evidence, first, extra=extra,
                          summary=f"{sched.group}: " + ", ".join(a for a, _, _ in items) + " overdue")
        self._diff(state, cp, rule, key, hit, now, _EMPTY, out, dedupe=sched.group)
        return hit is not None

    def _diff(self, state: PatientState, cp: CompiledProtocol, rule: CRule, key: str, hit: Hit | None,
              now: datetime, retract_ids: frozenset, out: list, dedupe: str = "") -> None:
        prev = state.active.get(key)
        if hit is KEEP:
            if not retract_ids or prev is None or not any(i in retract_ids for i in prev[2].split(" ")):
                return  # its results are no longer held: the finding stays as it is
            hit = None
        if hit is None:
            if prev is None:
                return
            del state.active[key]
            prev_ids = prev[2].split(" ") if prev[2] else []
            st = "retracted" if retract_ids and any(i in retract_ids for i in prev_ids) else "cleared"
            out.append(self._finding(state, cp, rule, dedupe, st, prev[0], prev[1] or None, None, prev[2], now))
            return
        ids = hit.ids()
        grade = hit.grade or 0
        if prev is not None and prev[0] == hit.rank and prev[1] == grade and prev[2] == ids:
            # same outcome; but a corrected value under the same id is news for the evidence
            if not retract_ids or not any(i in retract_ids for i in ids.split(" ")):
                return
        state.active[key] = [hit.rank, grade, ids]
        out.append(self._finding(state, cp, rule, dedupe, "present", hit.rank, hit.grade, hit, ids, now))

    def _finding(self, state: PatientState, cp: CompiledProtocol, rule: CRule, dedupe: str, st: str,
                 rank: int, grade, hit: Hit | None, ids: str, now: datetime) -> Finding:
        units = cp.units
        evidence: list[Evidence] = []
        if hit is not None:
            t = hit.t
            for analyte, e, limit, op, basis, ref, note in hit.evidence:
                unit = units.get(analyte)
                mult = None
                if ref not in (None, 0) and e is not None and basis not in ("absolute", "schedule", "score"):
                    mult = round(e[1] / ref, 3)
                evidence.append(Evidence(
                    observation_id=None if e is None else e[2], analyte=analyte,
                    value=None if e is None else e[1], unit=unit,
                    effective_at=None if e is None else from_epoch(e[0]),
                    limit=limit, limit_unit=unit if limit is not None else None,
                    comparison=op, basis=basis, multiple=mult,
                    note=note if note is None or isinstance(note, str) else f"item score {note}",
                ))
        else:
            # cleared / retracted: show the newest result of each analyte the rule reads
            t = None
            for a in rule.analytes:
                e = state.latest(a)
                if e is not None:
                    t = e[0] if t is None or e[0] > t else t
                    evidence.append(Evidence(observation_id=e[2], analyte=a, value=e[1], unit=units.get(a),
                                             effective_at=from_epoch(e[0]), note="newest result"))
            if t is None or st == "retracted" or rule.kind in ("overdue", "completion"):
                t = now.timestamp()
        sev = SEV_BY_RANK[rank]
        text = None
        if rule.text is not None:
            what = rule.text.what
            summary = _summary(rule, hit, grade, units) if hit is not None else None
            if st == "cleared" and rule.kind == "no_dose_record":
                what = f"Resolved: {rule.title} (the dose record arrived)."
            elif st == "cleared":
                what = f"Cleared: {rule.title}."
            elif st == "retracted":
                what = f"Retracted: {rule.title} (the result it rested on was corrected or withdrawn)."
            elif summary:
                what = f"{what} {summary}"
            if hit is not None and hit.note:
                what = f"{what} {hit.note}"
            text = FindingText(what=what, why=rule.text.why, action=rule.text.action)
        if st == "present":
            # ids plus values: a corrected value under the same observation id is a new finding
            basis_ids = ids + "|" + " ".join(sorted(f"{x.observation_id}={x.value}" for x in evidence))
        else:
            basis_ids = ids + "|" + " ".join(sorted(x.observation_id or "" for x in evidence))
        fid = finding_id(state.patient_id, rule.id, dedupe, st, rank, grade or 0, basis_ids)
        return Finding(
            finding_id=fid,
            patient_id=state.patient_id,
            rule_id=rule.id,
            dedupe_key=dedupe,
            state=st,
            severity=sev,
            grade=grade,
            evidence=evidence,
            protocol=cp.ref,
            effective_at=from_epoch(t),
            evaluated_at=now,
            route=rule.route,
            text=text,
            ward=state.ward,
            care_team=state.care_team,
            days_since_dose=None if state.dose_at is None else round((t - state.dose_at) / 86400.0, 2),
        )


def _holds(state: PatientState, analyte: str, e: tuple) -> bool:
    """The state holds this very result (same id, time and value)."""
    for src in (state.hist.get(analyte, ()), state.ev.get(analyte, ())):
        for x in src:
            if x[2] == e[2] and x[0] == e[0] and x[1] == e[1]:
                return True
    return False


def _newer(a: tuple, b: tuple) -> bool:
    """Entry ``a`` is later (by effective time, then id) than entry ``b``."""
    return (a[0], a[2]) > (b[0], b[2])


_LABEL = {"uln": "x ULN", "lln": "x LLN", "baseline": "x baseline", "previous": "x previous"}


def _fmt(v) -> str:
    return f"{v:.4g}" if isinstance(v, float) else str(v)


def _summary(rule: CRule, hit: Hit, grade, units: dict) -> str:
    if hit.summary:
        return hit.summary + "."
    parts = []
    for analyte, e, limit, op, basis, ref, note in hit.evidence:
        if e is None:
            continue
        s = f"{analyte} {_fmt(e[1])} {units.get(analyte, '')}".rstrip()
        if basis in _LABEL and ref:
            s += f" = {e[1] / ref:.2f}{_LABEL[basis]}"
        elif note:
            s += f" ({note})"
        parts.append(s)
    out = "; ".join(parts)
    if grade:
        out += f" (CTCAE grade {grade})"
    return out + "."
