"""Published contracts cannot drift from the code: JSON Schemas, the AsyncAPI document, real payloads.

* the checked-in ``schemas/json/*.json`` and ``schemas/asyncapi.yaml`` equal what the models generate;
* every service topic is a channel of the AsyncAPI document, every payload ``$ref`` names a checked-in
  schema equal to the generated one, the dead-letter headers and reasons are the writer's;
* the document validates with the official AsyncAPI parser (npm ``@asyncapi/parser``,
  installed by ``scripts/install-node-tools.sh`` / ``make tools``);
* real serialised payloads (an alert, its webhook body, an action, a finding, an observation, a replay
  ledger entry) validate against their schemas (check-jsonschema from ``make tools``).
"""
from __future__ import annotations

import json
import shutil
import subprocess
from datetime import datetime, timedelta, timezone
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[2]
SCHEMA_DIR = ROOT / "schemas" / "json"
ASYNCAPI = ROOT / "schemas" / "asyncapi.yaml"
NODE_TOOLS = ROOT / "scripts" / "install-node-tools.sh"
NOW = datetime(2026, 11, 28, 9, 30, tzinfo=timezone.utc)


def _version() -> str:
    from monitor.cli import _version

    return _version()


def test_checked_in_json_schemas_equal_the_models():
    from schemas.jsonschema import SCHEMAS, render

    on_disk = {p.stem for p in SCHEMA_DIR.glob("*.json")}
    assert on_disk == set(SCHEMAS), "run `monitor schema` (make schema) and commit schemas/json"
    for name in SCHEMAS:
        assert (SCHEMA_DIR / f"{name}.json").read_text() == render(name), \
            f"schemas/json/{name}.json differs from the model: run `monitor schema` and commit"


def test_checked_in_asyncapi_equals_the_generated_document():
    from monitor.asyncapi import render

    assert ASYNCAPI.read_text() == render(version=_version()), \
        "schemas/asyncapi.yaml differs from monitor/asyncapi.py: run `monitor schema` and commit"


def test_every_topic_is_a_channel_and_every_payload_ref_is_a_generated_schema():
    from monitor.dlq_tool import replay_ledger_topic
    from monitor.settings import Settings
    from monitor.topics_admin import service_topics
    from schemas.jsonschema import SCHEMAS, render

    doc = yaml.safe_load(ASYNCAPI.read_text())
    s = Settings.model_construct()
    addresses = {c["address"] for c in doc["channels"].values()}
    assert set(service_topics(s)) | {replay_ledger_topic(s)} <= addresses
    used = set()
    for msg_name, msg in doc["components"]["messages"].items():
        ref = (msg.get("payload") or {}).get("$ref")
        if ref is None:
            continue
        path = (ASYNCAPI.parent / ref).resolve()
        assert path.exists(), f"{msg_name}: {ref} does not exist"
        assert path.read_text() == render(path.stem), f"{msg_name}: {ref} differs from the model"
        used.add(path.stem)
    # every input/output schema is on some topic (the dose/steroid variants are inside `treatment`;
    # the webhook body is not a topic: it is documented in the alert message)
    assert set(SCHEMAS) - used == {"treatment-dose", "treatment-steroid", "webhook-alert"}
    # every channel message is a component and every operation names its channel's messages
    for cid, ch in doc["channels"].items():
        for m in ch["messages"].values():
            assert m["$ref"].split("/")[-1] in doc["components"]["messages"]
    assert {op["channel"]["$ref"].split("/")[-1] for op in doc["operations"].values()} == set(doc["channels"])


def test_dead_letter_headers_are_the_writers():
    from monitor.dlq import dead_letter_headers
    from schemas.errors import Reason

    doc = yaml.safe_load(ASYNCAPI.read_text())
    headers = doc["components"]["messages"]["DeadLetter"]["headers"]
    written = [k for k, _ in dead_letter_headers(Reason.NOT_UTF8, "m", "t", 1, 2, NOW)]
    assert list(headers["properties"]) == written and headers["required"] == written
    assert headers["properties"]["dlq.reason"]["enum"] == [r.value for r in Reason]


def test_a_changed_model_is_noticed(monkeypatch):
    """The drift checks above can fail: a field added to a model changes the generated schema."""
    from pydantic import create_model

    import schemas.jsonschema as js
    from schemas.alert import AlertAction

    changed = create_model("AlertAction", __base__=AlertAction, extra_field=(str, "x"))
    monkeypatch.setitem(js.SCHEMAS, "alert-action", js._model(changed))
    assert (SCHEMA_DIR / "alert-action.json").read_text() != js.render("alert-action")


# ------------------------------------------------------------------ the official AsyncAPI parser


def node_modules() -> Path:
    if shutil.which("node") is None or shutil.which("npm") is None:
        pytest.fail("node/npm not found: install Node.js >= 18 with npm (the AsyncAPI parser is an npm package)")
    res = subprocess.run([str(NODE_TOOLS)], capture_output=True, text=True, timeout=600)
    if res.returncode != 0:
        pytest.fail(f"cannot install @asyncapi/parser:\n{res.stdout}\n{res.stderr}")
    out = subprocess.run([str(NODE_TOOLS), "--print"], capture_output=True, text=True, check=True)
    return Path(out.stdout.strip()) / "node_modules"


def parse_asyncapi(path: Path) -> subprocess.CompletedProcess:
    return subprocess.run(["node", str(ROOT / "scripts" / "validate-asyncapi.cjs"), str(path)],
                          capture_output=True, text=True, timeout=120,
                          env={"NODE_PATH": str(node_modules()), "PATH": "/usr/local/bin:/usr/bin:/bin"})


def test_asyncapi_document_validates_with_the_official_parser():
    from schemas.jsonschema import BASE_ID
    from schemas.errors import Reason

    res = parse_asyncapi(ASYNCAPI)
    assert res.returncode == 0, res.stderr
    summary = json.loads(res.stdout)
    assert summary["asyncapi"] == "3.0.0"
    doc = yaml.safe_load(ASYNCAPI.read_text())
    # the parser resolved every payload $ref to the schema with the matching $id
    for cid, ch in summary["channels"].items():
        assert ch["address"] == doc["channels"][cid]["address"]
        for mid, m in ch["messages"].items():
            ref = (doc["components"]["messages"][mid].get("payload") or {}).get("$ref")
            if ref:
                assert m["payload_id"] == BASE_ID + Path(ref).name
            assert m["key"] and m["key"]["type"] == "string"
    dead = summary["channels"]["dead-letter"]["messages"]["DeadLetter"]
    assert dead["header_reason_enum"] == [r.value for r in Reason]
    assert summary["channels"]["lab-results"]["messages"]["LabResult"]["headers"] == ["dlq.replay.at", "dlq.replay.of"]


def test_the_parser_rejects_a_broken_document(tmp_path):
    broken = tmp_path / "asyncapi.yaml"
    shutil.copytree(SCHEMA_DIR, tmp_path / "json")
    doc = yaml.safe_load(ASYNCAPI.read_text())
    doc["components"]["messages"]["Alert"]["payload"] = {"$ref": "./json/no-such-schema.json"}
    doc["channels"]["alerts"]["messages"]["Bogus"] = {"$ref": "#/components/messages/Bogus"}
    broken.write_text(yaml.safe_dump(doc, sort_keys=False))
    res = parse_asyncapi(broken)
    assert res.returncode == 1 and "error" in res.stderr


# ------------------------------------------------------------------ real payloads against their schemas


def check_jsonschema() -> str:
    from test_deploy import tool

    return tool("check-jsonschema")


def _alert():
    from schemas.alert import Alert, AlertText, HistoryEntry
    from schemas.findings import Evidence, ProtocolRef

    return Alert(
        alert_id="f" * 64, patient_id="MRN-0001", rule_id="liver.alt_increased", episode=1, severity="high", grade=3,
        protocol=ProtocolRef(id="onasemnogene-abeparvovec-iv", version="1.0.0"),
        evidence=[Evidence(observation_id="ACC-MRN-0001-1", analyte="alt", value=260, unit="U/L", limit=200,
                           limit_unit="U/L", comparison=">", basis="uln", multiple=6.5, effective_at=NOW)],
        opened_at=NOW - timedelta(hours=2), updated_at=NOW, effective_at=NOW,
        route={"id": "ward-nurse", "tiers": [{"recipients": ["role:ward-nurse"], "after_minutes": 0}]},
        history=[HistoryEntry(at=NOW, by="nurse1", action="acknowledge", role="nurse", note="called Dr X about MRN")],
        text=AlertText(what="ALT is raised 6.5x", why="liver injury", action="call the physician"),
        version=2, pseudonym="a-123456789abc", ward="W1", care_team="T1", finding_ids=["fi-1"],
    )


def payloads() -> dict[str, bytes]:
    from monitor.notify.sinks import WebhookSink
    from schemas.alert import AlertAction
    from schemas.events import Observation
    from schemas.findings import Finding, ProtocolRef
    from schemas.replay import ReplayLedgerEntry

    alert = _alert()
    return {
        "alert": alert.model_dump_json().encode(),
        "webhook-alert": WebhookSink("http://x", "secret").body(alert),
        "alert-action": AlertAction(action="acknowledge", alert_id="f" * 64, patient_id="MRN-0001", by="nurse1",
                                    role="nurse", at=NOW).model_dump_json().encode(),
        "finding": Finding(finding_id="fi-1", patient_id="MRN-0001", rule_id="liver.alt_increased",
                           protocol=ProtocolRef(id="p", version="1"), effective_at=NOW,
                           evaluated_at=NOW).model_dump_json().encode(),
        "observation": Observation(observation_id="o1", event_id="e1", patient_id="MRN-0001", analyte="alt",
                                   loinc="1742-6", kind="lab", value=55, unit="U/L", effective_at=NOW,
                                   source="lab-a").model_dump_json().encode(),
        "dlq-replay": ReplayLedgerEntry(dead_letter="dead-letter/0/5", dead_lettered_at=NOW, reason="unknown_loinc",
                                        replayed_to="lab-results", partition=1, offset=9,
                                        replayed_at=NOW).model_dump_json().encode(),
    }


def test_real_payloads_validate_against_their_schemas(tmp_path):
    cj = check_jsonschema()
    for name, body in payloads().items():
        f = tmp_path / f"{name}.json"
        f.write_bytes(body)
        res = subprocess.run([cj, "--schemafile", str(SCHEMA_DIR / f"{name}.json"), str(f)],
                             capture_output=True, text=True, timeout=120)
        assert res.returncode == 0, f"{name}: {res.stdout}{res.stderr}"


def test_webhook_schema_rejects_a_body_with_the_patient_id(tmp_path):
    """The webhook schema is a privacy contract: the full alert (patient id, finding ids) does not fit it."""
    cj = check_jsonschema()
    f = tmp_path / "full.json"
    f.write_bytes(_alert().model_dump_json().encode())
    res = subprocess.run([cj, "--schemafile", str(SCHEMA_DIR / "webhook-alert.json"), str(f)],
                         capture_output=True, text=True, timeout=120)
    assert res.returncode == 1 and "patient_id" in res.stdout + res.stderr
