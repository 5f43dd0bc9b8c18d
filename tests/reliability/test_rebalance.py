"""Rebalance: two workers on the same app id share the partitions; one is SIGKILLed
mid-stream; the other takes its partitions (after the group's session timeout) and the
crash-test checks hold, including no version paged twice across the two workers except
the killed worker's deliveries in flight: answered, with their ledger record not on the
broker right after the SIGKILL (read then, before the survivor takes the partitions over;
the same criterion as the crash test, ``harness.split_repeats``)."""
from __future__ import annotations

import time

import pytest

from monitor.notify.sinks import DEFAULT_CONCURRENCY
from receivers import WebhookReceiver
from reliability.harness import (LedgerReader, TopicReader, copy_times, publish, record_figure, split_repeats,
                                 start_workers, wait_converged, worker_group)
from workers import TEST_WEBHOOK_SECRET

pytestmark = pytest.mark.integration


def test_survivor_takes_over_partitions(kafka_bootstrap, tmp_path):
    bs = kafka_bootstrap
    t0 = time.monotonic()
    # session timeout 6 s (the broker's group.min.session.timeout.ms, not the 10 s
    # default): the survivor takes over 4 s sooner; nothing else changes
    with (WebhookReceiver(secret=TEST_WEBHOOK_SECRET) as hook,
          worker_group(bs, "reb", 777, "RB", hook, KAFKA_SESSION_TIMEOUT_SECONDS="6")
          as (prefix, topics, sc, env, workers)):
        half = len(sc.records) // 2
        w1, w2 = start_workers(bs, env, [tmp_path / "w1", tmp_path / "w2"], workers)
        publish(bs, topics, sc.records[:half])
        reader = TopicReader(bs, topics)
        ledger = LedgerReader(bs, topics["alert-deliveries"])
        try:
            deadline = time.monotonic() + 90
            while reader.poll().counts["observations"] < 300 and time.monotonic() < deadline:
                time.sleep(0.2)
            kill_wall = time.time()
            w1.kill()
            t_kill = time.monotonic()
            # the killed worker's records are all on the broker now; the survivor writes
            # only its own partitions' records until it takes w1's over (session timeout)
            ledger_at_kill = ledger.snapshot()
            publish(bs, topics, sc.records[half:])
            v = wait_converged(sc, reader, hook, topics, timeout=240, bootstrap=bs, app_id=prefix)
            print(f"rebalance: converged {time.monotonic() - t_kill:.0f}s after the kill; {v.summary()}")
        finally:
            reader.close()
            ledger.close()
        assert w2.proc.poll() is None
        with hook.lock:
            copies = copy_times((r["key"], r["at"]) for r in hook.received)
        in_flight, unexplained = split_repeats(v, {k: ts[0] for k, ts in copies.items()}, [kill_wall],
                                               [ledger_at_kill],
                                               second_at={k: ts[1] for k, ts in copies.items() if len(ts) > 1})
        # a delivery holds its dispatcher slot until its ledger record is acknowledged
        assert len(in_flight) <= DEFAULT_CONCURRENCY, f"more repeats than deliveries in flight: {in_flight}"
        record_figure("rebalance", {"lost": v.lost, "duplicated": len(unexplained), "in_flight_repeats": len(in_flight),
                                    "seconds": round(time.monotonic() - t0, 1), **v.summary()})
        assert v.ok_allowing(in_flight), v.explain() + "\n" + w2.tail(30)
