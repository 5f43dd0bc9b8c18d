"""``bench/run_all.py --throughput-runs``: every round's rates are reported against the (a)
of the same round, with medians and ranges (a shared host's speed moves between rounds)."""
from __future__ import annotations

from script_module import load_script


def _run_all():
    return load_script("bench/run_all.py", "bench_run_all")


def test_each_round_is_compared_with_its_own_raw_loop():
    rounds = [
        {"a": {"rate": 40_000.0}, "c1p": {"clinical_event_rate": 16_000.0}},
        {"a": {"rate": 20_000.0}, "c1p": {"clinical_event_rate": 10_000.0}},
        {"a": {"rate": 30_000.0}, "c1p": None},  # the stage failed in this round
    ]
    lines = _run_all().rounds_lines(rounds)
    table = [ln for ln in lines if ln.startswith("| ")]
    assert table[0] == "| round | (a) | (c) 1 worker + ingest process |"
    assert table[1] == "| 1 | 40,000 | 16,000 (0.40x) |"
    assert table[2] == "| 2 | 20,000 | 10,000 (0.50x) |"  # against round 2's (a), not round 1's
    assert table[3] == "| 3 | 30,000 | failed |"
    # medians over the rounds that ran: rates 13,000; ratios 0.45 (0.40 and 0.50)
    assert table[4] == "| median | 30,000 | 13,000 (0.45x; 0.40-0.50x) |"


def test_one_round_adds_nothing():
    assert _run_all().rounds_lines([{"a": {"rate": 1.0}}]) == []


def test_latency_phase_garbage_collections_are_the_difference_of_two_scrapes():
    m = _run_all()
    before = {"0": {"n": 10.0, "s": 0.050, "freed": 100.0}}
    after = {"0": {"n": 15.0, "s": 0.115, "freed": 115.0}, "1": {"n": 1.0, "s": 0.040, "freed": 0.0}}
    gcs = m.gc_during(before, after)
    assert gcs == {"0": {"n": 5, "ms": 65.0, "freed": 15}, "1": {"n": 1, "ms": 40.0, "freed": 0}}
    assert m.gc_text(gcs) == "gen0: 5 (65 ms, 15 freed); gen1: 1 (40 ms, 0 freed)"
    assert m.gc_text({}) == "—"


def test_latency_stage_with_two_workers_sums_their_garbage_collections():
    m = _run_all()
    w0 = {"0": {"n": 3.0, "s": 0.030, "freed": 8.0}}
    w1 = {"0": {"n": 4.0, "s": 0.045, "freed": 2.0}, "2": {"n": 1.0, "s": 0.200, "freed": 50.0}}
    assert m.sum_gc([w0, w1]) == {"0": {"n": 7.0, "s": 0.075, "freed": 10.0},
                                  "2": {"n": 1.0, "s": 0.200, "freed": 50.0}}
    assert m.sum_gc([w0]) == w0 and m.sum_gc([]) == {}


def _phase(rate: float, p99: float | None, published: int = 1000, matched: int | None = None) -> dict:
    return {"offered_rate": rate, "p99_ms": p99, "published": published,
            "matched": published if matched is None else matched}


def test_a_latency_sweep_runs_its_rates_in_rising_order_after_the_low_rate():
    m = _run_all()
    assert m.latency_phases(200.0, 2000.0, 20.0) == [(200.0, 10.0), (2000.0, 20.0)]
    assert m.latency_phases(0.0, 2000.0, 20.0, "1000, 500,1000,1500") == [(500.0, 20.0), (1000.0, 20.0), (1500.0, 20.0)]
    assert m.latency_phases(200.0, 2000.0, 8.0, "600,400") == [(200.0, 10.0), (400.0, 8.0), (600.0, 8.0)]


def test_the_sweep_names_the_highest_rate_within_the_tail_target_and_its_share_of_the_raw_loop():
    m = _run_all()
    phases = [_phase(200, 12.0), _phase(400, 40.5), _phase(600, 99.0), _phase(800, 180.2)]
    line = " ".join(m.sweep_lines(phases, 15_000.0))
    assert "p99 <= 100 ms up to 600/s" in line and "4.0 % of (a)'s 15,000 events/s" in line
    assert "not monotonic" not in line
    # an event never seen is not within the target, whatever the percentiles of those seen
    phases[2] = _phase(600, 99.0, matched=990)
    line = " ".join(m.sweep_lines(phases, None))
    assert "up to 400/s" in line and "% of (a)" not in line and "not monotonic" not in line
    # a rate that met it above one that did not: said so
    line = " ".join(m.sweep_lines([_phase(400, 140.0), _phase(600, 95.0)], None))
    assert "up to 600/s" in line and "not monotonic" in line
    assert "above 100 ms at every rate tried" in " ".join(m.sweep_lines([_phase(400, 140.0), _phase(600, 195.0)], None))
    assert m.sweep_lines([_phase(2000, 90.0)], 40_000.0) == []  # one rate: no sweep


def test_cpu_per_event_splits_the_worker_from_its_ingest_process():
    m = _run_all()
    # the worker's tree (itself and its ingest process) used 4 s, the worker's own process 2.5 s
    us = m.cpu_per_event({"workers": 4.0, "worker_process": 2.5, "broker": 0.5}, 50_000)
    assert us == {"workers": 80.0, "worker_process": 50.0, "broker": 10.0, "ingest_process": 30.0}
    assert m.cpu_per_event({"process": 1.0}, 0) is None  # no event in the window
    assert m.cpu_per_event(None, 10) is None


def test_cpu_lines_give_each_rounds_ceilings_against_its_own_raw_loop():
    m = _run_all()
    rounds = [
        {"a": {"rate": 40_000.0, "cpu_per_event": {"process": 20.0, "broker": 5.0}},
         "c1p": {"clinical_event_rate": 18_000.0,
                 "cpu_per_event": {"workers": 80.0, "worker_process": 50.0, "ingest_process": 30.0, "broker": 20.0},
                 "processor_us_per_record": 31.4}},
        {"a": {"rate": 20_000.0, "cpu_per_event": {"process": 40.0, "broker": 10.0}},
         "c1p": None},  # the stage failed in this round: no row
    ]
    table = [ln for ln in m.cpu_lines(rounds, cores=2) if ln.startswith("| ")]
    assert len(table) == 4  # header and three rows
    # one core for the loop: 1e6 / 20 us = 50,000 events/s, 1.25x (a); two cores for loop + broker: 2e6 / 25
    # the loop has no clinical processor
    assert table[1] == "| 1 | (a) | 40,000 | 20.0 | — | — | 5.0 | 25.0 | 50,000 (1.25x) | 80,000 (2.00x) | — |"
    # the clinical process (the worker's own) at 50 us allows 20,000 events/s, 0.50x of this round's (a);
    # all four processes' 100 us on two cores, 20,000 events/s; the processor's own 31.4 us per record
    assert table[2] == ("| 1 | (c) 1 worker + ingest process | 18,000 (0.45x) | 80.0 | 50.0 | 30.0 | 20.0 | 100.0 "
                        "| 20,000 (0.50x) | 20,000 (0.50x) | 31.4 |")
    assert table[3].startswith("| 2 | (a) | 20,000 | 40.0 |")
    assert m.cpu_lines([{"a": {"rate": 1.0}}]) == []  # nothing metered, nothing said


def test_the_processors_cpu_per_record_sums_the_workers_metrics(monkeypatch):
    from types import SimpleNamespace as S

    m = _run_all()
    metrics = {
        "1": [S(name="monitor_clinical_processor_cpu_seconds_total", labels={}, value=1.5),
              S(name="monitor_clinical_records_total", labels={"path": "fetched"}, value=40_000.0),
              S(name="monitor_clinical_records_total", labels={"path": "own_writes"}, value=10_000.0)],
        "2": [S(name="monitor_clinical_processor_cpu_seconds_total", labels={}, value=0.5),
              S(name="monitor_clinical_records_total", labels={"path": "fetched"}, value=30_000.0)],
    }
    monkeypatch.setattr(m, "worker_samples", lambda port: metrics.get(port, []))
    both = m.workers_processor([{"WEB_PORT": "1"}, {"WEB_PORT": "2"}])
    assert both == (2.0, 80_000.0)  # both workers, both paths
    assert m.processor_us((0.0, 0.0), both) == 25.0
    assert m.processor_us((1.0, 40_000.0), both) == 25.0  # a phase: the difference of two readings
    assert m.processor_us(both, both) is None  # no record in between
    assert m.workers_processor([{"WEB_PORT": "3"}]) == (0.0, 0.0)  # unreadable


def test_every_latency_run_shows_the_processors_cpu_per_record():
    m = _run_all()
    run = {"p50_ms": 20.0, "p95_ms": 50.0, "p99_ms": 80.0, "max_ms": 120.0, "matched": 40_000, "published": 40_000,
           "cpu_cores": {"worker": 0.8, "machine": 1.5}, "gc": {}, "processor_us_per_record": 180.4}
    lines = m.latency_runs_lines({"runs": [run, None]}, 2000.0)
    table = [ln for ln in lines if ln.startswith("| ")]
    assert table[0].split(" | ")[8] == "clinical processor, us per record"
    assert table[1].split(" | ")[8] == "180.4"  # the run's own figure, in its column
    assert table[2].count("|") == table[1].count("|")  # a failed run keeps the columns
