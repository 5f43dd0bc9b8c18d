"""Why an input was rejected: a machine-readable reason code plus a human message."""
from __future__ import annotations

from enum import StrEnum


class Reason(StrEnum):
    """Dead-letter reason codes. Bounded: safe to use as a metric label."""

    PAYLOAD_TOO_LARGE = "payload_too_large"
    EMPTY_PAYLOAD = "empty_payload"
    NOT_UTF8 = "not_utf8"
    MALFORMED_JSON = "malformed_json"
    TOO_DEEP = "too_deep"
    UNKNOWN_FORMAT = "unknown_format"
    SCHEMA_INVALID = "schema_invalid"
    NAIVE_TIMESTAMP = "naive_timestamp"
    FUTURE_TIMESTAMP = "future_timestamp"
    NON_FINITE_VALUE = "non_finite_value"
    EMPTY_ID = "empty_id"
    UNKNOWN_LOINC = "unknown_loinc"
    WRONG_TOPIC = "wrong_topic"
    UNIT_NOT_CONVERTIBLE = "unit_not_convertible"
    MISSING_VALUE = "missing_value"
    FHIR_INVALID = "fhir_invalid"
    FHIR_BAD_STATUS = "fhir_bad_status"
    FHIR_NOT_LOINC = "fhir_not_loinc"
    FHIR_NOT_UCUM = "fhir_not_ucum"
    FHIR_NO_SUBJECT = "fhir_no_subject"
    HL7_INVALID = "hl7_invalid"
    HL7_UNSUPPORTED_MESSAGE = "hl7_unsupported_message"
    HL7_NO_PATIENT = "hl7_no_patient"
    HL7_BAD_VALUE = "hl7_bad_value"
    HL7_NOT_LOINC = "hl7_not_loinc"
    TOO_COMPLEX = "too_complex"
    CENSORED_VALUE = "censored_value"
    ACTION_INVALID = "action_invalid"
    ACTION_FORBIDDEN = "action_forbidden"
    ACTION_UNKNOWN_ALERT = "action_unknown_alert"
    ACTION_UNKNOWN_USER = "action_unknown_user"
    INTERNAL_ERROR = "internal_error"
    #: the patient's stored state (its changelog value) cannot be read by this release: the
    #: record is kept here, not evaluated (README "A patient whose stored state cannot be read")
    PATIENT_STATE_UNREADABLE = "patient_state_unreadable"
    # integrator conventions (issue 16): HL7 processing id, per-source code maps, strict JSON
    HL7_PROCESSING_ID = "hl7_processing_id"
    UNKNOWN_LOCAL_CODE = "unknown_local_code"
    UNKNOWN_FIELD = "unknown_field"
    #: a value outside what its quantity can take (below 0, SpO2 over 100 %, ACVPU over 4):
    #: ``valid`` in ``schemas/data/analytes.yaml``
    IMPLAUSIBLE_VALUE = "implausible_value"


class Rejected(Exception):
    """Raised by parsers and validators; the ingest edge dead-letters the input."""

    def __init__(self, reason: Reason, message: str, location: str | None = None) -> None:
        super().__init__(f"{reason.value}: {message}")
        self.reason = reason
        self.message = message
        #: where in the input the error is, when known (HL7 ERR-2 style ``OBX^1^5``)
        self.location = location
