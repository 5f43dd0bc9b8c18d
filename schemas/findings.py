"""Findings: what the rule engine concludes about one patient and one rule.

The evaluate stage emits findings keyed by patient on the ``findings`` topic; the alert
lifecycle consumes them. A finding says whether the condition is ``present``,
``cleared`` (evaluated again and no longer met) or ``retracted`` (the evidence that made
it present was corrected away or entered in error).
"""
from __future__ import annotations

from datetime import datetime
from enum import StrEnum
from operator import attrgetter
from typing import Literal

from pydantic import AwareDatetime, BaseModel, ConfigDict, Field


class Severity(StrEnum):
    INFO = "info"
    WARNING = "warning"
    HIGH = "high"
    CRITICAL = "critical"

    @property
    def rank(self) -> int:
        return _RANK[self]


#: the one severity ranking, least to most urgent: ``Severity.rank`` is the index here
SEVERITY_ORDER: tuple[Severity, ...] = (Severity.INFO, Severity.WARNING, Severity.HIGH, Severity.CRITICAL)
_RANK = {s: i for i, s in enumerate(SEVERITY_ORDER)}
#: rank by severity, looked up by member or by its JSON value ("high": a StrEnum member
#: and its value are equal keys)
SEVERITY_RANK: dict[str, int] = {s.value: i for i, s in enumerate(SEVERITY_ORDER)}


def fast_enum_value(cls: type[StrEnum]) -> type[StrEnum]:
    """``member.value`` as a plain property reading ``_value_`` (the same value).

    Python 3.11's ``Enum.value`` is a descriptor written in Python; pydantic's serializer
    reads ``.value`` of every enum it writes (an alert version writes a few dozen: each
    history entry has a status or two and a severity), and that lookup was a visible part
    of the clinical stage's time per alert. Members, values, comparisons and JSON are
    unchanged."""
    cls.value = property(attrgetter("_value_"))  # type: ignore[assignment]
    return cls


fast_enum_value(Severity)


def effective_severity(severity: "Severity | str | None") -> Severity:
    """A missing or unknown severity is treated as critical (fail safe)."""
    if severity is None:
        return Severity.CRITICAL
    try:
        return Severity(severity)
    except ValueError:
        return Severity.CRITICAL


class ProtocolRef(BaseModel):
    model_config = ConfigDict(frozen=True)
    id: str
    version: str


#: ``Evidence.note`` on a ``retracted`` finding for a result that was corrected away or
#: withdrawn (the alert lifecycle resolves rather than retracts an alert that had also stood
#: on other valid results)
WITHDRAWN_NOTE = "corrected or withdrawn"


class Evidence(BaseModel):
    """One observation (or computed value) that a finding rests on, with the limit it crossed."""

    model_config = ConfigDict(frozen=True)
    observation_id: str | None = None
    analyte: str
    value: float | None = None
    unit: str | None = None
    effective_at: AwareDatetime | None = None
    limit: float | None = None
    limit_unit: str | None = None
    comparison: str | None = None  # e.g. ">", ">=", "<"
    basis: str | None = None  # "absolute" | "uln" | "lln" | "baseline" | "score" | "schedule" ...
    multiple: float | None = None  # value as a multiple of ULN / baseline where relevant
    note: str | None = None


class FindingText(BaseModel):
    model_config = ConfigDict(frozen=True)
    what: str
    why: str
    action: str


class Finding(BaseModel):
    model_config = ConfigDict(frozen=True)

    finding_id: str
    patient_id: str
    rule_id: str
    #: extra dedupe component, e.g. the analyte for a rule that covers several; "" if none
    dedupe_key: str = ""
    state: Literal["present", "cleared", "retracted"] = "present"
    severity: Severity | None = None
    grade: int | None = None
    evidence: list[Evidence] = Field(default_factory=list)
    protocol: ProtocolRef
    #: event time of the newest observation the finding rests on (or the overdue deadline)
    effective_at: AwareDatetime
    #: wall-clock time the finding was produced
    evaluated_at: AwareDatetime
    route: str | None = None
    text: FindingText | None = None
    #: context for routing and display (ward, care team, product, days since dose)
    ward: str | None = None
    care_team: str | None = None
    days_since_dose: float | None = None
    received_at: datetime | None = None
