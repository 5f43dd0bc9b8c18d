"""Hypothesis fuzzing of the clinical stage's input: the records of the patient stream.

Ingest writes the patient stream (``observations``): canonical observations, and the
treatments and actions it routes there with the headers ``kind`` and ``src.*``. The clinical
processor is the only reader, and a record there need not come from ingest (another writer
with the topic's ACL, an older or newer release, a broken producer), so it is input like any
other: promise 1, the worker never crashes on it, and every bad record is a dead letter with
its original bytes and a reason.

Each example takes the state of four simulated patients 30 days after their doses (restored
from their changelog values, as a worker's restore does) and a batch of 1-6 records built
from real stream records: values kept, mutated as JSON, mutated as bytes, replaced by
arbitrary bytes or missing; headers kept, dropped, or given other values (any bytes, none,
numbers that are not); keys kept, missing or arbitrary; partitions moved. Invariants:

- ``ClinicalProcessor.process_one`` never raises;
- a record yields outputs or exactly one dead letter with the record's key and original
  bytes, a ``Reason`` other than ``internal_error`` (that reason is the processor's last
  resort for an exception nobody foresaw: here it is a bug to find) and a message; a dead
  letter adds no patient to the store and marks none changed;
- every finding and alert version produced is valid JSON of its model;
- the changed patients encode for the changelog, each value restores in a fresh store and
  reads back, and encodes again to the same bytes;
- the same batch processed again on that restored state (a crash between the changelog and
  the commit) adds no finding and no alert version, except for actions without an
  ``action_id`` (nothing marks those as applied);
- the clock then runs over every patient held, up to two weeks later, and fails for none.
"""
from __future__ import annotations

import json
import zlib
from collections import namedtuple
from datetime import datetime, timedelta, timezone

import pytest
from hypothesis import given
from hypothesis import strategies as st

from alerts.engine import Engine
from alerts.protocol import default_protocols
from monitor import simulate as sim
from monitor.actions_auth import ActionAuthority
from monitor.clinical.processor import KIND_ACTION, ClinicalProcessor, routed_headers
from monitor.clinical.store import InMemoryPatientStore, UnreadablePatientState
from monitor.inbox.auth import User, UserDirectory
from monitor.metrics import REGISTRY
from monitor.ingest import Ingest
from monitor.settings import Settings
from monitor.worker import lifecycle_config
from schemas.alert import Alert, Role
from schemas.errors import Reason
from schemas.findings import Finding
from tests.fuzz.fuzzing import COUNTS, FUZZ, REASONS, mutate_bytes, mutate_json

Rec = namedtuple("Rec", "topic partition offset key value headers")
SETTINGS = Settings()
STREAM = SETTINGS.topic_observations
PARTITIONS = 6
PROTOCOLS = default_protocols()
ENGINE = Engine(PROTOCOLS)
LIFECYCLE = lifecycle_config(PROTOCOLS, SETTINGS)
AUTHORITY = ActionAuthority(UserDirectory([User("n1", Role.NURSE, "x"), User("doc1", Role.PHYSICIAN, "x")]))


def _processor(store: InMemoryPatientStore) -> ClinicalProcessor:
    return ClinicalProcessor(ENGINE, LIFECYCLE, store, findings_topic="findings", alerts_topic="alerts",
                             dead_letter_topic="dead-letter", clock_settle_seconds=0.0, authority=AUTHORITY)


def _base():
    """The seed records (the stream ingest wrote for a cohort, and actions on its alerts),
    the patients' changelog values after all of them, and the time they were processed."""
    start = datetime.now(timezone.utc).replace(hour=0, minute=0, second=0, microsecond=0) - timedelta(days=30)
    cohort = sim.generate_cohort(4, 5, start=start, days=30)
    now = start + timedelta(days=30)
    ingest = Ingest(SETTINGS)
    seeds: list[Rec] = []
    for i, r in enumerate(sim.records(cohort)):
        v = r["value"]
        raw = v.encode() if isinstance(v, str) else json.dumps(v).encode()
        for topic, key, value, headers in ingest.record(r["topic"], 0, i, r["key"].encode(), raw, now):
            if topic == STREAM:
                seeds.append(Rec(STREAM, zlib.crc32(key) % PARTITIONS, len(seeds), key, value, headers))
    store = InMemoryPatientStore()
    out = _processor(store).process(seeds, now)
    alerts = [json.loads(o.value) for o in out if o.topic == "alerts"]
    firsts = {a["alert_id"]: a for a in alerts}
    actions = []
    for n, a in enumerate(list(firsts.values())[:8]):
        by = "n1" if n % 2 else "doc1"
        at = now.isoformat()
        bodies = [{"action": "acknowledge", "alert_id": a["alert_id"], "by": by, "at": at, "action_id": f"ack-{n}"},
                  {"action": "note", "alert_id": a["alert_id"], "by": by, "at": at, "reason": "called the ward"},
                  {"action": "escalate", "alert_id": a["alert_id"], "by": by, "at": at, "action_id": f"esc-{n}"},
                  {"action": "silence", "alert_id": a["alert_id"], "by": by, "at": at, "reason": "repeat drawn",
                   "until": (now + timedelta(hours=4)).isoformat(), "action_id": f"sil-{n}"},
                  {"action": "resolve", "alert_id": a["alert_id"], "by": by, "at": at, "action_id": f"res-{n}"}]
        key = a["patient_id"].encode()
        for b in bodies:
            actions.append(Rec(STREAM, zlib.crc32(key) % PARTITIONS, 0, key, json.dumps(b).encode(),
                               routed_headers(KIND_ACTION, "alert-actions", 0, len(actions))))
    values = [(p, pid.encode(), v) for pid, p, v in store.take_changed()]
    return seeds + actions, values, now


SEEDS, VALUES, NOW = _base()
KEYS = sorted({k for _p, k, _v in VALUES})

header_value = st.one_of(st.none(), st.binary(max_size=12),
                         st.sampled_from([b"treatment", b"action", b"observation", b"", b"0", b"-1", b"1.5", b" 2",
                                          b"99999999999999999999999", b"\xff\xfe", b"alert-actions", b"treatments"]))
header_name = st.sampled_from(["kind", "src.topic", "src.partition", "src.offset", "content-type", ""])


@st.composite
def headers(draw, original):
    op = draw(st.sampled_from(["keep", "keep", "none", "drop", "change", "add"]))
    hs = list(original or [])
    if op == "none":
        return None
    if op == "drop" and hs:
        del hs[draw(st.integers(0, len(hs) - 1))]
    elif op == "change" and hs:
        i = draw(st.integers(0, len(hs) - 1))
        hs[i] = (hs[i][0], draw(header_value))
    elif op == "add":
        hs.insert(draw(st.integers(0, len(hs))), (draw(header_name), draw(header_value)))
    return hs


@st.composite
def stream_record(draw, offset: int):
    seed = draw(st.sampled_from(SEEDS))
    how = draw(st.sampled_from(["keep", "json", "json", "json", "bytes", "arbitrary", "none"]))
    if how == "json":
        value = mutate_json(draw, seed.value)
    elif how == "bytes":
        value = mutate_bytes(draw, seed.value)
    elif how == "arbitrary":
        value = draw(st.binary(max_size=200))
    elif how == "none":
        value = None
    else:
        value = seed.value
    key = draw(st.one_of(st.just(seed.key), st.just(seed.key), st.none(), st.binary(max_size=12),
                         st.sampled_from(KEYS)))
    partition = draw(st.one_of(st.just(seed.partition), st.integers(0, PARTITIONS - 1)))
    return Rec(STREAM, partition, offset, key, value, draw(headers(seed.headers)))


def _store() -> InMemoryPatientStore:
    store = InMemoryPatientStore()
    for partition, key, value in VALUES:
        store.restore_record(partition, key, value)
    return store


def _check(rec: Rec, out: list) -> bool:
    """The record's outputs are valid; whether it was a dead letter."""
    dead = [o for o in out if o.topic == "dead-letter"]
    if dead:
        assert len(out) == 1, [o.topic for o in out]
        (d,) = dead
        h = dict(d.headers)
        reason = Reason(h["dlq.reason"].decode())
        message = h["dlq.message"].decode()
        assert reason != Reason.INTERNAL_ERROR, (message, rec)
        assert message.strip()
        assert d.key == rec.key and d.value == (rec.value if rec.value is not None else b"")
        REASONS[reason.value] += 1
        return True
    REASONS["processed"] += 1
    for o in out:
        _valid(o)
    return False


def _valid(o) -> None:
    if o.topic == "findings":
        Finding.model_validate_json(o.value)
    else:
        assert o.topic == "alerts", o.topic
        Alert.model_validate_json(o.value)


def _clock_failures() -> float:
    return REGISTRY.get_sample_value("monitor_clinical_clock_failures_total", {"scope": "patient"}) or 0.0


@FUZZ
@given(data=st.data())
def test_patient_stream_records(data):
    batch = [data.draw(stream_record(1_000_000 + i)) for i in range(data.draw(st.integers(1, 6)))]
    now = NOW + timedelta(hours=data.draw(st.integers(-48, 24 * 30)))
    COUNTS["patient_stream"] += len(batch)
    store = _store()
    p = _processor(store)
    for rec in batch:
        out: list = []
        held = len(store), store.changed_count()
        p.process_one(rec, now, out)
        if _check(rec, out):  # a dead letter: no patient added, none marked changed
            assert (len(store), store.changed_count()) == held, rec
    # the changelog: every changed patient encodes, restores, reads and encodes again the same
    changed = store.take_changed()
    fresh = _store()
    for pid, partition, value in changed:
        fresh.restore_record(partition, pid.encode(), value)
    for pid, partition, value in changed:
        try:
            fresh.load(pid, partition)
        except UnreadablePatientState as exc:  # pragma: no cover - the failure this looks for
            pytest.fail(f"a changelog value the worker wrote cannot be read back: {exc}")
        fresh.mark_changed(pid)
    again = {pid: value for pid, _partition, value in fresh.take_changed()}
    assert again == {pid: value for pid, _partition, value in changed}
    # a replay of the batch on that state adds nothing (a crash after the changelog write)
    replayed: list = []
    q = _processor(fresh)
    for rec in batch:
        out = []
        q.process_one(rec, now, out)
        _check(rec, out)
        if not _action_without_id(rec):
            replayed.extend(o for o in out if o.topic != "dead-letter")
    assert not replayed, [(o.topic, json.loads(o.value).get("rule_id")) for o in replayed]
    # then the clock over every patient held, up to two weeks later: no patient's judgement fails
    failures = _clock_failures()
    later = now + timedelta(hours=data.draw(st.integers(0, 24 * 14)))
    for o in q.tick(fresh.patient_ids(range(PARTITIONS)), later):
        _valid(o)
    assert _clock_failures() == failures


def _action_without_id(rec: Rec) -> bool:
    if dict(rec.headers or []).get("kind") != KIND_ACTION:
        return False
    try:
        return not json.loads(rec.value).get("action_id")
    except Exception:
        return True
