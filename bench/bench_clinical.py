"""Benchmark the clinical processor and the patient store in-process (no broker).

Run: .venv/bin/python bench/bench_clinical.py [--patients 1000] [--days 60] [--batch 1000]
     [--restore-patients 10000]

Builds a simulated cohort (``monitor.simulate``), turns every input into the records of
the patient stream with the worker's own ingest step, then times
``ClinicalProcessor.process`` over batches of the stream as the runner takes them, plus
``take_changed`` (the changelog encoding of each changed patient once per batch). Then
the restore: the changelog values of ``--restore-patients`` patients applied to a fresh
store (``restore_record``) and every patient decoded once (the first tick). Prints
microseconds per record and the restore times.
"""
from __future__ import annotations

import argparse
import sys
import time
from collections import namedtuple
from datetime import datetime, timedelta, timezone
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from alerts.engine import Engine  # noqa: E402
from alerts.protocol import default_protocols  # noqa: E402
from monitor import simulate as sim  # noqa: E402
from monitor.clinical.processor import ClinicalProcessor  # noqa: E402
from monitor.clinical.store import InMemoryPatientStore  # noqa: E402
from monitor.ingest import Ingest  # noqa: E402
from monitor.settings import Settings  # noqa: E402
from monitor.worker import lifecycle_config  # noqa: E402

Rec = namedtuple("Rec", "topic partition offset key value headers")
PARTITIONS = 6


def stream_records(n_patients: int, days: int) -> list[Rec]:
    s = Settings()
    step = Ingest(s)
    today = datetime.now(timezone.utc).replace(hour=0, minute=0, second=0, microsecond=0)
    cohort = sim.generate_cohort(n_patients, 7, start=today - timedelta(days=days), days=days)
    now = datetime.now(timezone.utc)
    out = []
    for i, rec in enumerate(sim.records(cohort)):
        v = rec["value"]
        raw = v.encode() if isinstance(v, str) else __import__("json").dumps(v).encode()
        for topic, key, value, headers in step.record(rec["topic"], 0, i, rec["key"].encode(), raw, now):
            if topic == s.topic_observations:
                out.append(Rec(topic, hash(key) % PARTITIONS, len(out), key, value, headers))
    return out


def main(argv=None) -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--patients", type=int, default=1000)
    ap.add_argument("--days", type=int, default=60)
    ap.add_argument("--batch", type=int, default=1000)
    ap.add_argument("--restore-patients", type=int, default=10_000)
    a = ap.parse_args(argv)
    protocols = default_protocols()
    t = time.perf_counter()
    recs = stream_records(a.patients, a.days)
    print(f"{len(recs):,} stream records for {a.patients:,} patients built in {time.perf_counter() - t:.1f}s")
    store = InMemoryPatientStore()
    proc = ClinicalProcessor(Engine(protocols), lifecycle_config(protocols, Settings()), store,
                             findings_topic="findings", alerts_topic="alerts", dead_letter_topic="dead-letter")
    t_proc = t_enc = 0.0
    n_out = n_changed = 0
    for i in range(0, len(recs), a.batch):
        t0 = time.perf_counter()
        out = proc.process(recs[i:i + a.batch])
        t1 = time.perf_counter()
        changed = store.take_changed()
        t2 = time.perf_counter()
        t_proc += t1 - t0
        t_enc += t2 - t1
        n_out += len(out)
        n_changed += len(changed)
    n = len(recs)
    print(f"process: {t_proc / n * 1e6:.1f} us/record; changelog encode: {t_enc / n * 1e6:.1f} us/record "
          f"({n_changed:,} patient writes, {t_enc / max(n_changed, 1) * 1e6:.0f} us each); "
          f"{n_out:,} outputs; {n / (t_proc + t_enc):,.0f} records/s in-process")
    # restore: the changelog of N patients (copies of this cohort's final values)
    values = [(store.partition_of(pid), pid, raw) for pid, raw in
              ((pid, store.take_changed() or None) for pid in [])]  # placeholder (kept simple below)
    finals = []
    for pid in store.patient_ids(range(PARTITIONS)):
        store.mark_changed(pid)
    finals = store.take_changed()
    sizes = sorted(len(v) for _, _, v in finals)
    copies = [(p, f"{pid}~{k}".encode(), v) for k in range(a.restore_patients // len(finals) + 1)
              for pid, p, v in finals][:a.restore_patients]
    fresh = InMemoryPatientStore()
    t0 = time.perf_counter()
    for p, key, v in copies:
        fresh.restore_record(p, key, v)
    t1 = time.perf_counter()
    for pid in fresh.patient_ids(range(PARTITIONS)):
        fresh.load(pid, fresh.partition_of(pid))
    t2 = time.perf_counter()
    print(f"restore {len(copies):,} patients (median value {sizes[len(sizes) // 2]:,} bytes): apply {t1 - t0:.2f}s, "
          f"decode all once {t2 - t1:.2f}s (lazy: on first touch)")
    del values
    return 0


if __name__ == "__main__":
    sys.exit(main())
