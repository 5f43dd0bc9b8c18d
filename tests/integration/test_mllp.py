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
    """Every record of ``topic`` once ``expected`` are there, read to the end offsets. Callers
    stop the listener first (its producer flushed and closed), so the end offsets are final."""
    from kafka_broker import read_topic

    return read_topic(bootstrap, topic, expected, timeout_s)


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
    # g/mL: unit_not_convertible (the NIST message is a test message, MSH-11 T: sent here as P;
    # T and unsupported types are refused from the MSH, see test_test_message_is_refused_and_not_stored)
    nist = (DATA / "nist-lri-gu-002-cbc.hl7").read_bytes().decode().replace("|T|2.5.1|", "|P|2.5.1|", 1)
    bad = [nist, "this is not HL7", batch(1)[0].replace("|F|||20240502080000+0200\r", "|F|||202405020800\r")]
    try:
        acks = await asyncio.to_thread(send_batch, server.port, bad)
    finally:
        await server.stop()
    assert [ack_code(a)[0] for a in acks] == ["AE"] * 3
    assert all(b"ERR|" in a for a in acks)
    records = read_all(kafka_bootstrap, topics["dead-letter"], 3)
    assert len(records) == 3
    by_reason = {dict(r.headers)["dlq.reason"].decode(): r for r in records}
    assert set(by_reason) == {"unit_not_convertible", "hl7_invalid", "naive_timestamp"}
    assert by_reason["hl7_invalid"].value == b"this is not HL7"  # original bytes
    assert by_reason["unit_not_convertible"].value == nist.encode()
    for r in records:
        h = dict(r.headers)
        assert h["dlq.source.topic"] == b"mllp"
        assert h["dlq.message"] and h["dlq.received_at"]
    assert read_all(kafka_bootstrap, topics["observations"], 0) == []


def err_segment(raw: bytes):
    return hl7.parse(raw.strip(b"\x0b\x1c\r\n").decode()).segment("ERR")


async def test_test_message_is_refused_and_not_stored(kafka_bootstrap, topic_factory):
    """Issue 16: MSH-11 T on a production link -> AR / ERR 202, and nothing on any topic;
    an unsupported type (ORM, or an ADT event the patients feed does not take, A03) -> AR / ERR 200."""
    topics = topic_factory("observations", "dead-letter")
    server = await serve_mllp("127.0.0.1", 0, bootstrap=kafka_bootstrap,
                              observations_topic=topics["observations"], dead_letter_topic=topics["dead-letter"])
    test_msg = ORU.format(ctl="T-1", mrn="MRN-T", n=900, alt=400, ast=300).replace("|P|2.5.1", "|T|2.5.1")
    old_test_msg = test_msg.replace("|T|2.5.1", "|T|2.3")
    orm = batch(1)[0].replace("ORU^R01^ORU_R01|CTL-0", "ORM^O01^ORM_O01|ORM-1")
    adt = batch(1)[0].replace("ORU^R01^ORU_R01|CTL-0", "ADT^A03^ADT_A03|ADT-1")
    good = ORU.format(ctl="AFTER", mrn="MRN-G", n=901, alt=41, ast=31)
    try:
        acks = await asyncio.to_thread(send_batch, server.port, [test_msg, old_test_msg, orm, adt, good])
    finally:
        await server.stop()
    assert [ack_code(a) for a in acks] == [("AR", "T-1"), ("AR", "T-1"), ("AR", "ORM-1"), ("AR", "ADT-1"),
                                           ("AA", "AFTER")]
    err = err_segment(acks[0])  # v2.5.1 sender: ERR-2 location, ERR-3 code, ERR-4 severity
    assert str(err(2)) == "MSH^1^11" and str(err(3)(1)(1)) == "202" and str(err(4)) == "E"
    old = err_segment(acks[1])  # v2.3 sender: ERR-1 only
    assert len(old) == 2 and str(old(1)) == "MSH^1^11^202&Unsupported processing id&HL70357"
    for a in acks[2:4]:
        assert str(err_segment(a)(3)(1)(1)) == "200" and str(err_segment(a)(2)) == "MSH^1^9"
    msh7 = str(hl7.parse(acks[0].strip(b"\x0b\x1c\r\n").decode()).segment("MSH")(7))
    assert msh7.endswith("+0000") and len(msh7) == 19
    # stored: only the good message's two observations; nothing dead-lettered
    records = read_all(kafka_bootstrap, topics["observations"], 2)
    assert sorted(json.loads(r.value)["observation_id"] for r in records) == ["FL-901:1742-6", "FL-901:1920-8"]
    assert read_all(kafka_bootstrap, topics["dead-letter"], 0) == []
    assert server.stats.dead_lettered == 0 and server.stats.accepted == 1
    assert server.stats.refused_by_reason == {"hl7_processing_id": 2, "hl7_unsupported_message": 2}


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


def test_listener_process_metrics_carry_ack_type_and_parse_errors(kafka_bootstrap, topic_factory, tmp_path):
    """Issue 14 item 7: ``monitor mllp --metrics-port`` as its own process. Its scrape has the
    messages by ACK code and message type, parse errors by reason, the connection cap, and only
    the listener's own families (no worker gauge at zero such as ``monitor_ready 0``); no MRN."""
    import os
    import subprocess
    import sys
    import time
    import urllib.request

    from workers import TEST_PSEUDONYM_SECRET, free_port

    topics = topic_factory("observations", "dead-letter")
    port, mport = free_port(), free_port()
    root = Path(__file__).resolve().parents[2]
    env = dict(os.environ, PYTHONPATH=str(root), PSEUDONYM_SECRET=TEST_PSEUDONYM_SECRET)
    log = open(tmp_path / "mllp.log", "wb")
    proc = subprocess.Popen(
        [sys.executable, "-m", "monitor.cli", "mllp", "--port", str(port), "--metrics-port", str(mport),
         "--bootstrap", kafka_bootstrap, "--observations-topic", topics["observations"],
         "--dead-letter-topic", topics["dead-letter"], "--max-connections", "12"],
        cwd=root, env=env, stdout=log, stderr=subprocess.STDOUT)

    def scrape() -> str:
        with urllib.request.urlopen(f"http://127.0.0.1:{mport}/metrics", timeout=3) as r:
            return r.read().decode()

    try:
        deadline = time.monotonic() + 30
        while True:
            try:
                socket.create_connection(("127.0.0.1", port), timeout=1).close()
                scrape()
                break
            except OSError:
                if proc.poll() is not None or time.monotonic() > deadline:
                    raise AssertionError((tmp_path / "mllp.log").read_text()[-3000:])
                time.sleep(0.3)
        good = ORU.format(ctl="M-1", mrn="MRN-METRICS-77", n=1, alt=41, ast=31)
        orm = good.replace("ORU^R01^ORU_R01|M-1", "ORM^O01^ORM_O01|M-2")
        acks = send_batch(port, [good, "this is not HL7", orm])
        assert [ack_code(a)[0] for a in acks] == ["AA", "AE", "AR"]
        text = scrape()
    finally:
        proc.terminate()
        proc.wait(15)
        log.close()
    samples = {line.rsplit(" ", 1)[0]: float(line.rsplit(" ", 1)[1]) for line in text.splitlines()
               if line and not line.startswith("#")}
    assert samples['monitor_mllp_messages_total{ack="AA",type="ORU^R01"}'] == 1
    assert samples['monitor_mllp_messages_total{ack="AE",type="none"}'] == 1
    assert samples['monitor_mllp_messages_total{ack="AR",type="other"}'] == 1
    assert samples['monitor_mllp_parse_errors_total{reason="hl7_invalid"}'] == 1
    assert samples["monitor_mllp_max_connections"] == 12
    assert any(k.startswith("monitor_build_info{") for k in samples)
    names = {k.split("{")[0] for k in samples}
    assert all(n.startswith(("monitor_mllp_", "monitor_build")) for n in names), names
    assert "MRN-METRICS-77" not in text
