"""CPU time per input event of the ingest step (``monitor.ingest.Ingest.record`` and
``schemas.ingest.decode``) over a simulated cohort, in process, no Kafka.

Measured with ``time.process_time`` (the machine is shared: wall time is noisy) and with the
worker's GC settings (``gc.freeze()``, ``gc.set_threshold(10_000, 50, 100)``, as
``monitor.cli`` sets them). Prints us/event per section; each section is run ``--repeat``
times and the median is printed.

Imports come from the current directory's tree, so the same script measures another
checkout (A/B): ``cd /path/to/other && /path/to/.venv/bin/python /path/to/bench_ingest_cpu.py``.
"""
from __future__ import annotations

import argparse
import gc
import json
import os
import statistics
import sys
import time

sys.path.insert(0, os.getcwd())

from datetime import datetime, timedelta, timezone  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--format", default="json", choices=("json", "mixed", "fhir", "hl7"))
    ap.add_argument("--patients", type=int, default=300)
    ap.add_argument("--days", type=int, default=60)
    ap.add_argument("--repeat", type=int, default=3)
    ap.add_argument("--sections", default="record,decode,record_acc,parts")
    a = ap.parse_args()

    import schemas
    from monitor import simulate as sim
    from monitor.ingest import _OBS_JSON, COUNTERS, Ingest
    from monitor.settings import Settings
    from schemas.events import LabResult, LiverFunctionPanel, Observation, VitalSign
    from schemas.ingest import decode, parse_json

    print(f"tree: {os.path.dirname(os.path.dirname(schemas.__file__))}  format: {a.format}")
    s = Settings()
    step = Ingest(s)
    COUNTERS.deferred = True
    today = datetime.now(timezone.utc).replace(hour=0, minute=0, second=0, microsecond=0)
    cohort = sim.generate_cohort(a.patients, 7, start=today - timedelta(days=a.days), days=a.days,
                                 formats=(a.format,))
    recs = []
    for rec in sim.records(cohort):
        v = rec["value"]
        raw = v.encode() if isinstance(v, str) else json.dumps(v).encode()
        if rec["topic"] != s.topic_treatments:
            recs.append((rec["topic"], raw))
    now = datetime.now(timezone.utc)
    kinds = step.kinds
    limits = step.limits
    n_obs = sum(len(decode(kinds[t], r, received_at=now, limits=limits)) for t, r in recs)
    print(f"{len(recs)} events, {n_obs} observations")

    def record():
        rec = step.record
        for topic, raw in recs:
            rec(topic, 0, 0, None, raw, now)

    def record_acc():  # as the loop does: the decoded observations kept (per batch, hand-off)
        rec = step.record
        out = []
        for i, (topic, raw) in enumerate(recs):
            rec(topic, 0, 0, None, raw, now, out)
            if len(out) >= 5000:
                out = []

    def dec():
        for topic, raw in recs:
            decode(kinds[topic], raw, received_at=now, limits=limits)

    sections = {"record": ("Ingest.record", record), "record_acc": ("Ingest.record (decoded kept)", record_acc),
                "decode": ("decode", dec)}
    if "parts" in a.sections and a.format == "json":
        models = {s.topic_lab_results: LabResult, s.topic_vital_signs: VitalSign,
                  s.topic_liver_function: LiverFunctionPanel}
        objs = [(models[t], parse_json(r)) for t, r in recs]
        obs = [o for t, r in recs for o in decode(kinds[t], r, received_at=now, limits=limits)]
        dicts = [o.__dict__.copy() for o in obs]

        def pj():
            for _t, raw in recs:
                parse_json(raw)

        def val():
            for m, o in objs:
                m.model_validate(o)

        def oj():
            for o in obs:
                _OBS_JSON(o)

        def oc():
            for x in dicts:
                Observation(**x)

        sections.update({"pj": ("  parse_json", pj), "val": ("  wire model_validate(obj)", val),
                         "oj": ("  _OBS_JSON (all obs of the events)", oj),
                         "oc": ("  Observation(**) (all obs of the events)", oc)})
    wanted = a.sections.split(",")
    todo = [k for k in sections if k in wanted or (k in ("pj", "val", "oj", "oc") and "parts" in wanted)]
    gc.collect()
    gc.freeze()
    gc.set_threshold(10_000, 50, 100)
    res: dict[str, list[float]] = {k: [] for k in todo}
    for _ in range(a.repeat):
        for k in todo:
            t0 = time.process_time()
            sections[k][1]()
            res[k].append(1e6 * (time.process_time() - t0) / len(recs))
    for k in todo:
        xs = res[k]
        print(f"{sections[k][0]:44s} median {statistics.median(xs):6.2f} us/event   "
              f"(runs: {' '.join(f'{x:.2f}' for x in xs)})")


if __name__ == "__main__":
    main()
