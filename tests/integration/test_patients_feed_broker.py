"""The patients feed over MLLP against a real broker (issue 14): an ADT^A01 is answered AA only after
the canonical record is on ``patients`` (keyed by patient id); an invalid ADT (no MRN) is answered
AE and its original bytes are on the dead-letter topic with the reason. No demographics in INFO logs."""
from __future__ import annotations

import asyncio
import logging

import pytest

from monitor.mllp import serve_mllp
from schemas.patients import PatientRecord
from test_mllp import ack_code, read_all, send_batch

pytestmark = [pytest.mark.integration, pytest.mark.timeout(120)]

ADT = ("MSH|^~\\&|PAS|HOSP|MONITOR|GTX|20260101120000||ADT^{ev}^ADT_A01|{ctl}|P|2.5.1\r"
       "PID|1||{pid}^^^HOSP^PI{mr}||Nakamura^Yui||20240901|F\r"
       "PV1|1|I|PICU^R2^B7\r")


async def test_adt_over_mllp_lands_on_patients_and_invalid_is_dead_lettered(kafka_bootstrap, topic_factory, caplog):
    topics = topic_factory("observations", "dead-letter", "patients")
    server = await serve_mllp("127.0.0.1", 0, bootstrap=kafka_bootstrap,
                              observations_topic=topics["observations"], dead_letter_topic=topics["dead-letter"])
    server.patients_topic = topics["patients"]
    good = ADT.format(ev="A01", ctl="C1", pid="P-100", mr="~MRN-9001^^^HOSP^MR")
    update = ADT.format(ev="A08", ctl="C2", pid="P-100", mr="~MRN-9001^^^HOSP^MR").replace("PICU^R2^B7", "W2^R1^B1")
    bad = ADT.format(ev="A04", ctl="C3", pid="P-101", mr="")  # no MR identifier
    caplog.set_level(logging.INFO)
    try:
        acks = await asyncio.to_thread(send_batch, server.port, [good, update, bad])
    finally:
        await server.stop()
    assert [ack_code(a)[0] for a in acks] == ["AA", "AA", "AE"]
    recs = read_all(kafka_bootstrap, topics["patients"], 2)
    assert [r.key for r in recs] == [b"P-100", b"P-100"]
    first, second = (PatientRecord.model_validate_json(r.value) for r in recs)
    assert (first.display_name, first.mrn, first.mrn_authority, str(first.birth_date), first.ward, first.bed) == \
        ("Yui Nakamura", "MRN-9001", "HOSP", "2024-09-01", "PICU", "B7")
    assert second.ward == "W2"
    assert read_all(kafka_bootstrap, topics["observations"], 0) == []
    (dead,) = read_all(kafka_bootstrap, topics["dead-letter"], 1)
    assert dead.value.decode().startswith("MSH") and "P-101" in dead.value.decode()
    assert dict(dead.headers)["dlq.reason"] == b"hl7_bad_value"
    logged = "\n".join(r.getMessage() for r in caplog.records if r.levelno >= logging.INFO)
    assert "Nakamura" not in logged and "MRN-9001" not in logged and "P-10" not in logged
