"""The worker's and the ingest process's garbage-collector settings."""
from __future__ import annotations

import gc

#: the cyclic garbage collector's thresholds in a worker (CPython's default: 700, 10, 10). The
#: clinical stage allocates many short-lived objects per record (models, tuples, dicts) and
#: few cycles. Measured on the alert-churn workload (bench/bench_clinical.py, 1,000 patients x
#: 20 results; gc.callbacks, CPU time): the default spent 264-272 ms in 518 collections,
#: including 3 full ones of up to 29 ms (each walks the whole patient store). A young
#: collection's pause grows with the threshold: 50,000 spent 125-139 ms in 7 collections of
#: 18-22 ms (p50; max 27-33 ms), 10,000 spent 157-163 ms in 34 of 5 ms (max 8.5 ms), no
#: full one for either. Every pause holds up every record in the worker, so the shorter
#: ones are kept (over 60 rounds: 10,000 paused 8.5 ms p50 with one 45 ms middle-generation
#: collection, 622 ms in all; 50,000 paused 28 ms p50, 406 ms in all)
GC_THRESHOLDS = (10_000, 50, 100)


def tune_garbage_collector() -> None:
    """Fewer collections, and the objects built at start-up (modules, protocols, the app)
    moved out of the collector's view (``gc.freeze``): they live as long as the process."""
    gc.collect()
    gc.freeze()
    gc.set_threshold(*GC_THRESHOLDS)
