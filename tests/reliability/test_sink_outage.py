"""Slow and failing sinks: the webhook refuses connections, then answers 5xx, then
recovers. Every paging version reaches it exactly once after recovery, and processing
does not stall meanwhile: observations and alert versions keep flowing on Kafka during
the outage (measured on the alerts topic)."""
from __future__ import annotations

import json
import os
import threading
import time
import uuid
from collections import Counter
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest

from reliability.conftest import drop_topics, make_topics
from reliability.harness import (TopicReader, build_scenario, paging_keys, publish, record_figure, start_worker,
                                 stop_all, verdict, wait_settled)
from workers import TEST_WEBHOOK_SECRET, free_port, service_env

pytestmark = pytest.mark.integration


class FlakyWebhook:
    """Bound on a fixed port only from ``listen()`` (connection refused before); answers
    503 while ``failing`` (slowly: ``delay`` s), then 200, recording Idempotency-Keys."""

    def __init__(self, port: int, delay: float = 0.3) -> None:
        self.port, self.delay = port, delay
        self.failing = True
        self.keys: list[str] = []
        self.refused_phase_attempts = 0
        self.failed = 0
        self.lock = threading.Lock()
        self.server = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}/hook"

    def listen(self) -> None:
        hook = self

        class H(BaseHTTPRequestHandler):
            def do_POST(self):  # noqa: N802
                self.rfile.read(int(self.headers.get("Content-Length") or 0))
                if hook.failing:
                    time.sleep(hook.delay)
                    with hook.lock:
                        hook.failed += 1
                    self.send_response(503)
                    self.end_headers()
                    return
                with hook.lock:
                    hook.keys.append(self.headers.get("Idempotency-Key"))
                self.send_response(200)
                self.end_headers()

            def log_message(self, *a):
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", self.port), H)
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def close(self) -> None:
        if self.server:
            self.server.shutdown()
            self.server.server_close()


def test_webhook_outage_does_not_stall_processing_and_loses_nothing(kafka_bootstrap, tmp_path):
    # each phase is several retry intervals long (the backoff is 0.5, 1, then 2 s: the cap
    # DELIVERY_RETRY_MAX_SECONDS below): every waiting version is refused, then answered 503,
    # several times over (6 s: a version waiting from the start is refused 5 times, then
    # answered 503 about 3 times, each 503 taking 0.3 s)
    refused_s = float(os.environ.get("RELIABILITY_OUTAGE_REFUSED_S", "6"))
    failing_s = float(os.environ.get("RELIABILITY_OUTAGE_5XX_S", "6"))
    bs = kafka_bootstrap
    prefix = f"out{uuid.uuid4().hex[:8]}"
    topics = make_topics(bs, prefix)
    sc = build_scenario(int(os.environ.get("RELIABILITY_PATIENTS_SMALL", "20")), 99, id_prefix="OUT")
    workers: list = []
    hook = FlakyWebhook(free_port())
    try:
        env = service_env(topics, app_id=prefix, TICK_INTERVAL_SECONDS="2", WEBHOOK_URL=hook.url, WEBHOOK_SECRET=TEST_WEBHOOK_SECRET,
                          DELIVERY_RETRY_MAX_SECONDS="2")
        w = start_worker(bs, env, tmp_path / "w", workers)
        reader = TopicReader(bs, topics)
        try:
            t_out = time.monotonic()
            third = len(sc.records) // 3
            progress = []  # (seconds into the outage, alert versions on Kafka, observations)
            publish(bs, topics, sc.records[:third])
            sent = third
            while time.monotonic() - t_out < refused_s + failing_s:
                el = time.monotonic() - t_out
                if el >= refused_s and hook.server is None:
                    hook.listen()  # connection refused -> HTTP 503
                if sent < 2 * third and el > (refused_s + failing_s) / 2:
                    publish(bs, topics, sc.records[third:2 * third])
                    sent = 2 * third
                out = reader.poll()
                progress.append((round(el, 1), out.counts["alerts"], out.counts["observations"]))
                time.sleep(1)
            assert not hook.keys, "nothing can have been delivered during the outage"
            during = reader.poll()
            alerts_during = during.counts["alerts"]
            must_during = paging_keys(during.alerts)
            hook.failing = False  # recovered
            t_rec = time.monotonic()
            publish(bs, topics, sc.records[2 * third:])
            v = None
            while time.monotonic() - t_rec < 150:
                out = reader.poll()
                v = verdict(sc, out, list(hook.keys), topics)
                if v.lost == 0:
                    break
                time.sleep(1)
            # late repeats, if any, arrive: the worker has committed every input, the patient
            # stream and (past every delivered or skipped version) the alerts topic
            wait_settled(bs, prefix, topics, delivery=True)
            v = verdict(sc, reader.drain(), list(hook.keys), topics)
            recovered_in = time.monotonic() - t_rec
        finally:
            reader.close()
        # processing did not stall: the first two thirds were fully processed during the outage
        first_two = {o for r in sc.records[:2 * third] for o in r.observation_ids}
        missing_during = first_two - set(during.observations)
        print(f"outage progress (s, alert versions, observations): {progress[::5]}")
        print(f"alert versions on Kafka during the outage: {alerts_during}; paging versions waiting: "
              f"{len(must_during)}; webhook 503s: {hook.failed}; all delivered {recovered_in:.0f}s after recovery")
        record_figure("sink_outage", {"alert_versions_during_outage": alerts_during,
                                      "paging_versions_waiting": len(must_during), "http_503": hook.failed,
                                      "lost": v.lost, "duplicated": v.duplicated})
        assert alerts_during > 0 and progress[-1][1] > progress[0][1], progress
        assert not missing_during, f"processing stalled during the outage: {len(missing_during)} observations late"
        assert hook.failed > 0, "the webhook should have been hit while answering 5xx"
        assert must_during <= set(hook.keys)
        dupes = [k for k, n in Counter(hook.keys).items() if n > 1]
        assert not dupes and not v.missing_deliveries, v.explain()
        assert v.ok, v.explain()
    finally:
        hook.close()
        stop_all(workers)
        drop_topics(bs, topics)
