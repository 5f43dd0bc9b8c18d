"""Broker restart during processing: a dedicated broker is stopped and started again on
the same ports and data dir while the worker is mid-stream; the worker recovers without
manual action (it is never restarted) and the crash-test checks hold.
``RELIABILITY_BROKER_RESTARTS`` bounces (1 in CI)."""
from __future__ import annotations

import os
import time
import uuid

import pytest

from kafka_broker import Broker
from receivers import WebhookReceiver
from reliability.conftest import make_topics
from reliability.harness import (RestartableBroker, TopicReader, build_scenario, publish, record_figure, start_worker,
                                 stop_all, wait_converged)
from workers import TEST_WEBHOOK_SECRET, service_env

pytestmark = pytest.mark.integration


def test_worker_recovers_from_broker_restart(tmp_path):
    restarts = int(os.environ.get("RELIABILITY_BROKER_RESTARTS", "1"))
    broker = Broker(start_timeout=90)
    workers: list = []
    t0 = time.monotonic()
    bounced = 0
    try:
        broker.start()
        bs = broker.bootstrap
        prefix = f"brk{uuid.uuid4().hex[:8]}"
        topics = make_topics(bs, prefix)
        sc = build_scenario(int(os.environ.get("RELIABILITY_PATIENTS_SMALL", "20")), 4242, id_prefix="BR")
        n = len(sc.records)
        bounds = [round(i * n / (restarts + 1)) for i in range(restarts + 2)]
        chunks = [sc.records[a:b] for a, b in zip(bounds, bounds[1:])]
        with WebhookReceiver(secret=TEST_WEBHOOK_SECRET) as hook:
            env = service_env(topics, app_id=prefix, TICK_INTERVAL_SECONDS="2", WEBHOOK_URL=hook.url,
                              WEBHOOK_SECRET=TEST_WEBHOOK_SECRET)
            publish(bs, topics, chunks[0])
            w = start_worker(bs, env, tmp_path / "w", workers)
            reader = TopicReader(bs, topics)
            try:
                for i in range(restarts):
                    # mid-stream: some output exists, the backlog is not done
                    deadline = time.monotonic() + 60
                    while reader.poll().counts["observations"] < 200 * (i + 1) and time.monotonic() < deadline:
                        time.sleep(0.2)
                    reader.close()
                    took = RestartableBroker.bounce(broker, down_seconds=5)
                    bounced += 1
                    print(f"broker bounce {i + 1}: {took:.1f}s")
                    assert w.proc.poll() is None, f"worker died with the broker:\n{w.tail()}"
                    publish(bs, topics, chunks[i + 1])
                    reader = TopicReader(bs, topics)
                v = wait_converged(sc, reader, hook, topics, timeout=240, bootstrap=bs, app_id=prefix)
            finally:
                reader.close()
            assert w.proc.poll() is None, "the worker must ride out the restart, not exit"
            print(f"broker restart: {v.summary()}")
            record_figure("broker_restart", {"broker_restarts": bounced, "lost": v.lost, "duplicated": v.duplicated,
                                             "seconds": round(time.monotonic() - t0, 1), **v.summary()})
            assert v.ok, v.explain() + "\n" + w.tail(30)
    finally:
        stop_all(workers)
        broker.stop()
