"""The clinical protocol: a versioned, validated YAML file (pure data, no Kafka).

A protocol names the product(s) it applies to, the sources its numbers come from, its
rules (thresholds, composite conditions, early-warning scores, schedules, completion
criteria), its routes (who is told, escalation tiers, fail-safe) and age-banded default
reference ranges used when a result carries no range of its own.

Every numeric threshold carries either ``source`` (an id from ``sources``) or
``unconfirmed: true`` with a ``note``; the loader rejects a number with neither.

Validation errors name the offending path, e.g. ``rules[3].bands[0].value: ...``.
"""
from __future__ import annotations

from functools import lru_cache
from importlib import resources
from pathlib import Path
from typing import Annotated, Literal, Union

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from schemas.analytes import catalogue
from schemas.events import Product
from schemas.findings import Severity
from schemas.yaml_text import safe_load as load_yaml

Op = Literal[">", ">=", "<", "<="]
Basis = Literal["absolute", "uln", "lln", "baseline"]
PhaseName = Literal["full", "taper", "stopped", "none"]

#: CTCAE grade -> severity (issue 3)
GRADE_SEVERITY = {1: Severity.INFO, 2: Severity.WARNING, 3: Severity.HIGH, 4: Severity.CRITICAL, 5: Severity.CRITICAL}

#: the rule ids every default protocol must carry (issue 3)
STABLE_RULE_IDS = (
    "liver.alt_increased", "liver.ast_increased", "liver.bilirubin_increased", "liver.hys_law",
    "liver.acute_liver_failure_signature", "heme.platelets_decreased", "heme.tma_screen",
    "renal.creatinine_increased", "cardiac.troponin_i_increased", "vitals.fever",
    "vitals.early_warning", "schedule.overdue", "monitoring.complete",
)

# pseudo-analytes the early-warning items may use beside catalogue analytes
_PSEUDO_ITEMS = {"oxygen", "spo2_scale2"}
#: pseudo item -> the analyte it reads (``spo2_scale2``: NEWS2 SpO2 scale 2, for patients
#: whose dose event sets ``spo2_scale: 2``; ``spo2`` is then not scored on scale 1)
PSEUDO_ITEM_ANALYTE = {"oxygen": "o2_flow", "spo2_scale2": "spo2"}


class ProtocolError(ValueError):
    """A protocol file that does not load or validate; ``str()`` lists path: message lines."""

    def __init__(self, messages: list[str]) -> None:
        self.messages = messages
        super().__init__("\n".join(messages))


class _M(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class Sourced(_M):
    """Mixin: a number that must say where it comes from."""

    source: str | list[str] | None = None
    unconfirmed: bool = False
    note: str | None = None

    @model_validator(mode="after")
    def _needs_source(self):
        if not self.source and not self.unconfirmed:
            raise ValueError("needs a `source` (id from `sources`) or `unconfirmed: true` with a `note`")
        if self.unconfirmed and not self.note:
            raise ValueError("`unconfirmed: true` needs a `note` saying what is missing")
        return self

    def source_ids(self) -> list[str]:
        if not self.source:
            return []
        return [self.source] if isinstance(self.source, str) else list(self.source)


class SourceRef(_M):
    id: str = Field(min_length=1)
    title: str
    url: str | None = None
    ref: str | None = None  # the row of ../shared/clinical-reference.md


class Text(_M):
    what: str
    why: str
    action: str


class Band(Sourced):
    """One cut-off: ``value <op> limit`` where limit = ``value`` x basis (or absolute)."""

    op: Op
    value: float
    basis: Basis = "absolute"
    grade: int | None = Field(default=None, ge=1, le=5)
    severity: Severity | None = None
    #: the limit must be exceeded by consecutive readings spanning MORE than this many hours
    #: (e.g. CTCAE fever grade 4: > 40.0 C for > 24 h). Absolute limits only.
    for_hours: float | None = Field(default=None, gt=0)
    #: the band applies only to these analytes of the rule (e.g. one assay of two)
    analytes: list[str] | None = None
    #: the band still applies when the baseline is abnormal (``abnormal_baseline_bands`` then
    #: replace only the other bands): an absolute escalation that no baseline may suppress
    any_baseline: bool = False

    @model_validator(mode="after")
    def _grade_or_severity(self):
        if self.grade is None and self.severity is None:
            raise ValueError("a band needs a `grade` or a `severity`")
        if self.for_hours is not None and self.basis != "absolute":
            raise ValueError("`for_hours` needs an absolute limit (basis: absolute)")
        return self


class AgeValue(Sourced):
    """An age-specific limit: ``value`` applies while min_months <= age < max_months."""

    min_months: float = Field(default=0, ge=0)
    max_months: float = Field(default=1e6, gt=0)
    value: float


class Condition(Sourced):
    analyte: str
    op: Op
    value: float
    basis: Basis = "absolute"
    #: composite rules: ``any`` = any result of the analyte within the window meets it (the
    #: window's peak, or nadir, is shown); ``newest`` = only the newest result in the window.
    #: Completion criteria always use the newest result.
    use: Literal["any", "newest"] = "any"
    #: at least this many results within the window must meet it (e.g. 2 blood pressures)
    min_count: int = Field(default=1, ge=1, le=8)
    #: the condition applies only when the patient has no pre-dose baseline of the analyte
    #: (an x ULN / x LLN alternative to a x baseline condition)
    only_without_baseline: bool = False
    #: age-specific limits (absolute basis): the band for the patient's age at the result's
    #: time replaces ``value``; no band for the age: the condition cannot be evaluated
    by_age: list[AgeValue] | None = None


class Group(_M):
    all: list["Expr"] | None = None
    any: list["Expr"] | None = None

    @model_validator(mode="after")
    def _one(self):
        if (self.all is None) == (self.any is None):
            raise ValueError("a group has exactly one of `all` or `any`")
        if not (self.all or self.any):
            raise ValueError("a group needs at least one member")
        return self


Expr = Union[Condition, Group]
Group.model_rebuild()


class Active(Sourced):
    """When a rule applies: a window of days since dose, steroid phases and/or an age window."""

    days_since_dose: tuple[float, float] | None = None
    steroid_phases: list[PhaseName] | None = None
    #: [min, max) age in months at the result's time (e.g. children only: [0, 192])
    age_months: tuple[float, float] | None = None


class _RuleBase(_M):
    id: str = Field(pattern=r"^[a-z0-9_]+(\.[a-z0-9_]+)+$")
    title: str
    route: str
    text: Text
    active: Active | None = None
    severity: Severity | None = None


class GradedRule(_RuleBase):
    """Absolute limits, ULN/LLN multiples, baseline multiples, CTCAE grades (worst band wins)."""

    kind: Literal["graded"]
    analytes: list[str] = Field(min_length=1)
    bands: list[Band] = Field(min_length=1)
    #: replaces ``bands`` when the pre-dose baseline is above its ULN (CTCAE "baseline abnormal")
    abnormal_baseline_bands: list[Band] | None = None


class CompositeRule(_RuleBase):
    """Conditions over several analytes' latest results within an event-time window."""

    kind: Literal["composite"]
    window: Sourced | None = None
    window_days: float = Field(gt=0)
    when: Expr
    unless: Expr | None = None
    #: judge ``unless`` on the results at or before the onset (the earliest evidence of the
    #: episode, within the window before it), not on the newest ones (Hy's law: "without
    #: INITIAL findings of cholestasis")
    unless_at_onset: bool = False
    #: analytes whose worsening keeps a finding open even when its condition no longer holds
    #: (default: the analytes of ``when``)
    markers: list[str] | None = None
    severity: Severity = Severity.CRITICAL


class DeltaRule(_RuleBase, Sourced):
    """Latest result against the previous one within ``lookback_days``: ratio latest/previous."""

    kind: Literal["delta"]
    analyte: str
    lookback_days: float = Field(gt=0)
    op: Op
    ratio: float = Field(gt=0)
    #: only when the latest is also beyond this multiple of ULN (None: no such condition)
    min_uln_multiple: float | None = None
    severity: Severity = Severity.WARNING


class ScoreRule(_RuleBase):
    """Age-banded early-warning score (PEWS under ``adult_age_years``, NEWS2 from it)."""

    kind: Literal["early_warning"]
    #: latest vitals within this many hours of the newest vital count towards one score
    vitals_window: Sourced
    vitals_window_hours: float = Field(gt=0)


class OverdueRule(_RuleBase):
    kind: Literal["overdue"]
    severity: Severity = Severity.WARNING


class NoDoseRule(_RuleBase):
    """Results keep arriving for a patient with no (usable) dose record: after ``grace_hours``
    from the first result's effective time, tell someone (clock-driven)."""

    kind: Literal["no_dose_record"]
    grace: Sourced
    grace_hours: float = Field(default=12, ge=0)
    severity: Severity = Severity.WARNING


class CompletionRule(_RuleBase, Sourced):
    kind: Literal["completion"]
    min_days: float = Field(gt=0)
    when: Expr
    severity: Severity = Severity.INFO


class CensoredRule(_RuleBase):
    """A censored result ("<5", ">3000") that some rule cannot grade at its bound (see
    ``alerts.censored``): the value is not used, and this finding says so (per analyte)."""

    kind: Literal["censored"]
    severity: Severity = Severity.WARNING


class SteroidRule(_RuleBase, Sourced):
    """Checks of the corticosteroid course against the label (audit PS-4):

    * ``taper_gate``: when the current taper began, the newest post-dose results at or before
      that time met ``when`` (e.g. ALT or AST >= 2x ULN): the taper started on results that
      the label says forbid it. Cleared when the taper is abandoned (back to full dose) or ends.
      ``settle_hours``: the judgement waits this long (processing time) after the taper record
      arrives, so results drawn before the taper that are still on their way (a lab feed is
      slower than the pharmacy feed) land first; otherwise the taper would be judged on an older
      result and raise a transient alert that depends on arrival order. Once settled, a late
      result re-evaluates it as usual (it is raised or cleared at once).
    * ``early_taper``: a taper began before the regimen's full-dose period ended
      (``steroid_regimen``: start_days_before_dose + full_dose_days, minus ``tolerance_days``).
    * ``abrupt_stop``: the corticosteroid was stopped straight from the full dose, with no taper.
    """

    kind: Literal["steroid"]
    check: Literal["taper_gate", "early_taper", "abrupt_stop"]
    when: Expr | None = None
    tolerance_days: float = Field(default=0, ge=0)
    settle_hours: float = Field(default=0, ge=0)
    severity: Severity = Severity.WARNING


class RangeCheckRule(_RuleBase, Sourced):
    """A result's own reference range that differs from the protocol's age default by more
    than ``max_ratio`` (either way) is implausible (e.g. a umol/L range sent with a mg/dL
    value): the result is graded against the more alerting of the two limits (lower ULN,
    higher LLN) and this finding asks a person to check the range (per analyte)."""

    kind: Literal["range_check"]
    max_ratio: float = Field(gt=1)
    severity: Severity = Severity.WARNING


Rule = Annotated[
    Union[GradedRule, CompositeRule, DeltaRule, ScoreRule, OverdueRule, CompletionRule, CensoredRule,
          RangeCheckRule, SteroidRule, NoDoseRule],
    Field(discriminator="kind"),
]


class Period(Sourced):
    """Expected sampling interval while days since dose lie in [from_day, to_day)."""

    from_day: float = Field(ge=0)
    to_day: float = Field(gt=0)
    every_days: float = Field(gt=0)
    steroid_phases: list[PhaseName] | None = None
    #: days since the current steroid phase began, [from, to)
    phase_days: tuple[float, float] | None = None
    #: the period only exists until the completion rule holds (the label's "continue until
    #: unremarkable" after the minimum period). Other periods are never ended by completion.
    ends_on_completion: bool = False

    @model_validator(mode="after")
    def _order(self):
        if self.to_day <= self.from_day:
            raise ValueError("to_day must be after from_day")
        return self


class Schedule(_M):
    group: str = Field(pattern=r"^[a-z0-9_]+$")
    analytes: list[str] = Field(min_length=1)
    #: ``each``: every analyte must be sampled on time; ``any``: one of them suffices
    require: Literal["each", "any"] = "each"
    grace: Sourced
    grace_hours: float = Field(ge=0)
    periods: list[Period] = Field(min_length=1)


class AgeRange(Sourced):
    min_months: float = Field(default=0, ge=0)
    max_months: float = Field(default=1e6, gt=0)
    low: float | None = None
    high: float | None = None
    #: [min, max] a lab's own ULN may plausibly take at this age (``range_check`` rule); when
    #: absent, a ULN within ``max_ratio`` of ``high`` is plausible
    plausible_high: tuple[float, float] | None = None


class ScoreCut(_M):
    score: int = Field(ge=0, le=10)
    op: Op
    value: float


class ItemBand(Sourced):
    min_months: float = Field(default=0, ge=0)
    max_months: float = Field(default=1e6, gt=0)
    #: every cut that matches scores; the item scores the highest
    cuts: list[ScoreCut]
    #: for the ``oxygen`` item: score when the SpO2 result says the patient is on oxygen
    on_oxygen_score: int | None = None
    #: cuts that score only while the patient is on oxygen (NEWS2 SpO2 scale 2: >= 93 on O2)
    on_oxygen_cuts: list[ScoreCut] | None = None


class ScoreItem(_M):
    #: a catalogue analyte (heart_rate, respiratory_rate, ...) or ``oxygen`` (uses o2_flow and on_oxygen)
    item: str
    bands: list[ItemBand] = Field(min_length=1)


class SeverityBand(Sourced):
    min_score: int = Field(ge=0)
    severity: Severity


class ScoreSystem(Sourced):
    name: str
    items: list[ScoreItem] = Field(min_length=1)
    severity_bands: list[SeverityBand] = Field(min_length=1)
    #: any single item scoring at least this -> at least ``single_item_severity``
    single_item_score: int | None = None
    single_item_severity: Severity | None = None


class SteroidRegimen(Sourced):
    """The product's corticosteroid regimen as the label states it (documentation for the
    ward and the summary; the taper gate is a rule). ``None``: not stated by any source."""

    drug: str
    dose_mg_per_kg_day: float | None = Field(default=None, gt=0)
    #: days before the dose the corticosteroid starts (1 = 24 h before)
    start_days_before_dose: float | None = Field(default=None, ge=0)
    #: total days at the full dose before the taper is considered
    full_dose_days: float | None = Field(default=None, gt=0)
    taper_days: float | None = Field(default=None, gt=0)
    summary: str


class EarlyWarning(_M):
    adult_age_years: float = 16
    adult_age: Sourced
    pews: ScoreSystem
    news2: ScoreSystem


class EscalateAfter(_M):
    info: float | None = None
    warning: float | None = None
    high: float | None = None
    critical: float | None = None

    def for_severity(self, severity: Severity | str) -> float | None:
        return getattr(self, str(Severity(severity).value))


class RouteTier(_M):
    name: str = Field(min_length=1)
    recipients: list[str] = Field(min_length=1)
    escalate_after_minutes: EscalateAfter = EscalateAfter()


class Failsafe(_M):
    name: str = Field(min_length=1)
    recipients: list[str] = Field(min_length=1)


class Route(_M):
    id: str = Field(min_length=1)
    tiers: list[RouteTier] = Field(min_length=1)
    failsafe: Failsafe
    note: str | None = None


class HistoryLimits(_M):
    lab: int = Field(default=3, ge=2, le=50)
    vital: int = Field(default=2, ge=2, le=50)


class Protocol(_M):
    id: str = Field(pattern=r"^[a-z0-9][a-z0-9._-]*$")
    version: str = Field(min_length=1)
    title: str
    products: list[Product] = Field(min_length=1)
    disclaimer: str | None = None
    sources: list[SourceRef] = Field(min_length=1)
    history: HistoryLimits = HistoryLimits()
    reference_ranges: dict[str, list[AgeRange]] = Field(default_factory=dict)
    early_warning: EarlyWarning
    routes: list[Route] = Field(min_length=1)
    rules: list[Rule] = Field(min_length=1)
    schedules: list[Schedule] = Field(default_factory=list)
    steroid_regimen: SteroidRegimen | None = None

    @model_validator(mode="after")
    def _cross_refs(self):
        errs: list[str] = []
        src = {s.id for s in self.sources}
        cat = catalogue().by_key
        routes = [r.id for r in self.routes]
        if len(set(routes)) != len(routes):
            errs.append("routes: duplicate route id")
        ids = [r.id for r in self.rules]
        for i, rid in enumerate(ids):
            if ids.index(rid) != i:
                errs.append(f"rules[{i}].id: duplicate rule id {rid!r}")

        def check_sourced(obj: Sourced, path: str) -> None:
            for s in obj.source_ids():
                if s not in src:
                    errs.append(f"{path}.source: unknown source id {s!r}")

        def check_analyte(a: str, path: str) -> None:
            if a not in cat:
                errs.append(f"{path}: unknown analyte {a!r}")

        def walk(e: Expr, path: str) -> None:
            if isinstance(e, Condition):
                check_analyte(e.analyte, path + ".analyte")
                check_sourced(e, path)
                for j, b in enumerate(e.by_age or []):
                    check_sourced(b, f"{path}.by_age[{j}]")
                    if e.basis != "absolute":
                        errs.append(f"{path}.by_age: needs an absolute limit (basis: absolute)")
            else:
                key = "all" if e.all is not None else "any"
                for j, sub in enumerate(e.all if e.all is not None else e.any):
                    walk(sub, f"{path}.{key}[{j}]")

        for i, r in enumerate(self.rules):
            p = f"rules[{i}]"
            if r.route not in routes:
                errs.append(f"{p}.route: unknown route {r.route!r} (routes: {', '.join(routes)})")
            if r.active is not None:
                check_sourced(r.active, p + ".active")
            if isinstance(r, GradedRule):
                for a in r.analytes:
                    check_analyte(a, p + ".analytes")
                for j, b in enumerate(r.bands):
                    check_sourced(b, f"{p}.bands[{j}]")
                    for a in b.analytes or []:
                        if a not in r.analytes:
                            errs.append(f"{p}.bands[{j}].analytes: {a!r} is not an analyte of the rule")
                    if b.for_hours is not None and len(r.analytes) != 1:
                        errs.append(f"{p}.bands[{j}].for_hours: only for a rule over one analyte")
                for j, b in enumerate(r.abnormal_baseline_bands or []):
                    check_sourced(b, f"{p}.abnormal_baseline_bands[{j}]")
                    if b.basis != "baseline":
                        errs.append(f"{p}.abnormal_baseline_bands[{j}].basis: must be 'baseline'")
            elif isinstance(r, CompositeRule):
                walk(r.when, p + ".when")
                if r.unless is not None:
                    walk(r.unless, p + ".unless")
                if r.window is not None:
                    check_sourced(r.window, p + ".window")
                for a in r.markers or []:
                    check_analyte(a, p + ".markers")
            elif isinstance(r, NoDoseRule):
                check_sourced(r.grace, p + ".grace")
            elif isinstance(r, DeltaRule):
                check_analyte(r.analyte, p + ".analyte")
                check_sourced(r, p)
            elif isinstance(r, CompletionRule):
                walk(r.when, p + ".when")
                check_sourced(r, p)
            elif isinstance(r, ScoreRule):
                check_sourced(r.vitals_window, p + ".vitals_window")
            elif isinstance(r, RangeCheckRule):
                check_sourced(r, p)
            elif isinstance(r, SteroidRule):
                check_sourced(r, p)
                if r.check == "taper_gate":
                    if r.when is None:
                        errs.append(f"{p}.when: a taper_gate check needs conditions")
                    else:
                        walk(r.when, p + ".when")
                if r.check == "early_taper":
                    sr = self.steroid_regimen
                    if sr is None or sr.full_dose_days is None or sr.start_days_before_dose is None:
                        errs.append(f"{p}: early_taper needs steroid_regimen.full_dose_days and start_days_before_dose")
        for i, s in enumerate(self.schedules):
            for a in s.analytes:
                check_analyte(a, f"schedules[{i}].analytes")
            check_sourced(s.grace, f"schedules[{i}].grace")
            for j, per in enumerate(s.periods):
                check_sourced(per, f"schedules[{i}].periods[{j}]")
        for a, bands in self.reference_ranges.items():
            check_analyte(a, f"reference_ranges.{a}")
            for j, b in enumerate(bands):
                check_sourced(b, f"reference_ranges.{a}[{j}]")
        for name in ("pews", "news2"):
            sysm: ScoreSystem = getattr(self.early_warning, name)
            check_sourced(sysm, f"early_warning.{name}")
            for j, it in enumerate(sysm.items):
                if it.item not in _PSEUDO_ITEMS:
                    check_analyte(it.item, f"early_warning.{name}.items[{j}].item")
                for k, b in enumerate(it.bands):
                    check_sourced(b, f"early_warning.{name}.items[{j}].bands[{k}]")
            for j, b in enumerate(sysm.severity_bands):
                check_sourced(b, f"early_warning.{name}.severity_bands[{j}]")
        check_sourced(self.early_warning.adult_age, "early_warning.adult_age")
        if self.steroid_regimen is not None:
            check_sourced(self.steroid_regimen, "steroid_regimen")
        kinds = {r.kind for r in self.rules}
        if "overdue" in kinds and not self.schedules:
            errs.append("schedules: an `overdue` rule needs at least one schedule")
        if errs:
            raise ValueError("; ".join(errs))
        return self

    # -- helpers ---------------------------------------------------------------
    @property
    def ref(self):
        from schemas.findings import ProtocolRef

        return ProtocolRef(id=self.id, version=self.version)

    def route(self, route_id: str) -> Route:
        for r in self.routes:
            if r.id == route_id:
                return r
        raise KeyError(route_id)

    def rule(self, rule_id: str):
        for r in self.rules:
            if r.id == rule_id:
                return r
        raise KeyError(rule_id)


# -- loading ---------------------------------------------------------------------

_UNION_TAGS = {"graded", "composite", "delta", "early_warning", "overdue", "completion", "censored",
               "range_check", "steroid", "no_dose_record", "Condition", "Group"}


def _format_loc(loc: tuple) -> str:
    out = ""
    for i, part in enumerate(loc):
        if isinstance(part, int):
            out += f"[{part}]"
            continue
        part = str(part)
        # discriminator / union member names pydantic inserts after a list index
        if part in _UNION_TAGS and i > 0 and isinstance(loc[i - 1], int):
            continue
        if part.startswith("function-after[") or part.startswith("tagged-union["):
            continue
        out += ("." if out else "") + part
    return out or "(top level)"


def _errors(exc: ValidationError) -> list[str]:
    msgs = []
    for e in exc.errors(include_url=False, include_input=False):
        msg = e.get("msg", "")
        if msg.startswith("Value error, "):
            msg = msg[len("Value error, "):]
        loc = _format_loc(tuple(e.get("loc", ())))
        # cross-reference errors already carry their paths
        if loc == "(top level)" and ": " in msg:
            msgs.extend(m.strip() for m in msg.split("; "))
        else:
            msgs.append(f"{loc}: {msg}")
    return msgs


def parse_protocol(data: object) -> Protocol:
    if not isinstance(data, dict):
        raise ProtocolError(["(top level): a protocol is a mapping"])
    try:
        return Protocol.model_validate(data)
    except ValidationError as exc:
        raise ProtocolError(_errors(exc)) from None


def load_protocol_text(text: str) -> Protocol:
    try:
        data = load_yaml(text)
    except yaml.YAMLError as exc:
        raise ProtocolError([f"(yaml): {exc}"]) from None
    return parse_protocol(data)


def load_protocol(path: str | Path) -> Protocol:
    """Load and validate one protocol file. Raises ``ProtocolError`` (paths in the message)."""
    try:
        text = Path(path).read_text(encoding="utf-8")
    except OSError as exc:
        raise ProtocolError([f"(file): {exc}"]) from None
    return load_protocol_text(text)


def default_protocol(product: str | Product) -> Protocol:
    """The shipped protocol for ``product`` (``onasemnogene-abeparvovec-iv`` or ``-it``), cached."""
    return _default_protocol(Product(product).value)


@lru_cache(maxsize=8)
def _default_protocol(name: str) -> Protocol:
    text = resources.files("alerts").joinpath(f"protocols/{name}.yaml").read_text(encoding="utf-8")
    return load_protocol_text(text)


def default_protocols() -> list[Protocol]:
    return [default_protocol(p) for p in Product]


def protocol_for_product(product: str | Product, protocols: list[Protocol] | None = None) -> Protocol:
    """The first protocol in ``protocols`` (default: the shipped ones) that applies to ``product``."""
    product = Product(product)
    for p in protocols if protocols is not None else default_protocols():
        if product in p.products:
            return p
    raise KeyError(f"no protocol for product {product.value}")


# -- summary for `monitor protocol check FILE` -------------------------------------

def _count_unconfirmed(p: Protocol) -> list[str]:
    found: list[str] = []

    def visit(obj, path: str) -> None:
        if isinstance(obj, Sourced) and obj.unconfirmed:
            found.append(path)
        if isinstance(obj, BaseModel):
            for name in type(obj).model_fields:
                visit(getattr(obj, name), f"{path}.{name}" if path else name)
        elif isinstance(obj, (list, tuple)):
            for i, x in enumerate(obj):
                visit(x, f"{path}[{i}]")
        elif isinstance(obj, dict):
            for k, x in obj.items():
                visit(x, f"{path}.{k}")

    visit(p, "")
    return found


def summarise(p: Protocol) -> str:
    lines = [
        f"protocol {p.id} version {p.version}: {p.title}",
        f"products: {', '.join(x.value for x in p.products)}",
        f"sources: {len(p.sources)}",
        "routes: " + ", ".join(f"{r.id} ({len(r.tiers)} tiers, failsafe {r.failsafe.name})" for r in p.routes),
        f"rules: {len(p.rules)}",
    ]
    for r in p.rules:
        sev = r.severity.value if r.severity else "by grade"
        win = ""
        if r.active and r.active.days_since_dose:
            win = f" days {r.active.days_since_dose[0]:g}-{r.active.days_since_dose[1]:g}"
        if r.active and r.active.steroid_phases:
            win += f" steroid {'/'.join(r.active.steroid_phases)}"
        if r.active and r.active.age_months:
            win += f" age {r.active.age_months[0]:g}-{r.active.age_months[1]:g} months"
        lines.append(f"  {r.id:<40} {r.kind:<13} {sev:<9} route={r.route}{win}")
    sr = p.steroid_regimen
    if sr is not None:
        lines.append(f"steroid regimen: {sr.summary}" + (" (UNCONFIRMED)" if sr.unconfirmed else ""))
    lines.append(f"schedules: {len(p.schedules)}")
    for s in p.schedules:
        per = "; ".join(
            f"d{x.from_day:g}-{x.to_day:g} every {x.every_days:g}d"
            + (f" ({'/'.join(x.steroid_phases)}" if x.steroid_phases else "")
            + (f", days {x.phase_days[0]:g}-{x.phase_days[1]:g} of the phase" if x.steroid_phases and x.phase_days else "")
            + (")" if x.steroid_phases else "")
            + (" until complete" if x.ends_on_completion else "")
            for x in s.periods
        )
        lines.append(f"  {s.group:<12} {','.join(s.analytes)}: {per}; grace {s.grace_hours:g} h")
    unc = _count_unconfirmed(p)
    lines.append(f"unconfirmed numbers: {len(unc)} (check before going live)")
    for u in unc:
        lines.append(f"  {u}")
    missing = [rid for rid in STABLE_RULE_IDS if rid not in {r.id for r in p.rules}]
    if missing:
        lines.append("missing stable rule ids: " + ", ".join(missing))
    return "\n".join(lines)
