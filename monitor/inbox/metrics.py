"""Prometheus metrics of the nurse inbox (``monitor inbox serve --metrics-port``).

Each inbox app has its own registry (:class:`InboxMetrics`), served on a SEPARATE port
(``INBOX_METRICS_PORT``, bound to ``INBOX_METRICS_HOST``, default 127.0.0.1), never on the
user-facing port: the figures carry no patient data, but the inbox port faces every browser
behind the ingress, and login-failure or alert counts are nobody's business there. The MLLP
listener does the same (``MLLP_METRICS_PORT``). Prometheus scrapes it as job
``sma-monitor-inbox``.

Labels are bounded: the route TEMPLATE (``/alerts/{alert_id}``, never the path), the method
(GET, HEAD, POST, other), the HTTP status, the login outcome, the action kind and outcome, the
topic name, the alert severity. Never a user name, patient, alert id or ward.
"""
from __future__ import annotations

import time
from typing import Any

from aiohttp import web
from prometheus_client import CollectorRegistry, Counter, Histogram, Info
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily

from schemas.findings import SEVERITY_ORDER

__all__ = ["InboxMetrics", "METRICS_KEY", "metrics_middleware", "metrics_app", "LOGIN_OUTCOMES"]

#: outcomes of a sign-in attempt
LOGIN_OUTCOMES = ("succeeded", "failed", "throttled", "busy", "expired_form")
_METHODS = {"GET", "HEAD", "POST"}
_SEVERITIES = tuple(s.value for s in reversed(SEVERITY_ORDER))  # most urgent first


class _StateCollector:
    """Store and consumer state read at scrape time (the metrics server runs in the inbox's
    own event loop, so the store is never read while it changes)."""

    def __init__(self, owner: "InboxMetrics"):
        self.owner = owner

    def collect(self):
        o = self.owner
        store, status = o.store, o.status
        held = GaugeMetricFamily("monitor_inbox_alerts_held", "Alerts (latest versions) held by the inbox's store")
        open_ = GaugeMetricFamily("monitor_inbox_alerts_open", "Open alerts in the inbox's store, by severity (all wards)",
                                  labels=["severity"])
        patients = GaugeMetricFamily("monitor_inbox_patients", "Patients known to the inbox's store")
        invalid = CounterMetricFamily("monitor_inbox_invalid_records", "Records the inbox could not read (skipped)")
        caught = GaugeMetricFamily("monitor_inbox_caught_up",
                                   "1 once the inbox's consumer has read its topics to the end at least once (ready)")
        fetch = GaugeMetricFamily("monitor_inbox_last_fetch_timestamp_seconds",
                                  "Unix time of the oldest partition's last fetch answered by the broker (0: none yet)")
        record = GaugeMetricFamily("monitor_inbox_last_record_timestamp_seconds",
                                   "Unix time the inbox last consumed a record (0: none yet)")
        clients = GaugeMetricFamily("monitor_inbox_live_clients", "Open live-update streams (server-sent events)")
        sessions = GaugeMetricFamily("monitor_inbox_sessions", "Signed-in sessions held in memory")
        by_sev = {s: 0 for s in _SEVERITIES}
        if store is not None:
            for a in store.alerts.values():
                if a.is_open:
                    by_sev[a.severity.value] = by_sev.get(a.severity.value, 0) + 1
            held.add_metric([], len(store.alerts))
            patients.add_metric([], len(store.patients))
            invalid.add_metric([], store.counts.get("invalid", 0))
        else:
            held.add_metric([], 0)
            patients.add_metric([], 0)
            invalid.add_metric([], 0)
        for sev, n in by_sev.items():
            open_.add_metric([sev], n)
        st = status or {}
        caught.add_metric([], 1 if st.get("caught_up") else 0)
        fetch.add_metric([], float(st.get("last_fetch_at") or 0))
        record.add_metric([], float(st.get("last_record_at") or 0))
        clients.add_metric([], sum((o.streams or {}).values()))
        sessions.add_metric([], len(o.sessions) if o.sessions is not None else 0)
        yield from (held, open_, patients, invalid, caught, fetch, record, clients, sessions)


class InboxMetrics:
    """One inbox app's metrics and registry."""

    def __init__(self) -> None:
        self.registry = r = CollectorRegistry(auto_describe=True)
        self.store: Any = None
        self.status: dict | None = None
        self.sessions: Any = None
        self.streams: dict | None = None
        self.requests = Counter("monitor_inbox_http_requests_total",
                                "HTTP requests answered by the inbox, by route template, method and status",
                                ["route", "method", "status"], registry=r)
        self.latency = Histogram("monitor_inbox_http_request_seconds",
                                 "Time to answer an inbox request, by route template (the live stream excluded)",
                                 ["route"], buckets=(0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10),
                                 registry=r)
        self.logins = Counter("monitor_inbox_logins_total",
                              "Sign-in attempts by outcome (succeeded, failed, throttled, busy, expired_form)",
                              ["outcome"], registry=r)
        self.actions = Counter("monitor_inbox_actions_total",
                               "Alert actions submitted in the inbox, by action and outcome (sent, refused, failed)",
                               ["action", "outcome"], registry=r)
        self.records = Counter("monitor_inbox_records_consumed_total", "Records consumed into the inbox's store, by topic",
                               ["topic"], registry=r)
        self.consumer_errors = Counter("monitor_inbox_consumer_errors_total",
                                       "Errors of the inbox's Kafka consumer (it retries)", registry=r)
        self.build = Info("monitor_build", "Build version", registry=r)
        try:
            from ..ops import build_version

            self.build.info({"version": build_version(), "component": "inbox"})
        except Exception:  # pragma: no cover - never stop the inbox for a version string
            self.build.info({"version": "unknown", "component": "inbox"})
        for outcome in LOGIN_OUTCOMES:  # every outcome exists from the start (rates need a first sample)
            self.logins.labels(outcome=outcome)
        r.register(_StateCollector(self))

    def bind(self, *, store: Any, status: dict, sessions: Any, streams: dict) -> None:
        self.store, self.status, self.sessions, self.streams = store, status, sessions, streams

    def login(self, outcome: str) -> None:
        self.logins.labels(outcome=outcome).inc()

    def action(self, action: str, outcome: str) -> None:
        self.actions.labels(action=action, outcome=outcome).inc()

    def exposition(self) -> bytes:
        from prometheus_client import generate_latest

        return generate_latest(self.registry)


METRICS_KEY = web.AppKey("inbox_metrics", InboxMetrics)


def _route(request: web.Request) -> str:
    mi = request.match_info
    if getattr(mi, "http_exception", None) is not None:
        return "unmatched"
    try:
        return mi.route.resource.canonical if mi.route.resource is not None else "unmatched"
    except AttributeError:
        return "unmatched"


@web.middleware
async def metrics_middleware(request: web.Request, handler):
    """Outermost: counts every answer, also the ones middlewares or handlers raise."""
    metrics: InboxMetrics | None = request.app.get(METRICS_KEY)
    start = time.perf_counter()
    status = 500
    try:
        resp = await handler(request)
        status = resp.status
        return resp
    except web.HTTPException as exc:
        status = exc.status
        raise
    finally:
        if metrics is not None:
            route = _route(request)
            method = request.method if request.method in _METHODS else "other"
            metrics.requests.labels(route=route, method=method, status=str(status)).inc()
            if route != "/api/stream":
                metrics.latency.labels(route=route).observe(time.perf_counter() - start)


def metrics_app(metrics: InboxMetrics) -> web.Application:
    """The metrics port: ``GET /metrics`` only."""
    from prometheus_client import CONTENT_TYPE_LATEST

    async def handle(request: web.Request) -> web.Response:
        return web.Response(body=metrics.exposition(), headers={"Content-Type": CONTENT_TYPE_LATEST})

    app = web.Application()
    app.router.add_get("/metrics", handle)
    return app
