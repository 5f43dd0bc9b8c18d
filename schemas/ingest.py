"""Pure ingest: raw bytes from an input topic -> canonical observations or a treatment event.

No Kafka here. Every failure raises ``Rejected`` with a reason code; the stream edge
(``monitor.agents.ingest``) turns that into a dead letter carrying the original bytes.
"""
from __future__ import annotations

import json
from datetime import datetime, tzinfo
from typing import Iterable, Union

from pydantic import ValidationError
from pydantic_core import from_json

from .analytes import catalogue
from .canonical import (  # noqa: F401  (the shared parts, importable from here as they always were)
    DEFAULT_LIMITS,
    Limits,
    _observation,
    build_observation,
    check_not_future,
    check_patient_id,
    check_value,
    panel_observation_id,
    rejection_from_validation,
)
from .errors import Reason, Rejected
from .events import (
    DoseEvent,
    LabResult,
    LiverFunctionPanel,
    Observation,
    SteroidEvent,
    TreatmentEnvelope,
    VitalSign,
)

LAB_RESULTS = "lab-results"
VITAL_SIGNS = "vital-signs"
LIVER_FUNCTION = "liver-function"
TREATMENTS = "treatments"
INPUT_KINDS = (LAB_RESULTS, VITAL_SIGNS, LIVER_FUNCTION, TREATMENTS)

Decoded = Union[list[Observation], DoseEvent, SteroidEvent]


def _reject_constant(name: str) -> float:
    raise Rejected(Reason.NON_FINITE_VALUE, f"non-finite number {name} in JSON")


def _depth(obj: object, limit: int, level: int = 1, budget: list[int] | None = None) -> None:
    """Check nesting depth and, when ``budget`` is given, the number of JSON values."""
    if level > limit:
        raise Rejected(Reason.TOO_DEEP, f"JSON nested deeper than {limit} levels")
    values = obj.values() if isinstance(obj, dict) else obj if isinstance(obj, list) else ()
    if budget is not None:
        budget[0] -= len(values)
        if budget[0] < 0:
            raise Rejected(Reason.TOO_COMPLEX, f"JSON holds more than {budget[1]} values")
    for v in values:
        if isinstance(v, (dict, list)):
            _depth(v, limit, level + 1, budget)


def parse_json(raw: bytes, limits: Limits = DEFAULT_LIMITS) -> object:
    """Parse JSON with size, depth and finiteness limits."""
    try:
        text = raw.decode("utf-8") if isinstance(raw, (bytes, bytearray)) else raw
    except UnicodeDecodeError as exc:
        raise Rejected(Reason.NOT_UTF8, f"payload is not UTF-8 (byte {exc.start}: {exc.reason})") from None
    try:
        # pydantic-core's parser first (2-3x faster); it refuses everything json.loads
        # treats specially (NaN/Infinity, lone surrogate escapes, a BOM, bad syntax), and
        # then json.loads decides, so the outcome and reason are json.loads's
        obj = from_json(text, allow_inf_nan=False)
    except ValueError:
        try:
            obj = json.loads(text, parse_constant=_reject_constant)
        except Rejected:
            raise
        except RecursionError:
            raise Rejected(Reason.TOO_DEEP, f"JSON nested deeper than {limits.max_depth} levels") from None
        except ValueError as exc:
            raise Rejected(Reason.MALFORMED_JSON, f"malformed JSON: {exc}") from None
    # the walk is needed only when the text could break a limit: every JSON value takes at
    # least one character, and every level of nesting an opening bracket
    if len(text) > limits.max_json_values or text.count("{") + text.count("[") > limits.max_depth:
        _depth(obj, limits.max_depth, budget=[limits.max_json_values, limits.max_json_values])
    return obj


def _validate(model, obj: object):
    try:
        return model.model_validate(obj)
    except ValidationError as exc:
        raise rejection_from_validation(exc) from None


def _lab(obj: object, received_at: datetime, limits: Limits) -> list[Observation]:
    e: LabResult = _validate(LabResult, obj)
    # build_observation's work, without its keyword arguments (the same function below)
    return [_observation(e.event_id, e.event_id, e.patient_id, e.loinc, e.value, e.unit, e.reference_range,
                         e.effective_at, e.status, e.corrects, e.source, "json", received_at, limits,
                         e.abnormal_flag, None, e.comparator)]


def _vital(obj: object, received_at: datetime, limits: Limits) -> list[Observation]:
    e: VitalSign = _validate(VitalSign, obj)
    return [_observation(e.event_id, e.event_id, e.patient_id, e.loinc, e.value, e.unit, None, e.effective_at,
                         e.status, e.corrects, e.source, "json", received_at, limits, None, e.on_oxygen,
                         e.comparator)]


def _panel(obj: object, received_at: datetime, limits: Limits) -> list[Observation]:
    e: LiverFunctionPanel = _validate(LiverFunctionPanel, obj)
    out: list[Observation] = []
    seen: set[str] = set()
    cat = catalogue()
    for r in e.results:
        analyte = cat.analyte_for_loinc(r.loinc)
        if analyte.key in seen:
            raise Rejected(Reason.SCHEMA_INVALID, f"panel lists {analyte.key} twice")
        seen.add(analyte.key)
        out.append(
            _observation(
                panel_observation_id(e.event_id, analyte.key), e.event_id, e.patient_id, r.loinc, r.value, r.unit,
                r.reference_range, e.effective_at, r.status or e.status,
                panel_observation_id(e.corrects, analyte.key) if e.corrects else None,
                e.source, "json", received_at, limits, None, None, r.comparator,
            )
        )
    return out


def _treatment(obj: object, received_at: datetime, limits: Limits) -> DoseEvent | SteroidEvent:
    env: TreatmentEnvelope = _validate(TreatmentEnvelope, {"event": obj})
    e = env.event
    check_patient_id(e.patient_id)
    check_not_future(e.administered_at if isinstance(e, DoseEvent) else e.at, received_at, limits, "treatment time")
    return e


_CANONICAL = {LAB_RESULTS: _lab, VITAL_SIGNS: _vital, LIVER_FUNCTION: _panel, TREATMENTS: _treatment}


def detect_format(raw: bytes) -> str:
    head = raw.lstrip()[:8]
    if head.startswith(b"\x0b") or head.startswith(b"MSH"):
        return "hl7"
    return "json"


def decode(topic_kind: str, raw: bytes | None, *, received_at: datetime, limits: Limits = DEFAULT_LIMITS,
           default_tz: tzinfo | None = None) -> Decoded:
    """Decode one message from input topic ``topic_kind``. Raises ``Rejected``.

    ``default_tz``: the zone of HL7 v2 timestamps sent without an offset (``monitor mllp
    --default-tz``); None refuses them. JSON and FHIR timestamps always need an offset."""
    if topic_kind not in _CANONICAL:
        raise Rejected(Reason.UNKNOWN_FORMAT, f"unknown input topic kind {topic_kind!r}")
    if not raw:
        raise Rejected(Reason.EMPTY_PAYLOAD, "empty message")
    if len(raw) > limits.max_bytes:
        raise Rejected(Reason.PAYLOAD_TOO_LARGE, f"payload of {len(raw)} bytes exceeds {limits.max_bytes}")
    if detect_format(raw) == "hl7":
        if topic_kind == TREATMENTS:
            raise Rejected(Reason.UNKNOWN_FORMAT, "HL7 v2 is not accepted on the treatments topic")
        from .hl7v2 import observations_from_hl7

        try:
            text = raw.decode("utf-8")
        except UnicodeDecodeError:
            text = raw.decode("latin-1")
        return observations_from_hl7(text, received_at=received_at, limits=limits, default_tz=default_tz)
    obj = parse_json(raw, limits)
    if isinstance(obj, dict) and "resourceType" in obj:
        if topic_kind == TREATMENTS:
            raise Rejected(Reason.UNKNOWN_FORMAT, "FHIR resources are not accepted on the treatments topic")
        from .fhir import observations_from_fhir

        return observations_from_fhir(obj, received_at=received_at, limits=limits)
    if not isinstance(obj, dict):
        raise Rejected(Reason.SCHEMA_INVALID, f"expected a JSON object, got {type(obj).__name__}")
    return _CANONICAL[topic_kind](obj, received_at, limits)


def iter_observations(decoded: Decoded) -> Iterable[Observation]:
    return decoded if isinstance(decoded, list) else ()
