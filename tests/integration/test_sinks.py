"""Delivery sinks against real receivers on loopback.

(a) a real Alertmanager (Debian ``prometheus-alertmanager``, installed by
    ``deploy/local/install-debs.sh`` if missing, started per test on a free port);
(b) an aiohttp webhook receiver that fails its first attempts (HTTP 500, then a period of
    connection refused) and recovers: every alert version arrives exactly once, signed.
"""
from __future__ import annotations

import asyncio
import hashlib
import hmac
import json
import os
import shutil
import socket
import subprocess
import time
from datetime import datetime, timedelta, timezone
from pathlib import Path

import aiohttp
import pytest
from aiohttp import web

from alerts.lifecycle import AlertBook, LifecycleConfig, apply_action, apply_finding, tick
from alerts.routing import RouteSpec
from monitor.notify.sinks import (
    AlertmanagerSink,
    Backoff,
    DeliveryHooks,
    DeliveryKey,
    Dispatcher,
    InMemoryLedger,
    WebhookSink,
    should_deliver,
)
from schemas.alert import Alert, AlertAction
from schemas.findings import Evidence, Finding, FindingText, ProtocolRef

pytestmark = [pytest.mark.integration, pytest.mark.timeout(60)]

REPO = Path(__file__).resolve().parents[2]
AM_BIN = os.environ.get("ALERTMANAGER_BIN", "/usr/bin/prometheus-alertmanager")
PID = "MRN-SECRET-778899"
SECRET = b"webhook-test-secret"
UTC = timezone.utc

ROUTE = RouteSpec.model_validate({
    "id": "liver",
    "tiers": [{"name": "ward-nurse", "recipients": ["ward-nurse"],
               "escalate_after_minutes": {"critical": 5, "high": 10, "warning": 30}},
              {"name": "physician", "recipients": ["physician"],
               "escalate_after_minutes": {"critical": 5, "high": 10, "warning": 30}}],
    "failsafe": {"name": "coordinator", "recipients": ["coordinator"]},
})
CONFIG = LifecycleConfig(routes={"liver": ROUTE}, pseudonym_secret=b"pseudo-secret")


def _finding(rule: str, n: int, *, state: str = "present", severity: str | None = "high",
             at: datetime, key: str = "") -> Finding:
    return Finding(
        finding_id=f"{rule}-{key}-{n}", patient_id=PID, rule_id=rule, dedupe_key=key, state=state,
        severity=severity, grade=3,
        evidence=[Evidence(observation_id=f"obs-{n}", analyte="ALT", value=200.0 + n, unit="U/L",
                           limit=120.0, comparison=">")],
        protocol=ProtocolRef(id="sma-oa", version="1.2.0"), effective_at=at, evaluated_at=at, route="liver",
        text=FindingText(what="ALT above 3x ULN", why="possible AAV liver injury", action="repeat LFTs, call MD"),
        ward="PICU", care_team="neuro-picu",
    )


def _scenario() -> list[Alert]:
    """A realistic stream of alert versions for one patient (opens, updates, escalation, ack, resolve)."""
    b = AlertBook(patient_id=PID)
    t0 = datetime.now(UTC).replace(microsecond=0)
    out: list[Alert] = []
    out += apply_finding(b, _finding("liver.alt_increased", 1, at=t0), t0, CONFIG)
    out += apply_finding(b, _finding("liver.alt_increased", 2, at=t0 + timedelta(minutes=1)),
                         t0 + timedelta(minutes=1), CONFIG)
    out += apply_finding(b, _finding("vitals.temp_high", 1, severity="warning", at=t0), t0, CONFIG)
    out += tick(b, t0 + timedelta(minutes=10), CONFIG)
    alt = b.open_alert_for("liver.alt_increased")
    out += apply_action(b, AlertAction(action="acknowledge", alert_id=alt.alert_id, by="nurse:amy", role="nurse",
                                       at=t0 + timedelta(minutes=11)), t0 + timedelta(minutes=11), CONFIG)
    out += apply_finding(b, _finding("vitals.temp_high", 2, state="cleared", at=t0 + timedelta(minutes=12)),
                         t0 + timedelta(minutes=12), CONFIG)
    out += apply_finding(b, _finding("liver.ggt", 1, severity="critical", at=t0), t0, CONFIG)
    return out


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


# ------------------------------------------------------------------ (a) Alertmanager


class Alertmanager:
    """A real Alertmanager process on a free loopback port. ``stop()`` then ``start()`` is a
    restart (Alertmanager keeps no alerts across one); config, data directory and log stay."""

    def __init__(self, tmp: Path, config: str):
        self.cfg = tmp / "am.yml"
        self.cfg.write_text(config)
        self.data = tmp / "am-data"
        self.log_path = tmp / "am.log"
        self.port = _free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.proc: subprocess.Popen | None = None
        self._log = None

    def start(self, timeout: float = 20.0) -> None:
        import urllib.request

        self._log = open(self.log_path, "ab")
        self.proc = subprocess.Popen(
            [AM_BIN, f"--config.file={self.cfg}", f"--storage.path={self.data}",
             f"--web.listen-address=127.0.0.1:{self.port}", "--cluster.listen-address=", "--log.level=warn"],
            stdout=self._log, stderr=subprocess.STDOUT)
        deadline = time.monotonic() + timeout
        while True:
            if self.proc.poll() is not None:
                raise RuntimeError(f"alertmanager exited: {self.tail()}")
            try:
                with urllib.request.urlopen(f"{self.url}/-/ready", timeout=1) as r:
                    if r.status == 200:
                        return
            except OSError:
                pass
            if time.monotonic() > deadline:
                raise TimeoutError(f"alertmanager not ready within {timeout:.0f} s: {self.tail()}")
            time.sleep(0.1)

    def tail(self) -> str:
        return self.log_path.read_text(errors="replace")[-2000:] if self.log_path.exists() else ""

    def stop(self) -> None:
        if self.proc is not None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout=5)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(timeout=5)
            self.proc = None
        if self._log is not None:
            self._log.close()
            self._log = None

    def alerts(self) -> list[dict]:
        import urllib.request

        with urllib.request.urlopen(f"{self.url}/api/v2/alerts", timeout=2) as r:
            return json.loads(r.read())


@pytest.fixture
def alertmanager(tmp_path):
    if not os.path.exists(AM_BIN):
        if shutil.which("apt-get") is None:
            pytest.skip("prometheus-alertmanager missing and no apt-get")
        res = subprocess.run([str(REPO / "deploy/local/install-debs.sh"), "prometheus-alertmanager"],
                             capture_output=True, text=True, timeout=600)
        if res.returncode != 0 or not os.path.exists(AM_BIN):
            pytest.skip(f"could not install prometheus-alertmanager: {res.stderr[-500:]}")
    am = Alertmanager(tmp_path, 'route:\n  receiver: "null"\n  group_wait: 1h\nreceivers:\n  - name: "null"\n')
    try:
        am.start()
        yield am.url
    finally:
        am.stop()


async def _am_alerts(url: str) -> tuple[str, list[dict]]:
    async with aiohttp.ClientSession() as s:
        async with s.get(f"{url}/api/v2/alerts") as r:
            assert r.status == 200
            raw = await r.text()
    return raw, json.loads(raw)


async def test_alertmanager_receives_push_without_patient_identifiers(alertmanager):
    versions = _scenario()
    sink = AlertmanagerSink(alertmanager)
    delivered: list[tuple[str, int]] = []
    d = Dispatcher([sink], InMemoryLedger(), backoff=Backoff(base=0.05, max_delay=0.5),
                   hooks=DeliveryHooks(on_delivered=lambda s, a, n, lat: delivered.append((a.alert_id, a.version))))
    await d.start()
    try:
        for v in versions:
            d.enqueue(v)
        await d.join(timeout=20)
    finally:
        await d.stop()
    # paging policy: only notify versions and status transitions went to Alertmanager
    assert sorted(delivered) == sorted((v.alert_id, v.version) for v in versions if should_deliver(sink, v))
    assert len(delivered) < len(versions)

    raw, active = await _am_alerts(alertmanager)
    assert PID not in raw and "MRN" not in raw
    latest = {v.alert_id: v for v in versions}
    by_ref = {a["labels"]["alert_ref"]: a for a in active}
    alt = next(v for v in latest.values() if v.rule_id == "liver.alt_increased")
    temp = next(v for v in latest.values() if v.rule_id == "vitals.temp_high")
    ggt = next(v for v in latest.values() if v.rule_id == "liver.ggt")
    assert set(by_ref) == {alt.pseudonym, ggt.pseudonym}  # the resolved one is not active
    got = by_ref[alt.pseudonym]
    assert got["labels"] == {"alertname": "liver.alt_increased", "rule_id": "liver.alt_increased",
                             "severity": "high", "escalation_tier": "1", "team": "neuro-picu",
                             "alert_ref": alt.pseudonym}
    assert got["status"]["state"] == "active"
    assert got["annotations"]["status"] == "acknowledged"
    assert got["annotations"]["escalation_level"] == "1"
    # a non-identifying summary always (issue 14); the nurse text only when configured
    assert got["annotations"]["summary"].startswith(f"high liver.alt_increased alert {alt.pseudonym}")
    assert alt.text.what not in raw and alt.text.why not in raw
    assert by_ref[ggt.pseudonym]["labels"]["severity"] == "critical"
    assert temp.pseudonym not in raw or all(a["labels"]["alert_ref"] != temp.pseudonym for a in active)


async def test_alertmanager_resolve_severity_change_and_opt_in_fields(alertmanager):
    b = AlertBook(patient_id=PID)
    t0 = datetime.now(UTC).replace(microsecond=0)
    sink = AlertmanagerSink(alertmanager, include_text=True, include_patient_id=True, name="am-full")
    try:
        opened = apply_finding(b, _finding("liver.ast_increased", 1, severity="warning", at=t0), t0, CONFIG)[0]
        await sink.deliver(opened)
        raised = apply_finding(b, _finding("liver.ast_increased", 2, severity="critical", at=t0), t0, CONFIG)[0]
        await sink.deliver(raised)
        raw, active = await _am_alerts(alertmanager)
        mine = [a for a in active if a["labels"]["alert_ref"] == opened.pseudonym]
        # the earlier (warning) label set was ended, only the critical one is active
        assert [a["labels"]["severity"] for a in mine] == ["critical"]
        assert mine[0]["labels"]["patient_id"] == PID  # opt-in only
        assert mine[0]["annotations"]["summary"] == "ALT above 3x ULN"
        cleared = apply_finding(b, _finding("liver.ast_increased", 3, state="cleared", at=t0 + timedelta(seconds=1)),
                                t0 + timedelta(seconds=1), CONFIG)[0]
        await sink.deliver(cleared)
        raw, active = await _am_alerts(alertmanager)
        assert opened.pseudonym not in raw
    finally:
        await sink.close()


# ------------------------------------------------------------------ (b) webhook


class FlakyReceiver:
    """Loopback webhook receiver: 500 for the first ``fail_first`` requests, then 200."""

    def __init__(self, port: int, fail_first: int = 0):
        self.port = port
        self.fail_first = fail_first
        self.requests = 0
        self.received: list[tuple[str, dict, float]] = []  # (idempotency key, body, monotonic time)
        self.bad_signatures = 0
        self.runner: web.AppRunner | None = None
        self.first_500s = asyncio.Event()

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}/hook"

    async def handle(self, request: web.Request) -> web.Response:
        self.requests += 1
        body = await request.read()
        if self.requests <= self.fail_first:
            if self.requests == self.fail_first:
                self.first_500s.set()
            return web.Response(status=500, text="boom")
        ts, key = request.headers.get("X-Signature-Timestamp", ""), request.headers.get("Idempotency-Key", "")
        expected = hmac.new(SECRET, f"{ts}.{key}.".encode() + body, hashlib.sha256).hexdigest()
        if not (ts.isdigit() and abs(time.time() - int(ts)) <= 300
                and hmac.compare_digest(expected, request.headers.get("X-Signature-SHA256", ""))):
            self.bad_signatures += 1
            return web.Response(status=401)
        self.received.append((request.headers["Idempotency-Key"], json.loads(body), time.monotonic()))
        return web.json_response({"ok": True})

    async def start(self) -> None:
        app = web.Application()
        app.router.add_post("/hook", self.handle)
        self.runner = web.AppRunner(app)
        await self.runner.setup()
        await web.TCPSite(self.runner, "127.0.0.1", self.port, reuse_address=True).start()

    async def stop(self) -> None:
        if self.runner is not None:
            await self.runner.cleanup()
            self.runner = None


async def test_webhook_receiver_that_fails_first_gets_every_version_exactly_once():
    port = _free_port()
    recv = FlakyReceiver(port, fail_first=5)
    versions = _scenario()
    failures: list[str] = []
    attempts: list[int] = []
    latencies: list[float] = []
    hooks = DeliveryHooks(
        on_attempt=lambda s, a, n: attempts.append(n),
        on_failure=lambda s, a, n, exc, retry: failures.append(f"{type(exc).__name__}:{getattr(exc, 'status', None)}"),
        on_delivered=lambda s, a, n, lat: latencies.append(lat),
    )
    ledger = InMemoryLedger()
    # paging=False: an inbox/audit webhook that gets every version
    sink = WebhookSink(recv.url, SECRET, paging=False, timeout=2.0)
    d = Dispatcher([sink], ledger, hooks=hooks, backoff=Backoff(base=0.05, factor=2.0, max_delay=0.4, jitter=0.1))
    await recv.start()
    await d.start()
    try:
        t_enqueue = time.monotonic()
        for v in versions:
            assert d.enqueue(v) == 1  # returns immediately
        assert time.monotonic() - t_enqueue < 0.05
        await asyncio.wait_for(recv.first_500s.wait(), 10)
        # then the receiver goes away entirely: connection refused for a while
        await recv.stop()
        await asyncio.sleep(1.0)
        assert d.pending_count() > 0  # nothing dropped while the receiver is down
        refused_before = sum(1 for f in failures if f.endswith(":None"))
        recv.fail_first = 0
        await recv.start()
        await d.join(timeout=30)
        # replays (restart / rebalance) of already delivered versions are ignored
        for v in versions:
            assert d.enqueue(v) == 0
        await asyncio.sleep(0.3)
    finally:
        await d.stop()
        await recv.stop()

    keys = [k for k, _, _ in recv.received]
    assert len(keys) == len(set(keys)), "a version was delivered twice"
    assert set(keys) == {v.idempotency_key for v in versions}
    assert recv.bad_signatures == 0
    assert any(f == "DeliveryError:500" for f in failures)
    assert refused_before > 0, failures  # connection refused period was exercised
    for _, body, _ in recv.received:
        assert "patient_id" not in body
        assert PID not in json.dumps(body)
    # versions of one alert arrive in order
    order: dict[str, list[int]] = {}
    for _, body, _ in recv.received:
        order.setdefault(body["alert_id"], []).append(body["version"])
    assert all(vs == sorted(vs) for vs in order.values())
    assert d.pending_count() == 0 and len(ledger) == len(versions)

    # a restarted dispatcher with the same (persistent) ledger sends nothing again
    recv2 = FlakyReceiver(port)
    await recv2.start()
    d2 = Dispatcher([WebhookSink(recv2.url, SECRET, paging=False)], ledger)
    await d2.start()
    try:
        assert sum(d2.enqueue(v) for v in versions) == 0
        await asyncio.sleep(0.2)
    finally:
        await d2.stop()
        await recv2.stop()
    assert recv2.received == []
    print(f"\nflaky webhook: {len(versions)} versions, {len(attempts)} attempts, {len(failures)} failures, "
          f"max enqueue->delivery {max(latencies):.3f}s")


async def test_time_from_finding_to_first_delivery():
    recv = FlakyReceiver(_free_port())
    await recv.start()
    latencies: list[float] = []
    sink = WebhookSink(recv.url, SECRET)
    d = Dispatcher([sink], InMemoryLedger(), hooks=DeliveryHooks(on_delivered=lambda s, a, n, lat: latencies.append(lat)))
    await d.start()
    samples: list[float] = []
    try:
        # warm the connection pool once, then measure
        for i in range(21):
            b = AlertBook(patient_id=f"{PID}-{i}")
            now = datetime.now(UTC)
            f = _finding("liver.alt_increased", i, at=now).model_copy(update={"patient_id": b.patient_id})
            t0 = time.monotonic()
            out = apply_finding(b, f, now, CONFIG)
            for a in out:
                d.enqueue(a)
            n = len(recv.received)
            while len(recv.received) == n:
                await asyncio.sleep(0.0005)
            if i:
                samples.append(recv.received[-1][2] - t0)
    finally:
        await d.stop()
        await recv.stop()
    samples.sort()
    p50, p95 = samples[len(samples) // 2], samples[int(len(samples) * 0.95) - 1]
    print(f"\nfinding -> first webhook delivery (loopback): p50 {p50 * 1000:.1f} ms, p95 {p95 * 1000:.1f} ms, "
          f"max {samples[-1] * 1000:.1f} ms; enqueue->delivered hook p50 {sorted(latencies)[len(latencies) // 2] * 1000:.1f} ms")
    assert samples[-1] < 1.0


async def test_paging_policy_and_ledger_keys():
    versions = _scenario()
    sink = WebhookSink("http://127.0.0.1:9/never", SECRET)  # paging sink
    d = Dispatcher([sink], InMemoryLedger())  # not started: enqueue still returns at once
    queued = sum(d.enqueue(v) for v in versions)
    assert queued == sum(1 for v in versions if v.notify or v.status_changed)
    assert len(d.pending()) == queued  # kept, not dropped
    # the same version twice is queued once
    assert d.enqueue(versions[0]) == 0
    assert DeliveryKey("webhook", "a", 3).as_str() == "webhook|a|3"
    assert all(Backoff(base=1, max_delay=5, jitter=0.2).delay(n) <= 5 for n in range(1, 30))
    await d.stop()
