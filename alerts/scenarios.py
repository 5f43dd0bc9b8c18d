"""Clinicians' protocol tests: scenario files run through the real engine and lifecycle (pure).

A scenario (one YAML file, format in the README "Protocol tests" section and in
``alerts/protocols/tests/*.yaml``) describes one patient, a timeline of events and the
alerts expected at given times. :func:`run_scenario` feeds it, in arrival order, through
exactly what the worker runs, without Kafka:

- typed ``lab:`` / ``vital:`` events are built with ``schemas.canonical.build_observation``
  (the real unit and range conversion); raw ``json:`` / ``fhir:`` / ``hl7:`` events go
  through ``schemas.ingest.decode`` exactly as from an input topic (a rejection is a dead
  letter, checkable with ``dead_letters:``). Every observation is round-tripped through its
  JSON form, as it travels on the ``observations`` topic;
- ``alerts.engine.Engine`` evaluates them (``evaluate_observation``, ``apply_treatment``,
  ``check_schedule`` on every clock tick), and every finding goes through the alert
  lifecycle (``alerts.lifecycle.AlertEngine``: dedupe, episodes, escalation ticks,
  inhibition, actions), with the protocol's routes, as in ``monitor.clinical.processor``.

The clock: day 0 is ``T0`` (2025-03-03T08:00Z). Events are fed at their arrival time
(``arrives``, default ``day``); between events the clock ticks every ``tick_hours``
(scenario key, default 1) and each tick runs ``check_schedule`` and the lifecycle ``tick``,
as the worker's ``patient-ticks`` do. An expectation ``at: D`` is checked once every event
arriving at or before D has been fed and the clock has ticked up to D.

:func:`run_paths` runs files and folders and returns :class:`ScenarioResult` objects;
:func:`format_results` renders them like ``promtool test rules``: one line per passing
scenario, a readable diff per failed expectation.
"""
from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from datetime import date, datetime, timedelta, timezone
from importlib import resources
from pathlib import Path
from typing import Any, Iterable

import yaml

from schemas.alert import Alert, AlertAction, AlertStatus
from schemas.analytes import catalogue
from schemas.errors import Rejected
from schemas.events import DoseEvent, Observation, ReferenceRange, ResultStatus, SteroidEvent
from schemas.findings import SEVERITY_ORDER
from schemas.ingest import LAB_RESULTS, LIVER_FUNCTION, TREATMENTS, VITAL_SIGNS, build_observation, decode
from schemas.yaml_text import safe_load as load_yaml

from .course import Course, lifecycle_for
from .engine import Engine
from .protocol import Protocol, ProtocolError, default_protocols, load_protocol

__all__ = [
    "T0", "ScenarioError", "Failure", "ScenarioResult", "shipped_suite", "scenario_files",
    "load_scenario", "run_scenario", "run_file", "run_paths", "format_results",
]

T0 = datetime(2025, 3, 3, 8, 0, tzinfo=timezone.utc)
PATIENT = "scenario-patient"
SEVERITIES = tuple(s.value for s in SEVERITY_ORDER)
#: expectation statuses: the lifecycle's AlertStatus values plus ``open`` (firing or acknowledged)
STATUSES = ("open",) + tuple(s.value for s in AlertStatus)
_OPEN = {AlertStatus.FIRING, AlertStatus.ACKNOWLEDGED}
_EVENT_KINDS = ("lab", "vital", "steroid", "dose", "correct", "withdraw", "json", "fhir", "hl7", "action")
_COMPARATORS = ("<=", ">=", "<", ">")


class ScenarioError(ValueError):
    """The scenario file itself is wrong (not a failed expectation)."""


@dataclass
class Failure:
    at: float
    what: str
    expected: str
    actual: list[str]


@dataclass
class ScenarioResult:
    path: str
    name: str
    covers: list[str] = field(default_factory=list)
    checks: int = 0
    failures: list[Failure] = field(default_factory=list)
    error: str | None = None

    @property
    def ok(self) -> bool:
        return self.error is None and not self.failures


# --------------------------------------------------------------------------- files

def shipped_suite() -> Path:
    """The folder of shipped scenarios (``alerts/protocols/tests``)."""
    return Path(str(resources.files("alerts").joinpath("protocols/tests")))


def scenario_files(paths: Iterable[str | Path] | None = None) -> list[Path]:
    """Expand files and folders (``*.yaml`` / ``*.yml``, sorted); none = the shipped suite."""
    paths = list(paths or []) or [shipped_suite()]
    out: list[Path] = []
    for p in paths:
        p = Path(p)
        if p.is_dir():
            out.extend(sorted(x for x in p.iterdir() if x.suffix in (".yaml", ".yml") and x.is_file()))
        else:
            out.append(p)
    return out


def load_scenario(path: str | Path) -> dict:
    try:
        data = load_yaml(Path(path).read_text(encoding="utf-8"))
    except OSError as exc:
        raise ScenarioError(f"cannot read: {exc}") from None
    except yaml.YAMLError as exc:
        raise ScenarioError(f"not valid YAML: {exc}") from None
    if not isinstance(data, dict):
        raise ScenarioError("a scenario file must be a mapping (name, protocol, patient, events, expect)")
    return data


# --------------------------------------------------------------------------- helpers

def at_day(day: float) -> datetime:
    return T0 + timedelta(days=float(day))


def _num(v: Any, what: str) -> float:
    if isinstance(v, bool) or not isinstance(v, (int, float)):
        raise ScenarioError(f"{what}: expected a number, got {v!r}")
    if not math.isfinite(v):
        raise ScenarioError(f"{what}: not a finite number")
    return float(v)


def parse_value(v: Any, what: str) -> tuple[float | None, str | None]:
    """A number, or a censored string like ``">3000"`` / ``"<=5"``: (value, comparator)."""
    if v is None:
        return None, None
    if isinstance(v, str):
        s = v.strip()
        for c in _COMPARATORS:
            if s.startswith(c):
                try:
                    return float(s[len(c):].strip()), c
                except ValueError:
                    break
        try:
            return float(s), None
        except ValueError:
            raise ScenarioError(f"{what}: {v!r} is not a number or a censored value like '>3000'") from None
    return _num(v, what), None


def _date(v: Any, what: str) -> date:
    if isinstance(v, date) and not isinstance(v, datetime):
        return v
    try:
        return date.fromisoformat(str(v))
    except ValueError:
        raise ScenarioError(f"{what}: expected a date YYYY-MM-DD, got {v!r}") from None


def _protocols_for(spec: Any, base: Path) -> tuple[list[Protocol], Protocol]:
    shipped = default_protocols()
    if not isinstance(spec, str) or not spec:
        raise ScenarioError("protocol: give a shipped protocol id (e.g. onasemnogene-abeparvovec-iv) or a YAML path")
    for p in shipped:
        if p.id == spec:
            return shipped, p
    path = Path(spec)
    if not path.is_absolute():
        path = base / path
    if path.suffix in (".yaml", ".yml") and path.exists():
        try:
            p = load_protocol(path)
        except ProtocolError as exc:
            raise ScenarioError(f"protocol {spec}: {exc}") from None
        return [p] + [q for q in shipped if not set(q.products) & set(p.products)], p
    raise ScenarioError(f"protocol {spec!r}: not a shipped protocol id ({', '.join(p.id for p in shipped)}) "
                        "nor a protocol file")


def _raw_topic(obj: Any) -> str:
    """The input topic a raw JSON object would be published to, by its shape."""
    if not isinstance(obj, dict):
        return LAB_RESULTS
    if obj.get("type") in ("dose", "steroid"):
        return TREATMENTS
    if "results" in obj:
        return LIVER_FUNCTION
    loinc = obj.get("loinc")
    if isinstance(loinc, str):
        try:
            if catalogue().analyte_for_loinc(loinc).kind == "vital":
                return VITAL_SIGNS
        except Rejected:
            pass
    return LAB_RESULTS


def _fmt_alert(a: Alert) -> str:
    grade = f" grade {a.grade}" if a.grade else ""
    dedupe = f" [{a.dedupe_key}]" if a.dedupe_key else ""
    sev = a.severity.value if a.severity else "critical"
    return f"{a.rule_id}{dedupe}: {sev}{grade}, {a.status.value} (episode {a.episode}) - {a.text.what}"


def _fmt_expect(e: dict) -> str:
    parts = [str(e.get("rule"))]
    if e.get("dedupe"):
        parts[0] += f" [{e['dedupe']}]"
    for k in ("severity", "grade", "status"):
        if k in e:
            parts.append(f"{k} {e[k]}")
    if "status" not in e:
        parts.append("status open")
    if "text_contains" in e:
        parts.append(f"text contains {e['text_contains']!r}")
    return parts[0] + (": " + ", ".join(parts[1:]) if len(parts) > 1 else "")


def _alert_text(a: Alert) -> str:
    return f"{a.text.what} {a.text.why} {a.text.action}".lower()


def _matches(a: Alert, e: dict) -> bool:
    if a.rule_id != e["rule"]:
        return False
    if "dedupe" in e and (a.dedupe_key or "") != str(e["dedupe"]):
        return False
    status = e.get("status", "open")
    if status == "open":
        if a.status not in _OPEN:
            return False
    elif a.status.value != status:
        return False
    if "severity" in e and (a.severity.value if a.severity else "critical") != e["severity"]:
        return False
    if "grade" in e and (a.grade or 0) != int(e["grade"]):
        return False
    if "text_contains" in e and str(e["text_contains"]).lower() not in _alert_text(a):
        return False
    return True


# --------------------------------------------------------------------------- runner

class _Run:
    def __init__(self, data: dict, path: Path) -> None:
        self.data = data
        self.base = path.parent
        self.protocols, self.protocol = _protocols_for(data.get("protocol"), self.base)
        patient = data.get("patient") or {}
        if not isinstance(patient, dict) or "birth_date" not in patient:
            raise ScenarioError("patient: needs birth_date (YYYY-MM-DD)")
        self.patient_id = str(patient.get("id", PATIENT))
        self.birth = _date(patient["birth_date"], "patient.birth_date")
        self.weight = _num(patient.get("weight_kg", 7.5), "patient.weight_kg")
        self.dead: list[str] = []
        self.dead_messages: list[str] = []
        #: scenario event id -> (analyte, unit) of the typed event, for corrections
        self.known: dict[str, tuple[str, str | None, dict]] = {}
        self.n = 0
        tick = _num(data.get("tick_hours", 1), "tick_hours")
        if tick <= 0:
            raise ScenarioError("tick_hours must be > 0")
        self.tick = timedelta(hours=tick)
        # the engine, lifecycle and clock shared with the protocol replay (alerts.course)
        self.course = Course(Engine(self.protocols), lifecycle_for(self.protocols), self.patient_id,
                             anchor=T0, step=self.tick)
        self.engine = self.course.engine
        self.life = self.course.life
        self.state = self.course.state
        self.book = self.course.book

    # -- building events -----------------------------------------------------------
    def _next_id(self, prefix: str) -> str:
        self.n += 1
        return f"{prefix}-{self.n}"

    def _observation(self, kind: str, spec: Any, ev: dict, day: float, arrives: float) -> list[Observation]:
        if not isinstance(spec, dict) or "analyte" not in spec:
            raise ScenarioError(f"{kind}: needs analyte and value")
        key = spec["analyte"]
        a = catalogue().by_key.get(key)
        if a is None:
            raise ScenarioError(f"{kind}: unknown analyte {key!r} (keys are in schemas/data/analytes.yaml)")
        if a.kind != kind:
            raise ScenarioError(f"{kind}: {key} is a {a.kind}, write it as `{a.kind}:`")
        value, comparator = parse_value(spec.get("value"), f"{kind} {key} value")
        unit = spec.get("unit", a.canonical_unit)
        low = spec.get("low")
        high = spec.get("high")
        rr = None
        if low is not None or high is not None:
            rr = ReferenceRange(low=None if low is None else _num(low, "low"),
                                high=None if high is None else _num(high, "high"))
        oid = str(ev.get("id") or self._next_id(key))
        self.known[oid] = (key, unit, spec)
        return [self._build(oid, a.loinc[0], value, comparator, unit, rr, day, arrives,
                            ResultStatus(spec.get("status", "final")), None, spec.get("on_oxygen"))]

    def _build(self, oid: str, loinc: str, value, comparator, unit, rr, day: float, arrives: float,
               status: ResultStatus, corrects: str | None, on_oxygen) -> Observation:
        kwargs = dict(
            observation_id=oid, event_id=oid, patient_id=self.patient_id, loinc=loinc, value=value, unit=unit,
            reference_range=rr, effective_at=at_day(day), status=status, corrects=corrects, source="scenario",
            fmt="json", received_at=max(at_day(arrives), at_day(day)), on_oxygen=on_oxygen,
        )
        if comparator is not None:
            kwargs["comparator"] = comparator
        try:
            return build_observation(**kwargs)
        except TypeError as exc:
            if comparator is not None:
                raise ScenarioError(f"censored value {comparator}{value}: this build has no comparator support") from exc
            raise

    def _correction(self, spec: Any, ev: dict, day: float, arrives: float, withdraw: bool) -> list[Observation]:
        kind = "withdraw" if withdraw else "correct"
        if not isinstance(spec, dict) or "id" not in spec:
            raise ScenarioError(f"{kind}: needs the id of the event it changes")
        target = str(spec["id"])
        if target not in self.known:
            raise ScenarioError(f"{kind}: no earlier lab/vital event with id {target!r}")
        key, unit, orig = self.known[target]
        a = catalogue().by_key[key]
        oid = str(ev.get("id") or f"{target}-{kind}-{self._next_id('c')}")
        if withdraw:
            return [self._build(oid, a.loinc[0], None, None, None, None, day, arrives,
                                ResultStatus.ENTERED_IN_ERROR, target, None)]
        value, comparator = parse_value(spec.get("value"), f"correct {target} value")
        unit = spec.get("unit", unit)
        low = spec.get("low", orig.get("low"))
        high = spec.get("high", orig.get("high"))
        rr = None
        if low is not None or high is not None:
            rr = ReferenceRange(low=None if low is None else _num(low, "low"),
                                high=None if high is None else _num(high, "high"))
        self.known[oid] = (key, unit, {**orig, **spec})
        return [self._build(oid, a.loinc[0], value, comparator, unit, rr, day, arrives,
                            ResultStatus.CORRECTED, target, orig.get("on_oxygen"))]

    def _dose(self, spec: dict) -> DoseEvent:
        product = spec.get("product") or self.protocol.products[0].value
        extra = {k: v for k, v in spec.items() if k not in ("day", "arrives", "product", "id", "ward", "care_team")}
        try:
            return DoseEvent.model_validate({
                "type": "dose", "event_id": str(spec.get("id", "dose-1")), "patient_id": self.patient_id,
                "product": product, "administered_at": at_day(_num(spec.get("day", 0), "dose.day")),
                "birth_date": self.birth, "weight_kg": self.weight, "ward": spec.get("ward", "W1"),
                "care_team": spec.get("care_team", "T1"), "source": "scenario", **extra,
            })
        except ValueError as exc:
            raise ScenarioError(f"dose: {exc}") from None

    def _steroid(self, spec: Any, day: float, ev: dict) -> SteroidEvent:
        if not isinstance(spec, dict) or "phase" not in spec:
            raise ScenarioError("steroid: needs phase (full, taper, stopped)")
        try:
            return SteroidEvent.model_validate({
                "type": "steroid", "event_id": str(ev.get("id") or self._next_id("steroid")),
                "patient_id": self.patient_id, "phase": spec["phase"],
                "dose_mg_per_kg_day": spec.get("dose_mg_per_kg_day", 1.0),
                "drug": spec.get("drug", "prednisolone"), "at": at_day(day), "source": "scenario",
            })
        except ValueError as exc:
            raise ScenarioError(f"steroid: {exc}") from None

    def _raw(self, kind: str, payload: Any, arrives: float) -> list:
        if kind == "hl7":
            if not isinstance(payload, str):
                raise ScenarioError("hl7: give the message as a string")
            raw = payload.strip().replace("\r\n", "\r").replace("\n", "\r").encode("utf-8")
            topic = LAB_RESULTS
        else:
            raw = json.dumps(payload, default=str).encode("utf-8")
            topic = LAB_RESULTS if kind == "fhir" else _raw_topic(payload)
        try:
            decoded = decode(topic, raw, received_at=at_day(arrives))
        except Rejected as rej:
            self.dead.append(rej.reason.value)
            self.dead_messages.append(rej.message)
            return []
        if isinstance(decoded, list):
            return decoded
        return [decoded]

    # -- timeline ------------------------------------------------------------------
    def timeline(self) -> list[tuple[float, int, dict]]:
        items: list[tuple[float, int, dict]] = []
        dose = self.data.get("dose")
        if dose is not None:
            if not isinstance(dose, dict):
                raise ScenarioError("dose: expected a mapping (day, product, arrives)")
            d = _num(dose.get("day", 0), "dose.day")
            items.append((_num(dose.get("arrives", d), "dose.arrives"), -1, {"dose": dose, "day": d}))
        events = self.data.get("events") or []
        if not isinstance(events, list):
            raise ScenarioError("events: expected a list")
        seq = 0
        for i, ev in enumerate(events):
            if not isinstance(ev, dict) or "day" not in ev:
                raise ScenarioError(f"events[{i}]: each event needs `day:` and one of {', '.join(_EVENT_KINDS)}")
            for one in _expand(ev, i):
                kinds = [k for k in _EVENT_KINDS if k in one]
                if len(kinds) != 1:
                    raise ScenarioError(f"events[{i}]: exactly one of {', '.join(_EVENT_KINDS + ('labs',))} "
                                        f"(found {kinds or 'none'})")
                d = _num(one["day"], f"events[{i}].day")
                arr = _num(one.get("arrives", d), f"events[{i}].arrives")
                items.append((arr, seq, one))
                seq += 1
        items.sort(key=lambda x: (x[0], x[1]))
        return items

    def feed(self, ev: dict, arrives: float) -> None:
        now = at_day(arrives)
        day = float(ev["day"])
        if "dose" in ev:
            self._treat(self._dose(ev["dose"]), now)
            return
        if "action" in ev:
            self._action(ev["action"], now)
            return
        if "steroid" in ev:
            self._treat(self._steroid(ev["steroid"], day, ev), now)
            return
        if "lab" in ev or "vital" in ev:
            kind = "lab" if "lab" in ev else "vital"
            try:
                objs = self._observation(kind, ev[kind], ev, day, arrives)
            except Rejected as rej:
                self.dead.append(rej.reason.value)
                self.dead_messages.append(rej.message)
                return
        elif "correct" in ev or "withdraw" in ev:
            w = "withdraw" in ev
            try:
                objs = self._correction(ev["withdraw" if w else "correct"], ev, day, arrives, w)
            except Rejected as rej:
                self.dead.append(rej.reason.value)
                self.dead_messages.append(rej.message)
                return
        else:
            kind = next(k for k in ("json", "fhir", "hl7") if k in ev)
            objs = self._raw(kind, ev[kind], arrives)
        for o in objs:
            if isinstance(o, Observation):
                # as it travels on the observations topic
                o = Observation.model_validate_json(o.model_dump_json())
                if o.patient_id != self.patient_id:
                    raise ScenarioError(f"an event is for patient {o.patient_id!r}; scenarios have one patient "
                                        f"({self.patient_id!r}: set patient.id or use it in raw events)")
                self.course.observe(o, now)
            else:
                if o.patient_id != self.patient_id:
                    raise ScenarioError(f"a treatment event is for patient {o.patient_id!r}, not {self.patient_id!r}")
                self._treat(o, now)

    def _treat(self, event, now: datetime) -> None:
        self.course.treat(event, now)

    def _action(self, spec: Any, now: datetime) -> None:
        if not isinstance(spec, dict) or "kind" not in spec or "rule" not in spec:
            raise ScenarioError("action: needs kind and rule (and by, role)")
        alert = self.book.open_alert_for(spec["rule"], str(spec.get("dedupe", "")))
        if alert is None:
            raise ScenarioError(f"action {spec['kind']} on {spec['rule']}: no open alert for that rule at that time")
        until = spec.get("until_day")
        try:
            action = AlertAction(action=spec["kind"], alert_id=alert.alert_id, patient_id=self.patient_id,
                                 by=str(spec.get("by", "scenario")), role=spec.get("role", "physician"), at=now,
                                 reason=spec.get("reason", "protocol test"),
                                 until=None if until is None else at_day(_num(until, "action.until_day")))
        except ValueError as exc:
            raise ScenarioError(f"action: {exc}") from None
        self.course.act(action, now)


def _expand(ev: dict, i: int) -> list[dict]:
    """Optional shorthands: ``labs: [...]`` (several results drawn together) and
    ``repeat: {every_days: N, until_day: D}`` (the same event every N days up to day D)."""
    if "labs" in ev:
        labs = ev["labs"]
        if not isinstance(labs, list) or not labs:
            raise ScenarioError(f"events[{i}].labs: a list of lab results ({{analyte, value, ...}})")
        base = {k: v for k, v in ev.items() if k not in ("labs", "id")}
        out = [{**base, "lab": dict(lab)} for lab in labs]
    else:
        out = [ev]
    rep = ev.get("repeat")
    if rep is None:
        return out
    if not isinstance(rep, dict) or "every_days" not in rep or "until_day" not in rep:
        raise ScenarioError(f"events[{i}].repeat: needs every_days and until_day")
    if any("id" in e for e in out):
        raise ScenarioError(f"events[{i}]: a repeated event cannot carry an id")
    every = _num(rep["every_days"], "repeat.every_days")
    until = _num(rep["until_day"], "repeat.until_day")
    if every <= 0:
        raise ScenarioError(f"events[{i}].repeat.every_days must be > 0")
    rows = []
    k = 0
    d0 = _num(ev["day"], f"events[{i}].day")
    lag = _num(ev.get("arrives", d0), f"events[{i}].arrives") - d0
    while d0 + k * every <= until + 1e-9:
        for e in out:
            row = {kk: vv for kk, vv in e.items() if kk != "repeat"}
            row["day"] = d0 + k * every
            if "arrives" in e:
                row["arrives"] = row["day"] + lag
            rows.append(row)
        k += 1
    return rows


def run_scenario(data: dict, path: str | Path = "<scenario>") -> ScenarioResult:
    path = Path(path)
    res = ScenarioResult(path=str(path), name=str(data.get("name") or path.stem),
                         covers=[str(c) for c in (data.get("covers") or [])])
    try:
        _run(data, path, res)
    except ScenarioError as exc:
        res.error = str(exc)
    return res


def _run(data: dict, path: Path, res: ScenarioResult) -> None:
    run = _Run(data, path)
    expects = data.get("expect")
    if not isinstance(expects, list) or not expects:
        raise ScenarioError("expect: give at least one check ({at: DAY, alerts: [...], absent: [...]})")
    for i, e in enumerate(expects):
        if not isinstance(e, dict) or "at" not in e:
            raise ScenarioError(f"expect[{i}]: needs `at:` (the day the check runs)")
        for a in e.get("alerts") or []:
            if not isinstance(a, dict) or "rule" not in a:
                raise ScenarioError(f"expect[{i}].alerts: each needs `rule:`")
            if "severity" in a and a["severity"] not in SEVERITIES:
                raise ScenarioError(f"expect[{i}]: severity {a['severity']!r} is not one of {', '.join(SEVERITIES)}")
            if "status" in a and a["status"] not in STATUSES:
                raise ScenarioError(f"expect[{i}]: status {a['status']!r} is not one of {', '.join(STATUSES)}")
    order = sorted(range(len(expects)), key=lambda i: (_num(expects[i]["at"], f"expect[{i}].at"), i))
    items = run.timeline()
    start = at_day(min([x[0] for x in items] + [_num(expects[i]["at"], "at") for i in order]))
    course = run.course
    course.start(start)  # the first tick lands at or after the first event
    pos = 0
    for i in order:
        e = expects[i]
        until = at_day(float(e["at"]))
        while pos < len(items) and at_day(items[pos][0]) <= until:
            arr, _, ev = items[pos]
            course.advance(at_day(arr), inclusive=False)
            run.feed(ev, arr)
            pos += 1
        course.advance(until)
        course.clock(until)  # the check itself sees the clock at `at`
        course.last_tick = max(course.last_tick, until)
        _check(run, e, res)


def _check(run: _Run, e: dict, res: ScenarioResult) -> None:
    at = float(e["at"])
    alerts = sorted(run.book.alerts.values(), key=lambda a: (a.rule_id, a.dedupe_key, a.episode))
    open_alerts = [a for a in alerts if a.status in _OPEN]
    for exp in e.get("alerts") or []:
        res.checks += 1
        if not any(_matches(a, exp) for a in alerts):
            same = [a for a in alerts if a.rule_id == exp["rule"]]
            actual = [_fmt_alert(a) for a in same] or [f"no {exp['rule']} alert at all"]
            res.failures.append(Failure(at, "expected alert", _fmt_expect(exp), actual))
    for rule in e.get("absent") or []:
        res.checks += 1
        hits = [a for a in open_alerts if a.rule_id == rule]
        if hits:
            res.failures.append(Failure(at, "expected no open alert", str(rule), [_fmt_alert(a) for a in hits]))
    if e.get("exact"):
        res.checks += 1
        wanted = e.get("alerts") or []
        listed = {str(w["rule"]) for w in wanted}
        extra = [a for a in open_alerts if a.rule_id not in listed]
        if extra:
            res.failures.append(Failure(at, "unexpected open alerts (exact: true)",
                                        "only " + (", ".join(str(w["rule"]) for w in wanted) or "none"),
                                        [_fmt_alert(a) for a in extra]))
    if "dead_letters" in e:
        res.checks += 1
        want = [str(x) for x in (e.get("dead_letters") or [])]
        if want != run.dead:
            res.failures.append(Failure(at, "dead letters", ", ".join(want) or "none",
                                        [f"{r}: {m}" for r, m in zip(run.dead, run.dead_messages)] or ["none"]))


def run_file(path: str | Path) -> ScenarioResult:
    path = Path(path)
    try:
        data = load_scenario(path)
    except ScenarioError as exc:
        return ScenarioResult(path=str(path), name=path.stem, error=str(exc))
    return run_scenario(data, path)


def run_paths(paths: Iterable[str | Path] | None = None) -> list[ScenarioResult]:
    files = scenario_files(paths)
    results = []
    for f in files:
        if not f.exists():
            results.append(ScenarioResult(path=str(f), name=f.name, error="no such file"))
            continue
        results.append(run_file(f))
    return results


def format_results(results: list[ScenarioResult]) -> str:
    lines: list[str] = []
    for r in results:
        if r.ok:
            lines.append(f"PASS {r.path}: {r.name} ({r.checks} checks)")
            continue
        if r.error is not None:
            lines.append(f"ERROR {r.path}: {r.name}\n  the scenario cannot run: {r.error}")
            continue
        lines.append(f"FAIL {r.path}: {r.name} ({len(r.failures)} of {r.checks} checks failed)")
        for f in r.failures:
            day = f"{f.at:g}"
            lines.append(f"  at day {day}: {f.what}")
            lines.append(f"    - expected: {f.expected}")
            for i, a in enumerate(f.actual):
                lines.append(f"    {'+ actual:  ' if i == 0 else '           '}{a}")
    passed = sum(1 for r in results if r.ok)
    failed = len(results) - passed
    lines.append(f"{passed} scenario(s) passed, {failed} failed")
    return "\n".join(lines)
