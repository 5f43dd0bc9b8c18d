"""Publish a JSON-lines file of events to their input topics (kafka-python, acks=all)."""
from __future__ import annotations

import json
from pathlib import Path
from typing import Iterable, Iterator

from schemas.analytes import catalogue

from .settings import Settings


def route_event(obj: dict, s: Settings) -> str:
    """Choose the input topic for an event by its shape (``topic`` wins when present)."""
    if "type" in obj:
        return s.topic_treatments
    if "results" in obj:
        return s.topic_liver_function
    analyte = catalogue().by_loinc.get(str(obj.get("loinc", "")))
    if analyte is not None and analyte.kind == "vital":
        return s.topic_vital_signs
    return s.topic_lab_results


def iter_records(lines: Iterable[str], s: Settings) -> Iterator[tuple[str, bytes | None, bytes]]:
    """Yield (topic, key, value bytes). A line is either an event or {"topic", "value"[, "key"]}."""
    for n, line in enumerate(lines, 1):
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        obj = json.loads(line)
        if isinstance(obj, dict) and "topic" in obj and "value" in obj:
            topic = obj["topic"]
            value = obj["value"]
            key = obj.get("key")
            if isinstance(value, str):
                raw = value.encode("utf-8")
            else:
                raw = json.dumps(value, separators=(",", ":")).encode()
                key = key or (value.get("patient_id") if isinstance(value, dict) else None)
        else:
            topic = route_event(obj, s)
            raw = json.dumps(obj, separators=(",", ":")).encode()
            key = obj.get("patient_id")
        yield topic, (str(key).encode() if key else None), raw


def publish_file(path: str | Path, s: Settings, *, flush_every: int = 10_000) -> dict[str, int]:
    from kafka import KafkaProducer

    from .kafka_config import kafka_python_config

    producer = KafkaProducer(
        acks="all", linger_ms=20, batch_size=256 * 1024, max_request_size=16 * 1024 * 1024,
        **kafka_python_config(s),
    )
    counts: dict[str, int] = {}
    try:
        with open(path, encoding="utf-8") as fh:
            for i, (topic, key, raw) in enumerate(iter_records(fh, s), 1):
                producer.send(topic, key=key, value=raw)
                counts[topic] = counts.get(topic, 0) + 1
                if i % flush_every == 0:
                    producer.flush()
        producer.flush()
    finally:
        producer.close()
    return counts
