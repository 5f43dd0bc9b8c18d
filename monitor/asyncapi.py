"""Generate ``schemas/asyncapi.yaml``: an AsyncAPI 3.0 description of every topic.

Built from the service's own definitions so it cannot drift: topic names from
``monitor.settings.Settings`` / ``topics_admin.service_topics`` (default names),
payload schemas from ``schemas/jsonschema.py`` (referenced as ``./json/<name>.json``),
dead-letter headers from ``monitor/dlq.py`` and reasons from ``schemas.errors.Reason``,
replay headers from ``monitor/dlq_tool.py``. ``monitor schema`` writes it next to the
JSON Schemas; a unit test fails when the checked-in file differs, and CI validates it
with the official parser (``scripts/validate-asyncapi.cjs``, ``@asyncapi/parser``).
"""
from __future__ import annotations

from datetime import datetime, timezone
from typing import Any

import yaml

from schemas.errors import Reason

from . import dlq_tool
from .dlq import dead_letter_headers
from .settings import Settings
from .topics_admin import service_topics

KAFKA_BINDING = "0.5.0"

PATIENT_KEY = {"type": "string", "description": "The patient id (UTF-8). Every patient-keyed topic must be keyed "
               "by it with the Java client's default (murmur2) partitioner and the same partition count as "
               "`observations`, so one worker holds all of a patient's records."}


def _dead_letter_header_names() -> list[str]:
    return [k for k, _ in dead_letter_headers(Reason.INTERNAL_ERROR, "", "t", 0, 0, datetime.now(timezone.utc))]


def _replay_headers() -> dict[str, Any]:
    return {
        "type": "object",
        "description": "Present only on records republished by `monitor dlq replay`.",
        "properties": {
            dlq_tool.H_REPLAY_OF: {"type": "string", "description": "Coordinates of the dead letter replayed: "
                                   "`<dead-letter topic>/<partition>/<offset>`."},
            dlq_tool.H_REPLAY_AT: {"type": "string", "format": "date-time", "description": "When it was replayed."},
        },
    }


def _dead_letter_headers() -> dict[str, Any]:
    names = _dead_letter_header_names()
    meaning = {
        "dlq.reason": {"type": "string", "enum": [r.value for r in Reason],
                       "description": "Why the input was rejected (a bounded code, also a metric label)."},
        "dlq.message": {"type": "string", "maxLength": 1000, "description": "Human-readable detail (UTF-8)."},
        "dlq.source.topic": {"type": "string", "description": "Topic the input was read from; `mllp` for the "
                             "MLLP listener (bytes received over TCP)."},
        "dlq.source.partition": {"type": "string", "description": "Source partition (decimal); empty for MLLP."},
        "dlq.source.offset": {"type": "string", "description": "Source offset (decimal); empty for MLLP."},
        "dlq.received_at": {"type": "string", "format": "date-time", "description": "When the input was read."},
    }
    missing = [n for n in names if n not in meaning]
    if missing:
        raise KeyError(f"dead-letter headers without a description in monitor/asyncapi.py: {missing}")
    return {"type": "object", "required": names, "properties": {n: meaning[n] for n in names}}


def _msg(name: str, title: str, summary: str, payload: dict | None, *, key: dict | None = None,
         content_type: str = "application/json", headers: dict | None = None, examples: list | None = None) -> dict:
    m: dict[str, Any] = {"name": name, "title": title, "summary": summary, "contentType": content_type}
    if headers is not None:
        m["headers"] = headers
    if payload is not None:
        m["payload"] = payload
    m["bindings"] = {"kafka": {"key": key or PATIENT_KEY, "bindingVersion": KAFKA_BINDING}}
    if examples:
        m["examples"] = examples
    return m


def build(s: Settings | None = None, version: str = "0.1.0", schema_dir: str = "./json") -> dict[str, Any]:
    s = s or Settings.model_construct()

    def _ref(schema: str) -> dict:
        return {"$ref": f"{schema_dir}/{schema}.json"}

    replay_ref = {"$ref": "#/components/schemas/ReplayHeaders"}
    messages = {
        "LabResult": _msg("lab-result", "Lab result (JSON)", "One lab result in the service's JSON format.",
                          _ref("lab-result"), headers=replay_ref),
        "FhirObservation": _msg(
            "fhir-observation", "Lab result or vital sign (FHIR R4)",
            "A FHIR R4 Observation, or a Bundle of Observations (transaction, batch, collection or message). "
            "LOINC coding and UCUM units are required; see docs/integration.md.",
            {"type": "object", "required": ["resourceType"],
             "properties": {"resourceType": {"type": "string", "enum": ["Observation", "Bundle"]}}},
            content_type="application/fhir+json", headers=replay_ref),
        "Hl7Oru": _msg(
            "hl7-oru-r01", "Lab results (HL7 v2 ORU^R01)",
            "An HL7 v2.x ORU^R01 message (segments separated by CR), LOINC-coded OBX; see docs/integration.md.",
            {"type": "string"}, content_type="x-application/hl7-v2+er7", headers=replay_ref),
        "VitalSign": _msg("vital-sign", "Vital sign (JSON)", "One vital sign.", _ref("vital-sign"),
                          headers=replay_ref),
        "LiverFunctionPanel": _msg("liver-function-panel", "Liver function panel (JSON)",
                                   "Several liver results sampled together.", _ref("liver-function-panel"),
                                   headers=replay_ref),
        "Treatment": _msg("treatment", "Dose or steroid event",
                          "The gene-therapy dose (`type: dose`) or a steroid phase (`type: steroid`).",
                          _ref("treatment"), headers=replay_ref),
        "Observation": _msg("observation", "Canonical observation",
                            "Every accepted input becomes one or more of these (canonical unit beside the "
                            "value and unit received).", _ref("observation")),
        "DeadLetter": _msg(
            "dead-letter", "Rejected input", "The original bytes exactly as received (any content), with "
            "the reason in headers. Key: the original key. List, inspect and replay with `monitor dlq`.",
            {"type": "string", "description": "The original bytes (not necessarily UTF-8)."},
            content_type="application/octet-stream", headers=_dead_letter_headers(),
            key={"type": "string", "description": "The rejected record's original key (may be absent)."}),
        "DeadLetterReplay": _msg(
            "dlq-replay", "Replayed dead letter", "Ledger entry written by `monitor dlq replay` after the "
            "republished record was acknowledged; the key is the dead letter's coordinates.", _ref("dlq-replay"),
            key={"type": "string", "description": "`<dead-letter topic>/<partition>/<offset>`."}),
        "Finding": _msg("finding", "Rule finding", "A rule's finding for a patient (present, cleared, retracted).",
                        _ref("finding")),
        "Alert": _msg("alert", "Alert version", "Each version of an alert (firing, acknowledged, escalated, "
                      "resolved...): the outbox the delivery service and the inbox read.", _ref("alert")),
        "AlertAction": _msg("alert-action", "Alert action", "Acknowledge, resolve, silence, unsilence or "
                            "comment, from the inbox, the actions API or another system.", _ref("alert-action")),
        "Patient": _msg("patient", "Patient demographics", "The canonical demographic record (name, MRN, "
                        "date of birth, ward, bed), written by the MLLP listener (ADT^A01/A04/A08/A31) and "
                        "`monitor patients load` (JSON, FHIR R4 Patient). PHI: the inbox shows it to signed-in "
                        "clinical users only.", _ref("patient"),
                        key={"type": "string", "description": "The patient id."}),
        "OpenAlert": _msg("open-alert", "Open alert (index entry)", "The latest version of an open alert "
                          "Alertmanager has been given; a tombstone (no value) once it closes.", _ref("alert"),
                          key={"type": "string", "description": "The alert id (32 hex characters)."}),
        "OpenAlertsMarker": _msg("open-alerts-marker", "Open-alerts index marker", "Written before each commit of "
                                 "the outbox partition: the index is valid for an outbox resuming at or before "
                                 "this offset.", {"type": "object", "required": ["outbox_offset"], "properties": {
                                     "outbox_offset": {"type": "integer", "minimum": 0}}},
                                 key={"type": "string", "const": "#valid-from"}),
        "Delivery": _msg("alert-delivery", "Delivered alert version", "Internal idempotency ledger of the "
                         "delivery service (compacted).", {"type": "string", "const": "1"},
                         content_type="text/plain",
                         key={"type": "string", "description": "`<sink>|<alert_id>|<version>`."}),
    }
    topics = [
        ("lab-results", s.topic_lab_results, "Input: lab results from lab systems (JSON, FHIR R4 or HL7 v2).",
         ["LabResult", "FhirObservation", "Hl7Oru"], "receive", None),
        ("vital-signs", s.topic_vital_signs, "Input: vital signs (JSON or FHIR R4).",
         ["VitalSign", "FhirObservation"], "receive", None),
        ("liver-function", s.topic_liver_function, "Input: liver function panels (JSON).",
         ["LiverFunctionPanel"], "receive", None),
        ("treatments", s.topic_treatments, "Input: dose and steroid events. Must be keyed by patient id.",
         ["Treatment"], "receive", None),
        ("observations", s.topic_observations, "Canonical observations (ingest and MLLP listener write, the "
         "clinical agent reads).", ["Observation"], "send", None),
        ("dead-letter", s.topic_dead_letter, "Every rejected input: original bytes plus `dlq.*` headers.",
         ["DeadLetter"], "send", None),
        ("dead-letter-replays", dlq_tool.replay_ledger_topic(s), "Ledger of `monitor dlq replay` (compacted; "
         "created by the tool on first use, not by `monitor topics`).", ["DeadLetterReplay"], "send", "compact"),
        ("findings", s.topic_findings, "Rule findings per patient.", ["Finding"], "send", None),
        ("alerts", s.topic_alerts, "Alert versions: the outbox for delivery and the inbox.", ["Alert"], "send", None),
        ("alert-actions", s.topic_alert_actions, "Actions on alerts. Must be keyed by patient id.",
         ["AlertAction"], "receive", None),
        ("patients", s.topic_patients, "Patient demographics, compacted by patient id (never expire).",
         ["Patient"], "send", "compact"),
        ("alert-deliveries", s.topic_deliveries, "Internal delivery ledger (compacted).", ["Delivery"], "send",
         "compact"),
        ("open-alerts", s.topic_open_alerts, "Internal index of the open alerts Alertmanager has been given "
         "(compacted; key the alert id, partition that of the alert's outbox partition, a tombstone once it closes; "
         "key `#valid-from` marks the outbox offset the partition's index is valid from).",
         ["OpenAlert", "OpenAlertsMarker"], "send", "compact"),
    ]
    described = {address for _, address, *_ in topics}
    missing = [t for t in service_topics(s) if t not in described]
    if missing:
        raise KeyError(f"service topics not described in monitor/asyncapi.py: {missing}")
    channels: dict[str, Any] = {}
    operations: dict[str, Any] = {}
    for cid, address, description, msgs, action, cleanup in topics:
        kafka: dict[str, Any] = {"topic": address, "bindingVersion": KAFKA_BINDING}
        if cleanup:
            kafka["topicConfiguration"] = {"cleanup.policy": [cleanup]}
        channels[cid] = {
            "address": address, "description": description,
            "messages": {m: {"$ref": f"#/components/messages/{m}"} for m in msgs},
            "bindings": {"kafka": kafka},
        }
        op = ("consume" if action == "receive" else "produce") + "".join(p.title() for p in cid.split("-"))
        operations[op] = {
            "action": action, "channel": {"$ref": f"#/channels/{cid}"},
            "summary": ("The service reads this topic." if action == "receive" else "The service writes this topic."),
            "messages": [{"$ref": f"#/channels/{cid}/messages/{m}"} for m in msgs],
        }
    # the clinical agent also reads observations; the inbox and delivery read alerts
    return {
        "asyncapi": "3.0.0",
        "info": {
            "title": "SMA gene-therapy safety monitor",
            "version": version,
            "description": "Kafka topics of the post-gene-therapy safety monitor. Topic names are the defaults; "
                           "each is configurable (TOPIC_* variables, docs/configuration.md). Payload schemas "
                           "are in schemas/json (generated from the pydantic models). Generated by "
                           "`monitor schema`: do not edit by hand.",
            "license": {"name": "Apache-2.0", "url": "https://www.apache.org/licenses/LICENSE-2.0"},
        },
        "defaultContentType": "application/json",
        "servers": {
            "local": {"host": "127.0.0.1:9092", "protocol": "kafka",
                      "description": "`make kafka` (KAFKA_BOOTSTRAP_SERVERS)."},
        },
        "channels": channels,
        "operations": operations,
        "components": {
            "messages": messages,
            "schemas": {"ReplayHeaders": _replay_headers()},
        },
    }


def render(s: Settings | None = None, version: str = "0.1.0", schema_dir: str = "./json") -> str:
    header = ("# AsyncAPI 3.0 description of the monitor's Kafka topics.\n"
              "# Generated by `monitor schema --out schemas/json` (monitor/asyncapi.py); do not edit by hand.\n"
              "# Validate: make tools && NODE_PATH=$(scripts/install-node-tools.sh --print)/node_modules "
              "node scripts/validate-asyncapi.cjs schemas/asyncapi.yaml\n")
    return header + yaml.safe_dump(build(s, version, schema_dir), sort_keys=False, allow_unicode=True, width=110)
