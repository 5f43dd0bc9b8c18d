"""Compact per-patient state for the rule engine (pure data, JSON-able).

One ``PatientState`` per patient, stored in a changelog-backed table by the Faust layer
via ``to_dict()`` / ``from_dict()`` (a small dict of lists, ints, floats and strings).

Contents
- treatment facts: product, dose time, birth date (as UTC epoch of midnight), weight,
  ward, care team, steroid phase changes ``[[t, phase], ...]`` (sorted, bounded);
- ``hist``: per analyte the newest ``N`` results sorted by effective time, each an
  entry ``(t, value, observation_id, ref_low, ref_high)`` (t = UTC epoch seconds,
  rounded to the second; value and range in the analyte's canonical unit; the range is
  the result's own, ``None`` when it carried none). The newest entry is the analyte's
  last sample time;
- ``base``: per analyte the baseline = the last result before dosing (an entry);
- ``o2``: newest ``[t, on_oxygen]`` flag seen on a vital sign;
- ``sus``: per analyte with a sustained band (``for_hours``, e.g. fever > 40.0 C for
  > 24 h) its readings ``(t, value, observation_id)`` within a window of the newest one,
  plus the newest reading before it (bounded): a set that does not depend on arrival order;
- ``runs``: derived from ``sus``, the current run of consecutive readings beyond the
  limit ending at the newest reading, ``[start_t, start_value, start_id, last_t]``
  (absent when the newest reading is not beyond the limit);
- ``ev``: per analyte read by a composite rule, the post-dose results that meet one of its
  conditions ("episode" results): the newest ``EV_KEEP`` of them plus the most extreme one
  since dosing (the peak, or the nadir for a falling analyte). A function of the set of
  results held, never of their arrival order, so a composite finding can pair a peak with
  a later result (Hy's law: an ALT event with a bilirubin rise days later) and can tell
  "no longer evaluable" from "resolved";
- ``first``: the effective time of the earliest result received while no dose record was
  known (drives ``monitoring.no_dose_record``);
- ``active``: rules currently present, ``key -> [severity_rank, grade, evidence ids]``
  (key = rule id, or ``rule id|dedupe key``), so the engine can emit ``cleared`` and
  ``retracted`` and stay silent when nothing changed.

Event time: entries are placed by effective time, so a late or out-of-order result
lands where it belongs; keeping the newest ``N`` by time is independent of arrival
order. A result with an observation id already held replaces it (idempotent replay).
"""
from __future__ import annotations

from bisect import bisect_right, insort
from operator import itemgetter
from datetime import date, datetime, timezone
from typing import Any

Entry = tuple  # (t:int, value:float, observation_id:str, ref_low:float|None, ref_high:float|None)

_EPOCH_ORDINAL = date(1970, 1, 1).toordinal()
MAX_STEROID_CHANGES = 8
MAX_SUSTAINED = 64
#: newest episode results held per analyte (plus the extremes since dosing: ``_trim_episode``)
EV_KEEP = 5
#: results held per analyte while no dose record is known: a dose record that arrives late
#: still finds the pre-dose baseline and every post-dose result it now governs (32: about five
#: days of 4-hourly vital signs; 8 lost a fever behind twelve temperatures when a takeover
#: delayed a dose record, ``late-dose-fever-among-many-vitals-iv.yaml``)
PRE_DOSE_LIMIT = 32


def epoch(dt: datetime) -> int:
    """Aware datetime -> integer UTC epoch seconds (rounded)."""
    return int(round(dt.timestamp()))


def from_epoch(t: float) -> datetime:
    return datetime.fromtimestamp(t, tz=timezone.utc)


def date_epoch(d: date) -> int:
    return (d.toordinal() - _EPOCH_ORDINAL) * 86400


def _entry_key(e: Entry) -> tuple:
    return (e[0], e[2])


class PatientState:
    """Mutable per-patient state. See the module docstring for the fields."""

    __slots__ = (
        "patient_id", "product", "dose_at", "dose_id", "birth", "weight", "ward", "care_team",
        "steroid", "hist", "base", "o2", "active", "runs", "sus", "spo2_scale", "ev", "first",
        "srx",
    )

    def __init__(self, patient_id: str) -> None:
        self.patient_id = patient_id
        self.product: str | None = None
        self.dose_at: int | None = None
        self.dose_id: str | None = None
        self.birth: int | None = None
        self.weight: float | None = None
        self.ward: str | None = None
        self.care_team: str | None = None
        self.steroid: list[list] = []
        self.hist: dict[str, list[Entry]] = {}
        self.base: dict[str, Entry] = {}
        self.o2: list | None = None
        self.active: dict[str, list] = {}
        self.runs: dict[str, list] = {}
        self.sus: dict[str, list[tuple]] = {}
        #: NEWS2 SpO2 scale from the dose event (None: scale 1)
        self.spo2_scale: int | None = None
        self.ev: dict[str, list[Entry]] = {}
        self.first: int | None = None
        #: ``[t, received]``: the newest steroid change recorded (effective time) and the
        #: processing time its record arrived (the taper gate settles from it)
        self.srx: list | None = None

    # -- history -----------------------------------------------------------------
    def insert(self, analyte: str, entry: Entry, limit: int) -> None:
        """Insert by effective time, replacing an entry with the same observation id; keep the newest ``limit``."""
        h = self.hist.get(analyte)
        if h is None:
            self.hist[analyte] = [entry]
        else:
            oid = entry[2]
            for i, e in enumerate(h):
                if e[2] == oid:
                    del h[i]
                    break
            if not h or _entry_key(entry) >= _entry_key(h[-1]):
                h.append(entry)
            else:
                insort(h, entry, key=_entry_key)
            if len(h) > limit:
                del h[: len(h) - limit]
        self._offer_baseline(analyte, entry)

    def hold_episode(self, analyte: str, entry: Entry, direction: int) -> None:
        """Hold a post-dose result that meets a composite condition (see ``ev``):
        ``direction`` +1 keeps the highest as the peak, -1 the lowest."""
        lst = [x for x in self.ev.get(analyte, ()) if x[2] != entry[2]]
        insort(lst, entry, key=_entry_key)
        self.ev[analyte] = _trim_episode(lst, direction)

    def drop_episode(self, analyte: str, observation_id: str) -> None:
        lst = self.ev.get(analyte)
        if lst is None:
            return
        kept = [x for x in lst if x[2] != observation_id]
        if kept:
            self.ev[analyte] = kept
        else:
            del self.ev[analyte]

    def _offer_baseline(self, analyte: str, entry: Entry) -> None:
        if self.dose_at is not None and entry[0] >= self.dose_at:
            return
        b = self.base.get(analyte)
        if b is None or _entry_key(entry) >= _entry_key(b) or b[2] == entry[2]:
            self.base[analyte] = entry

    def remove(self, observation_id: str, analyte: str | None = None) -> list[str]:
        """Remove the result with this id (history and baseline); return the analytes it was found under."""
        found: list[str] = []
        keys = [analyte] if analyte is not None and analyte in self.hist else list(self.hist)
        if analyte is not None and analyte not in self.hist:
            keys = list(self.hist)
        for a in keys:
            h = self.hist[a]
            for i, e in enumerate(h):
                if e[2] == observation_id:
                    del h[i]
                    found.append(a)
                    break
            if not h:
                del self.hist[a]
        for a, lst in list(self.ev.items()):
            if any(x[2] == observation_id for x in lst):
                self.drop_episode(a, observation_id)
                if a not in found:
                    found.append(a)
        for a, s in list(self.sus.items()):
            kept = [x for x in s if x[2] != observation_id]
            if len(kept) != len(s):
                self.sus[a] = kept
                if a not in found:
                    found.append(a)
        for a, b in list(self.base.items()):
            if b[2] == observation_id:
                del self.base[a]
                if a not in found:
                    found.append(a)
                self._recompute_baseline(a)
        return found

    def _recompute_baseline(self, analyte: str) -> None:
        if self.dose_at is None:
            h = self.hist.get(analyte)
            if h:
                self.base[analyte] = h[-1]
            return
        best = None
        for e in self.hist.get(analyte, ()):
            if e[0] < self.dose_at:
                best = e
        if best is not None:
            self.base[analyte] = best

    def set_dose(self, dose_at: int) -> None:
        """Fix the dose time and recompute every baseline as the last result before it."""
        self.dose_at = dose_at
        for a in set(self.hist) | set(self.base):
            b = self.base.get(a)
            best = b if b is not None and b[0] < dose_at else None
            for e in self.hist.get(a, ()):
                if e[0] < dose_at and (best is None or _entry_key(e) > _entry_key(best)):
                    best = e
            if best is None:
                self.base.pop(a, None)
            else:
                self.base[a] = best

    def latest(self, analyte: str) -> Entry | None:
        h = self.hist.get(analyte)
        return h[-1] if h else None

    def latest_at(self, analyte: str, t: float) -> Entry | None:
        """The newest result held at or before ``t`` (the history is in time order)."""
        h = self.hist.get(analyte)
        if not h:
            return None
        i = bisect_right(h, t, key=itemgetter(0))
        return h[i - 1] if i else None

    # -- sustained runs (e.g. fever grade 4) ---------------------------------------
    def record_sustained(self, analyte: str, e: Entry, window_s: float, hot=None) -> None:
        """Hold ``e`` among the readings of a sustained analyte and, when ``hot`` is given,
        derive the run again.

        ``sus[analyte]`` keeps, by (time, id), every reading within ``window_s`` of the
        newest one plus the newest reading before that window, at most ``MAX_SUSTAINED``.
        That set depends only on which readings arrived, never on their order, so the
        run derived from it does not either (a late reading lands where it belongs)."""
        item = (e[0], e[1], e[2])
        s = [x for x in self.sus.get(analyte, ()) if x[2] != item[2]]
        insort(s, item, key=_entry_key)
        cutoff = s[-1][0] - window_s
        first_in = 0
        while first_in < len(s) and s[first_in][0] < cutoff:
            first_in += 1
        keep_from = max(0, first_in - 1, len(s) - MAX_SUSTAINED)
        self.sus[analyte] = s[keep_from:]
        if hot is not None:
            self.rebuild_run(analyte, hot)

    def rebuild_run(self, analyte: str, hot) -> None:
        """Derive the current run from the held readings: the trailing readings, newest
        first, that are all beyond the limit (no run when the newest one is not)."""
        s = self.sus.get(analyte)
        if not s or not hot(s[-1][1]):
            self.runs.pop(analyte, None)
            return
        i = len(s) - 1
        while i > 0 and hot(s[i - 1][1]):
            i -= 1
        start = s[i]
        self.runs[analyte] = [start[0], start[1], start[2], s[-1][0]]

    # -- steroid -----------------------------------------------------------------
    def add_steroid(self, t: int, phase: str) -> None:
        item = [t, phase]
        if item in self.steroid:
            return
        self.steroid = [s for s in self.steroid if s[0] != t]
        self.steroid.append(item)
        self.steroid.sort(key=lambda s: s[0])
        if len(self.steroid) > MAX_STEROID_CHANGES:
            del self.steroid[: len(self.steroid) - MAX_STEROID_CHANGES]

    def steroid_at(self, t: float) -> tuple[str, int | None]:
        """(phase, start time) in force at event time ``t``; ``("none", None)`` before any."""
        phase, since = "none", None
        for st, ph in self.steroid:
            if st <= t:
                phase, since = ph, st
            else:
                break
        return phase, since

    def days_since_dose(self, t: float) -> float | None:
        if self.dose_at is None:
            return None
        return (t - self.dose_at) / 86400.0

    def age_months(self, t: float) -> float | None:
        if self.birth is None:
            return None
        return (t - self.birth) / 2629800.0  # 30.4375 days

    # -- serialisation -----------------------------------------------------------
    def to_dict(self) -> dict[str, Any]:
        """Compact JSON-able form. Times are seconds relative to ``t0`` (the dose time, or
        the first result); a reference range shared by an analyte's results is stored
        once in ``r`` and entries of 3 items use it (5 items: their own range)."""
        t0 = self.dose_at
        if t0 is None:
            t0 = min((h[0][0] for h in self.hist.values() if h), default=0)
        d: dict[str, Any] = {"p": self.patient_id, "t0": t0}
        if self.product is not None:
            d["pr"] = _PRODUCT_CODE.get(self.product, self.product)
        if self.dose_at is not None:
            d["d"] = 1  # the dose time is t0
        if self.dose_id is not None:
            d["di"] = self.dose_id
        if self.birth is not None:
            d["b"] = self.birth // 86400 if self.birth % 86400 == 0 else self.birth / 86400
        if self.weight is not None:
            d["w"] = _num(self.weight)
        if self.ward is not None:
            d["wd"] = self.ward
        if self.care_team is not None:
            d["ct"] = self.care_team
        if self.spo2_scale is not None:
            d["sc"] = self.spo2_scale
        if self.steroid:
            d["s"] = [[s[0] - t0, s[1]] for s in self.steroid]
        if self.srx is not None:
            d["sr"] = [self.srx[0] - t0, self.srx[1] - t0]
        ranges: dict[str, list] = {}
        for a, h in self.hist.items():
            e = h[-1]
            if e[3] is not None or e[4] is not None:
                ranges[a] = [_num(e[3]), _num(e[4])]
        if ranges:
            d["r"] = {_code(a): r for a, r in ranges.items()}
        if self.hist:
            d["h"] = {_code(a): _pack_all(h, t0, ranges.get(a)) for a, h in self.hist.items()}
        if self.base:
            d["bl"] = {_code(a): _pack(e, t0, ranges.get(a)) for a, e in self.base.items()}
        if self.o2 is not None:
            d["o2"] = [self.o2[0] - t0, 1 if self.o2[1] else 0]
        if self.active:
            d["a"] = {k: list(v) for k, v in self.active.items()}
        if self.sus:
            d["su"] = {_code(a): [[x[0] - t0, _num(x[1]), x[2]] for x in s] for a, s in self.sus.items() if s}
        if self.ev:
            d["ev"] = {_code(a): _pack_all(lst, t0, ranges.get(a)) for a, lst in self.ev.items() if lst}
        if self.first is not None:
            d["f"] = self.first - t0
        if self.runs:
            d["ru"] = {_code(a): [r[0] - t0, _num(r[1]), r[2], r[3] - t0] for a, r in self.runs.items()}
        return d

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "PatientState":
        s = cls(d["p"])
        t0 = d.get("t0", 0)
        pr = d.get("pr")
        s.product = _PRODUCT_NAME.get(pr, pr) if pr is not None else None
        s.dose_at = t0 if "d" in d else None
        s.dose_id = d.get("di")
        b = d.get("b")
        if b is not None and abs(b) < 1e6:
            b = int(round(b * 86400))  # days since the epoch (older states: seconds)
        s.birth = b
        s.weight = d.get("w")
        s.ward = d.get("wd")
        s.care_team = d.get("ct")
        s.spo2_scale = d.get("sc")
        s.steroid = [[x[0] + t0, x[1]] for x in d.get("s", ())]
        sr = d.get("sr")
        s.srx = [sr[0] + t0, sr[1] + t0] if sr is not None else None
        ranges = {_name(a): r for a, r in d.get("r", {}).items()}
        s.hist = {_name(a): [_unpack(e, t0, ranges.get(_name(a))) for e in h] for a, h in d.get("h", {}).items()}
        s.base = {_name(a): _unpack(e, t0, ranges.get(_name(a))) for a, e in d.get("bl", {}).items()}
        s.runs = {_name(a): [r[0] + t0, r[1], r[2], r[3] + t0] for a, r in d.get("ru", {}).items()}
        s.sus = {_name(a): [(x[0] + t0, x[1], x[2]) for x in v] for a, v in d.get("su", {}).items()}
        s.ev = {_name(a): [_unpack(e, t0, ranges.get(_name(a))) for e in lst] for a, lst in d.get("ev", {}).items()}
        f = d.get("f")
        s.first = None if f is None else f + t0
        o2 = d.get("o2")
        s.o2 = [o2[0] + t0, bool(o2[1])] if o2 is not None else None
        s.active = {k: list(v) for k, v in d.get("a", {}).items()}
        return s

    def __eq__(self, other: object) -> bool:
        return isinstance(other, PatientState) and self.to_dict() == other.to_dict()

    def __repr__(self) -> str:
        return f"PatientState({self.to_dict()!r})"


def _trim_episode(lst: list, direction: int) -> list:
    """The newest ``EV_KEEP`` entries (sorted by time) plus the most extreme ones (at most
    four, in time order before them): by value, the newest and the oldest of equal values; by
    value over the result's own limit in that direction (ULN for a peak, LLN for a nadir) among
    the results that carry one; and by value among those that carry none (graded against the
    protocol's default, the same for all). The oldest of equal extremes pairs with results of
    other analytes that only it is near in time: haemoglobin 60 on the day of a platelet count
    of 10 (the TMA screen), then 60 again on days 14-16 with a twin of the first; with the dose
    record arriving after them, only the newest 60s were kept and the screen was not raised. A
    condition is a multiple of each result's own limit, so when ranges differ between results
    the highest value need not be the result that meets it: ALT 81 with a ULN of 4 (20x, kept
    as the more cautious limit) is a peak that ALT 120 with a ULN of 40 (3x) is not. Kept by
    value only, it was dropped once five newer results were held, and the acute liver failure
    signature it raised depended on the order the results arrived in."""
    if len(lst) <= EV_KEEP:
        return lst
    keep = lst[-EV_KEEP:]
    extra = [e for e in _extremes(lst, direction) if e not in keep]
    if not extra:
        return keep
    return sorted(set(extra), key=_entry_key) + keep


def _extremes(lst: list, direction: int) -> list:
    """The entries :func:`_trim_episode` keeps however old: see there."""
    limit = 3 if direction < 0 else 4
    pick = min if direction < 0 else max
    s = -1 if direction < 0 else 1  # of equal values, the newest (then the id) wins
    limited = [e for e in lst if e[limit] is not None and e[limit] > 0]
    bare = [e for e in lst if e[limit] is None or e[limit] <= 0]
    out = [pick(lst, key=lambda e: (e[1], s * e[0], e[2])), pick(lst, key=lambda e: (e[1], -s * e[0], e[2]))]
    if limited:
        out.append(pick(limited, key=lambda e: (e[1] / e[limit], s * e[0], e[2])))
    if bare:
        out.append(pick(bare, key=lambda e: (e[1], s * e[0], e[2])))
    return out


def _num(v: float | None):
    if type(v) is float:  # the common case, without the float() and abs() calls
        return int(v) if v.is_integer() and -1e15 < v < 1e15 else v
    if v is None:
        return None
    return int(v) if float(v).is_integer() and abs(v) < 1e15 else v


#: stable short keys for analytes in the serialised state (upper case: never an analyte key,
#: which are lower case). NEVER renumber: stored changelogs depend on them. Unknown analytes
#: are stored under their own name.
_ANALYTE_CODE = {
    "alt": "A", "ast": "B", "bilirubin_total": "C", "bilirubin_direct": "D", "alp": "E", "ggt": "F",
    "ldh": "G", "platelets": "H", "hemoglobin": "I", "creatinine": "J", "troponin_i": "K",
    "troponin_i_hs": "L", "inr": "M", "pt": "N", "aptt": "O", "albumin": "P", "crp": "Q",
    "glucose": "R", "potassium": "S", "sodium": "T", "heart_rate": "U", "respiratory_rate": "V",
    "systolic_bp": "W", "diastolic_bp": "X", "spo2": "Y", "temperature": "Z", "o2_flow": "O2",
    "weight": "WT",
}
_ANALYTE_NAME = {v: k for k, v in _ANALYTE_CODE.items()}


def _code(a: str) -> str:
    return _ANALYTE_CODE.get(a, a)


def _name(c: str) -> str:
    return _ANALYTE_NAME.get(c, c)


_PRODUCT_CODE = {"onasemnogene-abeparvovec-iv": "iv", "onasemnogene-abeparvovec-it": "it"}
_PRODUCT_NAME = {v: k for k, v in _PRODUCT_CODE.items()}


def _pack(e: Entry, t0: int, shared: list | None) -> list:
    out = [e[0] - t0, _num(e[1]), e[2]]
    lo, hi = _num(e[3]), _num(e[4])
    if shared is None:
        if lo is not None or hi is not None:
            out += [lo, hi]
    elif [lo, hi] != shared:
        out += [lo, hi]
    return out


def _pack_all(entries: list, t0: int, shared: list | None) -> list:
    """``[_pack(e, t0, shared) for e in entries]``, the ``_num`` calls inlined for floats."""
    out = []
    for e in entries:
        v, lo, hi = e[1], e[3], e[4]
        v = (int(v) if v.is_integer() and -1e15 < v < 1e15 else v) if type(v) is float else _num(v)
        lo = (int(lo) if lo.is_integer() and -1e15 < lo < 1e15 else lo) if type(lo) is float else _num(lo)
        hi = (int(hi) if hi.is_integer() and -1e15 < hi < 1e15 else hi) if type(hi) is float else _num(hi)
        if shared is None:
            out.append([e[0] - t0, v, e[2], lo, hi] if lo is not None or hi is not None else [e[0] - t0, v, e[2]])
        else:
            out.append([e[0] - t0, v, e[2], lo, hi] if [lo, hi] != shared else [e[0] - t0, v, e[2]])
    return out


def _unpack(x: list, t0: int, shared: list | None) -> Entry:
    if len(x) >= 5:
        return (x[0] + t0, x[1], x[2], x[3], x[4])
    if shared is not None:
        return (x[0] + t0, x[1], x[2], shared[0], shared[1])
    return (x[0] + t0, x[1], x[2], None, None)
