"""The nurse inbox app: aiohttp beside the worker, fed by its own group-less aiokafka consumer.

``monitor inbox`` (``main``) serves it; ``monitor inbox hash-password`` prints a password hash.

Environment (besides the worker's ``Settings``):

* ``INBOX_USERS_FILE``: users (JSON or YAML) with scrypt password hashes; required.
* ``INBOX_HOST`` / ``INBOX_PORT``: where to listen (default ``WEB_HOST`` / 6067).
* ``INBOX_SECRET``: key of the opaque patient references in URLs (HMAC of the patient id);
  random per process when unset (references then change on restart).
* ``INBOX_SECURE_COOKIES``: ``auto`` (Secure when the request came over https), ``true``, ``false``.
* ``INBOX_TRUST_PROXY``: ``true`` to honour ``X-Forwarded-Proto`` / ``X-Forwarded-For``.
* ``INBOX_TLS_CERT`` / ``INBOX_TLS_KEY``: serve https directly.
* ``INBOX_SESSION_IDLE_MINUTES`` (30) / ``INBOX_SESSION_MAX_HOURS`` (12).
* ``INBOX_METRICS_PORT`` (0 = off) / ``INBOX_METRICS_HOST`` (127.0.0.1): Prometheus metrics on a
  port of their own (:mod:`monitor.inbox.metrics`), never on the user-facing one.

Probes: ``/healthz`` (liveness: the process answers) and ``/readyz`` (503 until the consumer has
read its topics to the end once, so a restarted inbox is not shown to nurses half-filled).
"""
from __future__ import annotations

import argparse
import asyncio
import getpass
import logging
import os
import secrets
import sys
import time
from pathlib import Path
from typing import Awaitable, Callable

from aiohttp import web

from schemas.alert import AlertAction

from ..settings import Settings, is_loopback
from .auth import (
    AUTH_KEY, AuthConfig, LoginThrottle, ReloadingUserDirectory, SessionStore, UserDirectory, auth_middleware,
    hash_password, load_users,
    security_headers_middleware,
)
from .metrics import METRICS_KEY, InboxMetrics, metrics_app, metrics_middleware
from .store import InboxStore
from .views import PUBLISH_KEY, STATUS_KEY, STORE_KEY, add_routes

log = logging.getLogger("monitor.inbox")
STATIC_DIR = Path(__file__).resolve().parent / "static"
BRIDGE_KEY = web.AppKey("inbox_bridge", object)


class KafkaBridge:
    """Consumes alerts, observations and treatments from the beginning (no consumer group) into the
    store; publishes actions to ``alert-actions`` (acks=all, idempotent, key = patient id)."""

    def __init__(self, settings: Settings, store: InboxStore, status: dict, metrics: InboxMetrics | None = None):
        self.settings = settings
        self.store = store
        self.status = status
        self.metrics = metrics
        self.consumer = None
        self.producer = None
        self._task: asyncio.Task | None = None

    async def start(self) -> None:
        from aiokafka import AIOKafkaConsumer, AIOKafkaProducer

        from ..kafka_config import aiokafka_config

        s = self.settings
        cfg = aiokafka_config(s)
        self.producer = AIOKafkaProducer(acks="all", enable_idempotence=True, linger_ms=0,
                                         request_timeout_ms=15000, **cfg)
        await self.producer.start()
        self.consumer = AIOKafkaConsumer(
            s.topic_alerts, s.topic_observations, s.topic_treatments, s.topic_patients, group_id=None,
            auto_offset_reset="earliest", enable_auto_commit=False, metadata_max_age_ms=10_000,
            max_partition_fetch_bytes=s.max_message_bytes, fetch_max_bytes=max(s.max_message_bytes, 52_428_800),
            **cfg)
        await self.consumer.start()
        self._task = asyncio.create_task(self._run(), name="inbox-consumer")

    async def _run(self) -> None:
        s, store = self.settings, self.store
        handlers = {s.topic_alerts: store.apply_alert_bytes, s.topic_observations: store.apply_observation_bytes,
                    s.topic_treatments: store.apply_treatment_bytes, s.topic_patients: store.apply_patient_bytes}
        while True:
            try:
                batch = await self.consumer.getmany(timeout_ms=500, max_records=5000)
            except asyncio.CancelledError:
                raise
            except Exception as exc:  # keep serving what we have; retry
                log.warning("inbox consumer error: %s", type(exc).__name__)
                self.status["consumer_errors"] = self.status.get("consumer_errors", 0) + 1
                if self.metrics is not None:
                    self.metrics.consumer_errors.inc()
                await asyncio.sleep(1.0)
                continue
            self._note_fetch()
            if not batch:
                self.status["caught_up"] = True
                continue
            # alerts last: a patient's dose and observations land before the alert that rests on them
            for tp in sorted(batch, key=lambda tp: tp.topic == s.topic_alerts):
                h = handlers.get(tp.topic)
                for msg in batch[tp]:
                    if tp.topic == s.topic_observations and msg.headers:
                        continue  # a treatment or action routed into the patient stream (read at its source)
                    try:
                        h(msg.value)
                    except Exception:  # never let one bad record stop the view
                        store.counts["invalid"] += 1
            self.status["records"] = self.status.get("records", 0) + sum(len(v) for v in batch.values())
            self.status["last_record_at"] = time.time()
            if self.metrics is not None:
                for tp, msgs in batch.items():
                    self.metrics.records.labels(topic=tp.topic).inc(len(msgs))
            await asyncio.sleep(0)

    def _note_fetch(self) -> None:
        """``last_fetch_at``: when the broker last answered a fetch for the LEAST recently
        fetched partition (aiokafka's ``last_poll_timestamp``); stays put while the broker is
        unreachable, so the store's staleness is visible (metric and rule InboxStoreStale)."""
        try:
            stamps = [self.consumer.last_poll_timestamp(tp) for tp in self.consumer.assignment()]
        except Exception:  # pragma: no cover - an assignment changing under us
            return
        if stamps and all(t is not None for t in stamps):
            self.status["last_fetch_at"] = min(stamps) / 1000.0

    async def publish_action(self, action: AlertAction) -> None:
        key = (action.patient_id or "").encode("utf-8") or None
        await self.producer.send_and_wait(self.settings.topic_alert_actions, key=key,
                                          value=action.model_dump_json().encode("utf-8"))

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            try:
                await self._task
            except (asyncio.CancelledError, Exception):
                pass
        from ..kafka_batch import stop_clients

        await stop_clients(self.consumer, self.producer)


def _env_bool(name: str, default: bool | None) -> bool | None:
    v = os.environ.get(name, "").strip().lower()
    if v in ("1", "true", "yes", "on"):
        return True
    if v in ("0", "false", "no", "off"):
        return False
    return default


async def create_inbox_app(settings: Settings, *, users: UserDirectory | None = None,
                           store: InboxStore | None = None,
                           publish: Callable[[AlertAction], Awaitable[None]] | None = None,
                           secret: bytes | str | None = None, secure_cookies: bool | None = None,
                           trust_proxy: bool | None = None, sessions: SessionStore | None = None,
                           throttle: LoginThrottle | None = None, start_kafka: bool = True,
                           metrics_host: str = "127.0.0.1", metrics_port: int = 0) -> web.Application:
    """Build the inbox application.

    ``start_kafka=False`` (tests) skips the Kafka bridge; pass ``store`` and ``publish`` instead.
    ``metrics_port`` (0: none) serves ``/metrics`` on ``metrics_host`` beside the app.
    Without ``publish`` the app publishes through its own aiokafka producer.
    """
    if users is None:
        path = os.environ.get("INBOX_USERS_FILE")
        users = ReloadingUserDirectory(path) if path else load_users()
    if secret is None:
        secret = os.environ.get("INBOX_SECRET") or secrets.token_bytes(32)
    secret_b = secret.encode("utf-8") if isinstance(secret, str) else secret
    store = store if store is not None else InboxStore(secret_b)
    if sessions is None:
        sessions = SessionStore(idle_seconds=float(os.environ.get("INBOX_SESSION_IDLE_MINUTES", "30")) * 60,
                                max_seconds=float(os.environ.get("INBOX_SESSION_MAX_HOURS", "12")) * 3600)
    proxies = tuple(x for x in os.environ.get("INBOX_TRUSTED_PROXIES", "").split(",") if x.strip())
    cfg = AuthConfig(users=users, sessions=sessions, throttle=throttle or LoginThrottle(),
                     secure_cookies=secure_cookies if secure_cookies is not None
                     else _env_bool("INBOX_SECURE_COOKIES", None),
                     trust_proxy=trust_proxy if trust_proxy is not None
                     else bool(_env_bool("INBOX_TRUST_PROXY", False)) or bool(proxies),
                     trusted_proxies=proxies)
    app = web.Application(middlewares=[metrics_middleware, security_headers_middleware, auth_middleware],
                          client_max_size=64 * 1024)
    app[AUTH_KEY] = cfg
    metrics = InboxMetrics()
    app[METRICS_KEY] = metrics
    from .views import STREAMS_KEY, VERIFY_KEY, verify_slots

    app[VERIFY_KEY] = verify_slots()
    app[STREAMS_KEY] = {}
    app[STORE_KEY] = store
    status: dict = {"caught_up": not start_kafka}
    app[STATUS_KEY] = status
    metrics.bind(store=store, status=status, sessions=sessions, streams=app[STREAMS_KEY])
    bridge = KafkaBridge(settings, store, status, metrics) if start_kafka else None
    app[BRIDGE_KEY] = bridge

    async def _publish_via_bridge(action: AlertAction) -> None:
        if bridge is None:
            raise RuntimeError("no Kafka producer")
        await bridge.publish_action(action)

    app[PUBLISH_KEY] = publish or _publish_via_bridge

    async def kafka_ctx(app: web.Application):
        if bridge is not None:
            await bridge.start()
        yield
        if bridge is not None:
            await bridge.stop()

    async def close_streams(app: web.Application) -> None:
        store.publish({"type": "shutdown"})

    app.cleanup_ctx.append(kafka_ctx)
    app.on_shutdown.append(close_streams)
    if metrics_port:
        async def metrics_ctx(app: web.Application):
            runner = web.AppRunner(metrics_app(metrics), access_log=None)
            await runner.setup()
            await web.TCPSite(runner, metrics_host, metrics_port).start()
            log.info("inbox: metrics on %s:%d/metrics", metrics_host, metrics_port)
            yield
            await runner.cleanup()

        app.cleanup_ctx.append(metrics_ctx)
    add_routes(app, str(STATIC_DIR))
    return app


# --------------------------------------------------------------------------- command line


def _cmd_hash(args: argparse.Namespace) -> int:
    if args.password_stdin or not sys.stdin.isatty():
        pw = sys.stdin.readline().rstrip("\r\n")
    else:
        pw = getpass.getpass("Password: ")
        if pw != getpass.getpass("Again: "):
            print("passwords differ", file=sys.stderr)
            return 1
    if len(pw) < 8:
        print("password too short (at least 8 characters)", file=sys.stderr)
        return 1
    print(hash_password(pw))
    return 0


def _cmd_serve(args: argparse.Namespace) -> int:
    from ..settings import get_settings

    logging.basicConfig(level=os.environ.get("LOG_LEVEL", "INFO"))
    s = get_settings()
    from ..settings import require_secrets

    require_secrets("inbox", s)
    if args.users_file:
        os.environ["INBOX_USERS_FILE"] = args.users_file
    try:
        path = os.environ.get("INBOX_USERS_FILE", "")
        if not path:
            raise ValueError("no users file: set INBOX_USERS_FILE")
        users = ReloadingUserDirectory(path)  # re-read on change: removed users lose their sessions
    except (OSError, ValueError) as exc:
        print(f"inbox: cannot load users: {exc}", file=sys.stderr)
        return 2
    host = args.host or os.environ.get("INBOX_HOST") or s.web_host
    port = args.port or int(os.environ.get("INBOX_PORT", "6067"))
    ssl_ctx = None
    cert, key = os.environ.get("INBOX_TLS_CERT"), os.environ.get("INBOX_TLS_KEY")
    if cert:
        import ssl

        ssl_ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
        ssl_ctx.load_cert_chain(cert, key)
    secure = _env_bool("INBOX_SECURE_COOKIES", None)
    if not is_loopback(host):
        # exposed: TLS here, or a TLS-terminating proxy (then cookies are Secure/__Host- and HSTS is sent)
        if not cert and secure is not True:
            print(f"inbox: refusing to listen on {host} without TLS: set INBOX_TLS_CERT/INBOX_TLS_KEY, or "
                  "INBOX_SECURE_COOKIES=true (and INBOX_TRUSTED_PROXIES) behind a TLS proxy", file=sys.stderr)
            return 2
        secure = True if secure is None else secure
    if cert and secure is None:
        secure = True
    metrics_port = args.metrics_port if args.metrics_port is not None else int(os.environ.get("INBOX_METRICS_PORT") or 0)
    metrics_host = args.metrics_host or os.environ.get("INBOX_METRICS_HOST") or "127.0.0.1"
    web.run_app(create_inbox_app(s, users=users, secure_cookies=secure, metrics_host=metrics_host,
                                 metrics_port=metrics_port), host=host, port=port, ssl_context=ssl_ctx,
                print=lambda m: log.info("%s", m), access_log=None)
    return 0


def main(argv: list[str] | None = None) -> int:
    """``monitor inbox [serve] [--host H] [--port P] [--users-file F]`` | ``monitor inbox hash-password``."""
    p = argparse.ArgumentParser(prog="monitor inbox", description="Nurse web inbox")
    sub = p.add_subparsers(dest="cmd")
    sp = sub.add_parser("serve", help="serve the inbox (default)")
    hp = sub.add_parser("hash-password", help="print an scrypt hash for a password (read from the terminal or stdin)")
    hp.add_argument("--password-stdin", action="store_true",
                    help="read the password from standard input instead of the terminal (default: off)")
    for q, d in ((p, None), (sp, argparse.SUPPRESS)):
        q.add_argument("--host", default=d, help="address to bind (env INBOX_HOST; default: WEB_HOST, 127.0.0.1)")
        q.add_argument("--port", type=int, default=d, help="port to bind (env INBOX_PORT; default: 6067)")
        q.add_argument("--users-file", default=d,
                       help="YAML users file with scrypt hashes and roles (env INBOX_USERS_FILE; default: none, "
                            "required)")
        q.add_argument("--metrics-port", type=int, default=d,
                       help="serve Prometheus metrics on this port, apart from the user-facing one "
                            "(env INBOX_METRICS_PORT; default: 0 = off)")
        q.add_argument("--metrics-host", default=d,
                       help="address of the metrics endpoint (env INBOX_METRICS_HOST; default: 127.0.0.1)")
    args = p.parse_args(argv if argv is not None else sys.argv[1:])
    if args.cmd == "hash-password":
        return _cmd_hash(args)
    return _cmd_serve(args)


if __name__ == "__main__":  # pragma: no cover
    raise SystemExit(main())
