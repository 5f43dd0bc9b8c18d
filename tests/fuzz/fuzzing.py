"""What the fuzz targets share: the budget, the per-target counts and the mutations.

Budget: ``FUZZ_EXAMPLES`` inputs in total over the ``TARGETS`` targets of ``tests/fuzz``
(default ~2,700 in CI, i.e. ~300 each). ``FUZZ_STATS`` names a JSON file the per-target
counts are written to at exit (``tests/reliability/run_long.py``); ``FUZZ_DATABASE`` a
directory where hypothesis keeps every failing example, so a failure deep in a long run is
replayed first when the test runs again.
"""
from __future__ import annotations

import atexit
import json
import os
from collections import Counter
from pathlib import Path

from hypothesis import HealthCheck, settings
from hypothesis import strategies as st
from hypothesis.database import DirectoryBasedExampleDatabase

#: the targets of tests/fuzz: eight parser targets (test_fuzz_parsers.py) and the patient
#: stream's (test_fuzz_patient_stream.py)
TARGETS = 9
TOTAL = int(os.environ.get("FUZZ_EXAMPLES", str(300 * TARGETS)))
PER_TARGET = max(10, TOTAL // TARGETS)
_DB = os.environ.get("FUZZ_DATABASE")
FUZZ = settings(max_examples=PER_TARGET, deadline=None, derandomize=False,
                database=DirectoryBasedExampleDatabase(_DB) if _DB else None,
                suppress_health_check=list(HealthCheck))
#: inputs tried per target, and outcomes by reason (written to ``FUZZ_STATS``)
COUNTS: Counter = Counter()
REASONS: Counter = Counter()


def _write_stats() -> None:
    path = os.environ.get("FUZZ_STATS")
    if path:
        Path(path).write_text(json.dumps({"inputs": dict(COUNTS), "total": sum(COUNTS.values()),
                                          "reasons": dict(REASONS)}))


atexit.register(_write_stats)

json_leaf = st.one_of(st.none(), st.booleans(), st.integers(min_value=-10**30, max_value=10**30),
                      st.floats(allow_nan=False, allow_infinity=False), st.text(max_size=30),
                      st.sampled_from(["", " ", "1742-6", "U/L", "mg/dL", "10*9/L", "2025-01-01T00:00:00",
                                       "2025-01-01T00:00:00+00:00", "9999-12-31T23:59:59Z", "final", "amended",
                                       "entered-in-error", "http://loinc.org", "Patient/x", "-1e309", "NaN"]))
json_value = st.recursive(json_leaf, lambda c: st.one_of(st.lists(c, max_size=4),
                                                          st.dictionaries(st.text(max_size=12), c, max_size=4)),
                          max_leaves=12)


def _paths(obj, prefix=()):
    yield prefix
    if isinstance(obj, dict):
        for k, v in obj.items():
            yield from _paths(v, prefix + (k,))
    elif isinstance(obj, list):
        for i, v in enumerate(obj):
            yield from _paths(v, prefix + (i,))


def mutate_json(draw, raw: bytes, leaf=json_value) -> bytes:
    """1-4 structural mutations of a JSON document: a value replaced (by ``leaf``), deleted,
    duplicated in its list, or a key inserted."""
    obj = json.loads(raw)
    for _ in range(draw(st.integers(1, 4))):
        paths = [p for p in _paths(obj) if p]
        if not paths:
            break
        path = draw(st.sampled_from(paths))
        parent = obj
        for k in path[:-1]:
            parent = parent[k]
        op = draw(st.sampled_from(["replace", "delete", "dup", "insert"]))
        last = path[-1]
        if op == "replace":
            parent[last] = draw(leaf)
        elif op == "delete":
            del parent[last]
        elif op == "dup" and isinstance(parent, list):
            parent.append(parent[last])
        elif op == "insert" and isinstance(parent, dict):
            parent[draw(st.text(max_size=10))] = draw(leaf)
    return json.dumps(obj).encode()


def mutate_bytes(draw, raw: bytes) -> bytes:
    """1-6 byte-level mutations: a byte flipped, bytes inserted or deleted, the tail cut,
    a run duplicated."""
    buf = bytearray(raw)
    for _ in range(draw(st.integers(1, 6))):
        if not buf:
            break
        i = draw(st.integers(0, len(buf) - 1))
        op = draw(st.sampled_from(["flip", "insert", "delete", "truncate", "dup"]))
        if op == "flip":
            buf[i] = draw(st.integers(0, 255))
        elif op == "insert":
            buf[i:i] = draw(st.binary(min_size=1, max_size=8))
        elif op == "delete":
            del buf[i:i + draw(st.integers(1, 16))]
        elif op == "truncate":
            del buf[i:]
        else:
            j = draw(st.integers(i, min(len(buf), i + 64)))
            buf[j:j] = buf[i:j]
    return bytes(buf)
