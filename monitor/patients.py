"""The patients feed: validate demographic messages and write canonical records to ``patients``.

``monitor patients load FILE...``: each file holds HL7 v2 ADT messages (``.hl7``: one or more,
each starting with ``MSH``), a JSON object or list (records or FHIR ``Patient`` resources, or a
FHIR ``Bundle`` of them), or JSON lines. Valid ones go to ``TOPIC_PATIENTS`` keyed by patient id
(compacted: the latest record per patient is kept for ever); invalid ones to the dead-letter topic
with their original bytes and the reason. The MLLP listener does the same for ADT over MLLP.
Counts only are printed/logged: no demographics (PHI) at INFO.
"""
from __future__ import annotations

import argparse
import json
import logging
import re
import sys
from datetime import datetime, timezone
from pathlib import Path
from typing import Iterator

from schemas.errors import Rejected
from schemas.patients import PatientRecord, parse_patient

from .dlq import dead_letter_headers
from .settings import Settings, get_settings

log = logging.getLogger(__name__)
SOURCE = "patients-load"


def split_messages(data: bytes) -> Iterator[bytes]:
    """The messages of one file, as the bytes each arrived in."""
    text = data.decode("utf-8", "replace").lstrip("\ufeff \t\r\n")
    if text.startswith("MSH"):
        for part in re.split(r"[\r\n]+(?=MSH)", text):
            if part.strip():
                yield part.replace("\r\n", "\r").replace("\n", "\r").encode("utf-8")
        return
    try:
        obj = json.loads(data)
    except ValueError:
        for line in data.splitlines():
            if line.strip():
                yield line
        return
    if isinstance(obj, dict) and obj.get("resourceType") == "Bundle":
        obj = [e.get("resource") for e in obj.get("entry") or [] if isinstance(e, dict)]
    for item in obj if isinstance(obj, list) else [obj]:
        yield json.dumps(item, separators=(",", ":")).encode("utf-8")


def route(raw: bytes, s: Settings) -> tuple[str, bytes | None, bytes, list[tuple[str, bytes]] | None, PatientRecord | None]:
    """(topic, key, value, headers, record) for one message: the canonical record, or a dead letter."""
    try:
        rec = parse_patient(raw)
    except Rejected as rej:
        headers = dead_letter_headers(rej.reason, rej.message, SOURCE, None, None, datetime.now(timezone.utc))
        return s.topic_dead_letter, None, raw, headers, None
    return s.topic_patients, rec.patient_id.encode("utf-8"), rec.model_dump_json().encode("utf-8"), None, rec


def load_files(paths: list[str], s: Settings) -> dict[str, int]:
    from kafka import KafkaProducer

    from .kafka_config import kafka_python_config

    producer = KafkaProducer(acks="all", linger_ms=20, **kafka_python_config(s))
    counts = {"accepted": 0, "dead_lettered": 0}
    try:
        for path in paths:
            for raw in split_messages(Path(path).read_bytes()):
                topic, key, value, headers, rec = route(raw, s)
                producer.send(topic, key=key, value=value, headers=headers)
                counts["accepted" if rec else "dead_lettered"] += 1
        producer.flush()
    finally:
        producer.close()
    return counts


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="monitor patients", description="patient demographics feed")
    sub = p.add_subparsers(dest="cmd", required=True)
    ld = sub.add_parser("load", help="validate and publish demographic records (JSON, FHIR Patient, HL7 ADT)")
    ld.add_argument("files", nargs="+", help="files of records (.hl7: ADT messages; .json/.jsonl: records, "
                                            "FHIR Patients or a FHIR Bundle)")
    args = p.parse_args(argv if argv is not None else sys.argv[1:])
    counts = load_files(args.files, get_settings())
    print(f"patients: {counts['accepted']} records published, {counts['dead_lettered']} dead-lettered")
    return 0 if counts["dead_lettered"] == 0 else 1
