"""A real HTTP webhook receiver on loopback for integration tests (threaded, stdlib)."""
from __future__ import annotations

import hashlib
import hmac
import json
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer


class WebhookReceiver:
    """Records every POST; can refuse the first ``fail_first`` requests with HTTP 503, and
    answer each request ``delay`` seconds after it arrived (a slow receiver: deliveries stay
    in flight)."""

    def __init__(self, secret: str = "", fail_first: int = 0, delay: float = 0.0) -> None:
        self.secret = secret.encode()
        self.fail_first = fail_first
        self.delay = delay
        self.received: list[dict] = []
        self.attempts = 0
        self.lock = threading.Lock()
        receiver = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self):  # noqa: N802
                body = self.rfile.read(int(self.headers.get("Content-Length") or 0))
                if receiver.delay:
                    time.sleep(receiver.delay)
                with receiver.lock:
                    receiver.attempts += 1
                    if receiver.attempts <= receiver.fail_first:
                        self.send_response(503)
                        self.end_headers()
                        return
                    sig_ok = None
                    if receiver.secret:
                        # what a receiver checks: HMAC over timestamp, idempotency key and body,
                        # and a fresh timestamp (written out here, not imported from the sink)
                        ts = self.headers.get("X-Signature-Timestamp") or ""
                        key = self.headers.get("Idempotency-Key") or ""
                        want = hmac.new(receiver.secret, f"{ts}.{key}.".encode() + body, hashlib.sha256).hexdigest()
                        got = (self.headers.get("X-Signature-SHA256") or "").removeprefix("sha256=")
                        sig_ok = (ts.isdigit() and abs(time.time() - int(ts)) <= 300
                                  and hmac.compare_digest(want, got))
                    receiver.received.append({
                        "at": time.time(),
                        "key": self.headers.get("Idempotency-Key"),
                        "body": json.loads(body or b"null"),
                        "signature_ok": sig_ok,
                        "raw": body,
                    })
                self.send_response(200)
                self.end_headers()

            def log_message(self, *args):
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}/hook"
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)

    def __enter__(self) -> "WebhookReceiver":
        self.thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self.server.shutdown()
        self.server.server_close()

    def keys(self) -> list[str]:
        with self.lock:
            return [r["key"] for r in self.received]
