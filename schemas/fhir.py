"""FHIR R4 Observations and Bundles -> canonical observations.

Parsed with the ``fhir.resources.R4B`` models (R4B is wire-compatible with R4 for
Observation and Bundle). fhir.resources does not enforce required bindings, so this
module checks what it lets through: the status, the LOINC coding and the UCUM unit.
Every observation is built with :func:`schemas.canonical.build_observation`, so a value
sent as FHIR becomes exactly the observation the same value sent as JSON or HL7 v2
becomes (apart from ``format`` and ``received_at``).

Decisions (see also the module constants):

* **Status** (ObservationStatus): ``final``, ``preliminary``, ``amended``, ``corrected``,
  ``cancelled`` and ``entered-in-error`` map onto the canonical status of the same
  name. ``registered`` (no result yet) and ``unknown`` (the sender cannot say whether
  the result stands) are rejected with ``fhir_bad_status``: a safety monitor must not
  act on, nor silently drop, a result whose standing it cannot tell. Anything outside
  the value set is rejected the same way.
* **Corrections**: the FHIR resource id stays the same across versions, so an
  amended/corrected/entered-in-error Observation carries ``corrects=None`` and the
  canonical model treats it as replacing the observation with the same id.
* **Ids**: ``observation_id`` = ``event_id`` = the resource id. In a Bundle an
  Observation without id uses the entry's ``fullUrl``, else ``<bundle id>/<index>``.
  Component observations (e.g. the blood-pressure panel 85354-9) get
  ``<id>:<analyte>`` as observation id and the resource id as event id, like the
  JSON liver panel.
* **Codes**: the LOINC coding (system ``http://loinc.org``) is picked among several
  codings; an Observation with no LOINC coding is rejected (``fhir_not_loinc``).
  A LOINC code that is in no value set is rejected for a single Observation
  (``unknown_loinc``, as for JSON). Inside a Bundle, or as a component, such a result
  is *skipped* (the sender identified an analyte this service has no value set for,
  so no rule can be about it); a Bundle that yields no observation at all is rejected
  with the reason of its first skipped result. Skipped results are reported by
  :func:`parse_fhir` and logged at DEBUG.
* **Values**: ``valueQuantity`` only; its ``system`` must be
  ``http://unitsofmeasure.org`` whenever a unit is given; ``code`` is preferred over
  ``unit``. A comparator (``<``, ``<=``, ``>``, ``>=``: a detection or reporting limit)
  is kept as the observation's ``comparator`` beside the bound (``value``); the rule
  engine grades it conservatively or raises ``data_quality.censored_value``. Only the
  comparator ``ad`` ("sufficient to achieve", not a bound) is rejected with
  ``censored_value``. A result of a
  known analyte with another value type (string, CodeableConcept...) is rejected
  (``fhir_invalid``); no value is allowed only for cancelled/entered-in-error.
* **Times**: ``effectiveDateTime``, else ``effectivePeriod.start``, else
  ``effectivePeriod.end``, else ``effectiveInstant``. A dateTime without offset, or a
  date-only / partial date, is rejected with ``naive_timestamp``. No effective time:
  ``fhir_invalid``.
* **Subject**: ``Patient/<id>`` (relative or absolute URL, ``_history`` ignored);
  ``subject.identifier.value``; ``urn:uuid:``/``urn:oid:`` or ``#contained`` references
  resolved to a Patient in the same Bundle / contained list (its id, else its first
  identifier value). Anything else: ``fhir_no_subject``.
* **Reference range**: the first ``referenceRange`` with a low or high. Used only when
  its unit matches the value's unit (or it has none); otherwise dropped (the
  protocol's thresholds, not the lab's range, drive the rules).
* **Interpretation**: the first interpretation code (v3 ObservationInterpretation,
  same codes as HL7 table 0078: H, L, HH, LL, N, A...) becomes ``abnormal_flag``.
* **Bundles**: ``collection``, ``transaction``, ``batch`` and ``message`` (the
  MessageHeader entry is skipped). Non-Observation entries are skipped; a DELETE
  request entry is rejected (send ``entered-in-error`` instead). Any invalid
  Observation rejects the whole Bundle.
"""
from __future__ import annotations

import logging
import math
import re
from dataclasses import dataclass, field
from datetime import date, datetime
from decimal import Decimal
from typing import Any

from pydantic import ValidationError

from .analytes import catalogue
from .canonical import DEFAULT_LIMITS, build_observation, panel_observation_id
from .errors import Reason, Rejected
from .events import Observation, ReferenceRange, ResultStatus

log = logging.getLogger(__name__)

LOINC_SYSTEM = "http://loinc.org"
UCUM_SYSTEM = "http://unitsofmeasure.org"

#: FHIR ObservationStatus -> canonical status; ``None`` means "reject".
STATUS_MAP: dict[str, ResultStatus | None] = {
    "final": ResultStatus.FINAL,
    "preliminary": ResultStatus.PRELIMINARY,
    "amended": ResultStatus.AMENDED,
    "corrected": ResultStatus.CORRECTED,
    "cancelled": ResultStatus.CANCELLED,
    "entered-in-error": ResultStatus.ENTERED_IN_ERROR,
    "registered": None,
    "unknown": None,
}

BUNDLE_TYPES = frozenset({"collection", "transaction", "batch", "message"})

# A FHIR date / partial date, or a dateTime without offset.
_PARTIAL_DATE = re.compile(r"^\d{4}(-\d{2}(-\d{2})?)?$")
_NAIVE_DATETIME = re.compile(r"^\d{4}-\d{2}-\d{2}T\d{2}:\d{2}(:\d{2}(\.\d+)?)?$")


@dataclass(frozen=True)
class Skipped:
    """A result that produced no observation and did not reject the message."""

    ref: str  # the observation id it would have had
    reason: Reason
    message: str


@dataclass
class FhirResult:
    observations: list[Observation] = field(default_factory=list)
    skipped: list[Skipped] = field(default_factory=list)


def observations_from_fhir(
    obj: Any,
    *,
    received_at: datetime,
    limits=None,
    source: str | None = None,
) -> list[Observation]:
    """A FHIR Observation or Bundle (parsed JSON) -> canonical observations. Raises ``Rejected``."""
    return parse_fhir(obj, received_at=received_at, limits=limits, source=source).observations


def parse_fhir(obj: Any, *, received_at: datetime, limits=None, source: str | None = None) -> FhirResult:
    """Like :func:`observations_from_fhir` but also reports skipped results."""
    limits = limits or DEFAULT_LIMITS
    try:
        return _parse(obj, received_at, limits, source)
    except Rejected:
        raise
    except ValidationError as exc:
        raise _from_validation(exc) from None
    except RecursionError:
        raise Rejected(Reason.TOO_DEEP, "FHIR resource nested too deeply") from None
    except Exception as exc:  # never let anything but Rejected escape
        raise Rejected(Reason.FHIR_INVALID, f"unexpected {type(exc).__name__} while reading FHIR") from None


# ---------------------------------------------------------------- top level


def _parse(obj: Any, received_at: datetime, limits, source: str | None) -> FhirResult:
    if not isinstance(obj, dict):
        raise Rejected(Reason.FHIR_INVALID, "a FHIR resource must be a JSON object")
    rtype = obj.get("resourceType")
    if rtype == "Observation":
        _check_naive_times(obj, "Observation")
        from fhir.resources.R4B.observation import Observation as FhirObservation

        res = FhirObservation.model_validate(obj)
        out = FhirResult()
        if not res.id:
            raise Rejected(Reason.FHIR_INVALID, "Observation has no id")
        _observation(res, res.id, {}, received_at, limits, source, out, in_bundle=False)
        if not out.observations:
            _raise_nothing(out)
        return out
    if rtype == "Bundle":
        return _bundle(obj, received_at, limits, source)
    raise Rejected(Reason.FHIR_INVALID, f"unsupported FHIR resource type {str(rtype)[:40]!r}")


def _bundle(obj: dict, received_at: datetime, limits, source: str | None) -> FhirResult:
    btype = obj.get("type")
    if btype not in BUNDLE_TYPES:
        raise Rejected(Reason.FHIR_INVALID, f"unsupported Bundle type {str(btype)[:40]!r}")
    entries = obj.get("entry") or []
    if isinstance(entries, list) and len(entries) > limits.max_bundle_entries:  # bounded work (review H1)
        raise Rejected(Reason.TOO_COMPLEX, f"Bundle has {len(entries)} entries, more than {limits.max_bundle_entries}")
    if isinstance(entries, list):
        for i, e in enumerate(entries):
            if isinstance(e, dict) and isinstance(e.get("resource"), dict):
                if e["resource"].get("resourceType") == "Observation":
                    _check_naive_times(e["resource"], f"Bundle.entry[{i}]")
    from fhir.resources.R4B.bundle import Bundle

    bundle = Bundle.model_validate(obj)
    patients = _bundle_patients(bundle)
    out = FhirResult()
    n_obs = 0
    seen: set[str] = set()
    for index, entry in enumerate(bundle.entry or []):
        request = getattr(entry, "request", None)
        if request is not None and str(request.method).upper() == "DELETE":
            raise Rejected(
                Reason.FHIR_INVALID,
                f"Bundle.entry[{index}] is a DELETE; withdraw a result with status entered-in-error",
            )
        res = entry.resource
        if res is None:
            continue
        rtype = res.get_resource_type()
        if rtype == "MessageHeader" and btype == "message":
            continue
        if rtype != "Observation":
            continue  # Patient, DiagnosticReport, Specimen...: context, not results
        n_obs += 1
        if res.id:
            oid = res.id
        elif entry.fullUrl:
            oid = str(entry.fullUrl)
        elif bundle.id:
            oid = f"{bundle.id}/{index}"
        else:
            raise Rejected(
                Reason.FHIR_INVALID,
                f"Bundle.entry[{index}] Observation has no id, no fullUrl, and the Bundle has no id",
            )
        if oid in seen:
            raise Rejected(Reason.FHIR_INVALID, f"Bundle lists Observation {oid!r} twice")
        seen.add(oid)
        _observation(res, oid, patients, received_at, limits, source, out, in_bundle=True)
    if n_obs == 0:
        raise Rejected(Reason.FHIR_INVALID, "Bundle holds no Observation")
    if not out.observations:
        _raise_nothing(out)
    ids = [o.observation_id for o in out.observations]
    if len(set(ids)) != len(ids):
        raise Rejected(Reason.FHIR_INVALID, "Bundle yields the same observation id twice")
    return out


def _raise_nothing(out: FhirResult) -> None:
    first = out.skipped[0] if out.skipped else None
    if first is None:
        raise Rejected(Reason.FHIR_INVALID, "no observation could be read")
    more = f" (and {len(out.skipped) - 1} more skipped)" if len(out.skipped) > 1 else ""
    raise Rejected(first.reason, first.message + more)


# ---------------------------------------------------------------- one Observation


def _observation(
    res,
    oid: str,
    patients: dict[str, str],
    received_at: datetime,
    limits,
    source: str | None,
    out: FhirResult,
    *,
    in_bundle: bool,
) -> None:
    status = _status(res.status, oid)
    patient_id = _patient_id(res, patients, oid)
    effective_at = _effective(res, oid)
    src = source or _source(res)
    cat = catalogue()
    cmap = _code_map(limits, res, src)

    loinc = _loinc(res.code, f"Observation {oid}") or _mapped_loinc(res.code, cmap, res.valueQuantity,
                                                                   f"Observation {oid}", src)
    has_value = res.valueQuantity is not None or _other_value(res) is not None
    components = list(res.component or [])

    def skip(ref: str, reason: Reason, message: str) -> None:
        log.debug("fhir: skipped a result (%s)", reason.value)
        out.skipped.append(Skipped(ref, reason, message))

    produced = 0
    # --- the Observation's own value
    if loinc is None:
        if has_value and res.valueQuantity is not None:
            raise Rejected(Reason.FHIR_NOT_LOINC, f"Observation {oid}: code has no {LOINC_SYSTEM} coding")
        if not components:
            if in_bundle and res.valueQuantity is None:
                # a non-numeric result under a local code (e.g. a comment): not a lab value
                skip(oid, Reason.FHIR_NOT_LOINC, f"Observation {oid}: code has no LOINC coding")
                return
            raise Rejected(Reason.FHIR_NOT_LOINC, f"Observation {oid}: code has no {LOINC_SYSTEM} coding")
    elif loinc not in cat.by_loinc:
        # an analyte without a value set: a panel code (e.g. 85354-9) with components, or skip
        if not components:
            if in_bundle:
                skip(oid, Reason.UNKNOWN_LOINC, f"LOINC code {loinc!r} is not in any value set")
                return
            cat.analyte_for_loinc(loinc)  # raises UNKNOWN_LOINC
    else:
        if not (not has_value and components):
            value, unit = _quantity(res.valueQuantity, _other_value(res), oid, cmap)
            out.observations.append(
                build_observation(
                    observation_id=oid, event_id=oid, patient_id=patient_id, loinc=loinc,
                    value=value, unit=unit, reference_range=_range(res.referenceRange, unit, oid),
                    effective_at=effective_at, status=status, corrects=None, source=src, fmt="fhir",
                    received_at=received_at, limits=limits,
                    abnormal_flag=_interpretation(res.interpretation),
                    comparator=_comparator(res.valueQuantity),
                )
            )
            produced += 1

    # --- components (e.g. systolic / diastolic of the blood-pressure panel)
    seen: set[str] = set()
    for i, comp in enumerate(components):
        c_loinc = _loinc(comp.code, f"Observation {oid} component[{i}]") or _mapped_loinc(
            comp.code, cmap, comp.valueQuantity, f"Observation {oid} component[{i}]", src)
        ref = f"{oid}:component[{i}]"
        c_value = _other_value(comp)
        if c_loinc is None:
            if comp.valueQuantity is not None:
                raise Rejected(
                    Reason.FHIR_NOT_LOINC, f"Observation {oid} component[{i}]: code has no LOINC coding"
                )
            skip(ref, Reason.FHIR_NOT_LOINC, f"Observation {oid} component[{i}]: code has no LOINC coding")
            continue
        analyte = cat.by_loinc.get(c_loinc)
        if analyte is None:
            skip(ref, Reason.UNKNOWN_LOINC, f"LOINC code {c_loinc!r} is not in any value set")
            continue
        if analyte.key in seen:
            raise Rejected(Reason.FHIR_INVALID, f"Observation {oid} lists component {analyte.key} twice")
        seen.add(analyte.key)
        value, unit = _quantity(comp.valueQuantity, c_value, f"{oid} component[{i}]", cmap)

        out.observations.append(
            build_observation(
                observation_id=panel_observation_id(oid, analyte.key), event_id=oid,
                patient_id=patient_id, loinc=c_loinc, value=value, unit=unit,
                reference_range=_range(comp.referenceRange, unit, f"{oid} component[{i}]"),
                effective_at=effective_at, status=status, corrects=None, source=src, fmt="fhir",
                received_at=received_at, limits=limits,
                abnormal_flag=_interpretation(comp.interpretation),
                comparator=_comparator(comp.valueQuantity),
            )
        )
        produced += 1
    if produced == 0 and components and not in_bundle and not out.skipped:
        raise Rejected(Reason.FHIR_INVALID, f"Observation {oid}: no usable component")


def _status(raw: Any, oid: str) -> ResultStatus:
    s = str(raw or "")
    if s not in STATUS_MAP:
        raise Rejected(Reason.FHIR_BAD_STATUS, f"Observation {oid}: status {s[:40]!r} is not an ObservationStatus")
    mapped = STATUS_MAP[s]
    if mapped is None:
        raise Rejected(
            Reason.FHIR_BAD_STATUS,
            f"Observation {oid}: status {s!r} carries no usable result (accepted: final, preliminary, "
            "amended, corrected, cancelled, entered-in-error)",
        )
    return mapped


def _loinc(concept, where: str) -> str | None:
    if concept is None:
        return None
    codes = []
    for coding in concept.coding or []:
        if coding.system and str(coding.system).rstrip("/") == LOINC_SYSTEM and coding.code:
            codes.append(str(coding.code).strip())
    if not codes:
        return None
    distinct = list(dict.fromkeys(codes))
    if len(distinct) > 1:
        known = [c for c in distinct if c in catalogue().by_loinc]
        if len(known) == 1:
            return known[0]
        raise Rejected(Reason.FHIR_INVALID, f"{where}: several different LOINC codings {distinct[:4]}")
    return distinct[0]


def _other_value(res) -> Any:
    for name in (
        "valueCodeableConcept", "valueString", "valueBoolean", "valueInteger", "valueRange",
        "valueRatio", "valueSampledData", "valueTime", "valueDateTime", "valuePeriod",
    ):
        v = getattr(res, name, None)
        if v is not None:
            return v
    return None


_COMPARATORS = ("<", "<=", ">=", ">")


def _comparator(q) -> str | None:
    """valueQuantity.comparator (``<``, ``<=``, ``>=``, ``>``): the value is a bound."""
    return None if q is None or q.comparator is None else str(q.comparator)


def _code_map(limits, res, src: str):
    """The per-source code map (``schemas.codemaps``): by ``Observation.meta.source``, else
    the source given by the caller (e.g. the Bundle's ``meta.source``)."""
    maps = getattr(limits, "code_maps", None)
    if maps is None:
        return None
    meta = getattr(res, "meta", None)
    if meta is not None and meta.source:
        found = maps.for_source(str(meta.source))
        if found is not None:
            return found
    return maps.for_source(src)


def _mapped_loinc(concept, cmap, quantity, where: str, src: str) -> str | None:
    """No LOINC coding: the first local coding found in the source's code map. A numeric
    result whose local codes are in no map is ``unknown_local_code`` naming the code."""
    if concept is None:
        return None
    local = [(str(c.code).strip(), str(c.system or "")) for c in (concept.coding or []) if c.code]
    if cmap is not None:
        for code, _ in local:
            loinc = cmap.loinc_for(code)
            if loinc is not None:
                return loinc
    if local and quantity is not None:
        code, system = local[0]
        from .hl7v2 import escape

        raise Rejected(
            Reason.UNKNOWN_LOCAL_CODE,
            f"{where}: local code {escape(code[:40])!r} (system {escape(system[:60])!r}) from "
            f"{escape(src[:60])!r} has no LOINC in " + ("its code map" if cmap is not None else "any code map"),
        )
    return None


def _quantity(q, other, where: str, cmap=None) -> tuple[float | None, str | None]:
    if q is None:
        if other is not None:
            raise Rejected(Reason.FHIR_INVALID, f"Observation {where}: value is not a Quantity")
        return None, None
    if q.comparator is not None and q.comparator not in _COMPARATORS:
        raise Rejected(
            Reason.CENSORED_VALUE,
            f"Observation {where}: value has comparator {q.comparator!r} (not a bound the rules can grade)",
        )
    unit = q.code if q.code not in (None, "") else q.unit
    if cmap is not None and unit not in (None, "") and str(q.system or "").rstrip("/") != UCUM_SYSTEM:
        # a local unit spelling listed in the source's code map stands for its UCUM code
        for local in (q.code, q.unit):
            if local and cmap.ucum_for(str(local)) != local:
                return _finite_value(q, where), cmap.ucum_for(str(local))
    if unit not in (None, ""):
        if str(q.system or "").rstrip("/") != UCUM_SYSTEM:
            raise Rejected(
                Reason.FHIR_NOT_UCUM,
                f"Observation {where}: valueQuantity.system must be {UCUM_SYSTEM}, got {str(q.system)[:60]!r}",
            )
    else:
        unit = None
    return _finite_value(q, where), unit


def _finite_value(q, where: str) -> float | None:
    if q is None or q.value is None:
        return None
    value = float(q.value) if isinstance(q.value, Decimal) else float(q.value)
    if not math.isfinite(value):
        raise Rejected(Reason.NON_FINITE_VALUE, f"Observation {where}: value is not finite")
    return value


def _range(ranges, unit: str | None, where: str) -> ReferenceRange | None:
    cat = catalogue()
    for rr in ranges or []:
        low = _bound(rr.low)
        high = _bound(rr.high)
        if low is None and high is None:
            continue
        units = {u for u in (_bound_unit(rr.low), _bound_unit(rr.high)) if u}
        if units and (unit is None or {cat.canonical_unit_code(u) for u in units} != {cat.canonical_unit_code(unit)}):
            log.debug("fhir: dropped a reference range in another unit")
            return None
        return ReferenceRange(low=low, high=high)
    return None


def _bound(q) -> float | None:
    if q is None or q.value is None:
        return None
    v = float(q.value)
    return v if math.isfinite(v) else None


def _bound_unit(q) -> str | None:
    if q is None:
        return None
    return q.code or q.unit or None


def _interpretation(interps) -> str | None:
    for concept in interps or []:
        for coding in concept.coding or []:
            if coding.code and len(str(coding.code)) <= 8:
                return str(coding.code)
    return None


def _effective(res, oid: str) -> datetime:
    candidates: list[tuple[str, Any]] = [("effectiveDateTime", res.effectiveDateTime)]
    if res.effectivePeriod is not None:
        candidates.append(("effectivePeriod.start", res.effectivePeriod.start))
        candidates.append(("effectivePeriod.end", res.effectivePeriod.end))
    candidates.append(("effectiveInstant", getattr(res, "effectiveInstant", None)))
    for name, v in candidates:
        if v is None:
            continue
        if isinstance(v, datetime):
            if v.tzinfo is None or v.utcoffset() is None:
                raise Rejected(Reason.NAIVE_TIMESTAMP, f"Observation {oid}: {name} has no UTC offset")
            return v
        # date, or partial date kept as a string by fhir.resources
        if isinstance(v, (date, str)):
            raise Rejected(
                Reason.NAIVE_TIMESTAMP,
                f"Observation {oid}: {name} {str(v)[:30]!r} is a date without time of day and offset",
            )
    raise Rejected(Reason.FHIR_INVALID, f"Observation {oid}: no effectiveDateTime / effectivePeriod")


def _check_naive_times(obj: dict, where: str) -> None:
    """fhir.resources rejects a dateTime without offset as a generic error: name it."""
    paths = [("effectiveDateTime", obj.get("effectiveDateTime"))]
    period = obj.get("effectivePeriod")
    if isinstance(period, dict):
        paths += [("effectivePeriod.start", period.get("start")), ("effectivePeriod.end", period.get("end"))]
    for name, v in paths:
        if isinstance(v, str) and (_NAIVE_DATETIME.match(v) or _PARTIAL_DATE.match(v)):
            raise Rejected(
                Reason.NAIVE_TIMESTAMP,
                f"{where}.{name} {v[:30]!r} has no UTC offset; send e.g. 2024-05-01T08:30:00+02:00",
            )


def _patient_from_resource(p) -> str | None:
    if p.id:
        return str(p.id)
    for ident in p.identifier or []:
        if ident.value:
            return str(ident.value)
    return None


def _bundle_patients(bundle) -> dict[str, str]:
    out: dict[str, str] = {}
    for entry in bundle.entry or []:
        res = entry.resource
        if res is None or res.get_resource_type() != "Patient":
            continue
        pid = _patient_from_resource(res)
        if pid is None:
            continue
        if entry.fullUrl:
            out[str(entry.fullUrl)] = pid
    return out


def _patient_id(res, patients: dict[str, str], oid: str) -> str:
    subj = res.subject
    if subj is None:
        raise Rejected(Reason.FHIR_NO_SUBJECT, f"Observation {oid} has no subject")
    ref = (subj.reference or "").strip()
    if ref:
        if ref.startswith("#"):
            for c in res.contained or []:
                if c.get_resource_type() == "Patient" and c.id == ref[1:]:
                    pid = _patient_from_resource(c)
                    if pid:
                        return pid
            raise Rejected(Reason.FHIR_NO_SUBJECT, f"Observation {oid}: contained subject is not a Patient")
        if ref in patients:
            return patients[ref]
        parts = ref.split("/")
        if "_history" in parts:
            parts = parts[: parts.index("_history")]
        if len(parts) >= 2 and parts[-2] == "Patient" and parts[-1]:
            return parts[-1]
        raise Rejected(Reason.FHIR_NO_SUBJECT, f"Observation {oid}: subject is not a Patient reference")
    if subj.identifier is not None and subj.identifier.value:
        if subj.type and str(subj.type) != "Patient":
            raise Rejected(Reason.FHIR_NO_SUBJECT, f"Observation {oid}: subject is a {subj.type}, not a Patient")
        return str(subj.identifier.value)
    raise Rejected(Reason.FHIR_NO_SUBJECT, f"Observation {oid}: subject has neither reference nor identifier")


def _source(res) -> str:
    meta = res.meta
    if meta is not None and meta.source:
        return str(meta.source)[:128]
    return "fhir"


def _from_validation(exc: ValidationError) -> Rejected:
    errors = exc.errors(include_url=False, include_input=False)
    first = errors[0] if errors else {"loc": (), "msg": str(exc)}
    loc = ".".join(str(p) for p in first.get("loc", ()))
    msg = f"{loc or 'resource'}: {first.get('msg', '')}"
    if len(errors) > 1:
        msg += f" (+{len(errors) - 1} more)"
    return Rejected(Reason.FHIR_INVALID, msg[:500])
