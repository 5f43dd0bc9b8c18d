"""Security review H1: hostile HL7 v2 / FHIR / JSON input is rejected with a reason
BEFORE it is fully parsed, and the ACK is built from the MSH segment alone.

On the old code (``hl7.parse`` of the whole message, ``create_ack`` re-parsing it) the
crafted ``NTE|1|`` + ``^&~`` storm was parsed to the end (~450 MiB per MiB of input)
and rejected only afterwards as ``hl7_invalid``. These tests pin the structure, not a
time: the reason code says which limit stopped it, and the memory the parser allocates
(``tracemalloc``, deterministic) stays a small multiple of the input. Timings are in
``bench/bench_hostile_hl7.py``.
"""
from __future__ import annotations

import json
import tracemalloc
from datetime import datetime, timezone
from pathlib import Path

import hl7
import pytest

from schemas.errors import Reason, Rejected
from schemas.hl7v2 import DEFAULT_HL7_LIMITS, _part, _repetitions, build_ack, split_message
from schemas.ingest import Limits, decode

NOW = datetime(2024, 6, 1, 12, 0, tzinfo=timezone.utc)
HEAD = "MSH|^~\\&|LAB|HOSP|MON|HOSP|20240502080000+0200||ORU^R01|C1|P|2.5\rPID|1||MRN-1\r"
DATA = Path(__file__).resolve().parents[1] / "data" / "hl7"


def _reject(raw: bytes, limits: Limits = Limits()) -> tuple[Rejected, int]:
    tracemalloc.start()
    try:
        with pytest.raises(Rejected) as ei:
            decode("lab-results", raw, received_at=NOW, limits=limits)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    return ei.value, peak


@pytest.mark.parametrize("body", [
    "NTE|1|" + "^&~" * 80_000,           # the review's storm, under the HL7 byte cap
    "NTE|" + "|" * 200_000,              # a million empty fields, scaled to the cap
    "NTE|1|x\r" * 5_000,                 # too many segments
    "NTE|1|" + "^" * 2_000,              # too many components
    "NTE|1|" + "&" * 2_000,              # too many sub-components
])
def test_structural_limits_reject_before_parsing(body):
    raw = (HEAD + body + "\r").encode()
    assert len(raw) <= DEFAULT_HL7_LIMITS.max_chars
    rej, peak = _reject(raw)
    assert rej.reason is Reason.TOO_COMPLEX, rej
    assert "limit" in rej.message
    # nothing was split into containers: the work is a few copies of the input
    assert peak < 4 * len(raw) + 1_000_000, peak


def test_crafted_one_mib_message_is_too_large_for_hl7():
    raw = (HEAD + "NTE|1|" + "^&~" * 340_000 + "\r").encode()
    assert len(raw) > 1_000_000
    rej, peak = _reject(raw, Limits(max_bytes=2_000_000))
    assert rej.reason is Reason.PAYLOAD_TOO_LARGE and "HL7 cap" in rej.message
    assert peak < 4 * len(raw), peak


def test_ack_reads_the_msh_segment_only():
    storm = (HEAD + "NTE|1|" + "^&~" * 340_000 + "\r").encode()
    tracemalloc.start()
    try:
        ack = build_ack(storm, "AE", "too_complex: x", reason=Reason.TOO_COMPLEX)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert peak < 200_000, peak  # the 1 MiB tail is never decoded
    parsed = hl7.parse(ack.decode())
    assert str(parsed.segment("MSA")(2)) == "C1"
    assert str(parsed.segment("MSH")(9)) == "ACK^R01^ACK"
    assert str(parsed.segment("MSH")(3)) == "MON" and str(parsed.segment("MSH")(5)) == "LAB"
    # a later segment that is not even text does not matter
    assert b"MSA|AA|C1" in build_ack(HEAD.encode() + b"\xff\xfe" * 1000, "AA")


def test_custom_delimiters_and_bad_delimiters():
    text = HEAD.replace("|", "#").replace("^~\\&", "$*\\@", 1).replace("ORU^R01", "ORU$R01")
    segs = split_message(text)
    assert _part(segs[0], 9, 1, 2) == "R01" and _part(segs[1], 3) == "MRN-1"
    with pytest.raises(Rejected) as ei:
        split_message("MSH|^^\\\\&|A|B\r")  # component and repetition separators are the same
    assert ei.value.reason is Reason.HL7_INVALID


def _ref_part(seg, f, r, c, s):
    """The previous ``_part``, reading ``hl7.parse`` containers (the reference)."""
    try:
        x = seg[f]
    except IndexError:
        return ""
    for idx in (r, c, s):
        if isinstance(x, str):
            return x.strip() if idx == 1 else ""
        try:
            x = x[idx - 1]
        except IndexError:
            return ""
    return (x if isinstance(x, str) else str(x)).strip()


@pytest.mark.parametrize("name", sorted(p.name for p in DATA.glob("*.hl7")))
def test_lazy_split_reads_what_the_hl7_package_reads(name):
    """Differential check on the public samples: every field, repetition, component and
    sub-component we read equals what ``hl7.parse`` gives."""
    from schemas.hl7v2 import normalise

    text = (DATA / name).read_bytes().decode("utf-8")
    ours = split_message(text)
    theirs = hl7.parse(normalise(text))
    assert len(ours) == len(theirs)
    for seg, ref in zip(ours, theirs):
        for f in range(1, len(ref)):
            if seg.name == "MSH" and f <= 2:
                continue
            for r in (1, 2):
                for c in (1, 2, 3, 4):
                    for s in (1,):  # callers never read a sub-component past the first
                        expected = _ref_part(ref, f, r, c, s)
                        assert _part(seg, f, r, c, s) == expected, (name, seg.name, f, r, c, s)
            assert _repetitions(seg, f) == (len(ref[f]) if str(ref[f]) else 0)


def test_json_value_budget_and_bundle_entry_cap():
    flat = b'{"event_id": "e", "x": [' + b",".join([b"0"] * 200_000) + b"]}"
    with pytest.raises(Rejected) as ei:
        decode("lab-results", flat, received_at=NOW)
    assert ei.value.reason is Reason.TOO_COMPLEX
    bundle = ('{"resourceType": "Bundle", "type": "collection", "entry": ['
              + ",".join(['{"resource": {"resourceType": "Patient", "id": "p"}}'] * 300) + "]}")
    with pytest.raises(Rejected) as ei:
        decode("lab-results", bundle.encode(), received_at=NOW)
    assert ei.value.reason is Reason.TOO_COMPLEX and "300 entries" in ei.value.message


def test_hl7_patient_id_is_bounded_and_printable():
    """Review L5: a 100 KB PID-3 with NUL and unit separators was accepted."""
    from schemas.hl7v2 import observations_from_hl7

    good = ("MSH|^~\\&|LAB|H|MON|H|20240502080000+0200||ORU^R01|C1|P|2.5\rPID|1||{pid}\r"
            "OBR|1|P1|F1|24325-3^Hepatic^LN|||20240502080000+0200\r"
            "OBX|1|NM|1742-6^ALT^LN||55|U/L|10-40|H|||F|||20240502080000+0200\r")
    assert observations_from_hl7(good.format(pid="MRN-1"), received_at=NOW)[0].patient_id == "MRN-1"
    for pid in ("M" * 129, "MRN\x00-1", "MRN\x1f1"):
        with pytest.raises(Rejected) as ei:
            observations_from_hl7(good.format(pid=pid), received_at=NOW)
        assert ei.value.reason is Reason.SCHEMA_INVALID


def test_a_treatments_patient_id_is_printable_as_a_results_is():
    """A dose or steroid event with a control character in its patient id was accepted and
    routed to the patient stream, where a lab result with the same id would be refused."""
    dose = {"type": "dose", "event_id": "d1", "patient_id": "{pid}", "product": "onasemnogene-abeparvovec-iv",
            "administered_at": "2024-05-01T08:00:00Z", "birth_date": "2023-01-01", "weight_kg": 8.0}
    ok = decode("treatments", json.dumps({**dose, "patient_id": "MRN-1"}).encode(), received_at=NOW)
    assert ok.patient_id == "MRN-1"
    for pid in ("MRN\x00-1", "MRN\x1f1", "MRN\u2028"):
        with pytest.raises(Rejected) as ei:
            decode("treatments", json.dumps({**dose, "patient_id": pid}).encode(), received_at=NOW)
        assert ei.value.reason is Reason.SCHEMA_INVALID and "control characters" in ei.value.message
