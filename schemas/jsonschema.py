"""JSON Schemas of every topic payload that has a model, and of the webhook body.

``monitor schema --out schemas/json`` (``make schema``) writes them; a unit test fails
when the checked-in files differ from what the models generate, and
``schemas/asyncapi.yaml`` refers to them for each Kafka channel.

Inputs (lab systems publish): lab-result, vital-sign, liver-function-panel,
treatment (dose | steroid; also each variant alone), alert-action.
Outputs (consumers read): observation, finding, alert, webhook-alert (the signed
webhook body: an alert without patient-identifying fields), dlq-replay (the replay ledger).
"""
from __future__ import annotations

import copy
import json
from pathlib import Path
from typing import Any, Callable

from pydantic import BaseModel, TypeAdapter

from .alert import Alert, AlertAction
from .events import DoseEvent, LabResult, LiverFunctionPanel, Observation, SteroidEvent, TreatmentEvent, VitalSign
from .findings import Finding
from .replay import ReplayLedgerEntry
from .patients import PatientRecord

BASE_ID = "https://sma-monitor.example/schemas/"
DRAFT = "https://json-schema.org/draft/2020-12/schema"


def _model(model: type[BaseModel]) -> Callable[[], dict[str, Any]]:
    return lambda: model.model_json_schema()


def _treatment() -> dict[str, Any]:
    schema = TypeAdapter(TreatmentEvent).json_schema()
    # OpenAPI's ``discriminator`` object is no JSON Schema keyword (AsyncAPI wants a string there);
    # each variant already pins ``type`` with ``const``, so ``oneOf`` alone is exact
    schema.pop("discriminator", None)
    schema["title"] = "TreatmentEvent"
    schema["description"] = "A record on topic ``treatments``: a dose or a steroid event, told apart by ``type``."
    return schema


#: fields ``Alert.public_dict`` removes from third-party payloads unless NOTIFY_INCLUDE_PATIENT_ID is on
WEBHOOK_WITHHELD = ("patient_id", "finding_ids")
WEBHOOK_EVIDENCE_WITHHELD = ("observation_id",)


def _webhook() -> dict[str, Any]:
    """The webhook body (``WebhookSink.body`` = ``Alert.public_dict``): the alert minus identifying fields."""
    schema = copy.deepcopy(Alert.model_json_schema())
    for name in WEBHOOK_WITHHELD:
        schema["properties"].pop(name, None)
        if name in schema.get("required", []):
            schema["required"].remove(name)
    for name in WEBHOOK_EVIDENCE_WITHHELD:
        schema["$defs"]["Evidence"]["properties"].pop(name, None)
    # a privacy contract: nothing beyond these fields leaves for a third party
    schema["additionalProperties"] = False
    schema["$defs"]["Evidence"]["additionalProperties"] = False
    schema["title"] = "WebhookAlert"
    schema["description"] = (
        "Body of the signed webhook POST (headers: Idempotency-Key = <alert_id>:<version>; "
        "X-Signature-Timestamp = unix seconds; X-Signature-SHA256 = hex HMAC-SHA256 with WEBHOOK_SECRET of "
        "'<timestamp>.<Idempotency-Key>.' followed by the body; receivers reject timestamps older than "
        "5 minutes and dedupe on Idempotency-Key). An alert version without the patient id, "
        "finding ids and observation ids; history notes read '[note withheld]'. The history is "
        "bounded (every entry by a person, the first entry, the first entry of each severity and tier, the "
        "newest automatic entries; history_omitted counts the automatic entries left out); each version "
        "lists the entries it added, so a receiver keeping every version has the whole timeline. With "
        "NOTIFY_INCLUDE_PATIENT_ID=true the withheld fields are present as in alert.json.")
    return schema


SCHEMAS: dict[str, Callable[[], dict[str, Any]]] = {
    "lab-result": _model(LabResult),
    "vital-sign": _model(VitalSign),
    "liver-function-panel": _model(LiverFunctionPanel),
    "treatment": _treatment,
    "treatment-dose": _model(DoseEvent),
    "treatment-steroid": _model(SteroidEvent),
    "observation": _model(Observation),
    "finding": _model(Finding),
    "alert": _model(Alert),
    "alert-action": _model(AlertAction),
    "webhook-alert": _webhook,
    "dlq-replay": _model(ReplayLedgerEntry),
    "patient": _model(PatientRecord),
}


def generate(name: str) -> dict[str, Any]:
    schema = SCHEMAS[name]()
    schema["$schema"] = DRAFT
    schema["$id"] = f"{BASE_ID}{name}.json"
    return schema


def render(name: str) -> str:
    return json.dumps(generate(name), indent=2, sort_keys=True) + "\n"


def write_schemas(out: Path) -> list[Path]:
    out.mkdir(parents=True, exist_ok=True)
    written = []
    for name in SCHEMAS:
        path = out / f"{name}.json"
        path.write_text(render(name), encoding="utf-8")
        written.append(path)
    return written
