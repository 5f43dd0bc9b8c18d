"""Patient identity: the canonical demographic record on the ``patients`` topic, and its parsers.

The ``patients`` topic is compacted and keyed by patient id; the latest record per id is the
patient's identity as shown to authenticated clinical users (name, MRN, date of birth) in the
inbox. Nothing of it goes into metrics, INFO logs or third-party notifications.

Three input forms, all giving a :class:`PatientRecord` or raising ``Rejected``:

* JSON: the record itself (``{patient_id, display_name, mrn, birth_date, ward?, care_team?, bed?}``);
* FHIR R4 ``Patient`` (parsed with ``fhir.resources.R4B``): id (or the first identifier) is the
  patient id, as for Observations' subjects; the identifier typed ``MR`` (v2-0203) is the MRN
  (its ``system`` the assigning authority); ``name`` (official first), ``birthDate``;
* HL7 v2 ADT^A01/A04/A08/A31: PID-3 first repetition component 1 is the patient id (as for ORU),
  the repetition typed ``MR`` (PID-3.5) is the MRN with PID-3.4 as assigning authority, PID-5
  family^given, PID-7 date of birth, PV1-3 point of care (ward^room^bed).

Pure: no Kafka.
"""
from __future__ import annotations

import json
import re
from datetime import date, datetime

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

from .errors import Reason, Rejected

ADT_EVENTS = frozenset({"A01", "A04", "A08", "A31"})
_ID_RE = re.compile(r"^[^\x00-\x1f\x7f]{1,128}\Z")


class PatientRecord(BaseModel):
    """One patient's demographics (the value on the ``patients`` topic; key = ``patient_id``)."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    patient_id: str = Field(min_length=1, max_length=128)
    display_name: str = Field(min_length=1, max_length=200)
    mrn: str = Field(min_length=1, max_length=64)
    #: the MRN's assigning authority (HL7 PID-3.4, FHIR identifier.system), when known
    mrn_authority: str | None = Field(default=None, max_length=200)
    birth_date: date
    ward: str | None = Field(default=None, max_length=64)
    care_team: str | None = Field(default=None, max_length=64)
    bed: str | None = Field(default=None, max_length=32)
    #: where the record came from: json | fhir | hl7
    source: str = "json"

    @field_validator("patient_id", "display_name", "mrn", "ward", "care_team", "bed")
    @classmethod
    def _no_control(cls, v: str | None) -> str | None:
        if v is None:
            return v
        v = v.strip()
        if not v or not _ID_RE.match(v):
            raise ValueError("empty or contains control characters")
        return v

    @field_validator("birth_date")
    @classmethod
    def _plausible(cls, v: date) -> date:
        if v > date.today() or v.year < 1900:
            raise ValueError("birth date in the future or before 1900")
        return v


def _invalid(reason: Reason, exc: ValidationError) -> Rejected:
    errs = "; ".join(f"{'.'.join(str(p) for p in e['loc']) or 'record'}: {e['msg']}" for e in exc.errors()[:5])
    return Rejected(reason, f"invalid patient record: {errs}")


def patient_from_json(obj: dict) -> PatientRecord:
    try:
        return PatientRecord.model_validate({**obj, "source": "json"})
    except ValidationError as exc:
        raise _invalid(Reason.SCHEMA_INVALID, exc) from None


def patient_from_fhir(obj: dict) -> PatientRecord:
    from fhir.resources.R4B.patient import Patient

    try:
        p = Patient.parse_obj(obj) if hasattr(Patient, "parse_obj") else Patient.model_validate(obj)
    except Exception as exc:  # pydantic v1/v2 errors from fhir.resources
        raise Rejected(Reason.FHIR_INVALID, f"invalid FHIR Patient: {type(exc).__name__}") from None
    pid = str(p.id) if p.id else next((str(i.value) for i in p.identifier or [] if i.value), None)
    if not pid:
        raise Rejected(Reason.FHIR_NO_SUBJECT, "FHIR Patient has neither id nor identifier")
    mrn = authority = None
    for ident in p.identifier or []:
        codes = [c.code for c in (ident.type.coding or [])] if ident.type else []
        if "MR" in codes and ident.value:
            mrn, authority = str(ident.value), (str(ident.system) if ident.system else None)
            break
    if mrn is None:
        raise Rejected(Reason.SCHEMA_INVALID, "FHIR Patient has no identifier of type MR (medical record number)")
    names = sorted(p.name or [], key=lambda n: n.use != "official")
    display = None
    for n in names:
        if n.text:
            display = str(n.text)
        else:
            parts = [*(n.given or []), n.family or ""]
            display = " ".join(x for x in parts if x).strip() or None
        if display:
            break
    if not display:
        raise Rejected(Reason.SCHEMA_INVALID, "FHIR Patient has no name")
    if p.birthDate is None:
        raise Rejected(Reason.SCHEMA_INVALID, "FHIR Patient has no birthDate")
    try:
        return PatientRecord(patient_id=pid, display_name=display, mrn=mrn, mrn_authority=authority,
                             birth_date=p.birthDate if isinstance(p.birthDate, date) else
                             date.fromisoformat(str(p.birthDate)), source="fhir")
    except (ValidationError, ValueError) as exc:
        if isinstance(exc, ValidationError):
            raise _invalid(Reason.SCHEMA_INVALID, exc) from None
        raise Rejected(Reason.SCHEMA_INVALID, "FHIR Patient birthDate is not a full date") from None


def is_adt(text: str) -> bool:
    """MSH-9.1 is ADT (cheap check on the first segment; the full parse validates)."""
    from .hl7v2 import _part, split_message

    try:
        msh = split_message(text)[0]
    except Rejected:
        return False
    return _part(msh, 9, 1, 1).upper() == "ADT"


def patient_from_adt(text: str) -> PatientRecord:
    """ADT^A01/A04/A08/A31 -> PatientRecord. Raises ``Rejected`` (``hl7_*``)."""
    from .hl7v2 import _part, _repetitions, split_message

    segs = split_message(text)
    msh = segs[0]
    kind, event = _part(msh, 9, 1, 1).upper(), _part(msh, 9, 1, 2).upper()
    if kind != "ADT" or event not in ADT_EVENTS:
        raise Rejected(Reason.HL7_UNSUPPORTED_MESSAGE,
                       f"{kind}^{event} is not a supported ADT event (A01, A04, A08, A31)")
    pid = next((s for s in segs if s.name == "PID"), None)
    if pid is None:
        raise Rejected(Reason.HL7_NO_PATIENT, "no PID segment")
    patient_id = _part(pid, 3, 1, 1)
    if not patient_id:
        raise Rejected(Reason.HL7_NO_PATIENT, "PID-3 (patient identifier list) is empty")
    mrn = authority = None
    for r in range(1, min(_repetitions(pid, 3), 20) + 1):
        if _part(pid, 3, r, 5).upper() == "MR" and _part(pid, 3, r, 1):
            mrn, authority = _part(pid, 3, r, 1), _part(pid, 3, r, 4) or None
            break
    if mrn is None:
        raise Rejected(Reason.HL7_BAD_VALUE, "PID-3 has no identifier of type MR (medical record number)")
    family, given = _part(pid, 5, 1, 1), _part(pid, 5, 1, 2)
    display = " ".join(x for x in (given, family) if x)
    if not display:
        raise Rejected(Reason.HL7_BAD_VALUE, "PID-5 (patient name) is empty")
    raw_dob = _part(pid, 7, 1, 1)
    try:
        dob = datetime.strptime(raw_dob[:8], "%Y%m%d").date()
    except ValueError:
        raise Rejected(Reason.HL7_BAD_VALUE, "PID-7 (date of birth) is not YYYYMMDD") from None
    pv1 = next((s for s in segs if s.name == "PV1"), None)
    ward = bed = None
    if pv1 is not None:
        ward = _part(pv1, 3, 1, 1) or None
        bed = _part(pv1, 3, 1, 3) or None
    try:
        return PatientRecord(patient_id=patient_id, display_name=display, mrn=mrn, mrn_authority=authority,
                             birth_date=dob, ward=ward, bed=bed, source="hl7")
    except ValidationError as exc:
        raise _invalid(Reason.HL7_BAD_VALUE, exc) from None


def parse_patient(raw: bytes) -> PatientRecord:
    """Any supported form (JSON record, FHIR Patient, HL7 v2 ADT) -> PatientRecord, or ``Rejected``."""
    if not raw or not raw.strip():
        raise Rejected(Reason.EMPTY_PAYLOAD, "empty patient message")
    if len(raw) > 1_048_576:
        raise Rejected(Reason.PAYLOAD_TOO_LARGE, f"patient message of {len(raw)} bytes")
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError:
        raise Rejected(Reason.NOT_UTF8, "patient message is not UTF-8") from None
    stripped = text.lstrip("\ufeff \t\r\n\x0b")
    if stripped.startswith("MSH"):
        return patient_from_adt(stripped)
    try:
        obj = json.loads(stripped)
    except (ValueError, RecursionError):
        raise Rejected(Reason.MALFORMED_JSON, "patient message is neither JSON nor HL7 v2") from None
    if not isinstance(obj, dict):
        raise Rejected(Reason.SCHEMA_INVALID, "patient message is not a JSON object")
    if obj.get("resourceType") == "Patient":
        return patient_from_fhir(obj)
    if "resourceType" in obj:
        raise Rejected(Reason.UNKNOWN_FORMAT, f"FHIR {str(obj['resourceType'])[:40]} is not a Patient")
    return patient_from_json(obj)
