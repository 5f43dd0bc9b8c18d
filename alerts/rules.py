"""Rule kinds, compiled from a ``Protocol`` into plain Python for the hot path.

No pydantic in the evaluation loop: ``compile_protocol`` turns the validated protocol
into small slotted objects with operator functions and per-analyte rule lists.

Pre-dose results are baselines, never evidence: every rule looks only at results taken at
or after the dose time (so the dose event does not raise alerts from pre-dose results).

Every ``evaluate`` is a pure function of the patient state (history, baselines,
treatment facts), never of arrival order: single-analyte rules look at the newest result
(by effective time), composite rules at each analyte's newest result within the rule's
window of the newest result of any of its analytes. So a late, older result never
overrides newer evidence, and the same results in any order give the same outcome.

An evaluation returns ``None`` (condition absent) or a ``Hit``:
``(severity_rank, grade, evidence, t)`` where evidence is a list of ``Ev`` items and
``t`` the event time of the newest evidence.
"""
from __future__ import annotations

import math
import operator
from bisect import bisect_left
from dataclasses import dataclass
from datetime import datetime, timezone
from decimal import Decimal
from typing import Callable

from schemas.analytes import catalogue
from schemas.findings import SEVERITY_ORDER, Severity

from .protocol import (
    GRADE_SEVERITY,
    PSEUDO_ITEM_ANALYTE,
    CensoredRule,
    CompletionRule,
    RangeCheckRule,
    SteroidRule,
    CompositeRule,
    Condition,
    DeltaRule,
    GradedRule,
    NoDoseRule,
    OverdueRule,
    Protocol,
    ScoreRule,
)
from .state import Entry, PatientState

OPS: dict[str, Callable[[float, float], bool]] = {
    ">": operator.gt, ">=": operator.ge, "<": operator.lt, "<=": operator.le,
}
B_ABS, B_ULN, B_LLN, B_BASE, B_SCORE, B_SCHEDULE = "absolute", "uln", "lln", "baseline", "score", "schedule"
SEV_BY_RANK = SEVERITY_ORDER
DAY = 86400.0
#: a value within this relative distance of a limit is compared exactly (decimal)
_NEAR = 1e-9


def meets(op: Callable, v: float, mult: float, ref: float) -> bool:
    """``v <op> mult x ref``, exact at the boundary (PS-16).

    Binary floating point misplaces exact CTCAE boundaries (1.5 x 1.2 = 1.7999999999999998,
    so bilirubin 1.8 with ULN 1.2 would grade 2 instead of 1). Far from the limit the float
    comparison is right; within a relative 1e-9 of it the numbers are compared as the
    decimals they were written as (shortest repr of each float), multiplied exactly."""
    lim = mult * ref
    d = v - lim
    if d > _NEAR * abs(lim) + 1e-300 or -d > _NEAR * abs(lim) + 1e-300:
        return op(v, lim)
    return op(Decimal(repr(float(v))), Decimal(repr(float(mult))) * Decimal(repr(float(ref))))


#: a composite rule whose episode results are no longer held: keep its finding as it is
KEEP = object()


def Ev(analyte, entry, limit=None, op=None, basis=None, ref=None, note=None) -> tuple:
    """One piece of evidence, a plain tuple (analyte, entry, limit, op, basis, ref, note);
    turned into ``schemas.findings.Evidence`` only when a finding is emitted."""
    return (analyte, entry, limit, op, basis, ref, note)


class Hit:
    __slots__ = ("rank", "grade", "evidence", "t", "extra", "summary", "note")

    def __init__(self, rank: int, grade: int | None, evidence: list[Ev], t: float, extra: str = "", summary: str = "",
                 note: str = ""):
        self.rank = rank
        self.grade = grade
        self.evidence = evidence
        self.t = t
        self.extra = extra
        self.summary = summary
        #: appended to the finding's text (e.g. "arrived late", "no longer evaluable")
        self.note = note

    def ids(self) -> str:
        ids = [e[1][2] for e in self.evidence if e[1] is not None]
        if self.extra:
            ids.append(self.extra)
        return " ".join(sorted(set(ids)))


# -- reference values ------------------------------------------------------------

class Ranges:
    """Age-banded default reference ranges: analyte -> [(min_months, max_months, low, high)]."""

    __slots__ = ("by_analyte", "plausible")

    def __init__(self, protocol: Protocol) -> None:
        self.by_analyte = {
            a: [(b.min_months, b.max_months, b.low, b.high) for b in bands]
            for a, bands in protocol.reference_ranges.items()
        }
        #: analyte -> [(min_months, max_months, (lo, hi))]: plausible ULNs of a lab's own range
        self.plausible = {
            a: [(b.min_months, b.max_months, tuple(b.plausible_high)) for b in bands if b.plausible_high]
            for a, bands in protocol.reference_ranges.items() if any(b.plausible_high for b in bands)
        }

    def plausible_high(self, analyte: str, st: PatientState, t: float) -> tuple[float, float] | None:
        bands = self.plausible.get(analyte)
        if not bands or st.birth is None:
            return None
        age = (t - st.birth) / 2629800.0
        for lo_m, hi_m, pair in bands:
            if lo_m <= age < hi_m:
                return pair
        return None

    def get(self, analyte: str, st: PatientState, t: float, idx: int) -> float | None:
        bands = self.by_analyte.get(analyte)
        if not bands:
            return None
        if st.birth is None:
            if len(bands) == 1:
                return bands[0][idx]
            return None
        age = (t - st.birth) / 2629800.0
        for lo_m, hi_m, low, high in bands:
            if lo_m <= age < hi_m:
                return low if idx == 2 else high
        return None


def uln(ranges: Ranges, st: PatientState, analyte: str, e: Entry) -> float | None:
    """The result's own ULN, else the age default's. A ULN of 0 or below is no limit: no
    multiple of it exists, so the default stands in (after the dose the engine's range check
    has already replaced it and said so; a result held from before the dose, whose range was
    not checked, would otherwise make every baseline "abnormal")."""
    hi = e[4]
    return hi if hi is not None and hi > 0 else ranges.get(analyte, st, e[0], 3)


def lln(ranges: Ranges, st: PatientState, analyte: str, e: Entry) -> float | None:
    """The result's own LLN, else the age default's; an LLN of 0 or below, which no value can
    be below, is no limit either (only LLN-graded analytes ask for one)."""
    lo = e[3]
    return lo if lo is not None and lo > 0 else ranges.get(analyte, st, e[0], 2)


def reference(ranges: Ranges, st: PatientState, analyte: str, e: Entry, basis: str) -> float | None:
    """The value a multiple is taken of (ULN, LLN, baseline), or 1 for absolute limits."""
    if basis == B_ABS:
        return 1.0
    if basis == B_ULN:
        return uln(ranges, st, analyte, e)
    if basis == B_LLN:
        return lln(ranges, st, analyte, e)
    b = usable_baseline(st, analyte)
    return None if b is None else b[1]


def usable_baseline(st: PatientState, analyte: str) -> Entry | None:
    """The baseline a multiple can be taken of: a pre-dose result above 0. A result of 0 (a
    lab's "not detected" sent as a number, a transcription error) makes every later result
    "1.5 x baseline" and no ratio exists: the analyte is judged as without a baseline, by
    the conditions on its reference range (``only_without_baseline``)."""
    b = st.base.get(analyte)
    return b if b is not None and b[1] > 0 else None


def _multiple(v: float, ref: float) -> float:
    """``v`` as a multiple of ``ref`` to rank results by (a reference of 0, as a result's own
    range can send, ranks by the sign of ``v``)."""
    return v / ref if ref else math.copysign(math.inf, v) if v else 0.0


def baseline_abnormal(ranges: Ranges, st: PatientState, analyte: str) -> bool:
    """CTCAE/admiral: baseline above its ULN (BNRIND high)."""
    b = st.base.get(analyte)
    if b is None:
        return False
    hi = uln(ranges, st, analyte, b)
    return hi is not None and b[1] > hi


# -- compiled rules --------------------------------------------------------------

class CRule:
    """Common compiled rule fields."""

    __slots__ = ("id", "kind", "route", "severity", "text", "title", "analytes", "days", "phases", "key", "ages")

    def __init__(self, r) -> None:
        self.id = r.id
        self.kind = r.kind
        self.route = r.route
        self.severity = r.severity
        self.text = r.text
        self.title = r.title
        self.analytes: tuple[str, ...] = ()
        self.days = tuple(r.active.days_since_dose) if r.active and r.active.days_since_dose else None
        self.phases = frozenset(r.active.steroid_phases) if r.active and r.active.steroid_phases else None
        self.ages = tuple(r.active.age_months) if r.active and r.active.age_months else None
        self.key = r.id

    def active_at(self, st: PatientState, t: float) -> bool:
        if self.days is not None:
            if st.dose_at is None:
                return False
            d = (t - st.dose_at) / DAY
            if not (self.days[0] <= d < self.days[1]):
                return False
        if self.phases is not None:
            if st.steroid_at(t)[0] not in self.phases:
                return False
        if self.ages is not None and st.birth is not None:
            age = (t - st.birth) / 2629800.0
            if not (self.ages[0] <= age < self.ages[1]):
                return False
        return True

    def evaluate(self, st: PatientState, cp: "CompiledProtocol") -> Hit | None:  # pragma: no cover
        raise NotImplementedError


class CBand:
    __slots__ = ("op", "ops", "value", "basis", "grade", "rank", "for_s", "only", "any_baseline")

    def __init__(self, b) -> None:
        self.op = OPS[b.op]
        self.ops = b.op
        self.value = b.value
        self.basis = b.basis
        self.grade = b.grade
        self.only = frozenset(b.analytes) if b.analytes else None
        self.any_baseline = b.any_baseline
        self.for_s = None if b.for_hours is None else b.for_hours * 3600.0
        sev = b.severity if b.severity is not None else GRADE_SEVERITY[b.grade]
        self.rank = Severity(sev).rank


def _sorted_bands(bands) -> tuple[CBand, ...]:
    cb = [CBand(b) for b in bands]
    cb.sort(key=lambda b: (b.rank, b.grade or 0), reverse=True)
    return tuple(cb)


class GradedRuleC(CRule):
    __slots__ = ("bands", "abn_bands")

    def __init__(self, r: GradedRule) -> None:
        super().__init__(r)
        self.analytes = tuple(r.analytes)
        self.bands = _sorted_bands(r.bands)
        if r.abnormal_baseline_bands:
            # bands marked any_baseline (an absolute escalation) stay when the baseline is abnormal
            self.abn_bands = _sorted_bands(list(r.abnormal_baseline_bands) + [b for b in r.bands if b.any_baseline])
        else:
            self.abn_bands = None

    def grade_entry(self, st, cp, a: str, e: Entry, evidence: list) -> tuple | None:
        """(rank, grade) of one result (evidence appended), or None when no band holds."""
        ranges = cp.ranges
        v = e[1]
        bands = self.bands
        if self.abn_bands is not None and baseline_abnormal(ranges, st, a):
            bands = self.abn_bands
        for b in bands:
            if b.only is not None and a not in b.only:
                continue
            basis = b.basis
            if basis == B_ABS:
                ref = 1.0
            elif basis == B_ULN:
                ref = e[4] if e[4] is not None and e[4] > 0 else ranges.get(a, st, e[0], 3)  # uln()
            else:
                ref = reference(ranges, st, a, e, basis)
            if ref is None:
                continue
            lim = b.value * ref
            d = v - lim
            if (b.op(v, lim) if d > _NEAR * abs(lim) or -d > _NEAR * abs(lim) else meets(b.op, v, b.value, ref)):
                if b.for_s is not None:
                    run = st.runs.get(a)
                    if run is None or run[3] != e[0] or run[3] - run[0] <= b.for_s:
                        continue  # not sustained long enough: a lower band decides
                    evidence.append((a, (run[0], run[1], run[2], None, None), lim, b.ops, basis, ref,
                                     f"first reading of this episode; sustained > {b.for_s / 3600:g} h"))
                evidence.append((a, e, lim, b.ops, basis, ref, None))
                return b.rank, b.grade
        return None

    def evaluate(self, st, cp):
        hist = st.hist
        best_rank = -1
        best_grade = None
        evidence = None
        t = None
        dose = st.dose_at if st.dose_at is not None else -1e18
        for a in self.analytes:
            h = hist.get(a)
            if not h:
                continue
            e = h[-1]
            if e[0] >= dose and (t is None or e[0] > t):
                t = e[0]
        if t is None or (self.days is not None or self.phases is not None or self.ages is not None) \
                and not self.active_at(st, t):
            return None
        for a in self.analytes:
            h = hist.get(a)
            if not h:
                continue
            e = h[-1]
            if e[0] < dose:
                continue  # a pre-dose result is a baseline, not evidence
            if evidence is None:
                evidence = []
            got = self.grade_entry(st, cp, a, e, evidence)
            if got is not None:
                rank, grade = got
                if rank > best_rank or (rank == best_rank and (grade or 0) > (best_grade or 0)):
                    best_rank, best_grade = rank, grade
        if not evidence:
            return None
        return Hit(best_rank, best_grade, evidence, max(ev[1][0] for ev in evidence))

    def evaluate_entry(self, st, cp, a: str, e: Entry) -> Hit | None:
        """What the rule said of ``e`` when it was the newest result (a late or re-evaluated
        result): the same bands, at the result's own event time."""
        if st.dose_at is None or e[0] < st.dose_at:
            return None
        if (self.days is not None or self.phases is not None or self.ages is not None) and not self.active_at(st, e[0]):
            return None
        evidence: list = []
        got = self.grade_entry(st, cp, a, e, evidence)
        if got is None:
            return None
        return Hit(got[0], got[1], evidence, e[0])


class CCond:
    __slots__ = ("analyte", "op", "ops", "value", "basis", "newest", "min_count", "no_base", "by_age", "direction")

    def __init__(self, c: Condition) -> None:
        self.analyte = c.analyte
        self.op = OPS[c.op]
        self.ops = c.op
        self.value = c.value
        self.basis = c.basis
        self.newest = c.use == "newest"
        self.min_count = c.min_count
        self.no_base = c.only_without_baseline
        self.by_age = tuple((x.min_months, x.max_months, x.value) for x in c.by_age) if c.by_age else None
        self.direction = -1 if c.op in ("<", "<=") else 1

    def limit(self, st: PatientState, cp: "CompiledProtocol", e: Entry) -> tuple | None:
        """(multiple, reference) for result ``e``, or None when it cannot be judged."""
        if self.by_age is not None:
            if st.birth is None:
                return None
            age = (e[0] - st.birth) / 2629800.0
            for lo, hi, v in self.by_age:
                if lo <= age < hi:
                    return v, 1.0
            return None
        ref = reference(cp.ranges, st, self.analyte, e, self.basis)
        return None if ref is None else (self.value, ref)

    def meeting_times(self, st: PatientState, cp: "CompiledProtocol", es: list) -> list:
        """The times of the results ``es`` that meet the condition (``limit`` then ``meets``
        on each, in order; a result that cannot be judged does not meet it). The common
        case (a multiple of the ULN, no age bands) inlines both."""
        if self.by_age is not None or self.basis != B_ULN:
            out = []
            for e in es:
                lr = self.limit(st, cp, e)
                if lr is not None and meets(self.op, e[1], lr[0], lr[1]):
                    out.append(e[0])
            return out
        ranges, a, op, mult = cp.ranges, self.analyte, self.op, self.value
        out = []
        for e in es:
            ref = e[4] if e[4] is not None and e[4] > 0 else ranges.get(a, st, e[0], 3)  # uln()
            if ref is None:
                continue
            v = e[1]
            lim = mult * ref
            d = v - lim
            near = _NEAR * abs(lim) + 1e-300
            if op(v, lim) if (d > near or -d > near) else meets(op, v, mult, ref):
                out.append(e[0])
        return out

    def holds(self, st: PatientState, cp: "CompiledProtocol", e: Entry):
        """True / False for one result; None when it cannot be judged."""
        if self.no_base and usable_baseline(st, self.analyte) is not None:
            return False
        lr = self.limit(st, cp, e)
        if lr is None:
            return None
        return meets(self.op, e[1], lr[0], lr[1])


def _compile_expr(e):
    if isinstance(e, Condition):
        return CCond(e)
    if e.all is not None:
        return ("all", tuple(_compile_expr(x) for x in e.all))
    return ("any", tuple(_compile_expr(x) for x in e.any))


def _expr_analytes(e, out: set) -> set:
    if isinstance(e, CCond):
        out.add(e.analyte)
    else:
        for x in e[1]:
            _expr_analytes(x, out)
    return out


def basis_analytes(node, basis: str, analytes: tuple = (), out: set | None = None) -> set:
    """The analytes a protocol's rules (their JSON) read against ``basis`` anywhere: a band's or
    condition's own ``analyte``/``analytes``, else the rule's."""
    if out is None:
        out = set()
    if isinstance(node, dict):
        own = node.get("analytes") or ([node["analyte"]] if node.get("analyte") else None)
        if own:
            analytes = tuple(own)
        if node.get("basis") == basis:
            out.update(analytes)
        for v in node.values():
            basis_analytes(v, basis, analytes, out)
    elif isinstance(node, list):
        for v in node:
            basis_analytes(v, basis, analytes, out)
    return out


def _expr_conds(e, out: list) -> list:
    if isinstance(e, CCond):
        out.append(e)
    else:
        for x in e[1]:
            _expr_conds(x, out)
    return out


def _ev(c: CCond, e: Entry, lr: tuple, note=None) -> tuple:
    return (c.analyte, e, lr[0] * lr[1], c.ops, B_ABS if c.by_age is not None else c.basis, lr[1], note)


def _group(kind, members, leaf, evidence):
    """Three-valued all/any over members; evidence only from members that hold."""
    if kind == "all":
        res = True
        local: list | None = [] if evidence is not None else None
        for m in members:
            r = leaf(m, local) if isinstance(m, CCond) else _group(m[0], m[1], leaf, local)
            if r is False:
                return False
            if r is None:
                res = None
        if res is True and local:
            evidence.extend(local)
        return res
    res = False
    for m in members:
        local = [] if evidence is not None else None
        r = leaf(m, local) if isinstance(m, CCond) else _group(m[0], m[1], leaf, local)
        if r is True:
            res = True  # keep evaluating: every true member is evidence
            if local:
                evidence.extend(local)
        elif r is None and res is False:
            res = None
    return res


def eval_expr(expr, st: PatientState, cp: "CompiledProtocol", since: float | None, evidence: list | None):
    """Three-valued on each analyte's NEWEST result (completion criteria): True, False or
    None (no result, no reference, outside the window)."""

    def leaf(c: CCond, ev):
        h = st.hist.get(c.analyte)
        if not h:
            return None
        e = h[-1]
        if since is not None and e[0] < since:
            return None
        if c.no_base and usable_baseline(st, c.analyte) is not None:
            return False
        lr = c.limit(st, cp, e)
        if lr is None:
            return None
        ok = meets(c.op, e[1], lr[0], lr[1])
        if ok and ev is not None:
            ev.append(_ev(c, e, lr))
        return ok

    if isinstance(expr, CCond):
        return leaf(expr, evidence)
    return _group(expr[0], expr[1], leaf, evidence)


def held(st: PatientState, analyte: str, lo: float, hi: float) -> list:
    """Every result of ``analyte`` held (history, episode results, baseline) with
    lo <= t <= hi, oldest first, one per observation id."""
    out: dict = {}
    for src in (st.hist.get(analyte, ()), st.ev.get(analyte, ())):
        for e in src:
            if lo <= e[0] <= hi:
                out[e[2]] = e
    b = st.base.get(analyte)
    if b is not None and lo <= b[0] <= hi:
        out.setdefault(b[2], b)
    if len(out) <= 1:
        return list(out.values())
    return sorted(out.values(), key=lambda e: (e[0], e[2]))


def eval_window(expr, st: PatientState, cp: "CompiledProtocol", lo: float, hi: float, evidence: list | None,
                newest: bool = False):
    """Three-valued over the results held within [lo, hi]: a condition holds when any result
    in the window meets it (``use: newest``: the newest one; ``min_count``: that many). The
    evidence is the most extreme result that meets it (the window's peak, or nadir), or the
    newest ``min_count`` ones."""

    cache: dict[str, list] = {}  # the state does not change during one evaluation

    def leaf(c: CCond, ev):
        es = cache.get(c.analyte)
        if es is None:
            es = cache[c.analyte] = held(st, c.analyte, lo, hi)
        if not es:
            return None
        if c.no_base and usable_baseline(st, c.analyte) is not None:
            return False
        if newest or c.newest:
            es = es[-1:]
        known = False
        hits = []
        for e in es:
            lr = c.limit(st, cp, e)
            if lr is None:
                continue
            known = True
            if meets(c.op, e[1], lr[0], lr[1]):
                hits.append((e, lr))
        if len(hits) >= c.min_count:
            if ev is not None:
                if c.min_count > 1:
                    note = f"{c.min_count} results within the window meet it"
                    ev.extend(_ev(c, e, lr, note) for e, lr in hits[-c.min_count:])
                else:
                    key = ((lambda x: _multiple(x[0][1], x[1][1])) if c.direction > 0
                           else (lambda x: -_multiple(x[0][1], x[1][1])))
                    e, lr = max(hits, key=lambda x: (key(x), x[0][0]))
                    ev.append(_ev(c, e, lr, "peak within the window" if len(hits) > 1 and c.direction > 0 else
                                  ("nadir within the window" if len(hits) > 1 else None)))
            return True
        return False if known else None

    if isinstance(expr, CCond):
        return leaf(expr, evidence)
    return _group(expr[0], expr[1], leaf, evidence)


def _is_held(st: PatientState, oid: str) -> bool:
    for src in (st.hist, st.ev):
        for lst in src.values():
            for e in lst:
                if e[2] == oid:
                    return True
    return False


def _day(t: float) -> str:
    return datetime.fromtimestamp(t, tz=timezone.utc).strftime("%Y-%m-%d %H:%M UTC")


def _simplify_possible(expr, st: PatientState, cp: "CompiledProtocol", dose: float,
                       held_by: dict[str, list], member_analytes: dict) -> object:
    """``CompositeRuleC._possible``'s tree: each condition of ``expr`` replaced by the sorted
    times of the post-dose results held that meet it, None where nothing can. A module
    function, not a closure calling itself: such a closure is a reference cycle, garbage
    only the cyclic collector frees (one per evaluation, with the patient state it holds)."""
    if isinstance(expr, CCond):
        if expr.no_base and usable_baseline(st, expr.analyte) is not None:
            return None
        es = held_by.get(expr.analyte)
        if es is None:
            es = held_by[expr.analyte] = held(st, expr.analyte, dose, 1e18)
        return expr.meeting_times(st, cp, es) or None  # oldest first
    if expr[0] == "all":
        # a member none of whose analytes is held at all is None (every condition in
        # it is), and so is the whole ``all``: decided before judging the others
        hist, ev, base = st.hist, st.ev, st.base
        for m in expr[1]:
            if not any(a in hist or a in ev or a in base for a in member_analytes[id(m)]):
                return None
    parts = []
    for m in expr[1]:
        r = _simplify_possible(m, st, cp, dose, held_by, member_analytes)
        if r is None:
            if expr[0] == "all":
                return None
            continue
        parts.append(r)
    return (expr[0], parts) if parts else None


def _met_within(x, lo: float, hi: float) -> bool:
    """Whether ``_simplify_possible``'s tree ``x`` holds with results in [lo, hi]."""
    if isinstance(x, list):  # times of the results meeting one condition, sorted
        i = bisect_left(x, lo)
        return i < len(x) and x[i] <= hi
    if x[0] == "all":
        for m in x[1]:
            if not _met_within(m, lo, hi):
                return False
        return True
    for m in x[1]:
        if _met_within(m, lo, hi):
            return True
    return False


class CompositeRuleC(CRule):
    """Conditions over several analytes within an event-time window, episode-aware.

    The rule is judged at the newest result of its ``when`` analytes, over every result held
    within the window before it (peaks count, not only the newest values). When that fails,
    the newest earlier window where it held (an episode, found among the held episode
    results) decides: the finding RESOLVES only when every analyte it rested on has a fresh
    result since and none of its markers is still worsening; otherwise it stays present,
    saying it is no longer evaluable (staleness is not resolution). A result of an analyte
    the rule does not pair on (a lone ALP, a blood pressure on another day) never clears it."""

    __slots__ = ("when", "unless", "window", "rank", "when_analytes", "unless_at_onset", "markers", "directions",
                 "conds_by_analyte", "need", "unless_analytes", "plain_raisers", "member_analytes")

    def __init__(self, r: CompositeRule) -> None:
        super().__init__(r)
        self.when = _compile_expr(r.when)
        self.unless = _compile_expr(r.unless) if r.unless is not None else None
        self.when_analytes = tuple(sorted(_expr_analytes(self.when, set())))
        self.unless_analytes = frozenset(_expr_analytes(self.unless, set())) if self.unless is not None else frozenset()
        an = set(self.when_analytes)
        if self.unless is not None:
            _expr_analytes(self.unless, an)
        self.markers = tuple(r.markers) if r.markers else self.when_analytes
        an.update(self.markers)
        self.analytes = tuple(sorted(an))
        self.window = r.window_days * DAY
        self.rank = r.severity.rank
        self.unless_at_onset = r.unless_at_onset
        self.directions: dict[str, int] = {}
        #: analyte sets of which each must hold an episode result for the condition to be
        #: possible (the members of a top-level `all`; else all analytes as one set)
        if isinstance(self.when, tuple) and self.when[0] == "all":
            self.need = tuple(frozenset(_expr_analytes(m, set())) for m in self.when[1])
        else:
            self.need = (frozenset(self.when_analytes),)
        self.conds_by_analyte: dict[str, list[CCond]] = {}
        for c in _expr_conds(self.when, []):
            self.directions.setdefault(c.analyte, c.direction)
            self.conds_by_analyte.setdefault(c.analyte, []).append(c)
        #: analytes whose "plain" results (meeting no composite condition) can still turn the
        #: rule from absent to present, so the engine must not skip it for them: those of
        #: ``unless`` (a newer normal ALP lifts the exclusion) and the markers no condition
        #: names (ALF: bilirubin above ULN and rising holds an episode open although it meets
        #: no ALF condition). A plain result of an analyte with conditions only adds
        #: freshness, or a newest value that fails ``use: newest`` (never a worsening marker:
        #: that must still meet a condition).
        self.plain_raisers = self.unless_analytes | frozenset(m for m in self.markers
                                                              if m not in self.conds_by_analyte)
        #: id of every sub-expression of ``when`` -> the analytes it reads (``_possible``)
        self.member_analytes: dict[int, frozenset] = {}

        def index(x) -> None:
            self.member_analytes[id(x)] = frozenset(_expr_analytes(x, set()))
            if not isinstance(x, CCond):
                for m in x[1]:
                    index(m)
        index(self.when)

    def eval_at(self, st: PatientState, cp: "CompiledProtocol", t: float) -> Hit | None:
        dose = st.dose_at
        lo = t - self.window
        if lo < dose:
            lo = dose  # pre-dose results are baselines, not evidence
        if not self.active_at(st, t):
            return None
        evidence: list[Ev] = []
        if eval_window(self.when, st, cp, lo, t, evidence) is not True:
            return None
        # one item per observation (an analyte may satisfy two members: keep the first)
        seen, uniq = set(), []
        for ev in evidence:
            k = ev[1][2]
            if k not in seen:
                seen.add(k)
                uniq.append(ev)
        if self.unless is not None:
            if self.unless_at_onset:
                # onset: the earliest result within the window that meets a `when` condition
                # (not the peak's time: the injury began with its first abnormal result)
                onset = min(ev[1][0] for ev in uniq)
                for a, conds in self.conds_by_analyte.items():
                    for e in held(st, a, lo, onset):
                        if e[0] < onset and any(c.holds(st, cp, e) for c in conds):
                            onset = e[0]
                            break
                if eval_window(self.unless, st, cp, onset - self.window, onset, None, newest=True) is True:
                    return None
            elif eval_window(self.unless, st, cp, lo, t, None, newest=True) is True:
                return None
        return Hit(self.rank, None, uniq, max(ev[1][0] for ev in uniq))

    def _possible(self, st: PatientState, cp: "CompiledProtocol", dose: float) -> Callable[[float], bool] | None:
        """A necessary condition for ``eval_at(t)`` to hit, cheap per ``t``: the ``when``
        expression with each condition replaced by "some post-dose result held meets it
        within the window [max(t - window, dose), t]" (and False where ``eval_window``'s
        leaf is False: ``only_without_baseline`` with a baseline held). ``eval_window``'s
        leaf can only be True when such a result exists (``use: newest`` and ``min_count``
        ask more), ``all`` needs every member True and ``any`` one, so a time for which this
        is False cannot hit and the episode search skips it without changing its outcome.
        Which results meet a condition does not depend on the window, so they are judged
        once per evaluation instead of once per candidate time (the search was quadratic in
        the episode results held). None: no time can hit (no member of an ``all`` has a
        meeting result at all, or no member of an ``any``)."""
        tree = _simplify_possible(self.when, st, cp, dose, {}, self.member_analytes)
        if tree is None:
            return None
        window = self.window

        def possible(t: float) -> bool:
            lo = t - window
            return _met_within(tree, lo if lo > dose else dose, t)

        return possible

    def _worsening(self, st: PatientState, cp: "CompiledProtocol", dose: float) -> list[str]:
        """Markers whose newest result is worse than the previous one and still abnormal:
        meeting one of the rule's conditions on that analyte, or beyond its reference limit
        for a marker the conditions do not name (e.g. bilirubin for the ALF signature)."""
        out = []
        for m in self.markers:
            es = held(st, m, dose, 1e18)
            if len(es) < 2:
                continue
            new, prev = es[-1], es[-2]
            d = self.directions.get(m, 1)
            if d * (new[1] - prev[1]) <= 0:
                continue
            conds = self.conds_by_analyte.get(m)
            if conds:
                bad = any(c.holds(st, cp, new) for c in conds)
            else:
                ref = (uln if d > 0 else lln)(cp.ranges, st, m, new)
                bad = ref is None or (new[1] > ref if d > 0 else new[1] < ref)
            if bad:
                out.append(f"{m} {prev[1]:g} -> {new[1]:g}")
        return out

    def evaluate(self, st, cp):
        dose = st.dose_at
        if dose is None:
            return None
        ev = st.ev
        if self.id not in st.active:
            # every post-dose result that meets a condition is an episode result: when a
            # member of the condition has none held, no episode is possible (the common
            # case, decided without building any window)
            for group in self.need:
                for a in group:
                    if a in ev:
                        break
                else:
                    return None
        t = None
        hist = st.hist
        for a in self.when_analytes:
            h = hist.get(a)
            if h and h[-1][0] >= dose and (t is None or h[-1][0] > t):
                t = h[-1][0]
        if t is None:
            return None
        # the earlier episodes' times among the held episode results
        cands = set()
        for a in self.when_analytes:
            for e in st.ev.get(a, ()):
                if dose <= e[0] < t:
                    cands.add(e[0])
        # with several, a necessary condition judged once (_possible): when no held result
        # meets what the condition needs, no time can hit (e.g. ALF's "> 20x ULN" or "INR
        # >= 1.5" for a patient whose ALT stays 4-8x ULN: every window was built and searched)
        possible = self._possible(st, cp, dose) if len(cands) > 1 else (lambda ti: True)
        if possible is None and self.id not in st.active:
            return None
        hit = self.eval_at(st, cp, t) if possible is not None and possible(t) else None
        if hit is not None:
            return hit
        ep = None
        if possible is not None:  # None: no candidate time can hit
            for ti in sorted(cands, reverse=True):
                if not possible(ti):
                    continue  # no result in that window meets what the condition needs: no hit there
                ep = self.eval_at(st, cp, ti)
                if ep is not None:
                    break
        if ep is None:
            prev = st.active.get(self.id)
            ids = [i for i in prev[2].split(" ") if not i.startswith("stale")] if prev is not None and prev[2] else []
            if ids and not all(_is_held(st, i) for i in ids):
                return KEEP  # the results it rested on are no longer held: keep it as it is
            return None
        t_e = ep.t
        stale = []
        for a in sorted({ev[0] for ev in ep.evidence}):
            h = hist.get(a)
            if not h or h[-1][0] <= t_e:
                stale.append(a)
        worse = self._worsening(st, cp, dose)
        if not stale and not worse:
            return None  # fresh results of everything it rested on, nothing worsening: resolved
        if worse:
            note = (f"Held open: {', '.join(worse)} still worsening although the condition "
                    f"was last met on {_day(t_e)}.")
        elif t - t_e > self.window:
            note = (f"No longer evaluable (results older than {self.window / DAY:g} days): last met on "
                    f"{_day(t_e)}; awaiting fresh {', '.join(stale)}. It stays open until fresh results "
                    f"show resolution or a clinician resolves it.")
        else:
            note = (f"No longer confirmed by the newest results (last met on {_day(t_e)}); awaiting fresh "
                    f"{', '.join(stale)}. It stays open until fresh results show resolution or a clinician "
                    f"resolves it.")
        # what is worsening is part of the outcome: a further rise re-states it (same severity)
        extra = "stale" + ("".join(f":{w.split(' ', 1)[0]}={w.rsplit(' ', 1)[1]}" for w in worse) if worse else "")
        return Hit(ep.rank, None, ep.evidence, t, extra=extra, note=note)


class DeltaRuleC(CRule):
    __slots__ = ("analyte", "lookback", "op", "ops", "ratio", "min_uln", "rank")

    def __init__(self, r: DeltaRule) -> None:
        super().__init__(r)
        self.analyte = r.analyte
        self.analytes = (r.analyte,)
        self.lookback = r.lookback_days * DAY
        self.op = OPS[r.op]
        self.ops = r.op
        self.ratio = r.ratio
        self.min_uln = r.min_uln_multiple
        self.rank = r.severity.rank

    def evaluate(self, st, cp):
        h = st.hist.get(self.analyte)
        if not h or len(h) < 2:
            return None
        return self._judge(st, cp, h[-1], h[-2])

    def evaluate_entry(self, st, cp, a: str, e: Entry) -> Hit | None:
        """What the rule said when ``e`` was the newest result, against the result held just
        before it: a dose record that arrives after the results re-judges them, so a fall
        that an in-order stream alerted on (and that recovered since) is not lost."""
        if st.dose_at is None or e[0] < st.dose_at:
            return None
        p = None
        for x in st.hist.get(self.analyte, ()):  # oldest first, by time then observation id
            if (x[0], x[2]) >= (e[0], e[2]):
                break
            p = x
        return None if p is None else self._judge(st, cp, e, p)

    def _judge(self, st, cp, e: Entry, p: Entry) -> Hit | None:
        if (st.dose_at is not None and e[0] < st.dose_at) or not self.active_at(st, e[0]):
            return None
        if e[0] - p[0] > self.lookback or p[1] <= 0:
            return None
        if not meets(self.op, e[1], self.ratio, p[1]):
            return None
        if self.min_uln is not None:
            hi = uln(cp.ranges, st, self.analyte, e)
            if hi is None or not meets(operator.ge, e[1], self.min_uln, hi):
                return None
        lim = self.ratio * p[1]
        return Hit(self.rank, None, [Ev(self.analyte, p, note="previous result"),
                                     Ev(self.analyte, e, lim, self.ops, "previous", p[1])], e[0])


class ScoreSystemC:
    __slots__ = ("name", "items", "sev_bands", "single_score", "single_rank", "_by_age", "has_scale2")

    def items_for_age(self, age_m: float) -> list:
        """[(item, cuts, on_oxygen_score, on_oxygen_cuts)] for this age (cached per whole month)."""
        key = int(age_m) if age_m >= 0 else -1
        got = self._by_age.get(key)
        if got is None:
            got = []
            for item, bands in self.items:
                for b in bands:
                    if b[0] <= age_m < b[1]:
                        got.append((item, b[2], b[3], b[4]))
                        break
            self._by_age[key] = got
        return got

    def __init__(self, s) -> None:
        self.name = s.name

        def cuts(cs):
            return sorted(((c.score, OPS[c.op], c.value) for c in cs), key=lambda c: -c[0])

        # item -> [(min_m, max_m, cuts[(score, op, value)], on_oxygen_score, on_oxygen_cuts)]
        self.items = [
            (it.item, [(b.min_months, b.max_months, cuts(b.cuts), b.on_oxygen_score,
                        cuts(b.on_oxygen_cuts) if b.on_oxygen_cuts else None)
                       for b in it.bands])
            for it in s.items
        ]
        #: NEWS2 SpO2 scale 2 is available: a patient on scale 2 scores it instead of ``spo2``
        self.has_scale2 = any(it.item == "spo2_scale2" for it in s.items)
        self._by_age: dict[int, list] = {}
        self.sev_bands = sorted(((b.min_score, b.severity.rank) for b in s.severity_bands), reverse=True)
        self.single_score = s.single_item_score
        self.single_rank = s.single_item_severity.rank if s.single_item_severity else None


def _cut_score(cuts, v: float) -> int:
    """Cuts are sorted by score, highest first: the first that matches is the item score."""
    for score, op, value in cuts:
        if op(v, value):
            return score
    return 0


def _on_oxygen(flow: Entry | None, o2: list | None, since: float) -> bool:
    """On supplemental oxygen within the score window: an O2 flow > 0 (``flow``: the reading
    scored) or an on-oxygen flag (``o2``: [time, flag])."""
    if flow is not None and flow[0] >= since and flow[1] > 0:
        return True
    return o2 is not None and o2[1] and o2[0] >= since


class ScoreRuleC(CRule):
    __slots__ = ("window",)
    VITALS = ("heart_rate", "respiratory_rate", "systolic_bp", "spo2", "temperature", "o2_flow")

    def __init__(self, r: ScoreRule, protocol: Protocol) -> None:
        super().__init__(r)
        self.window = r.vitals_window_hours * 3600.0
        an = set()
        for sysm in (protocol.early_warning.pews, protocol.early_warning.news2):
            for it in sysm.items:
                an.add(PSEUDO_ITEM_ANALYTE.get(it.item, it.item))
        self.analytes = tuple(sorted(an))

    def evaluate(self, st, cp):
        hist = st.hist
        t = None
        for a in self.analytes:
            h = hist.get(a)
            if h and (t is None or h[-1][0] > t):
                t = h[-1][0]
        if t is None:
            return None
        return self._score(st, cp, t, st.latest, st.o2)

    def evaluate_entry(self, st, cp, a: str, e: Entry) -> Hit | None:
        """What the score was when ``e`` was the newest vital sign (a late one, or one
        re-judged when the dose record arrives after it): every item from the newest reading
        held at or before ``e``'s time. The on-oxygen flag counts only if it was set at or
        before then (the state keeps the newest flag only)."""
        t = e[0]
        o2 = st.o2 if st.o2 is not None and st.o2[0] <= t else None
        return self._score(st, cp, t, lambda a: st.latest_at(a, t), o2)

    def _score(self, st, cp, t: float, pick, o2):
        """The score at time ``t``; ``pick(analyte)``: the reading of an item to score."""
        dose = st.dose_at if st.dose_at is not None else -1e18
        if t < dose or st.birth is None or not self.active_at(st, t):
            return None
        age_m = (t - st.birth) / 2629800.0
        sysm = cp.news2 if age_m >= cp.adult_age_months else cp.pews
        since = t - self.window
        if since < dose:
            since = dose
        total = 0
        max_item = 0
        evidence: list[Ev] = []
        parts = []
        scale2 = st.spo2_scale == 2 and sysm.has_scale2
        on_o2 = None
        for item, cuts, o2score, o2cuts in sysm.items_for_age(age_m):
            score = 0
            if item == "spo2_scale2" or item == "spo2":
                if (item == "spo2") == scale2:
                    continue  # one SpO2 scale per patient (dose event ``spo2_scale``)
                e = pick("spo2")
                if e is None or e[0] < since:
                    continue
                score = _cut_score(cuts, e[1])
                if o2cuts is not None:
                    if on_o2 is None:
                        on_o2 = _on_oxygen(pick("o2_flow"), o2, since)
                    if on_o2:
                        score = max(score, _cut_score(o2cuts, e[1]))
                evidence.append(("spo2", e, None, None, B_SCORE, None, score))
            elif item == "oxygen":
                f = pick("o2_flow")
                if f is not None and f[0] >= since:
                    score = _cut_score(cuts, f[1])
                    if score:
                        evidence.append(("o2_flow", f, None, None, B_SCORE, None, f"item score {score}"))
                if o2score and o2 is not None and o2[1] and o2[0] >= since and o2score > score:
                    score = o2score
                    evidence.append(("oxygen", None, None, None, B_SCORE, None, f"on oxygen: item score {score}"))
            else:
                e = pick(item)
                if e is None or e[0] < since:
                    continue
                score = _cut_score(cuts, e[1])
                evidence.append((item, e, None, None, B_SCORE, None, score))
            if score:
                parts.append(f"{item} {score}")
                total += score
                if score > max_item:
                    max_item = score
        rank = -1
        for min_score, r in sysm.sev_bands:
            if total >= min_score:
                rank = r
                break
        if sysm.single_score is not None and max_item >= sysm.single_score and sysm.single_rank > rank:
            rank = sysm.single_rank
        if rank < 0:
            return None
        ev_t = max((ev[1][0] for ev in evidence if ev[1] is not None), default=t)
        name = "NEWS2" if sysm is cp.news2 else "PEWS"
        return Hit(rank, None, evidence, ev_t, extra=f"{name}={total}",
                   summary=f"{name} {total} ({', '.join(parts) or 'no item scored'})")


class OverdueRuleC(CRule):
    __slots__ = ("rank",)

    def __init__(self, r: OverdueRule) -> None:
        super().__init__(r)
        self.rank = r.severity.rank


class NoDoseRuleC(CRule):
    __slots__ = ("rank", "grace")

    def __init__(self, r: NoDoseRule) -> None:
        super().__init__(r)
        self.rank = r.severity.rank
        self.grace = r.grace_hours * 3600.0


class CompletionRuleC(CRule):
    __slots__ = ("min_days", "when", "rank")

    def __init__(self, r: CompletionRule) -> None:
        super().__init__(r)
        self.min_days = r.min_days
        self.when = _compile_expr(r.when)
        self.analytes = tuple(sorted(_expr_analytes(self.when, set())))
        self.rank = r.severity.rank

    def evaluate_at(self, st: PatientState, cp: "CompiledProtocol", now: float) -> Hit | None:
        """The label's end criteria on CURRENT evidence: every required analyte must have a
        result taken at or after the end of the minimum period (dose + ``min_days``), and
        those results must meet the criteria. Older results (e.g. a day-75 panel of a patient
        seen on day 95) never complete monitoring. The engine also withholds completion
        while any sample is overdue (``Engine.check_schedule``)."""
        if st.dose_at is None or (now - st.dose_at) / DAY < self.min_days:
            return None
        evidence: list[Ev] = []
        since = st.dose_at + self.min_days * DAY
        if eval_expr(self.when, st, cp, since, evidence) is not True:
            return None
        t = max((ev[1][0] for ev in evidence), default=now)
        return Hit(self.rank, None, evidence, t)


@dataclass
class CPeriod:
    from_day: float
    to_day: float
    every: float
    phases: frozenset | None
    phase_days: tuple | None
    ends_on_completion: bool = False


@dataclass
class CSchedule:
    group: str
    analytes: tuple
    any_of: bool
    grace: float
    periods: list

    def period_at(self, st: PatientState, now: float, complete: bool = False) -> CPeriod | None:
        d = (now - st.dose_at) / DAY
        phase, since = st.steroid_at(now)
        for p in self.periods:
            if not (p.from_day <= d < p.to_day):
                continue
            if complete and p.ends_on_completion:
                continue
            if p.phases is not None and phase not in p.phases:
                continue
            if p.phase_days is not None:
                if since is None:
                    continue
                pd = (now - since) / DAY
                if not (p.phase_days[0] <= pd < p.phase_days[1]):
                    continue
            return p
        return None

    def overdue(self, st: PatientState, now: float, complete: bool = False) -> list[tuple[str, Entry | None, float]] | None:
        """[(analyte, last entry, deadline)] overdue at ``now``; [] if on time; None if not scheduled now.

        The deadline runs from the LAST sample (or the dose): a sample skipped mid-course and
        followed by a later one is not flagged afterwards, because the later sample satisfies
        the schedule; a missing sample is flagged from the first clock check after its
        deadline + grace. ``complete``: the completion criteria hold, which ends only the
        periods marked ``ends_on_completion``."""
        p = self.period_at(st, now, complete)
        if p is None:
            return None
        every = p.every * DAY
        if self.any_of:
            last = None
            for a in self.analytes:
                e = st.latest(a)
                if e is not None and (last is None or e[0] > last[0]):
                    last = e
            anchor = max(last[0], st.dose_at) if last is not None else st.dose_at
            deadline = anchor + every + self.grace
            return [("/".join(self.analytes), last, deadline)] if now > deadline else []
        out = []
        for a in self.analytes:
            e = st.latest(a)
            anchor = max(e[0], st.dose_at) if e is not None else st.dose_at
            deadline = anchor + every + self.grace
            if now > deadline:
                out.append((a, e, deadline))
        return out


class CensoredRuleC(CRule):
    """Raised by the engine itself (``Engine.evaluate_observation``) for a censored result
    that cannot be graded at its bound; never evaluated from the state."""

    __slots__ = ("rank",)

    def __init__(self, r: CensoredRule) -> None:
        super().__init__(r)
        self.rank = r.severity.rank

    def evaluate(self, st, cp):
        return None


class SteroidRuleC(CRule):
    """``SteroidRule``: the corticosteroid course against the label (see its docstring).
    Evidence for steroid events is a pseudo entry ``(t, None, "steroid-<phase>@<t>")``."""

    __slots__ = ("check", "when", "rank", "earliest_s", "tolerance_s", "settle_s")

    def __init__(self, r: SteroidRule, protocol: Protocol) -> None:
        super().__init__(r)
        self.check = r.check
        self.when = _compile_expr(r.when) if r.when is not None else None
        self.analytes = tuple(sorted(_expr_analytes(self.when, set()))) if self.when is not None else ()
        self.rank = r.severity.rank
        self.tolerance_s = r.tolerance_days * DAY
        self.settle_s = r.settle_hours * 3600.0
        sr = protocol.steroid_regimen
        self.earliest_s = None
        if r.check == "early_taper" and sr is not None and sr.full_dose_days is not None:
            self.earliest_s = (sr.full_dose_days - (sr.start_days_before_dose or 0)) * DAY

    @staticmethod
    def _ev(t: int, phase: str) -> tuple:
        return ("steroid", (t, None, f"steroid-{phase}@{t}", None, None), None, None, None, None,
                f"corticosteroid {phase}")

    def unsettled(self, st, now: float) -> bool:
        """The taper gate is not judged yet: its taper record arrived less than ``settle_s``
        (processing time) before ``now``, so results drawn before the taper may still be on
        their way. A finding already raised is not affected (see ``Engine._settle_steroid``)."""
        if self.check != "taper_gate" or not self.settle_s or st.srx is None or not st.steroid:
            return False
        t, phase = st.steroid[-1]
        return phase == "taper" and st.srx[0] == t and now < st.srx[1] + self.settle_s

    def evaluate(self, st, cp):
        course = st.steroid
        if not course or st.dose_at is None:
            return None
        if self.check == "abrupt_stop":
            for (t0, p0), (t1, p1) in zip(course, course[1:]):
                if p1 == "stopped" and p0 == "full" and t1 >= st.dose_at:
                    return Hit(self.rank, None, [self._ev(t0, p0), self._ev(t1, p1)], t1,
                               summary=f"stopped on day {(t1 - st.dose_at) / DAY:.1f} straight from the full dose")
            return None
        if self.check == "early_taper":
            t = next((t for t, p in course if p == "taper"), None)
            if t is None or self.earliest_s is None or t >= st.dose_at + self.earliest_s - self.tolerance_s:
                return None
            return Hit(self.rank, None, [self._ev(t, "taper")], t,
                       summary=f"taper began on day {(t - st.dose_at) / DAY:.1f}, before day "
                               f"{self.earliest_s / DAY:g} (end of the full-dose period)")
        # taper_gate: the taper in force now, judged on the newest results at or before its start
        if course[-1][1] != "taper" or self.when is None:
            return None
        t_taper = course[-1][0]
        hist = st.hist
        cut = {}
        for a in self.analytes:
            h = hist.get(a)
            if h:
                kept = h if h[-1][0] <= t_taper else [e for e in h if e[0] <= t_taper]
                if kept and kept[-1][0] >= st.dose_at:
                    cut[a] = kept
        if not cut:
            return None  # no post-dose result before the taper began
        probe = _AsOf(st, cut)
        evidence: list = []
        if eval_expr(self.when, probe, cp, st.dose_at, evidence) is not True:
            return None
        evidence.append(self._ev(t_taper, "taper"))
        return Hit(self.rank, None, evidence, t_taper,
                   summary=f"the taper began on day {(t_taper - st.dose_at) / DAY:.1f} on results that forbid it: "
                           + "; ".join(f"{a} {e[1]:.4g} (limit {lim:.4g})" for a, e, lim, *_ in evidence[:-1]))


class _AsOf:
    """A read-only view of a patient state with other (cut) histories."""

    __slots__ = ("_st", "hist")

    def __init__(self, st: PatientState, hist: dict) -> None:
        self._st = st
        self.hist = hist

    def __getattr__(self, name):
        return getattr(self._st, name)


class RangeCheckRuleC(CRule):
    """Raised by the engine itself for a result whose own reference range is implausible
    against the protocol's age default (``Engine._check_range``)."""

    __slots__ = ("rank", "max_ratio")

    def __init__(self, r: RangeCheckRule) -> None:
        super().__init__(r)
        self.rank = r.severity.rank
        self.max_ratio = r.max_ratio

    def evaluate(self, st, cp):
        return None


class CompiledProtocol:
    """A protocol ready for evaluation: rule objects, per-analyte rule lists, ranges, scores."""

    def __init__(self, protocol: Protocol) -> None:
        from schemas.findings import ProtocolRef

        self.protocol = protocol
        self.ref = ProtocolRef(id=protocol.id, version=protocol.version)
        self.ranges = Ranges(protocol)
        #: analytes some rule reads against a lower reference limit (``basis: lln``): a result's own
        #: LLN of 0 or below cannot be met by any value of theirs (the engine's range check)
        self.lln_graded = frozenset(basis_analytes([r.model_dump(mode="json") for r in protocol.rules], "lln"))
        self.lab_limit = protocol.history.lab
        self.vital_limit = protocol.history.vital
        ew = protocol.early_warning
        self.pews = ScoreSystemC(ew.pews)
        self.news2 = ScoreSystemC(ew.news2)
        self.adult_age_months = ew.adult_age_years * 12.0
        self.rules: list[CRule] = []
        self.overdue: OverdueRuleC | None = None
        self.completion: CompletionRuleC | None = None
        self.censored: CensoredRuleC | None = None
        self.range_check: RangeCheckRuleC | None = None
        self.no_dose: NoDoseRuleC | None = None
        for r in protocol.rules:
            if isinstance(r, GradedRule):
                c = GradedRuleC(r)
            elif isinstance(r, CompositeRule):
                c = CompositeRuleC(r)
            elif isinstance(r, DeltaRule):
                c = DeltaRuleC(r)
            elif isinstance(r, ScoreRule):
                c = ScoreRuleC(r, protocol)
            elif isinstance(r, OverdueRule):
                c = self.overdue = OverdueRuleC(r)
            elif isinstance(r, CompletionRule):
                c = self.completion = CompletionRuleC(r)
            elif isinstance(r, CensoredRule):
                c = self.censored = CensoredRuleC(r)
            elif isinstance(r, RangeCheckRule):
                c = self.range_check = RangeCheckRuleC(r)
            elif isinstance(r, SteroidRule):
                c = SteroidRuleC(r, protocol)
            elif isinstance(r, NoDoseRule):
                c = self.no_dose = NoDoseRuleC(r)
            else:  # pragma: no cover
                raise TypeError(r)
            self.rules.append(c)
        self.by_id = {r.id: r for r in self.rules}
        #: rules re-evaluated when a result for the analyte arrives (observation-driven kinds only)
        self.by_analyte: dict[str, tuple[CRule, ...]] = {}
        # clock-driven kinds and kinds the engine raises itself (censored, range check)
        clock_kinds = (OverdueRuleC, CompletionRuleC, NoDoseRuleC, CensoredRuleC, RangeCheckRuleC)
        for c in self.rules:
            if isinstance(c, clock_kinds):
                continue
            for a in c.analytes:
                self.by_analyte.setdefault(a, ())
                self.by_analyte[a] = self.by_analyte[a] + (c,)
        self.obs_rules = tuple(c for c in self.rules if not isinstance(c, clock_kinds))
        self.graded = tuple(c for c in self.rules if isinstance(c, GradedRuleC))
        #: rules that can say what they said of an earlier result (``evaluate_entry``)
        self.rejudged = self.graded + tuple(c for c in self.rules if isinstance(c, (DeltaRuleC, ScoreRuleC)))
        #: steroid checks that wait for a settling time after their record arrives (the clock raises them)
        self.settling = tuple(c for c in self.rules if isinstance(c, SteroidRuleC) and c.settle_s)
        #: analyte -> (direction, conditions of composite rules on it): a post-dose result that
        #: meets one is an episode result (``PatientState.ev``)
        self.episode: dict[str, tuple[int, tuple[CCond, ...]]] = {}
        for c in self.rules:
            if isinstance(c, CompositeRuleC):
                conds = _expr_conds(c.when, [])
                if c.unless is not None:
                    conds = _expr_conds(c.unless, conds)
                for cc in conds:
                    d, lst = self.episode.get(cc.analyte, (cc.direction, ()))
                    self.episode[cc.analyte] = (d, lst + (cc,))
        self.schedules = [
            CSchedule(
                group=s.group, analytes=tuple(s.analytes), any_of=s.require == "any",
                grace=s.grace_hours * 3600.0,
                periods=[CPeriod(p.from_day, p.to_day, p.every_days,
                                 frozenset(p.steroid_phases) if p.steroid_phases else None,
                                 tuple(p.phase_days) if p.phase_days else None,
                                 p.ends_on_completion) for p in s.periods],
            )
            for s in protocol.schedules
        ]
        self.schedule_by_analyte: dict[str, list[CSchedule]] = {}
        for s in self.schedules:
            for a in s.analytes:
                self.schedule_by_analyte.setdefault(a, []).append(s)
        cat = catalogue().by_key
        self.units = {k: a.canonical_unit for k, a in cat.items()}
        self.kinds = {k: a.kind for k, a in cat.items()}

        self.limits = {k: (self.vital_limit if kind == "vital" else self.lab_limit) for k, kind in self.kinds.items()}
        #: analyte -> predicate "beyond the limit" for sustained bands (``for_hours``); the
        #: engine keeps the run of such readings in ``PatientState.runs``
        self.sustain: dict[str, Callable[[float], bool]] = {}
        #: analyte -> the band's duration in seconds (``for_hours``)
        self.sustain_for_s: dict[str, float] = {}
        for c in self.rules:
            if isinstance(c, GradedRuleC):
                for b in c.bands + (c.abn_bands or ()):
                    if b.for_s is not None:
                        a = c.analytes[0]
                        if a in self.sustain:
                            raise ValueError(f"{c.id}: only one sustained limit per analyte ({a})")
                        op, lim = b.op, b.value
                        self.sustain[a] = (lambda v, op=op, lim=lim: op(v, lim))
                        self.sustain_for_s[a] = b.for_s

    def history_limit(self, analyte: str) -> int:
        return self.limits.get(analyte, self.lab_limit)

    def relevant(self, st: PatientState, analyte: str, e: Entry) -> bool:
        """Whether a post-dose result is an episode result: it meets a composite condition on
        its analyte (one relative to a baseline not yet known counts, until it is known)."""
        got = self.episode.get(analyte)
        if got is None:
            return False
        for c in got[1]:
            if c.no_base and usable_baseline(st, analyte) is not None:
                continue
            lr = c.limit(st, self, e)
            if lr is None:
                if c.basis == B_BASE:
                    return True
                continue
            if meets(c.op, e[1], lr[0], lr[1]):
                return True
        return False

    def rejudge(self, st: PatientState, analyte: str) -> None:
        """Rebuild the episode results of ``analyte`` from everything held (after the dose time
        or the baseline changed)."""
        got = self.episode.get(analyte)
        if got is None or st.dose_at is None:
            st.ev.pop(analyte, None)
            return
        pool = {e[2]: e for e in st.ev.get(analyte, ())}
        for e in st.hist.get(analyte, ()):
            pool[e[2]] = e
        st.ev.pop(analyte, None)
        for e in sorted(pool.values(), key=lambda e: (e[0], e[2])):
            if e[0] >= st.dose_at and self.relevant(st, analyte, e):
                st.hold_episode(analyte, e, got[0])


def compile_protocol(protocol: Protocol) -> CompiledProtocol:
    return CompiledProtocol(protocol)
