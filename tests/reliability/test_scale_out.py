"""Scaling out and back in under load, without a crash: a second worker joins mid-cohort
(the partitions are shared out: the first worker checkpoints and commits what it had at the
revocation, the second restores the changelog of the partitions it takes), then the first
leaves by SIGTERM (the second takes everything over). With no SIGKILL nothing may be
repeated at all: every observation, dead letter and expected alert is there, each
observation is on the patient stream as many times as an input carries its id (a
correction comes with its original's id), and no page is delivered twice (the webhook
answers after 0.2 s, so deliveries are in flight at each hand-over)."""
from __future__ import annotations

import threading
import time

import pytest

from receivers import WebhookReceiver
from reliability.harness import TopicReader, publish, record_figure, start_workers, wait_converged, worker_group
from workers import TEST_WEBHOOK_SECRET

pytestmark = pytest.mark.integration


def test_a_worker_joining_and_one_leaving_mid_cohort_lose_and_repeat_nothing(kafka_bootstrap, tmp_path):
    bs = kafka_bootstrap
    t0 = time.monotonic()
    with (WebhookReceiver(secret=TEST_WEBHOOK_SECRET, delay=0.2) as hook,
          worker_group(bs, "sco", 4242, "SO", hook) as (prefix, topics, sc, env, workers)):
        third = len(sc.records) // 3
        (w1,) = start_workers(bs, env, [tmp_path / "w1"], workers)
        publish(bs, topics, sc.records[:third])
        reader = TopicReader(bs, topics)
        try:
            deadline = time.monotonic() + 90
            while reader.poll().counts["observations"] < 150 and time.monotonic() < deadline:
                time.sleep(0.2)
            # the rest flows in small slices while w2 joins and w1 leaves: the hand-overs
            # happen with batches, changelog writes and deliveries in flight
            rest = sc.records[third:]
            feeder = threading.Thread(target=lambda: [
                (publish(bs, topics, rest[i:i + 40]), time.sleep(0.1)) for i in range(0, len(rest), 40)])
            feeder.start()
            (w2,) = start_workers(bs, env, [tmp_path / "w2"], workers)  # joins: a rebalance
            time.sleep(1.5)
            w1.stop()  # leaves: w2 takes everything over
            feeder.join(120)
            assert not feeder.is_alive()
            v = wait_converged(sc, reader, hook, topics, timeout=240, bootstrap=bs, app_id=prefix)
            print(f"scale out and in: converged in {time.monotonic() - t0:.0f}s; {v.summary()}")
        finally:
            reader.close()
        assert w2.proc.poll() is None
        record_figure("scale_out", {"lost": v.lost, "duplicated": len(v.duplicate_deliveries),
                                    "seconds": round(time.monotonic() - t0, 1), **v.summary()})
        # no crash: no repeat is explained by anything
        assert v.ok_allowing([]), v.explain() + "\n" + w2.tail(30)
        # each observation as many times as an input carries it (corrections come twice)
        assert v.duplicated_observations == 0, v.explain()
