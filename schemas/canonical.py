"""The canonical observation, shared by every wire format: one lab value gives one
``Observation`` whichever way it arrived (JSON, FHIR R4, HL7 v2).

``build_observation`` validates codes, units, bounds and times and converts to the canonical
unit; ``Limits`` bounds what one payload may cost. The format adapters (``schemas.ingest`` for
JSON, ``schemas.fhir``, ``schemas.hl7v2``) build on this module and this module on none of
them, so no adapter imports another's module to reach the shared parts. No Kafka here.
"""
from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime, timedelta, timezone
from math import isfinite
from typing import get_args
from zoneinfo import ZoneInfo

from pydantic import ValidationError
from pydantic_core import TzInfo

from .analytes import SIGNIFICANT_DIGITS, catalogue, round_sig_cached
from .errors import Reason, Rejected
from .events import RETRACTING_STATUSES, Comparator, Observation, ReferenceRange, ResultStatus


@dataclass(frozen=True)
class Hl7Limits:
    """Structural bounds for one HL7 v2 message (generous for a real ORU^R01)."""

    max_chars: int = 262_144          # 256 KiB: a large ORU is a few KiB; embedded PDFs are not read here
    max_segments: int = 2_000
    max_fields: int = 256             # per segment
    max_repetitions: int = 64         # per segment (all its fields together)
    max_components: int = 512         # per segment
    max_subcomponents: int = 256      # per segment


DEFAULT_HL7_LIMITS = Hl7Limits()


@dataclass(frozen=True)
class Limits:
    max_bytes: int = 1_048_576
    max_depth: int = 32
    max_future: timedelta = timedelta(hours=24)
    #: JSON values (objects, arrays and scalars) in one payload: bounds the Python work
    #: done on a parsed document (security review H1: parsing stays cheap on the loop)
    max_json_values: int = 100_000
    #: entries in one FHIR Bundle (each is validated by fhir.resources, ~0.1 ms apiece)
    max_bundle_entries: int = 250
    #: structural bounds for HL7 v2 (byte cap, segments, fields, repetitions...)
    hl7: Hl7Limits = DEFAULT_HL7_LIMITS
    #: the HL7 v2 processing id (MSH-11) accepted; another is ``hl7_processing_id``
    hl7_processing_id: str = "P"
    #: per-source code and unit maps (``schemas.codemaps.CodeMaps``); None = none
    code_maps: object | None = None


DEFAULT_LIMITS = Limits()


def rejection_from_validation(exc: ValidationError) -> Rejected:
    """Map the first pydantic error onto a reason code with a readable message."""
    errors = exc.errors(include_url=False, include_input=False)
    extra = [e for e in errors if e.get("type") == "extra_forbidden"]
    if extra:  # strict contract (issue 16): name every unknown field, bounded
        locs = [tuple(e.get("loc", ())) for e in extra]
        # a treatment is validated as {"event": <dose|steroid>}: name the field as sent
        names = [".".join(map(str, loc[2:] if loc[:1] == ("event",) else loc)) for loc in locs]
        shown = ", ".join(repr(n[:64]) for n in names[:10]) + (f" (+{len(names) - 10} more)" if len(names) > 10 else "")
        return Rejected(Reason.UNKNOWN_FIELD,
                        f"unknown field(s) {shown}; free additional data goes under 'extensions'")
    first = errors[0] if errors else {"type": "unknown", "loc": (), "msg": str(exc)}
    loc = ".".join(str(p) for p in first.get("loc", ()))
    etype = first.get("type", "")
    msg = f"{loc or 'payload'}: {first.get('msg', '')}"
    if len(errors) > 1:
        msg += f" (+{len(errors) - 1} more)"
    if etype == "timezone_aware":
        return Rejected(Reason.NAIVE_TIMESTAMP, msg + "; timestamps need an offset, e.g. +00:00")
    if etype == "finite_number":
        return Rejected(Reason.NON_FINITE_VALUE, msg)
    last = str(first.get("loc", ("",))[-1]) if first.get("loc") else ""
    if last.endswith("_id") and etype in ("string_too_short", "string_pattern_mismatch"):
        return Rejected(Reason.EMPTY_ID, msg)
    return Rejected(Reason.SCHEMA_INVALID, msg)


def check_not_future(when: datetime, received_at: datetime, limits: Limits, field: str) -> None:
    if when - received_at > limits.max_future:
        raise Rejected(
            Reason.FUTURE_TIMESTAMP,
            f"{field} {when.isoformat()} is more than {limits.max_future} after receipt",
        )


def build_observation(
    *,
    observation_id: str,
    event_id: str,
    patient_id: str,
    loinc: str,
    value: float | None,
    unit: str | None,
    reference_range: ReferenceRange | None,
    effective_at: datetime,
    status: ResultStatus,
    corrects: str | None,
    source: str,
    fmt: str,
    received_at: datetime,
    limits: Limits = DEFAULT_LIMITS,
    abnormal_flag: str | None = None,
    on_oxygen: bool | None = None,
    comparator: str | None = None,
) -> Observation:
    """Validate codes, units and times and convert to the canonical observation.

    Shared by the JSON, FHIR and HL7 adapters so one lab value gives one observation
    whichever way it arrived.
    """
    return _observation(observation_id, event_id, patient_id, loinc, value, unit, reference_range, effective_at,
                        status, corrects, source, fmt, received_at, limits, abnormal_flag, on_oxygen, comparator)


# --- models made without running their validator, when that provably changes nothing --------
#
# ``Observation(...)`` and ``ReferenceRange(...)`` validated every field again (~4 us per
# observation) although ``_observation`` hands them values of exactly the types the fields
# hold: pydantic returns such a value as it is (an exact ``str``, ``float``, ``bool``,
# ``ResultStatus``, ``ReferenceRange`` instance, or aware ``datetime``: checked in
# tests/unit/test_ingest_fastpath.py). So when every value passes the exact-type checks of
# ``_observation`` (a finite float, a known literal, a fixed-offset aware datetime), the
# model is made as ``model_construct`` makes it (fields, fields set, no extra, no private);
# any other value goes through the validator as before, with its error. Only for models
# without a post-init hook or private attributes (checked here at import).

_new = object.__new__
_set = object.__setattr__
#: the fields in the order of the model (the order of ``__dict__``; the dict made below lists them so)
_OBS_ORDER = ("observation_id", "event_id", "patient_id", "analyte", "loinc", "kind", "value", "comparator", "unit",
              "reference_range", "original_value", "original_unit", "effective_at", "status", "corrects", "source",
              "format", "abnormal_flag", "on_oxygen", "received_at")
_OBS_FIELDS = frozenset(_OBS_ORDER)
_RR_FIELDS = frozenset(("low", "high"))
_FAST_MODELS = all(
    m.__pydantic_post_init__ is None and not m.__private_attributes__ and m.model_config.get("extra") != "allow"
    and m.model_config.get("revalidate_instances", "never") == "never"
    for m in (Observation, ReferenceRange)
) and tuple(ReferenceRange.model_fields) == ("low", "high") and tuple(Observation.model_fields) == _OBS_ORDER
#: tzinfo classes whose ``utcoffset`` is always a timedelta: a datetime with one is aware
_AWARE_TZ = frozenset((timezone, TzInfo, ZoneInfo))
_COMPARATORS = frozenset(get_args(Comparator))
_KINDS = frozenset(get_args(Observation.model_fields["kind"].annotation))
_FORMATS = frozenset(get_args(Observation.model_fields["format"].annotation))


def _made(cls, values: dict, fields_set: frozenset):
    m = _new(cls)
    _set(m, "__dict__", values)
    _set(m, "__pydantic_fields_set__", set(fields_set))
    _set(m, "__pydantic_extra__", None)
    _set(m, "__pydantic_private__", None)
    return m


def _canonical(analyte, what: str, x: float, unit: str | None, conv) -> float:
    """``x`` (in ``unit``) converted to the analyte's canonical unit and rounded; a finite
    number without a finite canonical value (the conversion or its rounding overflowed) is
    rejected with its reason, never left to a validator or an internal error."""
    out = round_sig_cached(x * conv.factor + conv.offset)
    if out - out != 0 and x - x == 0:
        raise Rejected(Reason.NON_FINITE_VALUE,
                       f"{what} {x!r}{' ' + unit if unit else ''} has no finite value in "
                       f"{analyte.canonical_unit} (converted and rounded to {SIGNIFICANT_DIGITS} significant digits)")
    return out


def _check_bounds(analyte, canonical_value: float, original_value: float | None, unit: str | None,
                  status) -> None:
    """A value outside what its quantity can take (``valid`` in the catalogue) is rejected as
    ``implausible_value``; a withdrawal's value is not judged, so it passes."""
    lo, hi = analyte.valid_min, analyte.valid_max
    if ((lo is not None and canonical_value < lo) or (hi is not None and canonical_value > hi)) \
            and status not in RETRACTING_STATUSES:
        shown = canonical_value if original_value is None else original_value
        raise Rejected(Reason.IMPLAUSIBLE_VALUE,
                       f"{analyte.key} {shown:g}{' ' + unit if unit else ''} is outside what the "
                       f"quantity can take ({'' if lo is None else f'{lo:g}'}..{'' if hi is None else f'{hi:g}'}"
                       f" {analyte.canonical_unit})")


def check_value(obs: Observation) -> None:
    """Ingest's value bounds (``_check_bounds``), which the clinical stage applies again to the
    observations it reads: the stream may hold records ingest did not write."""
    if obs.value is not None:
        analyte = catalogue().by_key.get(obs.analyte)
        if analyte is not None:
            _check_bounds(analyte, obs.value, None, obs.unit, obs.status)  # the value judged, as judged


def check_patient_id(patient_id: str) -> None:
    """A patient id is not empty, and bounded and printable whatever the wire format (review
    L5: an HL7 PID-3 of 100 KB with NUL and unit separators used to be accepted). Ingest's
    rule, which the clinical stage applies again to the records it reads."""
    if not patient_id or not patient_id.strip():
        raise Rejected(Reason.EMPTY_ID, "patient id is empty")
    if len(patient_id) > 128 or not patient_id.isprintable():
        raise Rejected(Reason.SCHEMA_INVALID, "patient id is longer than 128 characters or holds control characters")


def _observation(observation_id, event_id, patient_id, loinc, value, unit, reference_range, effective_at, status,
                 corrects, source, fmt, received_at, limits, abnormal_flag, on_oxygen, comparator) -> Observation:
    """``build_observation`` with positional arguments: the checks and the outcome of each
    (reason, message, the order they are made in) are the same as they always were."""
    if not patient_id or not patient_id.strip():
        raise Rejected(Reason.EMPTY_ID, "patient id is empty")
    if not event_id or not event_id.strip():
        raise Rejected(Reason.EMPTY_ID, "event id is empty")
    check_patient_id(patient_id)
    if len(event_id) > 256 or not event_id.isprintable():
        raise Rejected(Reason.SCHEMA_INVALID, "event id is longer than 256 characters or holds control characters")
    if len(observation_id) > 256 or not observation_id.isprintable():
        raise Rejected(Reason.SCHEMA_INVALID,
                       "observation id is longer than 256 characters or holds control characters")
    tz = effective_at.tzinfo
    # (a tzinfo of the classes in _AWARE_TZ always gives an offset: not asked, ~0.15 us)
    if tz is None or ((type(tz) not in _AWARE_TZ or type(effective_at) is not datetime)
                      and effective_at.utcoffset() is None):
        raise Rejected(Reason.NAIVE_TIMESTAMP, "effective time has no UTC offset")
    if effective_at - received_at > limits.max_future:
        check_not_future(effective_at, received_at, limits, "effective time")
    cat = catalogue()
    analyte = cat.analyte_for_loinc(loinc)
    canonical_value = None
    if value is None:
        if status not in RETRACTING_STATUSES:
            raise Rejected(Reason.MISSING_VALUE, f"result {loinc} has no value and status {status.value}")
        # a withdrawal may omit the value; the unit still must make sense if given
        if unit:
            cat.convert(analyte, 0.0, unit)
        conv = original_value = None
    else:
        original_value = float(value)
        conv = cat.conversion(analyte, unit)
        canonical_value = _canonical(analyte, "value", original_value, unit, conv)
        _check_bounds(analyte, canonical_value, original_value, unit, status)
    rr = None
    if reference_range is not None and (reference_range.low is not None or reference_range.high is not None):
        low, high = reference_range.low, reference_range.high
        if conv is None:
            conv = cat.conversion(analyte, unit)
        if low is not None:
            low = _canonical(analyte, "reference range low", low, unit, conv)
        if high is not None:
            high = _canonical(analyte, "reference range high", high, unit, conv)
        if _FAST_MODELS and (low is None or (type(low) is float and isfinite(low))) \
                and (high is None or (type(high) is float and isfinite(high))):
            rr = _made(ReferenceRange, {"low": low, "high": high}, _RR_FIELDS)
        else:
            rr = ReferenceRange(low=low, high=high)
        if rr.low is not None and rr.high is not None and rr.low > rr.high:
            raise Rejected(Reason.SCHEMA_INVALID, f"reference range low {rr.low} > high {rr.high}")
    kind = analyte.kind
    canonical_unit = analyte.canonical_unit
    key = analyte.key
    comparator = None if canonical_value is None else comparator
    if (
        _FAST_MODELS
        and type(observation_id) is str and type(event_id) is str and type(patient_id) is str
        and type(key) is str and type(loinc) is str and type(canonical_unit) is str and type(source) is str
        and type(kind) is str and kind in _KINDS and type(fmt) is str and fmt in _FORMATS
        and (canonical_value is None or (type(canonical_value) is float and isfinite(canonical_value)))
        and (original_value is None or isfinite(original_value))
        and (comparator is None or (type(comparator) is str and comparator in _COMPARATORS))
        and (unit is None or type(unit) is str)
        and (corrects is None or type(corrects) is str)
        and (abnormal_flag is None or type(abnormal_flag) is str)
        and (on_oxygen is None or type(on_oxygen) is bool)
        and type(status) is ResultStatus
        and type(effective_at) is datetime and type(effective_at.tzinfo) in _AWARE_TZ
        and (received_at is None or (type(received_at) is datetime and type(received_at.tzinfo) in _AWARE_TZ))
    ):
        return _made(Observation, {
            "observation_id": observation_id, "event_id": event_id, "patient_id": patient_id, "analyte": key,
            "loinc": loinc, "kind": kind, "value": canonical_value, "comparator": comparator,
            "unit": canonical_unit, "reference_range": rr, "original_value": original_value,
            "original_unit": unit, "effective_at": effective_at, "status": status, "corrects": corrects,
            "source": source, "format": fmt, "abnormal_flag": abnormal_flag, "on_oxygen": on_oxygen,
            "received_at": received_at,
        }, _OBS_FIELDS)
    return Observation(
        observation_id=observation_id,
        event_id=event_id,
        patient_id=patient_id,
        analyte=key,
        loinc=loinc,
        kind=kind,
        value=canonical_value,
        comparator=comparator,
        unit=canonical_unit,
        reference_range=rr,
        original_value=original_value,
        original_unit=unit,
        effective_at=effective_at,
        status=status,
        corrects=corrects,
        source=source,
        format=fmt,
        abnormal_flag=abnormal_flag,
        on_oxygen=on_oxygen,
        received_at=received_at,
    )


def panel_observation_id(event_id: str, analyte: str) -> str:
    return f"{event_id}:{analyte}"
