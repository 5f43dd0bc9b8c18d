"""Hypothesis fuzzing of every input parser (promise 1: the worker never crashes on input).

Targets: ``schemas.ingest.decode`` for every topic kind with arbitrary bytes; mutated valid
JSON events (structure- and byte-level); mutated FHIR R4 resources (``schemas.fhir``);
mutated HL7 v2 ORU^R01 messages (``schemas.hl7v2``); and MLLP framing (``monitor.mllp``:
``MllpServer._read_frame`` + ``handle`` over a byte stream in arbitrary chunks).

Invariant: the only exception is ``schemas.errors.Rejected`` with a ``Reason`` and a
non-empty message; what is accepted is well-formed (observations validate again, within
the size limit); size and depth limits are enforced. On MLLP every message gets an ACK
and every reject is written to dead-letter with a ``dlq.reason`` header.

Budget, counts and mutations: ``tests/fuzz/fuzzing.py`` (``FUZZ_EXAMPLES`` in total over
the targets of this folder, ~300 each in CI).
"""
from __future__ import annotations

import asyncio
import json
import random
from datetime import datetime, timedelta, timezone
from pathlib import Path

import pytest
from hypothesis import given
from hypothesis import strategies as st

from schemas.errors import Reason, Rejected
from schemas.events import DoseEvent, Observation, SteroidEvent
from schemas.fhir import observations_from_fhir
from schemas.hl7v2 import observations_from_hl7
from schemas.ingest import INPUT_KINDS, Limits, decode
from tests.fuzz.fuzzing import COUNTS, FUZZ, REASONS, mutate_bytes, mutate_json

ROOT = Path(__file__).resolve().parents[2]
RECEIVED = datetime.now(timezone.utc)
# small limits so the fuzzer reaches them; the defaults are checked separately below
LIMITS = Limits(max_bytes=4096, max_depth=10, max_future=timedelta(hours=24))


# ---------------------------------------------------------------- seeds

def _seeds() -> dict[str, list[bytes]]:
    from monitor import simulate as sim

    start = RECEIVED.replace(hour=0, minute=0, second=0, microsecond=0) - timedelta(days=30)
    c = sim.generate_cohort(6, 3, start=start, days=30, formats=("mixed",))
    out: dict[str, list[bytes]] = {"json": [], "fhir": [], "hl7": [], "treatments": []}
    for e in c.events:
        for fmt in ("json", "fhir", "hl7"):
            v = sim.encode(e, fmt)
            raw = v.encode() if isinstance(v, str) else json.dumps(v).encode()
            kind = "treatments" if e.topic == "treatments" else fmt
            out[kind].append(raw)
            if e.topic == "treatments":
                break
    for p in (ROOT / "tests/data/fhir").glob("*.json"):
        out["fhir"].append(p.read_bytes())
    for p in (ROOT / "tests/data/hl7").glob("*.hl7"):
        out["hl7"].append(p.read_bytes())
    rng = random.Random(1)
    return {k: rng.sample(v, min(len(v), 60)) for k, v in out.items()}


SEEDS = _seeds()
KIND_OF = {"json": ("lab-results", "vital-signs", "liver-function"), "fhir": ("lab-results", "vital-signs", "liver-function"),
           "hl7": ("lab-results", "vital-signs", "liver-function"), "treatments": ("treatments",)}


def check_decode(kind: str, raw: bytes, limits: Limits = LIMITS, target: str = "?"):
    """decode() raises only Rejected (reason + message); accepted results are well-formed."""
    COUNTS[target] += 1
    try:
        out = decode(kind, raw, received_at=RECEIVED, limits=limits)
    except Rejected as rej:
        assert isinstance(rej.reason, Reason)
        assert isinstance(rej.message, str) and rej.message.strip()
        REASONS[rej.reason.value] += 1
        if raw and len(raw) > limits.max_bytes:
            assert rej.reason == Reason.PAYLOAD_TOO_LARGE
        return None
    assert len(raw) <= limits.max_bytes
    if kind == "treatments":
        assert isinstance(out, (DoseEvent, SteroidEvent))
    else:
        assert isinstance(out, list) and out
        for o in out:
            assert isinstance(o, Observation)
            Observation.model_validate_json(o.model_dump_json())  # round-trips (finite, aware times)
            assert o.patient_id.strip() and o.observation_id.strip()
    REASONS["accepted"] += 1
    return out


# ---------------------------------------------------------------- strategies

@st.composite
def mutated_json(draw, pool: str):
    return mutate_json(draw, draw(st.sampled_from(SEEDS[pool])))


@st.composite
def byte_mutated(draw, pool: str):
    return mutate_bytes(draw, draw(st.sampled_from(SEEDS[pool])))


HL7_ATOMS = ["|", "^", "~", "\\", "&", "\r", "\n", "\x0b", "\x1c", "MSH", "OBX", "OBR", "PID", "NM", "SN", "ST",
             "1742-6", "LN", "U/L", "<", ">", "-", "C", "F", "W", "X", "D", "20240502", "+0200", "99", "1e400", "\x00", "é"]


@st.composite
def mutated_hl7(draw):
    text = draw(st.sampled_from(SEEDS["hl7"])).decode("utf-8", "replace")
    segs = [s for s in text.replace("\r\n", "\r").replace("\n", "\r").split("\r") if s]
    for _ in range(draw(st.integers(1, 5))):
        if not segs:
            break
        si = draw(st.integers(0, len(segs) - 1))
        fields = segs[si].split("|")
        op = draw(st.sampled_from(["field", "drop_seg", "dup_seg", "swap", "junk", "drop_field"]))
        if op == "field":
            fi = draw(st.integers(0, len(fields) - 1))
            fields[fi] = draw(st.one_of(st.text(max_size=20), st.lists(st.sampled_from(HL7_ATOMS), max_size=6).map("".join)))
            segs[si] = "|".join(fields)
        elif op == "drop_field" and len(fields) > 1:
            del fields[draw(st.integers(0, len(fields) - 1))]
            segs[si] = "|".join(fields)
        elif op == "drop_seg":
            del segs[si]
        elif op == "dup_seg":
            segs.insert(si, segs[si])
        elif op == "swap" and len(segs) > 1:
            sj = draw(st.integers(0, len(segs) - 1))
            segs[si], segs[sj] = segs[sj], segs[si]
        else:
            segs.insert(si, draw(st.lists(st.sampled_from(HL7_ATOMS), max_size=10).map("".join)))
    sep = draw(st.sampled_from(["\r", "\n", "\r\n"]))
    return sep.join(segs).encode("utf-8", "replace")


# ---------------------------------------------------------------- targets

@FUZZ
@given(kind=st.sampled_from(INPUT_KINDS + ("unknown-topic",)), raw=st.one_of(
    st.binary(max_size=600), st.text(max_size=300).map(str.encode),
    st.builds(lambda b: b"MSH|^~\\&|" + b, st.binary(max_size=300)),
    st.builds(lambda b: b"\x0b" + b, st.binary(max_size=300)),
    st.builds(lambda b: b'{"resourceType":' + b, st.binary(max_size=300))))
def test_arbitrary_bytes_every_topic(kind, raw):
    if kind == "unknown-topic":
        COUNTS["arbitrary_bytes"] += 1
        with pytest.raises(Rejected):
            decode(kind, raw, received_at=RECEIVED)
        return
    check_decode(kind, raw, target="arbitrary_bytes")


@FUZZ
@given(pool=st.sampled_from(["json", "treatments"]), data=st.data())
def test_mutated_json_events(pool, data):
    raw = data.draw(mutated_json(pool))
    for kind in KIND_OF[pool] if pool == "treatments" else (data.draw(st.sampled_from(KIND_OF[pool])),):
        check_decode(kind, raw, target="mutated_json")


@FUZZ
@given(pool=st.sampled_from(["json", "fhir", "hl7", "treatments"]), data=st.data())
def test_byte_mutated_events(pool, data):
    raw = data.draw(byte_mutated(pool))
    kind = data.draw(st.sampled_from(KIND_OF[pool] + ("treatments",)))
    check_decode(kind, raw, target="byte_mutated")


@FUZZ
@given(data=st.data())
def test_mutated_fhir(data):
    raw = data.draw(mutated_json("fhir"))
    check_decode(data.draw(st.sampled_from(KIND_OF["fhir"])), raw, target="mutated_fhir")
    # and the FHIR parser directly, with objects JSON cannot express
    obj = json.loads(raw)
    try:
        observations_from_fhir(obj, received_at=RECEIVED, limits=LIMITS)
    except Rejected as rej:
        assert rej.message.strip()


@FUZZ
@given(raw=mutated_hl7())
def test_mutated_hl7(raw):
    check_decode("lab-results", raw, target="mutated_hl7")
    try:
        observations_from_hl7(raw.decode("utf-8", "replace"), received_at=RECEIVED, limits=LIMITS,
                              default_tz=timezone(timedelta(hours=2)))
    except Rejected as rej:
        assert rej.message.strip()


@FUZZ
@given(depth=st.integers(1, 200), kind=st.sampled_from(INPUT_KINDS), wrap=st.sampled_from(["list", "dict", "fhir"]))
def test_depth_limit(depth, kind, wrap):
    COUNTS["limits"] += 1
    inner: object = 1
    for _ in range(depth):
        inner = [inner] if wrap == "list" else {"a": inner}
    obj = {"resourceType": "Observation", "id": "x", "extension": inner} if wrap == "fhir" else {"patient_id": "p", "x": inner}
    raw = json.dumps(obj).encode()
    limits = Limits(max_bytes=10**6, max_depth=16)
    try:
        decode(kind, raw, received_at=RECEIVED, limits=limits)
    except Rejected as rej:
        if depth + 1 > 16:
            assert rej.reason == Reason.TOO_DEEP, (depth, rej.reason)
        return
    assert depth + 1 <= 16


@FUZZ
@given(kind=st.sampled_from(INPUT_KINDS), extra=st.integers(1, 5000), fmt=st.sampled_from(["json", "hl7", "fhir"]))
def test_size_limit(kind, extra, fmt):
    COUNTS["limits"] += 1
    pool = "treatments" if kind == "treatments" else fmt
    seed = SEEDS[pool][0]
    limits = Limits(max_bytes=len(seed) + extra - 1, max_depth=32)
    padded = seed + b" " * extra if pool != "hl7" else seed + b"\r" + b"Z" * (extra - 1)
    with pytest.raises(Rejected) as exc:
        decode(kind, padded, received_at=RECEIVED, limits=limits)
    assert exc.value.reason == Reason.PAYLOAD_TOO_LARGE
    # the default limit too (1 MiB)
    with pytest.raises(Rejected) as exc:
        decode(kind, b"{" + b" " * (1_048_576 + extra), received_at=RECEIVED)
    assert exc.value.reason == Reason.PAYLOAD_TOO_LARGE


# ---------------------------------------------------------------- MLLP framing

class FakeSink:
    def __init__(self) -> None:
        self.records: list = []

    async def send_all(self, records) -> None:
        self.records.extend(records)

    async def close(self) -> None:
        pass


MLLP_ATOMS = [b"\x0b", b"\x1c", b"\r", b"\x1c\r", b"\x0b\x1c\r", b"MSH|^~\\&|", b"\n"]


@st.composite
def mllp_stream(draw):
    parts = []
    for _ in range(draw(st.integers(1, 6))):
        kind = draw(st.sampled_from(["frame", "junk", "atoms", "big"]))
        if kind == "frame":
            body = draw(st.one_of(mutated_hl7(), st.sampled_from(SEEDS["hl7"])))
            parts.append(b"\x0b" + body + b"\x1c\r")
        elif kind == "junk":
            parts.append(draw(st.binary(max_size=200)))
        elif kind == "big":
            parts.append(b"\x0b" + b"MSH|" + b"A" * draw(st.integers(3000, 9000)) + b"\x1c\r")
        else:
            parts.append(b"".join(draw(st.lists(st.sampled_from(MLLP_ATOMS + [b"x"]), max_size=12))))
    stream = b"".join(parts)
    cuts = sorted(draw(st.lists(st.integers(0, len(stream)), max_size=8)))
    chunks, prev = [], 0
    for c in cuts + [len(stream)]:
        chunks.append(stream[prev:c])
        prev = c
    return stream, [c for c in chunks if c]


@FUZZ
@given(mllp_stream())
def test_mllp_framing_and_handling(sample):
    from monitor.mllp import MllpServer

    stream, chunks = sample
    COUNTS["mllp"] += 1
    max_bytes = 2048

    async def run():
        sink = FakeSink()
        server = MllpServer(sink, max_message_bytes=max_bytes, limits=Limits(max_bytes=max_bytes), idle_timeout=None)
        reader = asyncio.StreamReader()
        for c in chunks:
            reader.feed_data(c)
        reader.feed_eof()
        buf = bytearray()
        acks = []
        for _ in range(10_000):
            frame = await server._read_frame(reader, buf)
            if frame is None:
                break
            raw, oversized = frame
            assert len(raw) <= max_bytes
            ack = await server.handle(raw, oversized_len=oversized)
            assert ack.startswith(b"MSH"), ack[:40]
            acks.append(ack)
        return sink, server, acks

    sink, server, acks = asyncio.run(run())
    frames_closed = stream.count(b"\x1c\r")
    assert len(acks) <= frames_closed
    assert server.stats.messages == len(acks)
    # every message is stored (AA), dead-lettered (AE), or refused from its MSH (AR, processing id or
    # message type; nothing stored, the sender keeps it: issue 16)
    refused = sum(server.stats.refused_by_reason.values())
    assert server.stats.accepted + server.stats.dead_lettered + refused == len(acks)
    assert sum(b"MSA|AR|" in a for a in acks) == refused
    for topic, key, value, headers in sink.records:
        if topic == "dead-letter":
            h = dict(headers)
            assert h["dlq.reason"] and h["dlq.message"].strip()
            Reason(h["dlq.reason"].decode())
        else:
            Observation.model_validate_json(value)
