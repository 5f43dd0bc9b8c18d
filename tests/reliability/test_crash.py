"""Crash test (promises 1, 2, 4) and PHI hygiene (promise 6) on the same run.

A simulated cohort (40 patients, JSON/FHIR/HL7 mixed, plus deliberately invalid inputs)
is published in chunks; a worker is SIGKILLed (whole process group) at seeded random
points ``RELIABILITY_KILLS`` times (3 in CI), each time a chunk is published while it is
down and a new worker is started. Then, against ground truth: every valid record's
observations are on ``observations``; every invalid one is dead-lettered with the reason
the pure decoder gives and nothing else is; every expected (patient, rule) is on
``alerts`` at its severity (the critical ones included); every paging version reached the
webhook and none twice (Idempotency-Key). The same run's log, /metrics and third-party
payloads (webhook and Alertmanager) are scanned for patient ids and secrets.
"""
from __future__ import annotations

import bisect
import json
import os
import random
import time
import uuid
from collections import Counter

import pytest

from receivers import WebhookReceiver
from reliability.conftest import drop_topics, make_topics
from reliability.harness import (LedgerReader, TopicReader, build_scenario, copy_times, counting_kill, find_identifiers,
                                 info_lines, kills_default, ledger_key, publish, record_figure, split_repeats,
                                 start_worker, stop_all, wait_converged, worker_logs)
from monitor.notify.sinks import DEFAULT_CONCURRENCY
from workers import service_env

pytestmark = pytest.mark.integration

WEBHOOK_SECRET = "whsec-Zq8v-reliability-7f3a-4c1d9e8b7a6f5e4d"
PSEUDONYM_SECRET = "pseudo-Kx2-reliability-91c-0a9b8c7d6e5f4a3b"


@pytest.fixture(scope="module")
def crash_run(kafka_bootstrap, tmp_path_factory):
    kills = kills_default(3)
    seed = int(os.environ.get("RELIABILITY_SEED", "20240917"))
    n = int(os.environ.get("RELIABILITY_PATIENTS", "40"))
    rng = random.Random(seed)
    tmp = tmp_path_factory.mktemp("crash")
    prefix = f"crash{uuid.uuid4().hex[:8]}"
    topics = make_topics(kafka_bootstrap, prefix)
    sc = build_scenario(n, seed, id_prefix=f"PX{seed % 1000:03d}")
    # contiguous chunks keep per-patient order: chunk boundaries are seeded random cut points
    cuts = sorted(rng.sample(range(1, len(sc.records)), kills)) if kills else []
    bounds = [0, *cuts, len(sc.records)]
    chunks = [sc.records[a:b] for a, b in zip(bounds, bounds[1:])]
    workers: list = []
    metrics_text: list[str] = []
    marks: list[int] = []  # deliveries received when each SIGKILL was sent
    kill_times: list[float] = []  # wall clock of each SIGKILL
    ledger_at_kill: list[frozenset[str]] = []  # the delivery ledger on the broker right after each SIGKILL
    t0 = time.monotonic()
    with WebhookReceiver(secret=WEBHOOK_SECRET) as hook, WebhookReceiver() as am:
        # session timeout 6 s (the broker's group.min.session.timeout.ms, not the 10 s default):
        # each restarted worker gets the SIGKILLed one's partitions 4 s sooner; nothing else changes
        env = service_env(topics, app_id=prefix, TICK_INTERVAL_SECONDS="2", WEBHOOK_URL=hook.url,
                          WEBHOOK_SECRET=WEBHOOK_SECRET, ALERTMANAGER_URL=am.url.removesuffix("/hook"),
                          PSEUDONYM_SECRET=PSEUDONYM_SECRET, LOG_LEVEL="INFO", KAFKA_SESSION_TIMEOUT_SECONDS="6")
        reader = TopicReader(kafka_bootstrap, topics)
        ledger = LedgerReader(kafka_bootstrap, topics["alert-deliveries"])
        survived = 0
        try:
            publish(kafka_bootstrap, topics, chunks[0])
            w = start_worker(kafka_bootstrap, env, tmp / "w0", workers)
            for i in range(kills):
                time.sleep(rng.uniform(0.5, 8.0))
                try:
                    status, body = w.get("/metrics")
                    if status == 200:
                        metrics_text.append(body.decode(errors="replace"))
                except OSError:
                    pass
                marks.append(len(hook.received))
                kill_times.append(time.time())
                w.kill()
                ledger_at_kill.append(ledger.snapshot())  # what the next worker loads: no worker runs now
                publish(kafka_bootstrap, topics, chunks[i + 1])
                t_r = time.monotonic()
                w = start_worker(kafka_bootstrap, env, tmp / f"w{i + 1}", workers)
                print(f"restart {i + 1}: ready after {time.monotonic() - t_r:.1f}s")
                survived += 1
            v = wait_converged(sc, reader, hook, topics, timeout=240 + 10 * kills)
            status, body = w.get("/metrics")
            metrics_text.append(body.decode(errors="replace"))
            hook_raw = [r["raw"] for r in hook.received]
            hook_keys = hook.keys()
            with hook.lock:
                copies = copy_times((r["key"], r["at"]) for r in hook.received)
            first_at = {k: ts[0] for k, ts in copies.items()}
            second_at = {k: ts[1] for k, ts in copies.items() if len(ts) > 1}
            am_raw = [r["raw"] for r in am.received]
        finally:
            reader.close()
            ledger.close()
            stop_all(workers)
            logs = worker_logs(workers)
            drop_topics(kafka_bootstrap, topics)
    elapsed = time.monotonic() - t0
    # where was each duplicated version first delivered, relative to the SIGKILLs?
    dup_window = []
    for k in v.duplicate_deliveries:
        first = hook_keys.index(k)
        before = [m for m in marks if m >= first]
        dup_window.append(min(before) - first if before else None)
    in_flight, unexplained = split_repeats(v, first_at, kill_times, ledger_at_kill, second_at=second_at)
    repeats = repeat_report(v, first_at, second_at, kill_times, ledger_at_kill)
    keep = os.environ.get("RELIABILITY_KEEP_DIR")
    if keep:  # the worker logs and the timings, to explain a repeat after pytest's tmp dirs rotate
        os.makedirs(keep, exist_ok=True)
        with open(os.path.join(keep, "workers.log"), "w") as fh:
            fh.write(logs)
        with open(os.path.join(keep, "run.json"), "w") as fh:
            json.dump({"kill_times": kill_times, "marks": marks, "repeats": repeats, "first_at": first_at,
                       "ledger_sizes": [len(x) for x in ledger_at_kill]}, fh, indent=1)
    record_figure("crash", {"kills_survived": survived, "lost": v.lost, "duplicated": len(unexplained),
                            "in_flight_repeats": len(in_flight),
                            "duplicates_first_delivered_n_before_a_kill": dup_window,
                            "seconds_first_copy_to_kill": [r["seconds_to_kill"] for r in repeats],
                            "seconds_first_copy_to_senders_kill": [r["seconds_to_senders_kill"] for r in repeats],
                            "seconds": round(elapsed, 1), **v.summary()})
    print(f"crash run: {survived} kills survived in {elapsed:.0f}s; {v.summary()}")
    return {"verdict": v, "scenario": sc, "logs": logs, "metrics": metrics_text, "hook_raw": hook_raw,
            "am_raw": am_raw, "survived": survived, "kills": kills, "dup_window": dup_window,
            "in_flight": in_flight, "unexplained": unexplained,
            "repeats": repeats}


def repeat_report(v, first_at, second_at, kill_times, ledger_at_kill) -> list[dict]:
    """Per repeated version: the SIGKILL that can explain it (``counting_kill``, the one
    ``split_repeats`` judges by; None: no SIGKILL between its copies), the seconds from its
    first copy to that SIGKILL and to the SIGKILL of the worker that sent it (the same one
    unless the next worker was killed before it came to the version), and whether its ledger
    record was on the broker at the counting SIGKILL."""
    out = []
    for k in v.duplicate_deliveries:
        f = first_at.get(k)
        i = None if f is None else counting_kill(f, second_at.get(k, float("-inf")), kill_times)
        # the SIGKILL of the worker that sent the first copy: the in-flight window itself (the
        # counting kill can be later, when the worker after that one did not reach the version)
        j = None if f is None else next((n for n, t in enumerate(kill_times) if t >= f), None)
        out.append({"key": k, "kill": i, "seconds_to_kill": None if i is None else round(kill_times[i] - f, 2),
                    "seconds_to_senders_kill": None if j is None else round(kill_times[j] - f, 3),
                    "on_ledger_at_kill": None if i is None else ledger_key(k) in ledger_at_kill[i],
                    # which worker sent each copy (w0 before the first SIGKILL, wN after the Nth)
                    "senders": [f"w{bisect.bisect(kill_times, t)}" for t in (f, second_at.get(k)) if t is not None]})
    return out


def test_every_observation_present(crash_run):
    v = crash_run["verdict"]
    assert crash_run["survived"] == crash_run["kills"]
    assert not v.missing_observations, v.explain()


def test_every_dead_letter_accounted_for(crash_run):
    v = crash_run["verdict"]
    assert not v.missing_dead_letters, v.explain()
    assert not v.unaccounted_dead_letters, v.explain()
    assert not v.wrong_reason, v.explain()


def test_every_expected_alert_present(crash_run):
    v = crash_run["verdict"]
    assert not v.missing_critical, v.explain()
    assert not v.missing_alerts, v.explain()
    assert crash_run["scenario"].cohort.critical_expected, "the cohort should hold critical cases"


def test_no_version_paged_twice_and_none_missing(crash_run):
    """Every paging version reached the webhook. HTTP delivery after a SIGKILL is at least
    once: the ledger record of a version (on ``alert-deliveries``) is written only after the
    receiver answered, and the next worker skips exactly what is on the ledger; a version
    answered but whose record was not yet on the broker when the worker died is sent again
    with the same Idempotency-Key, which a receiver drops. The seconds between its first
    copy and the SIGKILL are not the criterion: the answer waits for the worker's event loop
    (shared with ingest and the clinical runner) and the record for the broker's
    acknowledgement. The criterion is the ledger read right after each SIGKILL. Any other
    repeat is a bug; and since a delivery holds one of the dispatcher's concurrency slots
    until its record is acknowledged, one SIGKILL repeats at most that many versions."""
    v = crash_run["verdict"]
    assert v.deliveries > 0
    assert not v.missing_deliveries, v.explain()
    in_flight, unexplained = crash_run["in_flight"], crash_run["unexplained"]
    assert not unexplained, (
        f"{v.explain()}\nrepeats not explained by a SIGKILL (no SIGKILL between their copies, or their ledger "
        f"record was on the broker when the worker that sent the second copy started): {unexplained}; "
        f"per repeat: {crash_run['repeats']}; failed attempts that were retried (a receiver's late answer): "
        f"{crash_run['logs'].count('delivery to webhook failed')}")
    per_kill = Counter(r["kill"] for r in crash_run["repeats"] if r["key"] in in_flight)
    assert all(n <= DEFAULT_CONCURRENCY for n in per_kill.values()), (
        f"more repeats at one SIGKILL than deliveries that can await their ledger record: {per_kill}")
    # a ledger write that failed would leave a delivered version off the ledger for good
    # (repeatable at any later SIGKILL); with a healthy broker none may fail
    assert "delivery ledger write for" not in crash_run["logs"]


# ---- PHI hygiene on the same run -----------------------------------------------------

def test_no_patient_id_in_info_logs(crash_run):
    text = info_lines(crash_run["logs"])
    assert len(text) > 1000, "the worker log should not be empty"
    hits = find_identifiers(text, crash_run["scenario"].patient_ids)
    assert not hits, hits[:5]


def test_no_patient_id_in_metric_labels(crash_run):
    assert crash_run["metrics"]
    for text in crash_run["metrics"]:
        assert "monitor_" in text
        hits = find_identifiers(text, crash_run["scenario"].patient_ids)
        assert not hits, hits[:5]


def test_no_patient_id_in_third_party_payloads(crash_run):
    assert crash_run["hook_raw"] and crash_run["am_raw"]
    ids = crash_run["scenario"].patient_ids
    for raw in crash_run["hook_raw"] + crash_run["am_raw"]:
        hits = find_identifiers(raw.decode(), ids)
        assert not hits, hits[:3]
    # the Alertmanager payload carries a pseudonymous reference, not the id
    am = json.loads(crash_run["am_raw"][0])
    assert am[0]["labels"]["alert_ref"] and "patient_id" not in am[0]["labels"]


def test_secrets_never_logged(crash_run):
    logs = crash_run["logs"]
    for secret in (WEBHOOK_SECRET, PSEUDONYM_SECRET):
        assert secret not in logs
