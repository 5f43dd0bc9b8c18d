"""Differential proof for ingest changes: every output of ``monitor.ingest.Ingest.record``
(topic, key, value bytes, headers) and every observation handed to the clinical stage
(its fields and fields set), for a fixed set of inputs, written to one file.

Run it in two trees with the same interpreter and compare the files (they must be
byte-identical); imports come from the current directory's tree (printed)::

    .venv/bin/python bench/diff_ingest_outputs.py capture /tmp/corpus.jsonl    # once
    cd /work/wt/base && /work/wt/ingestcpu/.venv/bin/python \\
        /work/wt/ingestcpu/bench/diff_ingest_outputs.py run /tmp/corpus.jsonl /tmp/out-base.txt
    cd /work/wt/ingestcpu && .venv/bin/python bench/diff_ingest_outputs.py run /tmp/corpus.jsonl /tmp/out-mine.txt

Inputs (deterministic, fixed ``received_at``):

- simulated cohorts: ``generate_cohort(300, 7, formats=("mixed",))`` and ``("json",)``, every
  record including treatments, plus alert actions;
- ``capture``: every payload the input tests hand to ``schemas.ingest.decode`` (unit tests
  of decoding, FHIR, HL7 v2, hostile input, units, censored values, the fuzz tests with their
  seeds and generated examples) and every file of tests/data;
- 12,000 seeded mutations of valid events (JSON, FHIR, HL7): dropped fields, wrong types, NaN and
  Infinity text, huge numbers and conversions that overflow, naive / future / offset
  timestamps, unknown units and LOINC codes, extra fields, deep and wide nesting,
  non-UTF-8 bytes, lone surrogates, a BOM, duplicate keys, non-ASCII and control
  characters, long identifiers, reference ranges.
"""
from __future__ import annotations

import base64
import copy
import hashlib
import json
import os
import random
import sys
from datetime import datetime, timedelta, timezone
from pathlib import Path

sys.path.insert(0, os.getcwd())

START = datetime(2026, 1, 1, tzinfo=timezone.utc)
DAYS = 60
RECEIVED = START + timedelta(days=DAYS, hours=6)
CAPTURE_TESTS = [
    "tests/unit/test_ingest_decode.py", "tests/unit/test_hostile_input.py", "tests/unit/test_fhir.py",
    "tests/unit/test_hl7v2.py", "tests/unit/test_units.py", "tests/unit/test_censored.py",
    "tests/unit/test_cross_format.py", "tests/unit/test_boundaries.py", "tests/unit/test_contracts.py",
    "tests/unit/test_keyed_ids.py", "tests/fuzz/test_fuzz_parsers.py",
]


def capture(path: str) -> None:
    """Run the input tests with ``decode`` wrapped; keep every (kind, payload) it is given."""
    import pytest

    import schemas.ingest as si

    seen: dict[tuple[str, bytes], None] = {}
    real = si.decode

    def spy(topic_kind, raw, **kw):
        if isinstance(raw, str):
            b = raw.encode("utf-8", "surrogatepass")
        else:
            b = bytes(raw) if raw is not None else b""
        if len(seen) < 50_000:
            seen.setdefault((str(topic_kind), b), None)
        return real(topic_kind, raw, **kw)

    si.decode = spy
    import monitor.ingest as mi
    mi.decode = spy
    for f in Path("tests/data").rglob("*"):
        if f.is_file() and f.suffix in (".json", ".hl7"):
            for kind in ("lab-results", "vital-signs", "liver-function", "treatments"):
                seen.setdefault((kind, f.read_bytes()), None)
    rc = pytest.main(["-q", "-p", "no:cacheprovider", "-x", *CAPTURE_TESTS])
    with open(path, "w") as fh:
        for kind, raw in seen:
            fh.write(json.dumps({"kind": kind, "raw": base64.b64encode(raw).decode()}) + "\n")
    print(f"captured {len(seen)} payloads (pytest exit {rc}) -> {path}")


def _mutations(rng: random.Random, events: list[tuple[str, dict]], texts: list[tuple[str, str]], n: int):
    """Seeded mutations of valid events: (kind, raw bytes)."""
    big = [1e308, -1e308, 1.7976931348623157e308, 1e300, 5e-324, 10 ** 30, 10 ** 400, 2 ** 63, -0.0, 0, 1,
           "5.2", "abc", True, None, [], {}, 1e-320, 123456789.123456789, 0.1 + 0.2]
    raw_text_nums = ["NaN", "Infinity", "-Infinity", "1e400", "-1e400", "1" * 400, "1e-400", "1.0e+308", "-0",
                     "-0.0", "0e0", "1E5", "2.5E+3", "1.5e-7", "123456789012345678901234567890", "9" * 4400,
                     "0.30000000000000004", "1.00000000000000011102230246251565404236316680908203125", "true",
                     "null", '"12.5"', '" 7 "', "[1]", "{}", "4.9e-324", "2.2250738585072014e-308"]
    bad_times = ["2026-02-01T10:00:00", "2026-02-01", "2099-01-01T00:00:00+00:00", "2026-03-02T12:00:00Z",
                 "2026-03-03T07:00:00+00:00", "2026-03-03T05:59:59+00:00", "2026-02-01T10:00:00-14:00",
                 "2026-02-01T10:00:00+14:00", "2026-02-01T10:00:00.123456789+01:00", "not a time", 1767225600,
                 "2026-02-01T10:00:00+0530", "2026-02-01 10:00:00+00:00", "2026-02-31T10:00:00+00:00",
                 "2026-02-01T10:00:00.1234567+00:00", "2026-02-01T10:00+00:00", "2026-02-01T10:00:00+00",
                 "2026-02-01t10:00:00z", "2026-02-01T23:59:60+00:00", "0001-01-01T00:00:00+14:00",
                 "9999-12-31T23:59:59-14:00", "9999-12-31T23:59:59.999999+00:00", "2026-02-01T10:00:00+23:59",
                 "2026-02-01T10:00:00+24:00", "2026-02-01T10:00:00 +01:00", 1e20, -1, "1767225600",
                 "2026-W05-1T10:00:00+00:00"]
    strings = ["", " ", "\t", "x" * 128, "x" * 129, "x" * 256, "x" * 257, "é", "患者", "a\x00b", "a\u2028b",
               "\ud800", "a\x7fb", "NaN", "0", "P-\u00e9", 5, None, ["a"]]
    units = ["mg/dL", "g/L", "U/L", "umol/L", "µmol/L", "  U/L  ", "u/l", "10*9/L", "%", "kg", "", None,
             "bpm", "/min", "mmHg", "Cel", "degF", "[degF]", 7]
    loincs = ["1742-6", "1920-8", "0000-0", "xx", "8867-4", "59408-5", "2708-6", "", None, 42]
    out = []
    for i in range(n):
        kind, ev = rng.choice(events)
        e = copy.deepcopy(ev)
        target = e
        if kind == "liver-function" and e.get("results") and rng.random() < 0.5:
            target = rng.choice(e["results"])
        keys = list(target)
        m = rng.randrange(22)
        raw = None
        if m == 0 and keys:
            del target[rng.choice(keys)]
        elif m == 1 and keys:
            target[rng.choice(keys)] = rng.choice(big + strings)
        elif m == 2:
            k = rng.choice(["value", "low", "high", "weight_kg", "dose_mg_per_kg_day"])
            if "reference_range" in target and k in ("low", "high") and isinstance(target["reference_range"], dict):
                target["reference_range"][k] = "@@NUM@@"
            else:
                target["value" if k in ("low", "high") else k] = "@@NUM@@"
            raw = json.dumps(e).replace('"@@NUM@@"', rng.choice(raw_text_nums)).encode()
        elif m == 3:
            target["value" if "value" in target or rng.random() < 0.5 else "weight_kg"] = rng.choice(big)
        elif m == 4:
            for k in ("effective_at", "administered_at", "at"):
                if k in e:
                    e[k] = rng.choice(bad_times)
        elif m == 5:
            target["unit"] = rng.choice(units)
        elif m == 6:
            target["loinc"] = rng.choice(loincs)
        elif m == 7:
            target[rng.choice(["refrence_range", "extra", "resourceType", "x" * 70, "extensions"])] = {"a": 1}
        elif m == 8:
            d = rng.choice([5, 20, 29, 30, 31, 32, 33, 40, 200])
            nest: object = 1
            for _ in range(d):
                nest = [nest] if rng.random() < 0.5 else {"k": nest}
            e["extensions"] = {"deep": nest}
        elif m == 9:
            b = json.dumps(e).encode()
            p = rng.randrange(len(b))
            raw = b[:p] + rng.choice([b"\xff", b"\xc3", b"\xe9", b"\x80\x80", b"\xed\xa0\x80"]) + b[p:]
        elif m == 10:
            b = json.dumps(e)
            k = rng.choice([x for x in ("patient_id", "event_id", "source", "unit", "loinc") if x in e] or ["source"])
            e[k] = "@@S@@"
            raw = json.dumps(e).replace('"@@S@@"', rng.choice(['"\\ud800"', '"a\\udfff"', '"\\u00e9"', '"\\u0000"',
                                                               '"\\ud83d\\ude00"', '"\\n"'])).encode()
        elif m == 11:
            raw = b"\xef\xbb\xbf" + json.dumps(e).encode()
        elif m == 12:
            b = json.dumps(e)
            k = rng.choice(keys) if keys else "value"
            raw = ("{" + json.dumps(k) + ": " + json.dumps(rng.choice(big[:6] + strings[:6])) + ", " + b[1:]).encode()
        elif m == 13:
            for k in ("patient_id", "event_id", "corrects", "source"):
                if k in e and rng.random() < 0.5:
                    e[k] = rng.choice(strings)
        elif m == 14:
            rr = {"low": rng.choice(big[:12] + [5.0, 50.0]), "high": rng.choice(big[:12] + [5.0, 40.0])}
            if rng.random() < 0.3:
                del rr[rng.choice(["low", "high"])]
            target["reference_range"] = rr
        elif m == 15:
            target["status"] = rng.choice(["final", "preliminary", "corrected", "amended", "entered-in-error",
                                           "cancelled", "FINAL", "", None, 1])
            if rng.random() < 0.5:
                target.pop("value", None)
        elif m == 16:
            target["comparator"] = rng.choice(["<", "<=", ">", ">=", "=", "", None, 1])
        elif m == 17:
            e["extensions"] = {f"k{j}": list(range(rng.choice([10, 1000]))) for j in range(rng.choice([1, 5, 120]))}
        elif m == 18:
            raw = rng.choice([b"[]", b"1", b'"x"', b"null", b"{", b"{}", b"  {} ", b"\x0bMSH|", b"MSH|^~\\&|",
                              json.dumps([e]).encode(), b'{"a":NaN}', b" \n" + json.dumps(e).encode()])
        elif m == 19:
            k = rng.choice(["on_oxygen", "abnormal_flag", "corrects", "source"])
            target[k] = rng.choice([True, False, "true", "yes", 1, 0, "H", "HH" * 5, None, 1.5])
        elif m == 20 and texts:
            tkind, text = rng.choice(texts)
            p = rng.randrange(len(text))
            ins = rng.choice(["", "|", "^", "\r", "X", "9999", "mg/dL", "1e400", "NaN", "20990101",
                              '"', "}", "\u00e9", "-"])
            cut = rng.choice([0, 0, 1, 3, 8])
            raw = (text[:p] + ins + text[p + cut:]).encode("utf-8", "surrogatepass")
            kind = tkind
        else:
            raw = json.dumps(e, indent=rng.choice([None, 1]), sort_keys=rng.random() < 0.5).encode()
        if raw is None:
            raw = json.dumps(e).encode()
        out.append((kind, raw))
    return out


def inputs(corpus: str | None, n_mut: int = 12000) -> list[tuple[str, bytes]]:
    from monitor import simulate as sim

    res: list[tuple[str, bytes]] = []
    events: list[tuple[str, dict]] = []
    texts: list[tuple[str, str]] = []
    for formats in (("mixed",), ("json",)):
        c = sim.generate_cohort(300, 7, start=START, days=DAYS, formats=formats)
        for rec in sim.records(c):
            v = rec["value"]
            raw = v.encode() if isinstance(v, str) else json.dumps(v).encode()
            res.append((rec["topic"], raw))
            if isinstance(v, dict) and formats == ("json",) and len(events) < 20000:
                events.append((rec["topic"], v))
            elif isinstance(v, str) and len(texts) < 5000:
                texts.append((rec["topic"], v))
    # the same events in every format (the cross-format path)
    c = sim.generate_cohort(40, 11, start=START, days=DAYS)
    for e in c.events:
        for fmt in ("json", "fhir", "hl7"):
            v = sim.encode(e, fmt)
            res.append((e.topic, v.encode() if isinstance(v, str) else json.dumps(v).encode()))
    for j in range(50):  # alert actions (routed, not decoded here)
        act = {"alert_id": f"a{j}", "action": "acknowledge", "patient_id": f"P{j}", "by": "nurse", "role": "nurse",
               "at": "2026-03-02T10:00:00+00:00"}
        if j % 5 == 0:
            act.pop("patient_id")
        res.append(("alert-actions", json.dumps(act).encode() if j % 7 else b"{bad"))
    rng = random.Random(20261129)
    res.extend(_mutations(rng, events, texts, n_mut))
    if corpus:
        with open(corpus) as fh:
            for line in fh:
                d = json.loads(line)
                res.append((d["kind"], base64.b64decode(d["raw"])))
    return res


def run(corpus: str | None, out_path: str) -> None:
    import schemas
    from monitor.ingest import COUNTERS, Ingest
    from monitor.settings import Settings

    print("schemas from", schemas.__file__)
    s = Settings()
    step = Ingest(s)
    COUNTERS.deferred = True
    topic_of = {"lab-results": s.topic_lab_results, "vital-signs": s.topic_vital_signs,
                "liver-function": s.topic_liver_function, "treatments": s.topic_treatments,
                "alert-actions": s.topic_alert_actions}
    ins = inputs(corpus)
    h = hashlib.sha256()
    counts = {"inputs": len(ins), "observations": 0, "dead_letters": 0, "routed": 0}
    reasons: dict[str, int] = {}
    with open(out_path, "w", encoding="utf-8", errors="backslashreplace") as fh:
        for i, (kind, raw) in enumerate(ins):
            topic = topic_of.get(kind, kind)
            decoded: list = []
            try:
                out = step.record(topic, i % 3, i, b"k%d" % i, raw, RECEIVED, decoded)
            except Exception as exc:  # noqa: BLE001 - recorded, not hidden
                out = [("RAISED", type(exc).__name__, str(exc))]
            lines = [f"#{i} {topic} {len(raw)}B"]
            for o in out:
                # a large value (hostile input kept on a dead letter) is written as its hash
                shown = o if len(o) < 3 or not isinstance(o[2], bytes) or len(o[2]) <= 4096 else \
                    (o[0], o[1], "sha256:" + hashlib.sha256(o[2]).hexdigest(), *o[3:])
                lines.append(repr(shown))
                if o[0] == s.topic_dead_letter:
                    counts["dead_letters"] += 1
                    r = dict(o[3])["dlq.reason"].decode()
                    reasons[r] = reasons.get(r, 0) + 1
                elif o[0] == s.topic_observations and o[3] is None:
                    counts["observations"] += 1
                else:
                    counts["routed"] += 1
            for value, obs in decoded:
                lines.append("  obs " + repr(sorted(obs.__dict__.items())) + " set=" +
                             repr(sorted(obs.__pydantic_fields_set__)) + f" extra={obs.__pydantic_extra__!r}"
                             f" private={obs.__pydantic_private__!r}" +
                             (" rr_set=" + repr(sorted(obs.reference_range.__pydantic_fields_set__))
                              if obs.reference_range is not None else ""))
            text = "\n".join(lines) + "\n"
            fh.write(text)
            h.update(text.encode("utf-8", "backslashreplace"))
    print(json.dumps(counts), json.dumps(dict(sorted(reasons.items()))))
    print("sha256", hashlib.sha256(Path(out_path).read_bytes()).hexdigest(), out_path)


if __name__ == "__main__":
    if sys.argv[1:2] == ["capture"]:
        capture(sys.argv[2])
    elif sys.argv[1:2] == ["run"]:
        run(sys.argv[2] if len(sys.argv) > 3 else None, sys.argv[-1])
    else:
        sys.exit(__doc__)
