"""Input events as lab systems publish them (JSON on the wire) and the canonical Observation.

Field names are the wire contract; ``monitor schema`` exports a JSON Schema for each.
"""
from __future__ import annotations

import math
from datetime import date, datetime
from enum import StrEnum
from typing import Annotated, Any, Literal, Union

from pydantic import AwareDatetime, BaseModel, ConfigDict, Field, field_validator

NonEmptyId = Annotated[str, Field(min_length=1, max_length=128, pattern=r"\S")]


#: a censored result: the true value lies beyond ``value`` in this direction (a detection or
#: reporting limit, e.g. troponin ">50000" or platelets "<10")
Comparator = Literal["<", "<=", ">=", ">"]


class ResultStatus(StrEnum):
    FINAL = "final"
    PRELIMINARY = "preliminary"
    CORRECTED = "corrected"
    AMENDED = "amended"
    ENTERED_IN_ERROR = "entered-in-error"
    CANCELLED = "cancelled"


#: statuses that replace an earlier result (the one named in ``corrects``, or the same event id)
REPLACING_STATUSES = frozenset({ResultStatus.CORRECTED, ResultStatus.AMENDED})
#: statuses that withdraw an earlier result
RETRACTING_STATUSES = frozenset({ResultStatus.ENTERED_IN_ERROR, ResultStatus.CANCELLED})


def _finite(v: float | None) -> float | None:
    if v is not None and not math.isfinite(v):
        raise ValueError("value must be a finite number")
    return v


class _Wire(BaseModel):
    """Strict wire contract (issue 16): an unknown field is rejected (``unknown_field``), never
    dropped -- a misspelt ``refrence_range`` must not silently lose the lab's range. Free
    additional data goes under ``extensions`` (top-level events only)."""

    model_config = ConfigDict(extra="forbid", frozen=True, allow_inf_nan=False)


#: free additional data of the sender, carried but not read (bounded by the JSON limits)
Extensions = Annotated[dict[str, Any] | None, Field(
    default=None, description="free additional data of the sender; not interpreted")]


class ReferenceRange(_Wire):
    low: float | None = None
    high: float | None = None


class LabResult(_Wire):
    """One laboratory result, topic ``lab-results``."""

    event_id: NonEmptyId
    patient_id: NonEmptyId
    loinc: str = Field(min_length=3, max_length=16)
    value: float | None = None
    #: set when the lab reports a bound, not a value ("<5", ">3000"): ``value`` is the bound
    comparator: Comparator | None = None
    unit: str | None = Field(default=None, max_length=64)
    reference_range: ReferenceRange | None = None
    effective_at: AwareDatetime
    #: required: a missing status is not guessed to be final (issue 16)
    status: ResultStatus
    corrects: NonEmptyId | None = None
    source: str = Field(default="unknown", min_length=1, max_length=128)
    abnormal_flag: str | None = Field(default=None, max_length=8)
    extensions: Extensions = None


class VitalSign(_Wire):
    """One vital-sign measurement, topic ``vital-signs``."""

    event_id: NonEmptyId
    patient_id: NonEmptyId
    loinc: str = Field(min_length=3, max_length=16)
    value: float
    #: set when the device reports a bound, not a value: ``value`` is the bound
    comparator: Comparator | None = None
    unit: str | None = Field(default=None, max_length=64)
    effective_at: AwareDatetime
    status: ResultStatus = ResultStatus.FINAL
    corrects: NonEmptyId | None = None
    source: str = Field(default="unknown", min_length=1, max_length=128)
    on_oxygen: bool | None = None
    extensions: Extensions = None


class PanelResult(_Wire):
    loinc: str = Field(min_length=3, max_length=16)
    value: float | None = None
    #: set when the lab reports a bound, not a value: ``value`` is the bound
    comparator: Comparator | None = None
    unit: str | None = Field(default=None, max_length=64)
    reference_range: ReferenceRange | None = None
    status: ResultStatus | None = None


class LiverFunctionPanel(_Wire):
    """A liver-function panel, topic ``liver-function``; fanned out into one observation per result."""

    event_id: NonEmptyId
    patient_id: NonEmptyId
    effective_at: AwareDatetime
    source: str = Field(default="unknown", min_length=1, max_length=128)
    #: required: a missing status is not guessed to be final (issue 16); a result may override it
    status: ResultStatus
    corrects: NonEmptyId | None = None
    results: list[PanelResult] = Field(min_length=1, max_length=64)
    extensions: Extensions = None


class Product(StrEnum):
    IV = "onasemnogene-abeparvovec-iv"
    IT = "onasemnogene-abeparvovec-it"


class DoseEvent(_Wire):
    """The gene-therapy dose, topic ``treatments``."""

    type: Literal["dose"]
    event_id: NonEmptyId
    patient_id: NonEmptyId
    product: Product
    administered_at: AwareDatetime
    birth_date: date
    weight_kg: float = Field(gt=0, lt=400)
    ward: str | None = Field(default=None, max_length=64)
    care_team: str | None = Field(default=None, max_length=64)
    source: str = Field(default="unknown", min_length=1, max_length=128)
    #: per-patient NEWS2 SpO2 scale (patients 16 and over): 2 for a prescribed target of
    #: 88-92 % (hypercapnic respiratory failure, e.g. on NIV); absent or 1: scale 1. To change
    #: it later, send the dose event again (same event_id) with the new value.
    spo2_scale: Literal[1, 2] | None = None
    extensions: Extensions = None


class SteroidPhase(StrEnum):
    FULL = "full"
    TAPER = "taper"
    STOPPED = "stopped"


class SteroidEvent(_Wire):
    """A change in the corticosteroid regimen, topic ``treatments``."""

    type: Literal["steroid"]
    event_id: NonEmptyId
    patient_id: NonEmptyId
    drug: str = Field(default="prednisolone", min_length=1, max_length=64)
    dose_mg_per_kg_day: float = Field(ge=0, lt=100)
    phase: SteroidPhase
    at: AwareDatetime
    source: str = Field(default="unknown", min_length=1, max_length=128)
    extensions: Extensions = None


TreatmentEvent = Annotated[Union[DoseEvent, SteroidEvent], Field(discriminator="type")]


class TreatmentEnvelope(_Wire):
    event: TreatmentEvent


class Observation(BaseModel):
    """The canonical observation every input becomes, keyed by ``patient_id`` on ``observations``.

    ``value`` and ``reference_range`` are in the analyte's canonical unit; the unit and
    value as received are kept beside them.
    """

    model_config = ConfigDict(frozen=True, allow_inf_nan=False)

    observation_id: str
    event_id: str
    patient_id: str
    analyte: str
    loinc: str
    kind: Literal["lab", "vital"]
    value: float | None
    #: a censored result: the true value lies beyond ``value`` in this direction (``value``
    #: is the reported bound, converted). ``None``: ``value`` is the measured value.
    comparator: Comparator | None = None
    unit: str
    reference_range: ReferenceRange | None = None
    original_value: float | None = None
    original_unit: str | None = None
    effective_at: AwareDatetime
    status: ResultStatus = ResultStatus.FINAL
    corrects: str | None = None
    source: str
    format: Literal["json", "fhir", "hl7"] = "json"
    abnormal_flag: str | None = None
    on_oxygen: bool | None = None
    received_at: AwareDatetime | None = None

    @field_validator("value", "original_value")
    @classmethod
    def _check_finite(cls, v: float | None) -> float | None:
        return _finite(v)

    @property
    def replaces(self) -> str | None:
        """The observation id this one replaces or withdraws, if any."""
        if self.status in REPLACING_STATUSES or self.status in RETRACTING_STATUSES:
            return self.corrects or self.observation_id
        return self.corrects


class DeadLetter(BaseModel):
    """What the dead-letter headers carry beside the original bytes (value)."""

    reason: str
    message: str
    source_topic: str
    source_partition: int | None = None
    source_offset: int | None = None
    received_at: datetime
