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

import hmac
from datetime import datetime
from typing import Iterable, Mapping

from schemas.events import (
    RETRACTING_STATUSES,
    DoseEvent,
    Observation,
    ResultStatus,
    SteroidEvent,
)
from schemas.findings import WITHDRAWN_NOTE, Evidence, Finding, FindingText

from .censored import conflicts
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


def finding_id(patient_id: str, rule_id: str, dedupe_key: str, state: str, rank: int, grade, ids: str,
               key: bytes = b"") -> str:
    """Keyed (HMAC-SHA256 under ``key``, the deployment's pseudonym secret) so the id
    is no plain hash of the patient id (review H2); the worker builds its ``Engine`` with the key."""
    raw = f"{patient_id}\x1f{rule_id}\x1f{dedupe_key}\x1f{state}\x1f{rank}\x1f{grade}\x1f{ids}"
    # the one-shot HMAC (the same bytes as hmac.new(...).hexdigest(), without its Python object)
    return hmac.digest(key, raw.encode(), "sha256").hex()[:32]


class Engine:
    """Evaluate observations, treatment events and the clock against versioned protocols.

    ``protocols``: a ``Protocol``, an iterable of them, a mapping product -> Protocol, or
    ``None`` for the shipped defaults. The patient's product (from the dose event) picks
    the protocol.

    ``id_key``: HMAC key of finding ids (the worker passes PSEUDONYM_SECRET; see finding_id).
    """

    def __init__(self, protocols: Protocol | Iterable[Protocol] | Mapping[str, Protocol] | None = None, *,
                 id_key: bytes = b"") -> None:
        self.id_key = id_key
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
        self._dq_key_cache: dict[str, tuple] = {}
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
        out = self._evaluate_observation(state, obs, now)
        if obs.comparator is not None and out:
            out = [_note_censored(f, obs) for f in out]
        return out

    def _evaluate_observation(self, state: PatientState, obs: Observation, now: datetime) -> list[Finding]:
        if obs.patient_id != state.patient_id:
            raise ValueError("observation is for another patient")
        product = state.product
        cp = self.compiled.get(product) if product is not None else None
        status = obs.status
        retract_ids: frozenset = _EMPTY
        late = None
        plain = False  # a post-dose result that meets no composite condition
        analyte = obs.analyte
        analytes = [analyte]
        dq_out: list[Finding] = []  # data-quality findings (implausible range) of this result
        range_flagged = False  # this result's own range is implausible
        range_raised = False  # ... and the range_check finding now rests on it
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
                if cp is not None and cp.range_check is not None:
                    entry, range_flagged, range_raised = self._check_range(state, cp, obs.analyte, entry, now,
                                                                           retract_ids, dq_out)
            if obs.comparator is not None:
                unusable = self._censored(state, obs, entry, now, retract_ids)
                if unusable is not None:
                    return dq_out + unusable
            dose_at = state.dose_at
            if cp is not None and dose_at is not None:
                limit = cp.history_limit(analyte)
            else:  # no dose record yet: hold more, so a late dose still finds baselines and peaks
                limit = PRE_DOSE_LIMIT
                if state.first is None or t < state.first:
                    state.first = t
            h = state.hist.get(analyte)
            if h and (h[-1][0] > t or h[-1][0] == t and h[-1][2] > entry[2]) and not _holds(state, analyte, entry):
                late = entry  # older than a result already held, and not a replay: a late arrival
            state.insert(analyte, entry, limit)
            if cp is not None and dose_at is not None and analyte in cp.episode:
                if t >= dose_at:
                    state.drop_episode(analyte, entry[2])
                    plain = not cp.relevant(state, analyte, entry)
                    if not plain:
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
        out: list[Finding] = dq_out
        if state.active and any(k in state.active for a in analytes for k in self._dq_keys(a)):
            out = out + self._settle_censored(state, obs, analytes, retract_ids, now, range_flagged, range_raised)
        if cp is None or state.dose_at is None:
            return out
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
                if rule in cp.rejudged:  # the rules that can re-judge one result
                    self._surface(state, cp, rule, [(analyte, late)], note, now, out)
        # a plain new result (no retraction) cannot raise a composite rule that is not present:
        # hits rest on results that meet a condition, and a plain result only adds freshness;
        # except on the rule's ``plain_raisers`` (an ``unless`` analyte, or a marker no condition
        # names: ALF's bilirubin rising above ULN holds an earlier episode open). Skipping those
        # made the final alerts depend on arrival order (the marker rise arriving after the
        # results that resolved the episode left it resolved; in event order it stayed open).
        skip = plain and late is None and not retract_ids and len(analytes) == 1
        active = state.active
        for rule in rules:
            if skip and rule.kind == "composite" and rule.id not in active and analyte not in rule.plain_raisers:
                continue
            hit = self._settle_steroid(state, rule, rule.evaluate(state, cp), now)
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
            state.spo2_scale = event.spo2_scale
            state.set_dose(epoch(event.administered_at))
            cp = self.protocol_for(state)
            when = event.administered_at
            note = "Re-evaluated when the dose record arrived (after this result)."
            if cp is not None:
                if cp.range_check is not None:
                    self._check_held_ranges(state, cp, now or when, out)
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
            # the taper gate settles from the arrival of the record of the taper in force
            # (processing time); kept only while that taper is the newest change, so the state
            # does not depend on the order older records arrived in
            t_last, p_last = state.steroid[-1]
            if fresh and p_last == "taper" and t_last == epoch(event.at):
                state.srx = [t_last, int((now or event.at).timestamp())]
            elif state.srx is not None and state.srx[0] != t_last:
                state.srx = None
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
            hit = self._settle_steroid(state, rule, rule.evaluate(state, cp), now)
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

    # -- censored results (see alerts.censored) -----------------------------------
    def _dq_keys(self, analyte: str) -> tuple:
        """``state.active`` keys a data-quality finding about ``analyte`` would use (cached)."""
        keys = self._dq_key_cache.get(analyte)
        if keys is None:
            ids = {r.id for cp in self.compiled.values() for r in (cp.censored, cp.range_check) if r is not None}
            keys = self._dq_key_cache[analyte] = tuple(f"{i}|{analyte}" for i in sorted(ids))
        return keys

    def _censored_rule(self, state: PatientState) -> tuple[CompiledProtocol | None, CRule | None]:
        """The patient's protocol and its ``censored`` rule; before the dose event (protocol
        unknown) the first loaded protocol that has one, so the finding is never lost."""
        cp = self.protocol_for(state)
        if cp is not None and cp.censored is not None:
            return cp, cp.censored
        for c in self.compiled.values():
            if c.censored is not None:
                return c, c.censored
        return None, None

    def _censored(self, state: PatientState, obs: Observation, entry: tuple, now: datetime,
                  retract_ids: frozenset) -> list[Finding] | None:
        """A censored result some condition cannot decide at its bound: not used; raise the
        ``censored`` finding instead, unless a result of the analyte at least as new is held
        (in time order that one would have closed it: the finding must not depend on the
        order results arrive in). ``None``: the bound is usable (the caller stores it)."""
        cp = self.protocol_for(state)
        compiled = [cp] if cp is not None else list({id(c): c for c in self.compiled.values()}.values())
        found = conflicts(compiled, state, obs.analyte, entry, obs.comparator)
        if not found:
            return None
        dq_cp, rule = self._censored_rule(state)
        if rule is None:  # no protocol declares the rule: use the bound (conservative for its direction)
            return None
        a = obs.analyte
        unit = dq_cp.units.get(a, "")
        shown = f"{obs.comparator}{_fmt(entry[1])} {unit}".rstrip()
        note = f"reported as {shown}: a bound, not a value; not used"
        hit = Hit(rule.rank, None, [Ev(a, entry, None, obs.comparator, None, None, note)], entry[0],
                  extra=f"{a}@{entry[0]}",
                  summary=f"{a} reported as {shown}; cannot be graded safely against " + "; ".join(found))
        out: list[Finding] = []
        key = f"{rule.id}|{a}"
        # a newer usable result has already settled the question, and a newer censored one (by
        # time, then id) is the one the finding shows: in time order it would have come last
        if not _newer_held(state, a, entry) and not _shows_newer(state.active.get(key), a, entry):
            self._diff(state, dq_cp, rule, key, hit, now, retract_ids, out, dedupe=a)
        return out

    def _check_range(self, state: PatientState, cp: CompiledProtocol, a: str, entry: tuple,
                     now: datetime, retract_ids: frozenset, out: list) -> tuple[tuple, bool, bool]:
        """``_range_verdict`` on one result of analyte ``a`` as it arrives: (the entry to store,
        whether its range is implausible, whether the finding now rests on it). The
        ``range_check`` finding is raised for it only when no other result of the analyte at
        least as new is held (``_newer_held``): that one has already answered the question (a
        plausible range closed it, an implausible one holds it open), so the finding is the same
        whatever order the results arrived in. Of two implausible results of the same time, the
        finding shows the one with the larger id (the order ``hist`` keeps them in), whichever
        came first; a correction under the id the finding shows takes it over."""
        new_entry, hit = self._range_verdict(state, cp, a, entry)
        if hit is None:
            return entry, False, False
        rule = cp.range_check
        key = f"{rule.id}|{a}"
        if not _newer_held(state, a, entry) or _shows_earlier_twin(state.active.get(key), a, entry):
            self._diff(state, cp, rule, key, hit, now, retract_ids, out, dedupe=a)
            return new_entry, True, True
        return new_entry, True, False

    def _check_held_ranges(self, state: PatientState, cp: CompiledProtocol, now: datetime, out: list) -> None:
        """(When the dose record arrives.) The results held from before it, whose ranges could
        not be checked (no protocol, no age), are checked now as if they had arrived after it:
        their limits replaced where implausible, and the ``range_check`` finding raised for the
        newest result of each analyte (by time, then id) if its range is implausible and no
        result of the same time has a plausible one (as on arrival). A result checked before (a
        dose record sent again) gets the same verdict again: its replaced limits pass, or, for a
        limit kept as the more cautious one, the same hit, which changes no finding."""
        for a, h in state.hist.items():
            if not h:
                continue
            newest, last_t, settled = None, h[-1][0], False
            for i, e in enumerate(h):
                hit = None
                if e[3] is not None or e[4] is not None:
                    new_entry, hit = self._range_verdict(state, cp, a, e)
                if hit is None:
                    # a usable result at the newest time answers the question, whatever its id
                    settled = settled or e[0] == last_t
                    continue
                h[i] = new_entry
                b = state.base.get(a)
                if b is not None and b[2] == e[2]:
                    state.base[a] = new_entry
                if i == len(h) - 1:
                    newest = hit
            if newest is not None and not settled:
                rule = cp.range_check
                self._diff(state, cp, rule, f"{rule.id}|{a}", newest, now, _EMPTY, out, dedupe=a)

    def _range_verdict(self, state: PatientState, cp: CompiledProtocol, a: str, entry: tuple) -> tuple:
        """(The entry with the limits to grade against, the ``range_check`` hit or None when the
        result's range is plausible.)

        PS-10: a result's own range more than ``max_ratio`` away from the protocol's age
        default (a range in another unit, an adult range for an infant) would silently move
        ULN/LLN. Grade against the more alerting limits (lower ULN, higher LLN) and raise the
        ``range_check`` finding. An upper limit of 0 or below is implausible too: no multiple of
        it exists (every positive result would be "infinitely" above it, grade 4), so the
        result is graded against the age default's ULN, or, where the protocol has none for
        the patient's age, against no ULN at all (its ULN-based grades are not given, and the
        finding says so). So is a lower limit of 0 or below for an analyte a rule grades
        against its LLN (platelets, haemoglobin): no value is below it, so "below the LLN"
        could never be met; the age default's LLN is used instead."""
        rule = cp.range_check
        ranges = cp.ranges
        t, _, _, low, high = entry
        no_uln = high is not None and high <= 0 and (a in ranges.by_analyte or a in cp.by_analyte)
        no_lln = low is not None and low <= 0 and a in cp.lln_graded
        if a not in ranges.by_analyte and not no_uln and not no_lln:
            return entry, None  # no age default to compare with
        m = rule.max_ratio
        d_high = d_low = None
        bad = []
        if high is not None:
            d_high = ranges.get(a, state, t, 3)
        if no_uln:
            bad.append(("ULN", high, d_high or None))
        elif high is not None and high > 0:
            span = ranges.plausible_high(a, state, t) if a in ranges.plausible else None
            if span is not None:  # an age band's own plausible ULNs
                if not (span[0] <= high <= span[1]):
                    bad.append(("ULN", high, d_high))
            elif d_high and (high > d_high * m or high * m < d_high):
                bad.append(("ULN", high, d_high))
        if no_lln:  # no value of the analyte is below it: its LLN-based grades could never be given
            d_low = ranges.get(a, state, t, 2)
            bad.append(("LLN", low, d_low or None))
        elif low is not None and low > 0:
            d_low = ranges.get(a, state, t, 2)
            if d_low and (low > d_low * m or low * m < d_low):
                bad.append(("LLN", low, d_low))
        if not bad:
            return entry, None
        new_high = (d_high or None) if no_uln else high if high is None or d_high is None else min(high, d_high)
        new_low = (d_low or None) if no_lln else low if low is None or d_low is None else max(low, d_low)
        unit = cp.units.get(a, "")
        said = ", ".join(f"{n} {_fmt(v)} vs default {_fmt(d)} {unit}".rstrip() if d is not None
                         else f"{n} {_fmt(v)} {unit}".rstrip() + ", no default for this age" for n, v, d in bad)
        ungraded = [n for n, flag, v in (("a ULN", no_uln, new_high), ("an LLN", no_lln, new_low)) if flag and v is None]
        used = (f"graded against LLN {_fmt(new_low)} / ULN {_fmt(new_high)}" if not ungraded
                else f"not graded against {' or '.join(ungraded)} (the protocol has no default for this patient's "
                     f"age): send the lab's range")
        zero = " and ".join(w for w, f in (("upper", no_uln), ("lower", no_lln)) if f)
        hit = Hit(rule.rank, None, [Ev(a, entry, None, None, None, None,
                                       f"result's reference range is implausible: {said}; {used}")], t,
                  extra=f"{a}@{t}", summary=f"{a}: the result's {zero} reference limit is not above 0 ({said}); {used}"
                  if zero else f"{a}: the result's reference range differs from the protocol's "
                               f"age default by more than {m:g}x ({said}); {used}")
        return (t, entry[1], entry[2], new_low, new_high), hit

    def _settle_censored(self, state: PatientState, obs: Observation, analytes: list, retract_ids: frozenset,
                         now: datetime, range_flagged: bool = False, range_raised: bool = False) -> list[Finding]:
        """Close a data-quality finding (``censored``, ``range_check``) when its result is
        withdrawn or corrected (retracted) or a newer usable result of the analyte arrives
        (cleared)."""
        out: list[Finding] = []
        if not state.active:
            return out
        dq_cp, rule = self._censored_rule(state)
        if rule is not None:
            self._settle_dq(state, dq_cp, rule, obs, analytes, retract_ids, now, out)
        cp = self.protocol_for(state)
        if cp is not None and cp.range_check is not None:
            # a result whose own range is implausible answers nothing (only its withdrawal does)
            self._settle_dq(state, cp, cp.range_check, obs, analytes, retract_ids, now, out,
                            only_retractions=range_flagged, raised_now=range_raised)
        return out

    def _settle_dq(self, state: PatientState, dq_cp: CompiledProtocol, rule: CRule, obs: Observation,
                   analytes: list, retract_ids: frozenset, now: datetime, out: list,
                   only_retractions: bool = False, raised_now: bool = False) -> None:
        """``raised_now``: the result being processed has just raised or kept the finding (a
        correction under the same id whose range is still implausible): the retraction of the
        version it replaces does not close it."""
        for a in analytes:
            key = f"{rule.id}|{a}"
            prev = state.active.get(key)
            if prev is None:
                continue
            ids = prev[2].split(" ") if prev[2] else []
            if retract_ids and any(i in retract_ids for i in ids):
                if raised_now and obs.observation_id in ids:
                    continue
                self._diff(state, dq_cp, rule, key, None, now, retract_ids, out, dedupe=a)
                continue
            if only_retractions or obs.status in RETRACTING_STATUSES or obs.value is None or obs.analyte != a:
                continue
            if obs.observation_id in ids:
                continue  # the result that raised it (just re-raised, or replayed)
            t_cens = max((int(i.rsplit("@", 1)[1]) for i in ids if i.startswith(a + "@")), default=None)
            if t_cens is not None and int(round(obs.effective_at.timestamp())) >= t_cens:
                self._diff(state, dq_cp, rule, key, None, now, _EMPTY, out, dedupe=a)

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
        if state.srx is not None:
            for rule in cp.settling:  # a taper gate whose settling time has passed is judged now
                if rule.id not in state.active:
                    self._diff(state, cp, rule, rule.id,
                               self._settle_steroid(state, rule, rule.evaluate(state, cp), now), now, _EMPTY, out)

    @staticmethod
    def _settle_steroid(state: PatientState, rule: CRule, hit, now: datetime):
        """A taper gate not raised yet stays silent until its record has settled
        (``SteroidRuleC.unsettled``): results drawn before the taper may still be on their
        way, and judging it on an older result would raise an alert that depends on arrival
        order. The clock (``_clock``) raises it once settled."""
        if (hit is None or hit is KEEP or rule.kind != "steroid" or rule.id in state.active
                or not rule.unsettled(state, now.timestamp())):
            return hit
        return None

    def _no_dose(self, state: PatientState, now: datetime, out: list) -> None:
        """Results held, no usable dose record, grace passed: ``monitoring.no_dose_record``."""
        if self.no_dose is None:
            return
        ncp, rule = self.no_dose
        hit = None
        first = state.first
        if not any(state.hist.values()):
            first = None  # every result withdrawn: nothing waits for a dose record
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
        for rule in cp.rejudged:
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
            gone = [i for i in prev_ids if i in retract_ids] if retract_ids else []
            st = "retracted" if gone else "cleared"
            f = self._finding(state, cp, rule, dedupe, st, prev[0], prev[1] or None, None, prev[2], now)
            if gone:
                # name what was corrected away or withdrawn, so the alert lifecycle can tell an
                # alert that rested only on it (retracted) from one that had stood on earlier
                # valid results too (resolved: e.g. a real nadir, then a mistyped count)
                a = rule.analytes[0] if len(rule.analytes) == 1 else ""
                f = f.model_copy(update={"evidence": list(f.evidence) + [
                    Evidence(observation_id=i, analyte=a, note=WITHDRAWN_NOTE) for i in gone]})
            out.append(f)
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
            if t is None or st == "retracted" or rule.kind in ("overdue", "completion", "steroid"):
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
        fid = finding_id(state.patient_id, rule.id, dedupe, st, rank, grade or 0, basis_ids, self.id_key)
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


def _newer_held(state: PatientState, analyte: str, entry: tuple) -> bool:
    """Another result of ``analyte`` at least as new as ``entry`` (effective time) is held: the
    one a data-quality question about ``entry`` would already have been settled by (the
    settling rule closes on a usable result at the same time or later)."""
    h = state.hist.get(analyte)
    if h:
        for e in reversed(h):
            if e[2] != entry[2]:
                return e[0] >= entry[0]
    return False


def _shown(active: list | None, analyte: str) -> tuple | None:
    """``(t, observation id)`` of the result a present data-quality finding about ``analyte``
    rests on (its ``state.active`` value; its evidence ids are that result's id and
    ``analyte@t``), or None."""
    if active is None or not active[2]:
        return None
    t, oid = None, None
    for i in active[2].split(" "):
        if i.startswith(analyte + "@"):
            try:
                t = int(i[len(analyte) + 1:])
                continue
            except ValueError:
                pass
        oid = i
    return None if t is None or oid is None else (t, oid)


def _shows_newer(active: list | None, analyte: str, entry: tuple) -> bool:
    """The present data-quality finding about ``analyte`` rests on another result newer than
    ``entry`` by effective time, then observation id: in time order that one came last."""
    shown = _shown(active, analyte)
    return shown is not None and shown[1] != entry[2] and shown > (entry[0], entry[2])


def _shows_earlier_twin(active: list | None, analyte: str, entry: tuple) -> bool:
    """The present data-quality finding about ``analyte`` rests on a result of the same effective
    time as ``entry`` with a smaller observation id (in time order, then id, ``entry`` comes
    after it), or on the version ``entry`` corrects under the same id: the finding moves to
    ``entry``."""
    shown = _shown(active, analyte)
    return shown is not None and shown[0] == entry[0] and shown[1] <= entry[2]


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


def _note_censored(f: Finding, obs: Observation) -> Finding:
    """Say on the evidence (and in the text) that a result used at its bound was censored."""
    if not any(e.observation_id == obs.observation_id and e.note is None for e in f.evidence):
        return f
    shown = f"{obs.comparator}{_fmt(obs.value)} {obs.unit}".rstrip()
    note = f"reported as {shown}: graded at least as {_fmt(obs.value)}"
    ev = [e.model_copy(update={"note": note}) if e.observation_id == obs.observation_id and e.note is None else e
          for e in f.evidence]
    text = f.text
    if text is not None:
        text = text.model_copy(update={"what": f"{text.what} ({obs.analyte} {note}.)"})
    return f.model_copy(update={"evidence": ev, "text": text})


_LABEL = {"uln": "x ULN", "lln": "x LLN", "baseline": "x baseline", "previous": "x previous"}


def _fmt(v) -> str:
    if not isinstance(v, float):
        return str(v)
    s = f"{v:.4g}"
    return f"{v:.0f}" if "e+" in s else s  # 50000, not 5e+04, in a nurse's text


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
