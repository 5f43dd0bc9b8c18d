"""Benchmark the clinical processor and the patient store in-process (no broker).

Run: .venv/bin/python bench/bench_clinical.py [--patients 1000] [--days 60] [--batch 1000]
     [--restore-patients 10000] [--churn-rounds 6] [--churn-patients 1000] [--checkpoint-every 1]

Builds a simulated cohort (``monitor.simulate``), turns every input into the records of
the patient stream with the worker's own ingest step, then times
``ClinicalProcessor.process`` over batches of the stream as the runner takes them, plus
``take_changed`` (the changelog encoding of each changed patient, after every batch as the
runner does; ``--checkpoint-every K`` encodes once per K batches instead, the first design
of the coalesced checkpoint, kept to repeat the figures in docs/measurements.md). Then
the restore: the changelog values of ``--restore-patients`` patients applied to a fresh
store (``restore_record``) and every patient decoded once (the first tick). Prints
microseconds per record, the restore times and the memory per patient (``tracemalloc``:
the restored bytes, and what decoding adds; every patient is decoded once the clock has
run over it).

``--churn-rounds N`` (> 0) also runs the workload of the latency test of ``run_all.py``
in-process: one dose per patient, then N rounds of one ALT result per patient that
alternates CTCAE grade 2 / 3, so that every record changes an alert (one finding and one
alert version each; the alert history grows by one entry per round). Prints CPU
microseconds per record (``time.process_time``: less sensitive to a shared machine than
wall time) for the processor and the changelog encoding, and the sizes of the alert
versions and changelog values it produced.

The process runs with the worker's garbage-collector settings
(``monitor.gc_tuning.tune_garbage_collector``), as ``monitor worker`` does: with CPython's
defaults, decoding 10,000 restored patients took 4.7 s instead of 2.5 s (the collector
walks the growing set of decoded patients again and again) and the alert-churn record 6 %
more. ``--python-gc-defaults`` measures with CPython's defaults instead.
"""
from __future__ import annotations

import argparse
import gc
import sys
import time
import tracemalloc
from collections import namedtuple
from datetime import datetime, timedelta, timezone
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from alerts.engine import Engine  # noqa: E402
from alerts.protocol import default_protocols  # noqa: E402
from monitor import simulate as sim  # noqa: E402
from monitor.clinical.processor import ClinicalProcessor  # noqa: E402
from monitor.clinical.store import InMemoryPatientStore  # noqa: E402
from monitor.gc_tuning import tune_garbage_collector  # noqa: E402
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


def churn(n_patients: int, rounds: int, batch: int, every: int = 1) -> None:
    """The latency test's workload (see the module docstring), CPU time per record."""
    s = Settings()
    step = Ingest(s)
    protocols = default_protocols()
    store = InMemoryPatientStore()
    proc = ClinicalProcessor(Engine(protocols), lifecycle_config(protocols, s), store,
                             findings_topic="findings", alerts_topic="alerts", dead_letter_topic="dead-letter")
    now = datetime.now(timezone.utc)
    seq = [0]

    def recs_of(topic: str, pid: str, value: dict) -> list[Rec]:
        out = []
        raw = __import__("json").dumps(value, separators=(",", ":")).encode()
        for t, key, v, headers in step.record(topic, 0, seq[0], pid.encode(), raw, now):
            if t == s.topic_observations:
                out.append(Rec(t, hash(key) % PARTITIONS, seq[0], key, v, headers))
                seq[0] += 1
        return out

    pids = [f"LAT-{i:04d}" for i in range(n_patients)]
    doses = [r for pid in pids for r in recs_of("treatments", pid, {
        "type": "dose", "event_id": f"{pid}-dose", "patient_id": pid, "product": "onasemnogene-abeparvovec-iv",
        "administered_at": (now - timedelta(days=10)).isoformat(),
        "birth_date": (now - timedelta(days=300)).date().isoformat(), "weight_kg": 8.2,
        "ward": "paediatric-neurology", "care_team": "sma-gene-therapy", "source": "bench"})]
    proc.process(doses)
    store.take_changed()
    grade3 = dict.fromkeys(pids, False)
    stream: list[Rec] = []
    for r in range(rounds):
        for pid in pids:
            grade3[pid] = not grade3[pid]
            t = now - timedelta(days=9) + timedelta(seconds=len(stream))
            stream += recs_of("lab-results", pid, {
                "event_id": f"lat-{len(stream)}", "patient_id": pid, "loinc": "1742-6",
                "value": (8 if grade3[pid] else 4) * 40.0, "unit": "U/L", "reference_range": {"low": 0, "high": 40.0},
                "status": "final", "source": "bench", "effective_at": t.isoformat()})
    t_proc = t_enc = 0.0
    n_alerts = a_bytes = c_bytes = n_changed = 0
    last_alert = 0
    for i in range(0, len(stream), batch):
        t0 = time.process_time()
        out = proc.process(stream[i:i + batch])
        t1 = time.process_time()
        last = i + batch >= len(stream)
        changed = store.take_changed() if last or (i // batch + 1) % every == 0 else []
        t2 = time.process_time()
        t_proc += t1 - t0
        t_enc += t2 - t1
        for o in out:
            if o.topic == "alerts":
                n_alerts += 1
                a_bytes += len(o.value)
                last_alert = len(o.value)
        n_changed += len(changed)
        c_bytes += sum(len(v) for _, _, v in changed)
    n = len(stream)
    print(f"churn ({n_patients:,} patients x {rounds} alert-changing results, batches of {batch}, "
          f"a checkpoint every {every}): "
          f"process {t_proc / n * 1e6:.0f} us/record CPU, changelog encode {t_enc / n * 1e6:.0f} us/record CPU "
          f"({n / (t_proc + t_enc):,.0f} records/s per CPU); {n_alerts:,} alert versions, mean "
          f"{a_bytes / max(n_alerts, 1):,.0f} bytes (last round {last_alert:,}); {n_changed:,} changelog writes, "
          f"mean {c_bytes / max(n_changed, 1):,.0f} bytes")


def main(argv=None) -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--patients", type=int, default=1000)
    ap.add_argument("--days", type=int, default=60)
    ap.add_argument("--batch", type=int, default=1000)
    ap.add_argument("--restore-patients", type=int, default=10_000,
                    help="patients in the restore and memory measures (0: skip them)")
    ap.add_argument("--churn-rounds", type=int, default=6, help="0: skip the alert-churn workload")
    ap.add_argument("--churn-patients", type=int, default=1000)
    ap.add_argument("--churn-batch", type=int, default=200)
    ap.add_argument("--checkpoint-every", type=int, default=1,
                    help="batches per changelog encoding (the runner encodes after every batch and writes once per "
                         "CLINICAL_CHECKPOINT_INTERVAL_SECONDS; K > 1 measures deferring the encoding too)")
    ap.add_argument("--python-gc-defaults", action="store_true",
                    help="CPython's garbage-collector settings, not the worker's (monitor.gc_tuning.tune_garbage_collector)")
    a = ap.parse_args(argv)
    if not a.python_gc_defaults:
        tune_garbage_collector()
    print(f"garbage collector: {'CPython defaults' if a.python_gc_defaults else 'the worker settings'} "
          f"(thresholds {gc.get_threshold()})")
    from alerts import compiled_core
    print(f"clinical core: {compiled_core.summary()} (CLINICAL_CORE=python for the plain modules)")
    if a.churn_rounds > 0:
        churn(a.churn_patients, a.churn_rounds, a.churn_batch, a.checkpoint_every)
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
        last = i + a.batch >= len(recs)
        changed = store.take_changed() if last or (i // a.batch + 1) % a.checkpoint_every == 0 else []
        t2 = time.perf_counter()
        t_proc += t1 - t0
        t_enc += t2 - t1
        n_out += len(out)
        n_changed += len(changed)
    n = len(recs)
    print(f"batches of {a.batch}, a checkpoint every {a.checkpoint_every}: "
          f"process: {t_proc / n * 1e6:.1f} us/record; changelog encode: {t_enc / n * 1e6:.1f} us/record "
          f"({n_changed:,} patient writes, {t_enc / max(n_changed, 1) * 1e6:.0f} us each); "
          f"{n_out:,} outputs; {n / (t_proc + t_enc):,.0f} records/s in-process")
    if a.restore_patients <= 0:
        print("restore and memory per patient: skipped (--restore-patients 0)")
        return 0
    # restore: the changelog of N patients (copies of this cohort's final values)
    for pid in store.patient_ids(range(PARTITIONS)):
        store.mark_changed(pid)
    finals = store.take_changed()
    sizes = sorted(len(v) for _, _, v in finals)
    copies = [(p, f"{pid}~{k}".encode(), v) for k in range(a.restore_patients // len(finals) + 1)
              for pid, p, v in finals][:a.restore_patients]
    del recs, store, proc, finals
    fresh = InMemoryPatientStore()
    t0 = time.perf_counter()
    for p, key, v in copies:
        fresh.restore_record(p, key, v)
    t1 = time.perf_counter()
    # the same restore traced, each value its own bytes object (as records read from the
    # changelog are): what the store holds once restored
    gc.collect()
    tracemalloc.start()
    traced = InMemoryPatientStore()
    for p, key, v in copies:
        traced.restore_record(p, key, bytes(bytearray(v)))
    gc.collect()
    m_raw = tracemalloc.get_traced_memory()[0]
    del traced, copies
    tracemalloc.stop()  # decode at full speed, then measure again
    t2 = time.perf_counter()
    pids = fresh.patient_ids(range(PARTITIONS))
    for pid in pids:
        fresh.load(pid, fresh.partition_of(pid))
    t3 = time.perf_counter()
    n = len(pids)
    print(f"restore {n:,} patients (median value {sizes[len(sizes) // 2]:,} bytes): apply {t1 - t0:.2f}s, "
          f"decode all once {t3 - t2:.2f}s (lazy: on first touch)")
    # memory per patient: the store as restored (bytes), and with every patient decoded
    # (after the first clock tick, which touches every owned patient)
    gc.collect()
    tracemalloc.start()
    for pid in pids[:2000]:
        fresh.discard(pid)
    gc.collect()
    after = tracemalloc.get_traced_memory()[0]
    for pid in pids[:2000]:
        fresh.load(pid, fresh.partition_of(pid))
    gc.collect()
    decoded = (tracemalloc.get_traced_memory()[0] - after) / min(n, 2000)
    tracemalloc.stop()
    raw = m_raw / n
    print(f"memory per patient: {raw / 1024:.1f} KiB restored (bytes), +{decoded / 1024:.1f} KiB once decoded; "
          f"{n:,} patients: {m_raw / 2**20:.0f} MiB restored, {(m_raw + decoded * n) / 2**20:.0f} MiB all decoded "
          f"(tracemalloc; decoded: {min(n, 2000):,} patients dropped back to bytes and decoded again)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
