"""The MLLP listener against a real broker: AA only after Kafka acknowledged the write."""
from __future__ import annotations

import asyncio
import json
import socket
from pathlib import Path

import hl7
import pytest
from hl7.client import MLLPClient
from kafka import KafkaConsumer

from monitor.mllp import serve_mllp

pytestmark = [pytest.mark.integration, pytest.mark.timeout(180)]

DATA = Path(__file__).resolve().parents[1] / "data" / "hl7"

ORU = (
    "MSH|^~\\&|LIS|CENTRAL LAB|MONITOR|GTX|20240502091500+0200||ORU^R01^ORU_R01|{ctl}|P|2.5.1\r"
    "PID|1||{mrn}^^^CENTRAL^MR\r"
    "OBR|1|PL-{n}|FL-{n}|24325-3^Hepatic function panel^LN|||20240502080000+0200\r"
    "OBX|1|NM|1742-6^ALT^LN||{alt}|U/L|10-40|H|||F|||20240502080000+0200\r"
    "OBX|2|NM|1920-8^AST^LN||{ast}|U/L|10-40|H|||F|||20240502080000+0200\r"
)


def batch(n: int) -> list[str]:
    return [ORU.format(ctl=f"CTL-{i}", mrn=f"MRN-{i % 7}", n=i, alt=40 + i, ast=30 + i) for i in range(n)]


def ack_code(raw: bytes) -> tuple[str, str]:
    text = raw.strip(b"\x0b\x1c\r\n").decode()
    msa = hl7.parse(text).segment("MSA")
    return str(msa(1)), str(msa(2))


def read_all(bootstrap: str, topic: str, expected: int, timeout_s: float = 30.0) -> list:
    consumer = KafkaConsumer(
        topic, bootstrap_servers=bootstrap, auto_offset_reset="earliest", enable_auto_commit=False,
        consumer_timeout_ms=2000, group_id=None,
    )
    out = []
    try:
        import time

        deadline = time.monotonic() + timeout_s
        while len(out) < expected and time.monotonic() < deadline:
            out.extend(consumer)
    finally:
        consumer.close()
    return out


def closed_port() -> int:
    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    port = s.getsockname()[1]
    s.close()
    return port


def send_batch(port: int, messages: list[str]) -> list[bytes]:
    with MLLPClient("127.0.0.1", port) as client:
        return [client.send_message(m) for m in messages]


async def test_batch_is_acked_and_on_kafka(kafka_bootstrap, topic_factory):
    topics = topic_factory("observations", "dead-letter")
    server = await serve_mllp("127.0.0.1", 0, bootstrap=kafka_bootstrap,
                              observations_topic=topics["observations"], dead_letter_topic=topics["dead-letter"])
    try:
        messages = batch(20)
        acks = await asyncio.to_thread(send_batch, server.port, messages)
    finally:
        await server.stop()
    assert [ack_code(a) for a in acks] == [("AA", f"CTL-{i}") for i in range(20)]
    records = read_all(kafka_bootstrap, topics["observations"], 40)
    assert len(records) == 40
    ids = sorted(json.loads(r.value)["observation_id"] for r in records)
    assert ids == sorted(f"FL-{i}:{c}" for i in range(20) for c in ("1742-6", "1920-8"))
    for r in records:
        obs = json.loads(r.value)
        assert r.key == obs["patient_id"].encode()
        assert obs["format"] == "hl7"
    assert server.stats.accepted == 20 and server.stats.observations == 40


async def test_rejected_and_unparseable_go_to_dead_letter(kafka_bootstrap, topic_factory):
    topics = topic_factory("observations", "dead-letter")
    server = await serve_mllp("127.0.0.1", 0, bootstrap=kafka_bootstrap,
                              observations_topic=topics["observations"], dead_letter_topic=topics["dead-letter"])
    nist = (DATA / "nist-lri-gu-002-cbc.hl7").read_bytes().decode()  # g/mL: unit_not_convertible
    bad = [nist, "this is not HL7", batch(1)[0].replace("ORU^R01", "ADT^A01"),
           batch(1)[0].replace("|F|||20240502080000+0200\r", "|F|||202405020800\r")]
    try:
        acks = await asyncio.to_thread(send_batch, server.port, bad)
    finally:
        await server.stop()
    assert [ack_code(a)[0] for a in acks] == ["AE"] * 4
    assert all(b"ERR|" in a for a in acks)
    records = read_all(kafka_bootstrap, topics["dead-letter"], 4)
    assert len(records) == 4
    by_reason = {dict(r.headers)["dlq.reason"].decode(): r for r in records}
    # an ORU relabelled ADT^A01 is now read by the patients feed (issue 14): no PID-5 name -> hl7_bad_value
    assert set(by_reason) == {"unit_not_convertible", "hl7_invalid", "hl7_bad_value", "naive_timestamp"}
    assert by_reason["hl7_invalid"].value == b"this is not HL7"  # original bytes
    assert by_reason["unit_not_convertible"].value == nist.encode()
    for r in records:
        h = dict(r.headers)
        assert h["dlq.source.topic"] == b"mllp"
        assert h["dlq.message"] and h["dlq.received_at"]
    assert read_all(kafka_bootstrap, topics["observations"], 1, timeout_s=3) == []


async def test_broker_unreachable_answers_ar_never_aa():
    server = await serve_mllp("127.0.0.1", 0, bootstrap=f"127.0.0.1:{closed_port()}", send_timeout=2.0)
    try:
        acks = await asyncio.to_thread(send_batch, server.port, batch(3) + ["garbage"])
    finally:
        await server.stop()
    codes = [ack_code(a)[0] for a in acks]
    assert codes == ["AR"] * 4
    assert server.stats.accepted == 0 and server.stats.dead_lettered == 0


async def test_oversized_frame_is_dead_lettered_and_connection_survives(kafka_bootstrap, topic_factory):
    topics = topic_factory("observations", "dead-letter")
    server = await serve_mllp("127.0.0.1", 0, bootstrap=kafka_bootstrap, max_message_bytes=4096,
                              observations_topic=topics["observations"], dead_letter_topic=topics["dead-letter"])
    big = batch(1)[0] + "NTE|1||" + "x" * 20000 + "\r"
    try:
        acks = await asyncio.to_thread(send_batch, server.port, [big, batch(1)[0]])
    finally:
        await server.stop()
    assert [ack_code(a)[0] for a in acks] == ["AE", "AA"]
    (dl,) = read_all(kafka_bootstrap, topics["dead-letter"], 1)
    assert dict(dl.headers)["dlq.reason"] == b"payload_too_large"
    assert len(dl.value) == 4096 and big.encode().startswith(dl.value)
