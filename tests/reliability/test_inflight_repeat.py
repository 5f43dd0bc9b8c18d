"""The in-flight repeat after a SIGKILL, made to happen: what the crash test may excuse.

A version is written to the delivery ledger (``alert-deliveries``) only after the receiver
answered, and a restarted worker skips exactly what is on the ledger. Here the receiver
answers the first webhook request and, before the worker can read that answer, the worker
is frozen (SIGSTOP: the same as an event loop held by other work, or a process without
CPU) for longer than the 2 s the crash test used to allow, then SIGKILLed. The version is
answered but not on the ledger, so the next worker sends it again with the same
Idempotency-Key: at least once, by design, however many seconds before the SIGKILL the
first copy came. ``split_repeats`` with the ledger read at the SIGKILL explains it; the
seconds window did not.
"""
from __future__ import annotations

import os
import signal
import threading
import time
import uuid
from collections import Counter
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest

from monitor.notify.sinks import DEFAULT_CONCURRENCY
from reliability.conftest import drop_topics, make_topics
from reliability.harness import (LedgerReader, Verdict, build_scenario, copy_times, ledger_key, publish,
                                 split_repeats, start_worker, stop_all)
from workers import TEST_WEBHOOK_SECRET, service_env

pytestmark = pytest.mark.integration

HOLD_SECONDS = 2.5  # longer than the old 2 s window


class FreezingWebhook:
    """Answers every POST with 200 and records (time, Idempotency-Key); on the first one it
    SIGSTOPs the process group ``freeze_pgid`` before answering."""

    def __init__(self) -> None:
        self.copies: list[tuple[float, str]] = []
        self.freeze_pgid: int | None = None
        self.frozen = threading.Event()
        self.lock = threading.Lock()
        hook = self

        class H(BaseHTTPRequestHandler):
            def do_POST(self):  # noqa: N802
                self.rfile.read(int(self.headers.get("Content-Length") or 0))
                with hook.lock:
                    hook.copies.append((time.time(), self.headers.get("Idempotency-Key")))
                    if hook.freeze_pgid is not None and not hook.frozen.is_set():
                        os.killpg(hook.freeze_pgid, signal.SIGSTOP)
                        hook.frozen.set()
                self.send_response(200)
                self.end_headers()

            def log_message(self, *a):
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), H)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}/hook"
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def keys(self) -> list[str]:
        with self.lock:
            return [k for _, k in self.copies]

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()


def test_answered_version_off_the_ledger_is_sent_again_after_a_sigkill(kafka_bootstrap, tmp_path):
    bs = kafka_bootstrap
    prefix = f"ifr{uuid.uuid4().hex[:8]}"
    topics = make_topics(bs, prefix)
    sc = build_scenario(6, 31, id_prefix="IFR")
    hook = FreezingWebhook()
    ledger = LedgerReader(bs, topics["alert-deliveries"])
    workers: list = []
    try:
        env = service_env(topics, app_id=prefix, TICK_INTERVAL_SECONDS="2", WEBHOOK_URL=hook.url,
                          WEBHOOK_SECRET=TEST_WEBHOOK_SECRET, KAFKA_SESSION_TIMEOUT_SECONDS="6")
        w = start_worker(bs, env, tmp_path / "w0", workers)
        hook.freeze_pgid = w.proc.pid  # its own session: pgid == pid
        publish(bs, topics, sc.records)
        assert hook.frozen.wait(120), "no webhook delivery"
        time.sleep(HOLD_SECONDS)
        kill_at = time.time()
        w.kill()  # SIGKILL ends a stopped process too
        at_kill = ledger.snapshot()
        first_at, first_key = hook.copies[0]
        answered = set(hook.keys())
        # answered before the SIGKILL, never written to the ledger (the worker never read the answer)
        assert ledger_key(first_key) not in at_kill
        assert kill_at - first_at >= HOLD_SECONDS
        start_worker(bs, env, tmp_path / "w1", workers)
        deadline = time.monotonic() + 120
        while Counter(hook.keys())[first_key] < 2 and time.monotonic() < deadline:
            time.sleep(0.2)
        # any other repeat has arrived once every version answered before the SIGKILL is on
        # the ledger: a record is written only after its (second) request was answered
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            on = ledger.snapshot()
            if all(ledger_key(k) in on for k in answered):
                break
            time.sleep(0.2)
        copies = Counter(hook.keys())
        assert copies[first_key] == 2, f"the answered version should be sent again once: {copies[first_key]}"
        second_at = [t for t, k in hook.copies if k == first_key][1]
        assert second_at > kill_at
        after = ledger.snapshot()
        assert ledger_key(first_key) in after, "the new worker records it"

        repeats = sorted(k for k, n in copies.items() if n > 1)
        times = copy_times((k, t) for t, k in hook.copies)
        firsts = {k: ts[0] for k, ts in times.items()}
        seconds = {k: ts[1] for k, ts in times.items() if len(ts) > 1}
        v = Verdict([], 0, [], [], [], [], [], [], repeats, 0, len(copies), len(hook.copies))
        in_flight, unexplained = split_repeats(v, firsts, [kill_at], [at_kill], second_at=seconds)
        # every repeat was answered before the SIGKILL and off the ledger at it; no more than
        # the dispatcher's concurrency slots can hold answered versions awaiting the ledger
        assert not unexplained and first_key in in_flight, (in_flight, unexplained)
        assert set(repeats) <= answered and len(repeats) <= DEFAULT_CONCURRENCY
        # the 2 s window alone called this at-least-once repeat a bug
        _, by_window = split_repeats(v, firsts, [kill_at])
        assert first_key in by_window
        print(f"in-flight repeat: first copy {kill_at - first_at:.1f}s before the SIGKILL, off the ledger; "
              f"{len(repeats)} repeated of {len(answered)} answered before it")
    finally:
        ledger.close()
        stop_all(workers)
        hook.close()
        drop_topics(bs, topics)
