"""The hand-off of decoded observations from ingest to the same worker's clinical stage
(``monitor.clinical.handoff``) changes cost, never outcome: an observation handed over is
equal to the one decoded from the bytes on the stream, it is taken only for the very bytes
ingest wrote, and a processor with the hand-off emits exactly what one without it emits."""
from __future__ import annotations

import json
from collections import namedtuple
from datetime import datetime, timedelta, timezone

from alerts.engine import Engine
from alerts.protocol import default_protocols
from monitor import simulate as sim
from monitor.clinical.handoff import DecodedObservations
from monitor.clinical.processor import ClinicalProcessor
from monitor.clinical.store import InMemoryPatientStore
from monitor.ingest import Ingest
from monitor.settings import Settings
from monitor.worker import lifecycle_config
from schemas.events import Observation

Rec = namedtuple("Rec", "topic partition offset key value headers")
PARTITIONS = 3


def _cohort_stream(n_patients: int = 12, days: int = 40):
    """(records of the patient stream, the observation ingest decoded for each, or None)."""
    s = Settings()
    step = Ingest(s)
    now = datetime.now(timezone.utc)
    cohort = sim.generate_cohort(n_patients, 11, start=now - timedelta(days=days), days=days)
    recs, decoded_of = [], []
    offsets = [0] * PARTITIONS
    for i, r in enumerate(sim.records(cohort)):
        v = r["value"]
        raw = v.encode() if isinstance(v, str) else json.dumps(v).encode()
        decoded: list = []
        out = step.record(r["topic"], 0, i, r["key"].encode(), raw, now, decoded)
        obs_out = [o for o in out if o[0] == s.topic_observations and o[3] is None]
        assert [o[2] for o in obs_out] == [v for v, _obs in decoded]
        it = (obs for _v, obs in decoded)
        for topic, key, value, headers in out:
            if topic != s.topic_observations:
                continue
            p = sum(key) % PARTITIONS
            recs.append(Rec(topic, p, offsets[p], key, value, headers))
            offsets[p] += 1
            decoded_of.append(next(it) if headers is None else None)
    return recs, decoded_of


def test_an_observation_decoded_by_ingest_equals_the_one_decoded_from_its_bytes():
    recs, decoded_of = _cohort_stream()
    n = 0
    for rec, obs in zip(recs, decoded_of):
        if obs is None:
            continue
        again = Observation.model_validate_json(rec.value)
        assert again == obs
        assert again.model_dump() == obs.model_dump()
        assert again.effective_at.utcoffset() == obs.effective_at.utcoffset()
        n += 1
    assert n > 500  # labs, vitals and panel results of the cohort


def test_taken_only_for_the_bytes_ingest_wrote_and_bounded():
    recs, decoded_of = _cohort_stream(3, 10)
    rec, obs = next((r, o) for r, o in zip(recs, decoded_of) if o is not None)
    h = DecodedObservations(capacity=3)
    h.put(rec.partition, rec.value, obs)
    assert h.take(rec.value + b" ") is None  # other bytes: decode them
    assert h.take(bytes(bytearray(rec.value))) is obs  # equal bytes (another object, as read from the broker)
    assert h.take(rec.value) is None  # an entry is taken once
    for v in (b"1", b"2", b"3", b"4"):  # full: nothing more is put
        h.put(0, v, obs)
    assert h.full() and h.take(b"4") is None
    assert h.take(b"2") is obs and len(h) == 1  # b"1" was written before it on that partition: passed
    h.put(1, b"5", obs)  # another partition: its own order
    assert h.take(b"3") is obs and h.take(b"5") is obs and len(h) == 0
    assert h.decode(rec.value) == obs and h.decoded == 4 and h.taken == 4  # not held: decoded
    h.put(0, b"6", obs)
    h.put(2, b"7", obs)
    h.retain([2])  # after a rebalance: only the partitions still owned
    assert h.take(b"6") is None and h.take(b"7") is obs
    mine = DecodedObservations(owned=lambda p: p == 1)  # only partitions the runner owns
    mine.put(0, b"x", obs)
    mine.put(1, b"y", obs)
    assert len(mine) == 1 and mine.take(b"y") is obs


def test_a_processor_with_the_hand_off_emits_exactly_what_one_without_it_emits():
    recs, decoded_of = _cohort_stream()
    protocols = default_protocols()
    s = Settings()
    now = datetime.now(timezone.utc)

    def run(handoff):
        p = ClinicalProcessor(Engine(protocols), lifecycle_config(protocols, s), InMemoryPatientStore(),
                              findings_topic="findings", alerts_topic="alerts", dead_letter_topic="dead-letter",
                              handoff=handoff)
        out = []
        for i in range(0, len(recs), 50):
            batch = recs[i:i + 50]
            if handoff is not None:  # as ingest does once the broker acknowledged the batch
                for rec, obs in zip(batch, decoded_of[i:i + 50]):
                    if obs is not None:
                        handoff.put(rec.partition, rec.value, obs)
            out.extend((o.topic, o.key, o.value) for o in p.process(batch, now))
        return out

    handoff = DecodedObservations()
    with_handoff, without = run(handoff), run(None)
    assert handoff.taken > 500 and handoff.decoded == 0
    assert with_handoff == without
    assert any(t == "alerts" for t, _k, _v in without)
